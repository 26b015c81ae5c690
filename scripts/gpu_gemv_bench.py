"""Batch-1 projections of Llama-3.1-8B: cuBLAS against forms of a Triton GEMV, per shape.

    python scripts/gpu_gemv_bench.py            # on the GPU: us per call and GB/s, every form and tile
    TRITON_INTERPRET=1 python scripts/gpu_gemv_bench.py --check   # on a CPU: correctness only

Every call is captured in one CUDA graph over distinct weight copies (about 2 GiB, beyond L2), as a
decode step issues them. The forms differ only in how the loop over K is written, and that decides
how many loads ptxas keeps in flight (docs/gpu.md, "Batch-1 projections"):
- `masked`: every step masked on rows and columns (radixserve's first GEMV: 40 registers, two loads
  issued before the first multiply);
- `dynstart`: the same with the loop starting at a run-time offset (56 registers, six loads first);
- `split`: unmasked full steps, then one masked tail step, rows clamped instead of masked;
- `hoisted`: one loop whose body picks an unmasked or a masked load (ptxas issues both steps' loads
  at once: all of a thread's loads in flight before the first multiply); radixserve's own kernel
  (radixserve/layers/gemv.py), run here at other tiles too, as is its gate/up + SiLU-and-mul form
  (`silu_hoisted`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

# (name, out_features N, in_features K) of one decoder layer and the LM head, tensor parallel 1
SHAPES = (("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
          ("down_proj", 4096, 14336), ("lm_head", 128256, 4096))
# (form, BLOCK_N, BLOCK_K, num_warps)
TILES = (("masked", 2, 4096, 4), ("dynstart", 2, 4096, 4), ("split", 2, 4096, 4), ("split", 1, 4096, 4),
         ("split", 2, 4096, 8), ("split", 4, 2048, 4), ("hoisted", 2, 4096, 4), ("hoisted", 1, 4096, 4),
         ("hoisted", 2, 2048, 4), ("hoisted", 4, 4096, 8))
SILU_TILES = (("silu_hoisted", 1, 4096, 4), ("silu_hoisted", 2, 2048, 4), ("silu_hoisted", 2, 4096, 8))


@triton.jit
def _masked(x_ptr, w_ptr, out_ptr, n_out, k_in, w_stride, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_out
    w_rows = w_ptr + rows[:, None].to(tl.int64) * w_stride
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < k_in
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _dynstart(x_ptr, w_ptr, out_ptr, n_out, k_in, w_stride, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.program_id(1) * k_in  # always 0 (grid dimension 1 is 1): only the loop's form changes
    row_mask = rows < n_out
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(start, start + k_in, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < k_in
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * w_stride + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _split(x_ptr, w_ptr, out_ptr, n_out, k_in, w_stride, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + tl.minimum(rows, n_out - 1)[:, None].to(tl.int64) * w_stride
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    full = k_in // BLOCK_K * BLOCK_K
    for k0 in range(0, full, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols).to(tl.float32)
        acc += tl.sum(tl.load(w_rows + cols[None, :]).to(tl.float32) * x[None, :], axis=1)
    if full < k_in:
        cols = full + tl.arange(0, BLOCK_K)
        col_mask = cols < k_in
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=col_mask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < n_out)


FORMS = {"masked": _masked, "dynstart": _dynstart, "split": _split}


def run(form: str, x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int, warps: int) -> torch.Tensor:
    """x [K] @ weight[N, K]^T -> [N]; silu forms: weight [2I, K] -> silu(gate) * up [I]. The hoisted
    forms are radixserve's own kernels (layers/gemv.py) at the tile given."""
    from radixserve.layers import gemv as model_gemv

    n, k = weight.shape
    if form.startswith("silu"):
        n //= 2
    out = x.new_empty(n)
    grid = (triton.cdiv(n, block_n), 1)
    tile = dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    if form == "hoisted":
        model_gemv._gemv_kernel[grid](x, weight, weight, out, n, k, weight.stride(0), HAS_BIAS=False, **tile)
    elif form == "silu_hoisted":
        model_gemv._gemv_silu_mul_kernel[grid](x, weight, out, n, k, weight.stride(0), **tile)
    else:
        FORMS[form][grid](x, weight, out, n, k, weight.stride(0), **tile)
    return out


def reference(form: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    y = weight.float() @ x.float()
    if form.startswith("silu"):
        gate, up = y.to(x.dtype).chunk(2)
        return torch.nn.functional.silu(gate) * up
    return y.to(x.dtype)


def check() -> None:
    """Small odd shapes against torch, every form (fp32: only summation order differs)."""
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for (n, k), (form, block_n, block_k, warps) in ((s, t) for s in ((38, 300), (64, 1024), (6, 77), (2, 5000))
                                                   for t in TILES + SILU_TILES):
        x = torch.randn(k, generator=gen)
        w = torch.randn(n, k, generator=gen)
        got = run(form, x, w, block_n, min(block_k, 512), warps)
        torch.testing.assert_close(got, reference(form, x, w), atol=1e-3, rtol=1e-4)
        cases += 1
    print(f"every form matches torch on {cases} (shape, tile) cases")


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
    return replay_ms(graph, reps) * 1e3 / len(calls)


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int, warmup: int = 1) -> float:
    """Mean milliseconds of one replay, timed with events over back-to-back replays."""
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps


def bench() -> None:
    dev = torch.device("cuda")
    from radixserve.layers import gemv as model_gemv

    for name, n, k in SHAPES:
        nbytes = n * k * 2
        copies = max(2, (2 << 30) // nbytes)  # about 2 GiB of weights: far beyond L2
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        x = torch.randn(k, device=dev, dtype=torch.bfloat16)
        rows = [("cuBLAS", graph_time_us([lambda w=w, x=x: torch.matmul(x[None], w.t()) for w in weights]))]
        rows.append(("radixserve gemv", graph_time_us([lambda w=w, x=x: model_gemv.gemv(x, w) for w in weights])))
        tiles = TILES + (SILU_TILES if name == "gate_up_proj" else ())
        if name == "gate_up_proj":
            rows.append(("radixserve gemv_silu_mul",
                         graph_time_us([lambda w=w, x=x: model_gemv.gemv_silu_mul(x, w) for w in weights])))
        for form, block_n, block_k, warps in tiles:
            want = reference(form, x, weights[0]).float()
            got = run(form, x, weights[0], block_n, block_k, warps).float()
            label = f"{form} {block_n}x{block_k} w{warps}"
            if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                rows.append((label + " WRONG", float("nan")))
                continue
            tile = (form, block_n, block_k, warps)
            rows.append((label, graph_time_us([lambda w=w, x=x, t=tile: run(t[0], x, w, *t[1:]) for w in weights])))
        print(f"\n{name} ({n} x {k}, {nbytes / 1e6:.1f} MB)")
        for label, us in rows:
            print(f"  {label:<28} {us:8.2f} us  {nbytes / us / 1e3:6.0f} GB/s", flush=True)
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
