"""The README's training figures: `megascope train` on the tiny preset, loss at the first and last step and
throughput, as the issue's acceptance command runs it.

    python bench/train_tiny.py [--ranks 2] [--steps 100] [--json]

Loss is the mean over ranks at a step; throughput is all ranks' tokens over the slowest rank's step time,
median over steps after the first (see megascope.engine.summary).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from megascope.engine.summary import summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "megascope.agent.cli", "train", "--nproc-per-node", str(args.ranks),
                   "--preset", "tiny", "--steps", str(args.steps), "--run-dir", tmp, "--log-every", "10"]  # fmt: skip
        print("$ megascope " + " ".join(command[3:]), file=sys.stderr)
        subprocess.run(command, check=True, stdout=sys.stderr)
        s = summarize(Path(tmp))
    print(f"\n{'figure':<34}{'value':>14}")
    print(f"{'loss at step 1 (mean of ranks)':<34}{s['first_loss']:>14.4f}")
    last_label = f"loss at step {s['steps']}"
    print(f"{last_label:<34}{s['last_loss']:>14.4f}")
    print(f"{'validation loss at the end':<34}{s['last_val_loss']:>14.4f}")
    print(f"{'throughput (tokens/s, median)':<34}{s['tokens_per_s']:>14,.0f}")
    if args.json:
        print(json.dumps(s))


if __name__ == "__main__":
    main()
