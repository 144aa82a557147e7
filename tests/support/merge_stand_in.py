"""A stand-in for ``megascope merge`` that keeps its command-line and progress contract, with knobs for tests.

It "merges" by copying the newest input checkpoint (so the result is a real committed checkpoint), printing
``progress`` lines as it goes and a ``done`` line at the end. Environment knobs:

- ``STAND_IN_SECONDS``: how long the merge takes (default 0.2), spread over its progress lines;
- ``STAND_IN_IGNORE_SIGTERM=1``: ignore SIGTERM (a merge stuck in I/O), so only SIGKILL stops it;
- ``STAND_IN_FAIL=TEXT``: refuse with ``megascope merge: error: TEXT`` and exit code 2;
- ``STAND_IN_GARBAGE_BYTES=N``: first print a line of N bytes that is not JSON.

SIGTERM (when not ignored) stops it with exit code 130 and nothing published, as the real command does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

TENSORS = 10


def main() -> int:
    parser = argparse.ArgumentParser(prog="megascope merge")
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--weights", type=float, nargs="+")
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--progress", choices=["json"])
    args = parser.parse_args()
    if os.environ.get("STAND_IN_FAIL"):
        print(f"megascope merge: error: {os.environ['STAND_IN_FAIL']}", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"megascope merge: error: --out: {args.out} already exists", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("STAND_IN_IGNORE_SIGTERM") else _stop)
    print("x" * int(os.environ.get("STAND_IN_GARBAGE_BYTES", "0")), flush=True)

    staging = args.out.with_name(args.out.name + ".tmp")
    staging.mkdir()
    seconds = float(os.environ.get("STAND_IN_SECONDS", "0.2"))
    for done in range(TENSORS + 1):
        print(json.dumps({"event": "progress", "tensors_done": done, "tensors_total": TENSORS,
                          "bytes_done": done * 100, "bytes_total": TENSORS * 100}), flush=True)  # fmt: skip
        time.sleep(seconds / TENSORS)
    newest = f"step_{args.steps[-1]:08d}"
    shutil.copytree(args.ckpt_dir / newest, staging / newest)
    (staging / "latest").write_text(newest)
    staging.rename(args.out)
    losses = {str(step): 3.0 + 0.01 * i for i, step in enumerate(reversed(args.steps))}
    print(json.dumps({"event": "done", "out": str(args.out), "steps": args.steps, "method": args.method,
                      "weights": [1 / len(args.steps)] * len(args.steps),
                      "val_loss": 2.9 if args.eval else None,
                      "input_val_losses": losses if args.eval else {}}), flush=True)  # fmt: skip
    return 0


def _stop(signum: int, frame: object) -> None:
    # Nothing is published: remove the staging directory of a merge in progress.
    for staging in Path(sys.argv[sys.argv.index("--out") + 1]).parent.glob("*.tmp"):
        shutil.rmtree(staging, ignore_errors=True)
    sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
