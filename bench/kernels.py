"""The fused Triton kernels against PyTorch, side by side in one run on one GPU (issue 8, Performance).

    python bench/kernels.py [--quick] [--json] [--skip-e2e] [--e2e-tokens 8192] [--e2e-steps 10]
    python bench/kernels.py --smoke        # no GPU: run every kernel once under Triton's CPU interpreter

1. Variable-length causal attention over a packed batch with ~50% average padding (document lengths uniform
   in [1, max_len]) vs scaled_dot_product_attention on the padded batch, vs SDPA on the packed batch with a
   block-diagonal causal mask, and vs FlashAttention's varlen kernel where one is available
   (torch.nn.attention.varlen.varlen_attn, or the flash_attn package). Goals: >= 3x padded SDPA, within
   1.3x of the best available (forward + backward).
2. Fused residual add + RMSNorm / LayerNorm, SwiGLU and bias + GELU vs eager PyTorch and vs torch.compile of
   the same reference. Goal: >= 2x eager.
3. Tile-wise sparse matmul (SC20) at 50/75/90% sparsity vs dense torch.matmul. Goal: >= 1.5x at 75%.
4. End to end: tokens/s and MFU of training steps of the 1b preset (one GPU, bf16 autocast, fused AdamW)
   with kernels="triton" vs kernels="torch", in this process (model-level, no data loader or DDP).

Times are medians of CUDA-event-timed repeats after warm-up; every Triton result is also checked against
the reference (max abs difference printed). Without a GPU the script says so and exits 0 with no figures.
The table goes to stdout; with --json the last stdout line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

GOALS = {"attention_vs_padded": 3.0, "attention_vs_best": 1.3, "fused_vs_eager": 2.0, "tile_sparse_75": 1.5}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``fn`` on the GPU, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(fn: Callable[..., Any], inputs: list[torch.Tensor]) -> Callable[[], object]:
    """A closure running ``fn(*inputs)`` and the backward of all its outputs w.r.t. ``inputs``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    probe = fn(*leaves)
    outs = list(probe) if isinstance(probe, tuple) else [probe]
    upstream = [torch.randn_like(o) for o in outs]

    def run() -> object:
        result = fn(*leaves)
        outs = list(result) if isinstance(result, tuple) else [result]
        return torch.autograd.grad(outs, leaves, upstream)

    return run


def max_diff(a: torch.Tensor | tuple[torch.Tensor, ...], b: torch.Tensor | tuple[torch.Tensor, ...]) -> float:
    a_list = list(a) if isinstance(a, tuple) else [a]
    b_list = list(b) if isinstance(b, tuple) else [b]
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a_list, b_list, strict=True))


# --- 1. attention --------------------------------------------------------------------------------------


def _best_varlen_baseline() -> tuple[str, Callable[..., torch.Tensor]] | None:
    """FlashAttention's varlen kernel, from the flash_attn package or from torch, whichever imports."""
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

        def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, m: int) -> torch.Tensor:
            out: torch.Tensor = flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)
            return out

        return "flash_attn.flash_attn_varlen_func", flash
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, m: int) -> torch.Tensor:
            out = varlen_attn(q, k, v, cu, cu, m, m, window_size=(-1, 0), enable_gqa=True)
            assert isinstance(out, torch.Tensor)  # a tuple only when asked for the log-sum-exp
            return out

        return "torch.nn.attention.varlen.varlen_attn (FlashAttention)", torch_varlen
    except ImportError:
        return None


