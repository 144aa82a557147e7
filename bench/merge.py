"""Merging N checkpoints: `megascope merge --method sma` vs mergekit's linear merge, on the same weights, one run.

    python bench/merge.py [--checkpoints 10] [--preset 125m] [--repeats 5] [--mergekit PATH] [--json]

Inputs: N checkpoints of one model (default the 125m preset, 85M parameters, 341 MB of fp32 weights each)
saved in our format by our Checkpointer (model tensors; weights drawn once, then moved a little per step, as
consecutive checkpoints of a run are), and the same checkpoints exported to Hugging Face format
(`megascope ckpt export`'s code path) for mergekit. Training a 125m model for ten checkpoints is out of reach
of a 2-core CPU machine; merging does not care where the numbers came from.

- megascope: `megascope merge --method sma --last N --progress none` on our checkpoints: streamed tensor by
  tensor, every block of every input checked against its CRC, the output fsynced and published atomically.
- mergekit: `mergekit-yaml` with `merge_method: linear`, weight 1 per model and `normalize: true` (the mean),
  `dtype: float32`, on the HF copies, with `--no-copy-tokenizer` (there is no tokenizer). mergekit is not a
  megascope dependency: install it in its own environment (`python -m venv /tmp/mk-venv &&
  /tmp/mk-venv/bin/pip install mergekit "torch==2.13.0+cpu"`) and pass `--mergekit /tmp/mk-venv/bin/mergekit-yaml`
  (default: `mergekit-yaml` on PATH). Without it, the baseline is a plain "load everything, average, save"
  script (`--baseline naive`), and the table says so.

Figures: wall time of the whole command (process start to exit, imports included: that is what a user waits
for), median of --repeats runs, the two tools interleaved; peak RSS of the command's process (ru_maxrss, taken
through a small launcher so that this script's own memory is not inherited; it counts file-backed pages a tool
has mapped, as both tools map their inputs); and the largest absolute difference between the two outputs over
every tensor (names mapped to HF's). Before the timed runs the freshly written inputs are flushed (`sync`)
and each tool runs once untimed, and just before every timed run the tool's inputs are read through (this
machine reclaims idle page cache within seconds), so every timed run reads its inputs from a warm page cache;
before every run the previous run's output is flushed, so that no run pays for another's write-back
(megascope fsyncs its own output before it exits, mergekit does not). The machine's load average is printed
with the figures: on a shared 2-core machine other work widens the spread.

With --json the last stdout line is one object:
`{"megascope": {"wall_s", "peak_rss_mb"}, "mergekit": {...}, "max_abs_diff", ...}` (the baseline's key is
"naive" when mergekit is not there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megascope.engine.checkpoint import Checkpointer
from megascope.engine.checkpoint.hf_export import export, hf_name
from megascope.engine.config import TrainConfig
from megascope.engine.model import Transformer, preset

# Runs ARGV in a child forked from this small process and prints its wall time, peak RSS and exit code. Forked
# here (not from the bench, which holds the models): Linux starts a child's peak-RSS count at its parent's RSS.
_LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "rc": os.waitstatus_to_exitcode(status)}))
"""

_NAIVE = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
inputs, out = sys.argv[1:-1], Path(sys.argv[-1])
models = [load_file(Path(d) / "model.safetensors") for d in inputs]
merged = {k: torch.stack([m[k].float() for m in models]).mean(0).to(models[0][k].dtype) for k in models[0]}
out.mkdir()
save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
"""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_inputs(root: Path, n: int, preset_name: str) -> list[int]:
    """N checkpoints in our format and their HF exports; returns the steps."""
    model_config = preset(preset_name)
    config = json.loads(TrainConfig(model=model_config, preset=preset_name).to_json())
    torch.manual_seed(0)
    state = {f"model/{k}": v for k, v in Transformer(model_config, kernels="torch").state_dict().items()}
    checkpointer = Checkpointer(root / "ckpt", keep_last=0)
    steps = [100 * (i + 1) for i in range(n)]
    for step in steps:
        with torch.no_grad():
            for tensor in state.values():
                tensor.add_(torch.randn_like(tensor), alpha=1e-3)
        checkpointer.save(step, state, {"step": step, "world_size": 1, "config": config})
        checkpointer.wait()
    checkpointer.close()
    del state
    for step in steps:
        export(root / "ckpt" / f"step_{step:08d}", root / f"hf_{step}")
    return steps


def measure(command: list[str]) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        raise SystemExit(f"launcher failed: {result.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    if figures["rc"] != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... exited {figures['rc']}:\n{result.stderr[-3000:]}")
    return figures


def mergekit_config(root: Path, steps: list[int]) -> Path:
    lines = ["merge_method: linear", "dtype: float32", "parameters:", "  normalize: true", "models:"]
    for step in steps:
        lines += [f"  - model: {root / f'hf_{step}'}", "    parameters:", "      weight: 1.0"]
    path = root / "mergekit.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def max_abs_diff(ours: Path, theirs: Path) -> float:
    """Largest |a - b| over every tensor of our merged checkpoint and the baseline's HF output."""
    step_dir = ours / (ours / "latest").read_text().strip()
    files = sorted(theirs.glob("*.safetensors"))
    found: dict[str, Path] = {}
    for file in files:
        with safe_open(file, "pt") as f:
            found.update(dict.fromkeys(f.keys(), file))
    worst = 0.0
    seen = 0
    with safe_open(step_dir / "rank0.safetensors", "pt") as f:
        for name in f.keys():  # noqa: SIM118  # safe_open is not a mapping
            target = hf_name(name)
            if target is None or target not in found:
                raise SystemExit(f"{name} ({target}) is missing from the baseline's output")
            with safe_open(found[target], "pt") as g:
                worst = max(worst, (f.get_tensor(name).double() - g.get_tensor(target).double()).abs().max().item())
            seen += 1
    if seen != len(found):
        raise SystemExit(f"the outputs hold different tensors ({seen} vs {len(found)})")
    return worst


