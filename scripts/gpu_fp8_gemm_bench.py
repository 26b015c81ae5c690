"""Block-FP8 projections of Llama-3.1-8B against bf16: us per call, weight GB/s, TFLOP/s and error.

    PYTHONPATH=. python scripts/gpu_fp8_gemm_bench.py --out results/fp8          # on the GPU
    PYTHONPATH=. python scripts/gpu_fp8_gemm_bench.py --out results/fp8 --sweep  # also sweep the tiles
    TRITON_INTERPRET=1 PYTHONPATH=. python scripts/gpu_fp8_gemm_bench.py --check # on a CPU: correctness

For each projection (tensor parallel 1) and M, the weight is quantised to 128 x 128 blocks and timed as
- `bf16 F.linear`: cuBLAS on the dequantised weight in bf16 (the baseline);
- `bf16 triton gemv` (M = 1): radixserve/layers/gemv.py on the same bf16 weight;
- `fp8 block_fp8_linear`: the Triton activation quantiser then the block GEMM (what a layer runs);
- `fp8 w8a8 gemm only`: the GEMM on an activation quantised beforehand;
- `fp8 cublas gemm only`: the same by cuBLAS (F.scaled_mm, 1x128 / 128x128 scales) where it fits;
- `fp8 gemv` (M = 1): the batch-1 kernel, bf16 activation.
Every call is captured in one CUDA graph over distinct weight copies (several hundred MB, beyond L2),
as a decode step issues them; the time is the median over replays of (replay time / calls). GB/s
counts the weight bytes read (fp8 values and block scales, or bf16), TFLOP/s 2*M*N*K. The error is
the largest |out - F.linear(x, dequant(w)) in fp32| over the outputs, absolute and relative to the
largest |reference|: the fp8 GEMM's includes the activation's rounding, the GEMV's does not.
--sweep also times every GEMM tile of GEMM_SWEEP (M buckets) and GEMV tile of GEMV_SWEEP and reports
the fastest, to fill GEMM_CONFIGS / GEMV defaults in radixserve/layers/quantization/fp8_kernels.py.
It prints `GEMM_CUBLAS_MIN_M m`: the least timed M from which cuBLAS's total over the projections beats
the Triton GEMM's at every timed M (0: nowhere), the value for fp8_kernels.GEMM_CUBLAS_MIN_M.
Writes fp8_gemm_bench.json and fp8_gemm_bench.md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from radixserve.layers.quantization import fp8_kernels as K
from radixserve.layers.quantization import fp8_utils as U

# (name, out_features N, in_features K) of one Llama-3.1-8B decoder layer
SHAPES = (("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
          ("down_proj", 4096, 14336))
MS = (1, 8, 32, 128, 1024, 4096)
BLOCK = (128, 128)
# (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages); a tile is tried where BLOCK_M <= max(16, 2 M)
GEMM_SWEEP = ((16, 32, 1, 4, 4), (16, 64, 1, 4, 4), (16, 128, 1, 4, 4), (32, 64, 1, 4, 4), (32, 128, 4, 4, 4),
              (64, 64, 8, 4, 4), (64, 128, 8, 4, 3), (64, 128, 8, 4, 4), (64, 256, 8, 8, 3),
              (128, 128, 8, 8, 3), (128, 128, 8, 4, 4), (128, 256, 8, 8, 3), (128, 64, 8, 4, 4))
# (BLOCK_N, BLOCK_K, num_warps, kernel) of the GEMV: the word kernel (integer decode) with its loads one
# step ahead ("words") or not ("words-np"), its pipelined loop of N stages ("pipeN": cp.async N - 1 steps
# ahead), and the byte kernel (Triton's fp8 cast; the default before 2026-12-07 was its 4 x 2048 w4)
GEMV_SWEEP = ((4, 1024, 4, "words"), (8, 512, 4, "words"), (8, 1024, 4, "words"), (8, 1024, 8, "words"),
              (16, 512, 4, "words"), (16, 512, 8, "words"), (16, 256, 4, "words"), (32, 256, 8, "words"),
              (4, 512, 4, "words"), (8, 256, 4, "words"), (8, 512, 4, "words-np"), (8, 1024, 4, "words-np"),
              (4, 2048, 4, "bytes"),
              (8, 1024, 8, "pipe3"), (8, 1024, 8, "pipe4"), (4, 1024, 4, "pipe3"), (4, 1024, 4, "pipe4"),
              (8, 512, 4, "pipe3"), (8, 512, 4, "pipe4"), (16, 512, 8, "pipe3"), (8, 1024, 4, "pipe2"),
              (4, 2048, 8, "pipe3"))


def gemv_form(form: str) -> tuple[bool, bool, int]:
    """A sweep form -> (words, prefetch, stages) for K._launch_gemv."""
    if form.startswith("pipe"):
        return True, False, int(form[len("pipe"):])
    return form.startswith("words"), form == "words", 0
WEIGHT_BYTES = 512 << 20  # bf16 copies per shape: far beyond L2 (50-60 MB)


def graph_time_us(calls: list[Callable[[], object]], reps: int) -> float:
    """Median over replays of one CUDA graph holding all calls, divided by the number of calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compile and warm outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    err = (out.float() - ref).abs().max().item()
    return err, err / max(ref.abs().max().item(), 1e-30)


