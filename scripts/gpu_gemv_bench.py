"""Batch-1 projections of Llama-3.1-8B: torch's matmul (cuBLAS) against a Triton GEMV, per shape.

    python scripts/gpu_gemv_bench.py            # on the GPU: time each shape and tile, print GB/s
    TRITON_INTERPRET=1 python scripts/gpu_gemv_bench.py --check   # on a CPU: correctness only

An experiment, not a serving path: batch-1 decode is bound by reading the weights, and on the H200
cuBLAS reads the narrow projections (o_proj, 4096 x 4096) at about 3.1 TB/s against about 4 TB/s
for the wide ones (docs/benchmarks.md). This measures whether a plain Triton GEMV (each program
owns BLOCK_N output rows, walks K in BLOCK_K steps, optionally splits K across programs and adds
the partial sums atomically) reads them faster, before anything is wired into the model.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

# (name, out_features N, in_features K) of one decoder layer and the LM head, tensor parallel 1
SHAPES = (("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
          ("down_proj", 4096, 14336), ("lm_head", 128256, 4096))
TILES = (  # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps): few rows and long K steps won on the H200
    (1, 4096, 1, 4), (2, 2048, 1, 4), (2, 4096, 1, 4), (2, 4096, 1, 8), (4, 1024, 1, 4), (4, 2048, 1, 4),
    (4, 2048, 1, 8), (4, 4096, 1, 8), (8, 1024, 1, 4), (8, 2048, 1, 8), (4, 1024, 2, 4), (4, 2048, 2, 4),
    (8, 512, 4, 4), (4, 1024, 4, 4), (16, 1024, 1, 8),
)


@triton.jit
def _gemv_kernel(X, W, Out, N, K, stride_wn, K_PER_SPLIT, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ATOMIC: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * K_PER_SPLIT
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(X + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if ATOMIC:
        tl.atomic_add(Out + offs_n, acc, mask=mask_n)
    else:
        tl.store(Out + offs_n, acc.to(Out.dtype.element_ty), mask=mask_n)


def gemv(x: torch.Tensor, weight: torch.Tensor, tile: tuple[int, int, int, int]) -> torch.Tensor:
    """x [K] @ weight[N, K]^T -> [N] (weight in nn.Linear's layout, rows contiguous)."""
    block_n, block_k, split_k, warps = tile
    n, k = weight.shape
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    atomic = split_k > 1
    out = torch.zeros(n, dtype=torch.float32, device=x.device) if atomic else x.new_empty(n)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, k_per_split))
    _gemv_kernel[grid](x, weight, out, n, k, weight.stride(0), k_per_split, BLOCK_N=block_n, BLOCK_K=block_k,
                       ATOMIC=atomic, num_warps=warps)
    return out.to(x.dtype) if atomic else out


def check() -> None:
    """Small odd shapes against torch, every tile (fp32, so only summation order differs)."""
    gen = torch.Generator().manual_seed(0)
    for (n, k), tile in itertools.product(((37, 300), (64, 1024), (5, 77)), TILES):
        x = torch.randn(k, generator=gen)
        w = torch.randn(n, k, generator=gen)
        torch.testing.assert_close(gemv(x, w, tile), w @ x, atol=1e-3, rtol=1e-4)
    print(f"gemv matches torch on {3 * len(TILES)} (shape, tile) cases")


def graph_time_us(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Mean time of one call when all of them run back to back inside one CUDA graph.

    This is how a decode step issues its projections: no host launch cost between kernels and each
    call reading weights that are not in L2 (the caller passes distinct copies).
    """
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
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1e3 / (reps * len(calls))


def bench() -> None:
    dev = torch.device("cuda")
    print(f"{'shape':<14} {'N x K':>14} {'cuBLAS us':>10} {'GB/s':>7}  best Triton tile (N, K, split, warps) us  GB/s")
    for name, n, k in SHAPES:
        nbytes = n * k * 2
        copies = max(2, (2 << 30) // nbytes)  # about 2 GiB of weights: far beyond L2
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = graph_time_us([lambda w=w, x=x: torch.matmul(x, w.t()) for w in weights])
        want = torch.matmul(x, weights[0].t()).float().flatten()
        best: tuple[float, tuple[int, int, int, int]] | None = None
        for tile in TILES:
            got = gemv(x.flatten(), weights[0], tile).float()
            if not torch.allclose(got, want, atol=0.5, rtol=2e-2):
                print(f"  {name}: tile {tile} gives wrong results; skipped")
                continue
            us = graph_time_us([lambda w=w, x=x, tile=tile: gemv(x.flatten(), w, tile) for w in weights])
            print(f"    {name} {tile}: {us:.1f} us", flush=True)
            best = min(best, (us, tile)) if best else (us, tile)
        line = f"{name:<14} {f'{n} x {k}':>14} {ref:>10.1f} {nbytes / ref / 1e3:>7.0f}"
        if best:
            line += f"  {best[1]!s:<22} {best[0]:>8.1f} {nbytes / best[0] / 1e3:>6.0f}"
        print(line, flush=True)
        del weights
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness on small shapes only")
    args = parser.parse_args()
    if args.check or os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        check()
    else:
        bench()

if __name__ == "__main__":
    main()