def read_through(files: list[Path]) -> None:
    """Read ``files`` whole (into the page cache; the bytes are dropped)."""
    buffer = bytearray(8 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    walls = [r["wall_s"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs]
    return {"wall_s": statistics.median(walls), "peak_rss_mb": statistics.median(rss),
            "wall_s_runs": walls, "peak_rss_mb_runs": rss}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mergekit", help="path to mergekit-yaml (default: on PATH)")
    parser.add_argument("--baseline", choices=["mergekit", "naive"], default="mergekit")
    parser.add_argument("--root", help="work directory (default: a temporary one, removed at the end)")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()

    mergekit = args.mergekit or shutil.which("mergekit-yaml")
    baseline = "mergekit" if args.baseline == "mergekit" and mergekit else "naive"
    if args.baseline == "mergekit" and not mergekit:
        log("mergekit-yaml not found (pass --mergekit PATH): comparing with a plain load-average-save script")
    root = Path(args.root or tempfile.mkdtemp(prefix="megascope-merge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        log(f"writing {args.checkpoints} checkpoints of the {args.preset} preset and their HF exports to {root}")
        steps = make_inputs(root, args.checkpoints, args.preset)
        input_bytes = sum(f.stat().st_size for f in (root / "ckpt").rglob("*.safetensors"))
        ours_cmd = [sys.executable, "-m", "megascope.agent.cli", "merge", "--ckpt-dir", str(root / "ckpt"),
                    "--method", "sma", "--last", str(len(steps)), "--progress", "none", "--out"]  # fmt: skip
        if baseline == "mergekit":
            assert mergekit is not None
            config = mergekit_config(root, steps)
            theirs_cmd = [mergekit, str(config), "--no-copy-tokenizer", "--quiet", "--no-write-model-card"]
        else:
            theirs_cmd = [sys.executable, "-c", _NAIVE, *(str(root / f"hf_{s}") for s in steps)]
        runs: dict[str, list[dict[str, float]]] = {"megascope": [], baseline: []}
        inputs = {"megascope": sorted((root / "ckpt").rglob("*.safetensors")),
                  baseline: sorted(root.glob("hf_*/*.safetensors"))}  # fmt: skip
        # The inputs were just written: flush them (the kernel would write them back during the timed runs,
        # stalling both tools' reads and our output's fsync), then one untimed run of each warms the page cache.
        os.sync()
        for tool, command in (("megascope", ours_cmd), (baseline, theirs_cmd)):
            warm = measure([*command, str(root / f"warm_{tool}")])
            log(f"  warm-up:  {tool:<9} {warm['wall_s']:6.2f} s  {warm['peak_rss_mb']:7.0f} MB (not counted)")
            shutil.rmtree(root / f"warm_{tool}")
        os.sync()
        load_before = os.getloadavg()[0]
        for repeat in range(args.repeats):
            order = ("megascope", baseline) if repeat % 2 == 0 else (baseline, "megascope")
            for tool in order:
                out = root / f"out_{tool}"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # the previous run's unsynced output (mergekit does not fsync) is not this run's to flush
                # This machine reclaims idle page cache within seconds: read the tool's inputs again just before
                # it runs, or a run reads from disk what the other tool's run let go cold.
                read_through(inputs[tool])
                figures = measure([*(ours_cmd if tool == "megascope" else theirs_cmd), str(out)])
                runs[tool].append(figures)
                log(f"  repeat {repeat + 1}: {tool:<9} {figures['wall_s']:6.2f} s  {figures['peak_rss_mb']:7.0f} MB")
        load_after = os.getloadavg()[0]
        diff = max_abs_diff(root / "out_megascope", root / f"out_{baseline}")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    ours, theirs = summarize(runs["megascope"]), summarize(runs[baseline])
    speedup = theirs["wall_s"] / ours["wall_s"]
    memory = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
    print(f"\nmerge of {len(steps)} checkpoints, {args.preset} preset ({input_bytes / 1e9:.2f} GB of inputs), "
          f"SMA, median of {args.repeats}; load average {load_before:.1f} -> {load_after:.1f} (2 cores)")  # fmt: skip
    print(f"\n{'tool':<28}{'wall s':>9}{'peak RSS MB':>14}   runs (wall s)")
    label = "mergekit linear" if baseline == "mergekit" else "naive load-average-save"
    for name, figures in (("megascope merge --method sma", ours), (label, theirs)):
        spread = ", ".join(f"{w:.2f}" for w in figures["wall_s_runs"])
        print(f"{name:<28}{figures['wall_s']:>9.2f}{figures['peak_rss_mb']:>14.0f}   {spread}")
    print(f"\nspeed-up: {speedup:.2f}x (goal >= 3x)   memory: {memory:.2f} of the baseline's (goal <= 0.5)   "
          f"max |difference|: {diff:.3g} (fp32 rounding: ~1e-7 relative)")  # fmt: skip
    if args.json:
        print(json.dumps({"megascope": ours, baseline: theirs, "max_abs_diff": diff, "speedup": speedup,
                          "memory_ratio": memory, "checkpoints": len(steps), "preset": args.preset,
                          "input_bytes": input_bytes, "load_average": [load_before, load_after]}))  # fmt: skip


if __name__ == "__main__":
    main()