def gemm_cfg(tile: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(("BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages"), tile, strict=True))


def try_time(calls: list[Callable[[], object]], reps: int) -> float:
    """graph_time_us, or NaN where the tile does not compile or fit (shared memory, registers)."""
    try:
        return graph_time_us(calls, reps)
    except Exception as exc:  # noqa: BLE001 - a tile that fails is reported, not fatal
        print(f"    failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        torch.cuda.synchronize()
        return float("nan")


def bench_shape(name: str, n: int, k: int, ms: tuple[int, ...], reps: int, sweep: bool) -> list[dict]:
    from radixserve.layers import gemv as bf16_gemv

    dev = torch.device("cuda")
    copies = max(2, math.ceil(WEIGHT_BYTES / (2 * n * k)))
    gen = torch.Generator(device=dev).manual_seed(n + k)
    fp8, bf16 = [], []
    for _ in range(copies):
        w = torch.randn(n, k, device=dev, generator=gen) / k**0.5
        q, s = U.quantize_weight_block(w, BLOCK)
        fp8.append((q, s))
        bf16.append(U.dequantize_block(q, s, BLOCK, torch.bfloat16))
        del w
    w_deq = U.dequantize_block(*fp8[0], BLOCK)  # fp32: the reference weight
    fp8_bytes = n * k + fp8[0][1].numel() * 4
    rows = []

    def row(m: int, method: str, us: float, nbytes: int, out: torch.Tensor | None, ref: torch.Tensor,
            **extra: object) -> None:
        err, rel = errors(out, ref) if out is not None else (float("nan"), float("nan"))
        rows.append(dict(shape=name, n=n, k=k, m=m, method=method, us=us, gbps=nbytes / us / 1e3,
                         tflops=2 * m * n * k / us / 1e6, max_abs_err=err, max_rel_err=rel, **extra))
        print(f"  {name:<13} M={m:<5} {method:<34} {us:9.2f} us {nbytes / us / 1e3:7.0f} GB/s "
              f"{2 * m * n * k / us / 1e6:7.1f} TFLOP/s  err {err:.3g} ({rel:.2%})", flush=True)

    def one_m(m: int) -> None:  # a function, so the timed lambdas close over its x, not a loop's
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        ref = F.linear(x.float(), w_deq)
        row(m, "bf16 F.linear", graph_time_us([lambda w=w: F.linear(x, w) for w in bf16], reps), 2 * n * k,
            F.linear(x, bf16[0]), ref)
        if m == 1:
            row(m, "bf16 triton gemv", graph_time_us([lambda w=w: bf16_gemv.gemv(x, w) for w in bf16], reps),
                2 * n * k, bf16_gemv.gemv(x, bf16[0]), ref)
        row(m, "fp8 block_fp8_linear",
            graph_time_us([lambda q=q, s=s: K.block_fp8_linear(x, q, s, BLOCK) for q, s in fp8], reps), fp8_bytes,
            K.block_fp8_linear(x, *fp8[0], BLOCK), ref, config=K.gemm_config(m))
        xq, xs = K.per_token_group_quant_fp8(x, BLOCK[1])
        gemm_out = K.w8a8_block_fp8_matmul(xq, xs, *fp8[0], BLOCK)
        row(m, "fp8 w8a8 gemm only",
            graph_time_us([lambda q=q, s=s: K.w8a8_block_fp8_matmul(xq, xs, q, s, BLOCK) for q, s in fp8], reps),
            fp8_bytes, gemm_out, ref)
        if K.cublas_block_fp8_fits(fp8[0][0], BLOCK):
            us = try_time([lambda q=q, s=s: K.cublas_block_fp8_matmul(xq, xs, q, s) for q, s in fp8], reps)
            out = K.cublas_block_fp8_matmul(xq, xs, *fp8[0]) if us == us else None
            row(m, "fp8 cublas gemm only", us, fp8_bytes, out, ref)
        if sweep:
            for tile in GEMM_SWEEP:
                if tile[0] > max(16, 2 * m):
                    continue
                cfg = gemm_cfg(tile)
                us = try_time([lambda q=q, s=s, c=cfg: K.w8a8_block_fp8_matmul(xq, xs, q, s, BLOCK, config=c)
                               for q, s in fp8], reps)
                out = K.w8a8_block_fp8_matmul(xq, xs, *fp8[0], BLOCK, config=cfg) if us == us else None
                row(m, "sweep gemm " + "x".join(map(str, tile)), us, fp8_bytes, out, ref, config=cfg)
        if m == 1:
            row(m, "fp8 gemv", graph_time_us([lambda q=q, s=s: K.fp8_gemv(x, q, s, BLOCK) for q, s in fp8], reps),
                fp8_bytes, K.fp8_gemv(x, *fp8[0], BLOCK), ref, tile=K.gemv_tile(k, BLOCK[0]))
            for bn, bk, warps, form in GEMV_SWEEP if sweep else ():
                words, ahead, stages = gemv_form(form)
                us = try_time([lambda q=q, s=s, t=(bn, bk), w=warps, f=words, a=ahead, st=stages:
                               K._launch_gemv(x, q, s, BLOCK, None, t, w, f, a, st) for q, s in fp8], reps)
                out = (K._launch_gemv(x, *fp8[0], BLOCK, None, (bn, bk), warps, words, ahead, stages)
                       if us == us else None)
                row(m, f"sweep gemv {form} {bn}x{bk} w{warps}", us, fp8_bytes, out, ref, tile=(bn, bk, warps))

    for m in ms:
        one_m(m)
    return rows  # the weight copies go with this frame


def best_tiles(rows: list[dict]) -> dict[str, str]:
    """The fastest swept tile per (shape, M)."""
    best: dict[str, str] = {}
    for key in sorted({(r["shape"], r["m"]) for r in rows}):
        swept = [r for r in rows if (r["shape"], r["m"]) == key and r["method"].startswith("sweep")
                 and r["us"] == r["us"]]
        for kind in ("sweep gemm", "sweep gemv"):
            cands = [r for r in swept if r["method"].startswith(kind)]
            if cands:
                top = min(cands, key=lambda r: r["us"])
                best[f"{key[0]} M={key[1]} {kind[6:]}"] = f"{top['method'][len(kind) + 1:]} ({top['us']:.2f} us)"
    return best


def best_gemv_overall(rows: list[dict]) -> str | None:
    """The swept GEMV form with the least total time over the projections timed at M = 1, as
    "BLOCK_N BLOCK_K num_warps form" (one default for fp8_kernels.py), or None without a GEMV sweep."""
    totals: dict[str, float] = {}
    for r in rows:
        if r["m"] == 1 and r["method"].startswith("sweep gemv "):
            totals[r["method"]] = totals.get(r["method"], 0.0) + r["us"]  # NaN (a failed form) stays NaN
    timed = {k: v for k, v in totals.items() if v == v}
    if not timed:
        return None
    form, tile, warps = min(timed, key=timed.get)[len("sweep gemv "):].split()
    bn, bk = tile.split("x")
    return f"{bn} {bk} {warps[1:]} {form}"


def cublas_min_m(rows: list[dict]) -> int:
    """The least timed M from which cuBLAS's block GEMM, summed over the projections, beats the Triton
    GEMM at that M and every larger one timed; 0 where it never does (or was not timed)."""
    totals: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["method"] in ("fp8 w8a8 gemm only", "fp8 cublas gemm only"):
            by = totals.setdefault(r["m"], {})
            by[r["method"]] = by.get(r["method"], 0.0) + r["us"]
    best = 0
    for m in sorted(totals, reverse=True):
        cublas, triton_us = totals[m].get("fp8 cublas gemm only", float("nan")), totals[m]["fp8 w8a8 gemm only"]
        if not cublas < triton_us:  # NaN (failed) counts as slower
            break
        best = m
    return best


def markdown(rows: list[dict], device: str, best: dict[str, str]) -> str:
    lines = [f"# Block-FP8 projections vs bf16 ({device}, torch {torch.__version__})", "",
             "| shape (N x K) | M | method | median us | weight GB/s | TFLOP/s | max abs err | max rel err |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['n']} x {r['k']}) | {r['m']} | {r['method']} | {r['us']:.2f} | "
                     f"{r['gbps']:.0f} | {r['tflops']:.1f} | {r['max_abs_err']:.3g} | {r['max_rel_err']:.2%} |")
    if best:
        lines += ["", "Fastest swept tiles:", ""] + [f"- {key}: {val}" for key, val in best.items()]
    return "\n".join(lines) + "\n"


def check() -> None:
    """Small shapes through every entry point against the torch path (runs in the interpreter)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for n, k in ((200, 320), (256, 256)):
        q, s = U.quantize_weight_block(torch.randn(n, k, device=dev) / k**0.5)
        for m in (1, 5, 33):
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            ref = U.block_fp8_linear_torch(x, q, s, out_dtype=torch.float32)
            print(f"N={n} K={k} M={m}: block_fp8_linear rel err {errors(K.block_fp8_linear(x, q, s), ref)[1]:.2e}")
            if m == 1:
                ref1 = U.block_fp8_linear_torch(x, q, s, out_dtype=torch.float32, quantize_activations=False)
                print(f"N={n} K={k} M=1: fp8_gemv rel err {errors(K.fp8_gemv(x, q, s), ref1)[1]:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fp8_bench", help="folder for fp8_gemm_bench.json / .md")
    parser.add_argument("--m", type=int, nargs="+", default=list(MS), help="batch sizes (rows)")
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES], help="projections to run")
    parser.add_argument("--reps", type=int, default=20, help="graph replays per timing")
    parser.add_argument("--sweep", action="store_true", help="also time every tile of the sweeps")
    parser.add_argument("--check", action="store_true", help="correctness on small shapes only")
    args = parser.parse_args()
    if args.check:
        check()
        return
    assert torch.cuda.is_available(), "the bench needs a GPU (--check runs anywhere)"
    device = torch.cuda.get_device_name()
    rows = []
    for name, n, k in SHAPES:
        if name in args.shapes:
            rows += bench_shape(name, n, k, tuple(args.m), args.reps, args.sweep)
            torch.cuda.empty_cache()
    best = best_tiles(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_gemm_bench.json"), "w") as f:
        json.dump(dict(device=device, torch=torch.__version__, rows=rows, best_tiles=best), f, indent=1)
    with open(os.path.join(args.out, "fp8_gemm_bench.md"), "w") as f:
        f.write(markdown(rows, device, best))
    print(f"wrote {args.out}/fp8_gemm_bench.json and .md")
    print(f"GEMM_CUBLAS_MIN_M {cublas_min_m(rows)}")
    if (overall := best_gemv_overall(rows)) is not None:
        print(f"GEMV_BEST {overall}")


if __name__ == "__main__":
    main()
