"""Issue 17's probe: hostile inputs per area against a real agent and real checkpoints; a table of what held.

    python bench/probe.py [--areas wire,transport,checkpoints] [--json]

Every case is made by the probe itself (garbage bytes, forged ranks and pids, oversize requests, damaged
checkpoints, ...). A case is *handled* when megascope refused it clearly or recovered, lost nothing, and kept
serving. The table gives, per area, the cases tried, handled and failed; ``--json`` ends stdout with one JSON
object: ``{"areas": {area: {"tried", "handled", "failed"}}, "cases": [{"area", "name", "handled", "detail"}]}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import Case  # noqa: E402

AREAS = {"wire": "probe.wire", "transport": "probe.transport", "checkpoints": "probe.checkpoints"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--areas", default=",".join(AREAS), help=f"comma-separated, of: {', '.join(AREAS)}")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()
    cases: list[Case] = []
    for area in args.areas.split(","):
        if area not in AREAS:
            parser.error(f"unknown area {area!r}; expected some of {', '.join(AREAS)}")
        module = importlib.import_module(AREAS[area])
        with tempfile.TemporaryDirectory(prefix=f"probe-{area}-") as workdir:
            print(f"probing {area} ...", file=sys.stderr, flush=True)
            cases += module.run(Path(workdir))
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"tried": 0, "handled": 0, "failed": 0})
    for case in cases:
        totals[case.area]["tried"] += 1
        totals[case.area]["handled" if case.handled else "failed"] += 1
    print(f"{'area':<18} {'tried':>6} {'handled':>8} {'failed':>7}")
    for area, row in totals.items():
        print(f"{area:<18} {row['tried']:>6} {row['handled']:>8} {row['failed']:>7}")
    for case in cases:
        if not case.handled:
            print(f"FAILED {case.area}: {case.name}: {case.detail}")
    if args.json:
        print(json.dumps({"areas": totals, "cases": [vars(c) for c in cases]}))
    return 0 if all(c.handled for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