def _with_bounds(
    fn: Callable[..., torch.Tensor], cu: torch.Tensor, max_len: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    return fn(q, k, v, cu, max_len)


def bench_attention(docs: int, max_len: int, n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, Any]:
    from megascope.kernels import varlen_attention

    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    lengths = torch.randint(1, max_len + 1, (docs,)).tolist()
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(total, n_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(total, n_kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(total, n_kv_heads, head_dim, device=device, dtype=dtype)
    result: dict[str, Any] = {
        "docs": docs,
        "max_len": max_len,
        "tokens": total,
        "padding": 1 - total / (docs * max_len),
        "heads": n_heads,
        "kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "ms": {},
    }

    # The same tokens, right-padded to (docs, heads, max_len, head_dim): causal attention needs no padding mask
    # for the real rows (padding only ever follows them), so is_causal alone is the strongest padded baseline.
    token_doc = torch.repeat_interleave(torch.arange(docs, device=device), torch.tensor(lengths, device=device))
    token_pos = torch.arange(total, device=device) - cu[:-1].long()[token_doc]

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(docs, max_len, x.shape[1], head_dim)
        out[token_doc, token_pos] = x
        return out.transpose(1, 2)

    def sdpa_padded(qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)

    same_doc = token_doc[:, None] == token_doc[None, :]
    block_diagonal = same_doc & torch.ones(total, total, dtype=torch.bool, device=device).tril()

    def sdpa_packed(q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q1, k1, v1, attn_mask=block_diagonal, enable_gqa=True)

    def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return varlen_attention(q, k, v, cu, max_len, kernels="triton")

    result["max_abs_diff_vs_reference"] = max_diff(
        ours(q, k, v), varlen_attention(q, k, v, cu, max_len, kernels="torch")
    )
    candidates: dict[str, tuple[Callable[..., Any], list[torch.Tensor]]] = {
        "triton varlen": (ours, [q, k, v]),
        "sdpa padded": (sdpa_padded, [padded(q), padded(k), padded(v)]),
        "sdpa packed block-diagonal": (sdpa_packed, [t.transpose(0, 1)[None] for t in (q, k, v)]),
    }
    best = _best_varlen_baseline()
    if best is not None:
        name, fn = best
        candidates[name] = (functools.partial(_with_bounds, fn, cu, max_len), [q, k, v])
    for name, (fn, inputs) in candidates.items():
        try:
            forward = time_ms(functools.partial(fn, *inputs))
            both = time_ms(fwd_bwd(fn, inputs))
            result["ms"][name] = {"forward": forward, "forward_backward": both}
        except (RuntimeError, torch.OutOfMemoryError) as error:  # e.g. the T x T mask does not fit
            result["ms"][name] = {"error": str(error).splitlines()[0][:200]}
        torch.cuda.empty_cache()
    ms = result["ms"]
    if "error" in ms["triton varlen"]:
        return result
    ours_ms = ms["triton varlen"]["forward_backward"]
    if "forward_backward" in ms["sdpa padded"]:
        result["speedup_vs_padded_sdpa"] = ms["sdpa padded"]["forward_backward"] / ours_ms
    best_name = best[0] if best is not None and "forward_backward" in ms[best[0]] else "sdpa packed block-diagonal"
    if "forward_backward" in ms[best_name]:
        result["best_available"] = best_name
        result["ratio_to_best_available"] = ours_ms / ms[best_name]["forward_backward"]
    return result


# --- 2. fused norms and activations --------------------------------------------------------------------


def bench_fused(tokens: int, dim: int, ffn_dim: int) -> dict[str, Any]:
    from megascope.kernels import activations, norms

    torch.manual_seed(0)
    device = torch.device("cuda")
    bf16, fp32 = torch.bfloat16, torch.float32
    # Dtypes as in the model under bf16 autocast: bf16 sublayer outputs, an fp32 residual stream and weights.
    x = torch.randn(tokens, dim, device=device, dtype=bf16)
    residual = torch.randn(tokens, dim, device=device, dtype=fp32)
    weight, bias = torch.randn(dim, device=device), torch.randn(dim, device=device)
    gate, up = (torch.randn(tokens, ffn_dim, device=device, dtype=bf16) for _ in range(2))
    h, b_up = torch.randn(tokens, ffn_dim, device=device, dtype=bf16), torch.randn(ffn_dim, device=device, dtype=bf16)

    def rms(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, kernels: str) -> tuple[torch.Tensor, torch.Tensor]:
        return norms.add_rms_norm(x, r, w, 1e-5, kernels=kernels)

    def ln(
        x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kernels: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return norms.add_layer_norm(x, r, w, b, 1e-5, kernels=kernels)

    def sw(g: torch.Tensor, u: torch.Tensor, kernels: str) -> torch.Tensor:
        return activations.swiglu(g, u, kernels=kernels)

    def gelu(x: torch.Tensor, b: torch.Tensor, kernels: str) -> torch.Tensor:
        return activations.bias_gelu(x, b, kernels=kernels)

    cases: dict[str, tuple[Callable[..., Any], list[torch.Tensor]]] = {
        "add_rms_norm": (rms, [x, residual, weight]),
        "add_layer_norm": (ln, [x, residual, weight, bias]),
        "swiglu": (sw, [gate, up]),
        "bias_gelu": (gelu, [h, b_up]),
    }
    result: dict[str, Any] = {"tokens": tokens, "dim": dim, "ffn_dim": ffn_dim}
    for name, (fn, inputs) in cases.items():
        eager = functools.partial(fn, kernels="torch")
        variants: dict[str, Callable[..., Any]] = {
            "triton": functools.partial(fn, kernels="triton"),
            "eager": eager,
            "torch.compile": torch.compile(eager),
        }
        entry: dict[str, Any] = {"max_abs_diff_vs_reference": max_diff(variants["triton"](*inputs), eager(*inputs))}
        for variant, f in variants.items():
            entry[variant] = {
                "forward": time_ms(functools.partial(f, *inputs)),
                "forward_backward": time_ms(fwd_bwd(f, inputs)),
            }
        entry["speedup_vs_eager"] = entry["eager"]["forward_backward"] / entry["triton"]["forward_backward"]
        entry["speedup_vs_compile"] = entry["torch.compile"]["forward_backward"] / entry["triton"]["forward_backward"]
        result[name] = entry
    return result


# --- 3. tile-wise sparse matmul ------------------------------------------------------------------------


def bench_tile_sparse(tokens: int, in_features: int, out_features: int, tile_n: int) -> dict[str, Any]:
    from megascope.kernels import tile_prune, tile_sparse_matmul

    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    dense_weight = torch.randn(out_features, in_features, device=device, dtype=dtype)
    dense_ms = time_ms(lambda: x @ dense_weight.T)
    dense_bwd_ms = time_ms(fwd_bwd(lambda x: x @ dense_weight.T, [x]))
    result: dict[str, Any] = {
        "tokens": tokens,
        "in_features": in_features,
        "out_features": out_features,
        "tile_n": tile_n,
        "dense_ms": {"forward": dense_ms, "forward_backward_x": dense_bwd_ms},
    }
    for sparsity in (0.5, 0.75, 0.9):
        pruned = tile_prune(dense_weight, sparsity, tile_n=tile_n)
        diff = max_diff(tile_sparse_matmul(x, pruned, kernels="triton"), x @ pruned.to_dense().T)
        sparse = functools.partial(tile_sparse_matmul, weight=pruned, kernels="triton")
        forward = time_ms(functools.partial(sparse, x))
        both = time_ms(fwd_bwd(sparse, [x]))
        result[f"{round(sparsity * 100)}%"] = {
            "sparsity": pruned.sparsity,
            "max_abs_diff_vs_dense_pruned": diff,
            "forward_ms": forward,
            "forward_backward_x_ms": both,
            "speedup": dense_ms / forward,
            "speedup_forward_backward_x": dense_bwd_ms / both,
        }
    return result


# --- 4. end to end -------------------------------------------------------------------------------------


def bench_end_to_end(preset_name: str, tokens: int, steps: int) -> dict[str, Any]:
    from megascope.engine.mfu import device_peak
    from megascope.engine.model import Transformer, cross_entropy, preset

    device = torch.device("cuda")
    config = preset(preset_name)
    generator = torch.Generator().manual_seed(0)
    lengths: list[int] = []
    while sum(lengths) < tokens:  # documents of uniform length in [1, max_seq_len], the last one cut to fit
        lengths.append(
            min(int(torch.randint(1, config.max_seq_len + 1, (1,), generator=generator)), tokens - sum(lengths))
        )
    batch = torch.randint(0, config.vocab_size, (tokens,), generator=generator).to(device)
    targets = torch.roll(batch, -1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    peak = device_peak(device, low_precision=True)
    flops = config.flops_per_step(lengths)
    result: dict[str, Any] = {"preset": preset_name, "tokens_per_step": tokens, "steps": steps}
    for kernels in ("triton", "torch"):
        torch.manual_seed(0)
        model = Transformer(config, kernels=kernels).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(model: Transformer = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            # As the trainer's step, minus data loading and DDP; no .item(), so the GPU is never waited on.
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = cross_entropy(model(batch, cu, max(lengths)), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        result[kernels] = {
            "step_ms": seconds * 1e3,
            "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / peak.flops_per_second if peak else None,
        }
        del model, optimizer
        torch.cuda.empty_cache()
    result["speedup"] = result["torch"]["step_ms"] / result["triton"]["step_ms"]
    result["peak"] = peak.source if peak else None
    return result


# --- report --------------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def section(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``fn``'s figures, or its error: one failing section must not cost the others' figures."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # reported in the table and the JSON
        traceback.print_exc()
        torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {str(error)[:500]}"}


def _print_attention(case: dict[str, Any]) -> None:
    print(
        f"\nvarlen attention: {case['docs']} docs up to {case['max_len']} tokens ({case['padding']:.0%} padding), "
        f"{case['heads']}/{case['kv_heads']} heads, head_dim {case['head_dim']}, bf16; "
        f"max |diff| vs reference {case['max_abs_diff_vs_reference']:.2e}"
    )
    for name, ms in case["ms"].items():
        if "error" in ms:
            print(f"  {name:55s} failed: {ms['error']}")
        else:
            print(f"  {name:55s} fwd {ms['forward']:8.3f} ms   fwd+bwd {ms['forward_backward']:8.3f} ms")
    if "speedup_vs_padded_sdpa" in case:
        print(f"  speedup vs padded SDPA (fwd+bwd): {case['speedup_vs_padded_sdpa']:.2f}x "
              f"(goal >= {GOALS['attention_vs_padded']}x)")  # fmt: skip
    if "ratio_to_best_available" in case:
        print(f"  time / {case['best_available']}: {case['ratio_to_best_available']:.2f} "
              f"(goal <= {GOALS['attention_vs_best']})")  # fmt: skip


def _print_fused(fused: dict[str, Any]) -> None:
    print(f"\nfused ops: {fused['tokens']} tokens, dim {fused['dim']}, ffn {fused['ffn_dim']} (fwd+bwd ms)")
    for name in ("add_rms_norm", "add_layer_norm", "swiglu", "bias_gelu"):
        e = fused[name]
        print(
            f"  {name:15s} triton {e['triton']['forward_backward']:7.3f}  eager {e['eager']['forward_backward']:7.3f}  "
            f"compile {e['torch.compile']['forward_backward']:7.3f}  -> {e['speedup_vs_eager']:.2f}x eager, "
            f"{e['speedup_vs_compile']:.2f}x compile (goal >= {GOALS['fused_vs_eager']}x eager)"
        )


def _print_tile_sparse(ts: dict[str, Any]) -> None:
    print(f"\ntile-sparse matmul: ({ts['tokens']} x {ts['in_features']}) @ W.T, W {ts['out_features']} x "
          f"{ts['in_features']}, tile_n {ts['tile_n']}, bf16; dense {ts['dense_ms']['forward']:.3f} ms")  # fmt: skip
    for key in ("50%", "75%", "90%"):
        e = ts[key]
        print(f"  {key}: {e['forward_ms']:.3f} ms -> {e['speedup']:.2f}x dense "
              f"(fwd+bwd x: {e['speedup_forward_backward_x']:.2f}x)")  # fmt: skip
    print(f"  goal at 75%: >= {GOALS['tile_sparse_75']}x")


def _print_end_to_end(e2e: dict[str, Any]) -> None:
    print(f"\nend to end, preset {e2e['preset']}, {e2e['tokens_per_step']} tokens/step (peak: {e2e['peak']}):")
    for kernels in ("triton", "torch"):
        r = e2e[kernels]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"  --kernels {kernels:6s} {r['step_ms']:8.1f} ms/step  {r['tokens_per_s']:10,.0f} tokens/s  MFU {mfu}")
    print(f"  speedup: {e2e['speedup']:.2f}x")


def print_table(figures: dict[str, Any]) -> None:
    print(f"GPU: {figures['gpu']}, torch {figures['torch']}, triton {figures['triton']}")
    sections: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], None]]] = [
        *(("varlen attention", case, _print_attention) for case in figures["attention"]),
        ("fused ops", figures["fused"], _print_fused),
        ("tile-sparse matmul", figures["tile_sparse"], _print_tile_sparse),
    ]
    if "end_to_end" in figures:
        sections.append(("end to end", figures["end_to_end"], _print_end_to_end))
    for title, figures_of_section, show in sections:
        if "error" in figures_of_section:
            print(f"\n{title}: failed: {figures_of_section['error']}")
        else:
            show(figures_of_section)


def smoke() -> dict[str, Any]:
    """Every kernel once at tiny shapes under the interpreter, checked against its reference; no timings."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the first Triton path imports the kernels
    from megascope.kernels import (
        add_layer_norm,
        add_rms_norm,
        bias_gelu,
        swiglu,
        tile_prune,
        tile_sparse_matmul,
        varlen_attention,
    )

    torch.manual_seed(0)
    cu = torch.tensor([0, 1, 8, 41], dtype=torch.int32)
    q, k, v = torch.randn(41, 4, 64), torch.randn(41, 2, 64), torch.randn(41, 2, 64)
    x, r, w, b = torch.randn(7, 33), torch.randn(7, 33), torch.randn(33), torch.randn(33)
    pruned = tile_prune(torch.randn(40, 33), 0.75, tile_n=16)
    checks: dict[str, Callable[[str], Any]] = {
        "varlen_attention": lambda kernels: varlen_attention(q, k, v, cu, 33, kernels=kernels),
        "add_rms_norm": lambda kernels: add_rms_norm(x, r, w, kernels=kernels),
        "add_layer_norm": lambda kernels: add_layer_norm(x, r, w, b, kernels=kernels),
        "swiglu": lambda kernels: swiglu(x, r, kernels=kernels),
        "bias_gelu": lambda kernels: bias_gelu(x, b, kernels=kernels),
        "tile_sparse_matmul": lambda kernels: tile_sparse_matmul(x, pruned, kernels=kernels),
    }
    diffs = {}
    for name, run in checks.items():
        diffs[name] = max_diff(run("triton"), run("torch"))
        log(f"smoke: {name}: max |triton - torch| = {diffs[name]:.2e}")
        if not diffs[name] < 1e-4:
            raise SystemExit(f"smoke: {name} disagrees with its reference")
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and no end-to-end run")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end training comparison")
    parser.add_argument("--e2e-preset", default="1b", help="model preset for the end-to-end run (default: 1b)")
    parser.add_argument("--e2e-tokens", type=int, default=8192, help="tokens per training step (default: 8192)")
    parser.add_argument("--e2e-steps", type=int, default=10, help="timed training steps (default: 10)")
    parser.add_argument("--smoke", action="store_true", help="without a GPU: run each kernel once, interpreted")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        reason = "no CUDA GPU here (torch.cuda.is_available() is False): no figures; they need a GPU"
        if args.smoke:
            diffs = smoke()
            print(f"bench/kernels.py: {reason}. Interpreter smoke check passed for {len(diffs)} kernels.")
            if args.json:
                print(json.dumps({"gpu": None, "figures": None, "reason": reason, "smoke_max_abs_diff": diffs}))
        else:
            print(f"bench/kernels.py: {reason}. Run on a GPU, or with --smoke for an interpreter check.")
            if args.json:
                print(json.dumps({"gpu": None, "figures": None, "reason": reason}))
        return

    import triton

    figures: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "goals": GOALS,
    }
    docs, max_len = (8, 1024) if args.quick else (16, 2048)
    log("attention ...")
    figures["attention"] = [
        section(bench_attention, docs, max_len, n_heads=32, n_kv_heads=8, head_dim=64),  # the 1b preset's heads
        section(bench_attention, docs, max_len, n_heads=16, n_kv_heads=4, head_dim=128),
    ]
    log("fused norms and activations ...")
    figures["fused"] = section(bench_fused, 8192 if args.quick else 16384, 2048, 5632)
    log("tile-sparse matmul ...")
    figures["tile_sparse"] = section(bench_tile_sparse, 4096 if args.quick else 8192, 2048, 5632, tile_n=128)
    if not (args.quick or args.skip_e2e):
        log(f"end to end ({args.e2e_preset}) ...")
        figures["end_to_end"] = section(bench_end_to_end, args.e2e_preset, args.e2e_tokens, args.e2e_steps)
    print_table(figures)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
