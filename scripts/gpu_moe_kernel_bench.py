"""Time the fused MoE Triton kernel (radixserve/layers/moe/triton_moe.py) per token count, tune its tiles.

    python scripts/gpu_moe_kernel_bench.py --shape mixtral --out DIR           # repo tiles vs torch
    python scripts/gpu_moe_kernel_bench.py --shape qwen3moe --tune --out DIR   # also search tiles
    TRITON_INTERPRET=1 python scripts/gpu_moe_kernel_bench.py --shape tiny --tokens 1,5,33   # CPU check

Shapes are one layer's experts at tensor parallel 1: Mixtral-8x7B (E=8, H=4096, N=14336, top-2) and
Qwen3-30B-A3B (E=128, H=2048, N=768, top-8), random bf16 weights of small magnitude and random routing.
Each count runs ROUTINGS distinct routings back to back (inside one CUDA graph up to --graph-max
tokens, eagerly above), so consecutive calls touch different experts as consecutive layers would.
GB/s counts the expert weights actually read: the distinct experts in each routing times 3 N H
elements; TFLOP/s counts 2 T K 3 N H (padding rows excluded). The torch column is the loop over
experts (torch_moe.py), eager (it reads the routing back to the host).

--tune searches a pruned tile grid per count within --budget-s seconds per shape and writes the best
as a JSON table (the layout radixserve/layers/moe/tile_configs.py reads) into --out; copy it to
radixserve/layers/moe/configs/ to ship it. Uses only torch 2.4+ / Triton 3.0+ APIs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from radixserve.layers.moe import tile_configs
from radixserve.layers.moe.torch_moe import fused_experts_torch
from radixserve.layers.moe.triton_moe import fused_moe_launch

SHAPES = {  # name: (E, H, N, top-k)
    "mixtral": (8, 4096, 14336, 2),
    "qwen3moe": (128, 2048, 768, 8),
    "tiny": (4, 64, 32, 2),  # for the interpreter
}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ROUTINGS = 4
# (BLOCK_N, BLOCK_K, num_warps, num_stages): few rows per expert (BLOCK_M 16/32) stream the weights
# with narrow, deep tiles; many rows want the wide tiles that keep the tensor cores busy
NARROW = ((64, 128, 4, 4), (32, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (64, 64, 4, 5),
          (128, 64, 4, 4), (32, 256, 4, 3), (128, 128, 8, 3))
WIDE = ((128, 64, 4, 4), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 4, 3))


def make_weights(e: int, h: int, n: int, dev: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(e, 2 * n, h, device=dev, dtype=dtype, generator=gen) * h**-0.5
    w2 = torch.randn(e, h, n, device=dev, dtype=dtype, generator=gen) * n**-0.5
    return w13, w2


def make_routing(t: int, e: int, k: int, h: int, seed: int, dev: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device=dev).manual_seed(1000 + seed)
    x = torch.randn(t, h, device=dev, dtype=dtype, generator=gen)
    probs = torch.randn(t, e, device=dev, generator=gen).softmax(-1)
    weights, ids = probs.topk(k, dim=-1)
    return x, weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def time_us(calls: list[Callable[[], object]], graph: bool, reps: int) -> float:
    """Median over reps of the mean time of one call, the calls run back to back."""
    def run_all() -> None:
        for call in calls:
            call()

    if calls and not torch.cuda.is_available():  # interpreter check: wall clock, meaningless numbers
        t0 = time.perf_counter()
        run_all()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton compiles) off the capture
        run_all()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    step = run_all
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run_all()
        step = g.replay
        step()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        step()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e3 / len(calls))
    return statistics.median(samples)


def candidates(rows_per_expert: float) -> list[dict]:
    """The pruned grid for one count: BLOCK_M from a quarter to twice the rows an expert gets, widest
    first (a count's share of the budget may run out before the end of its list)."""
    widest = max(16, 2 * 2 ** math.ceil(math.log2(max(rows_per_expert, 1))))
    out = []
    for bm in (m for m in (128, 64, 32, 16) if min(64, widest // 4) <= m <= widest):
        for bn, bk, warps, stages in NARROW if bm <= 32 else WIDE:
            for group in (1,) if bm <= 32 else (8, 1):
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps,
                                num_stages=stages))
    return out


def check(w13: torch.Tensor, w2: torch.Tensor, e: int, k: int, h: int, dev: torch.device) -> str:
    """Max error against fp32 of the kernel and of the torch path, once without and once with half the
    experts on another rank."""
    x, weights, ids = make_routing(64, e, k, h, 0, dev, w13.dtype)
    lines = []
    for label, emap, local in (("all local", None, slice(None)), ("half remote", "map", slice(0, e // 2))):
        expert_map = None
        if emap:  # the upper half of the experts lives elsewhere
            expert_map = torch.full((e,), -1, dtype=torch.int32, device=dev)
            expert_map[: e // 2] = torch.arange(e // 2, dtype=torch.int32, device=dev)
        a13, a2 = w13[local].contiguous(), w2[local].contiguous()
        ref = fused_experts_torch(x.float(), a13.float(), a2.float(), weights, ids, expert_map)
        got = fused_moe_launch(x, a13, a2, weights, ids, expert_map)
        base = fused_experts_torch(x, a13, a2, weights, ids, expert_map)
        lines.append(f"{label}: max |triton - fp32| = {(got.float() - ref).abs().max().item():.3e}, "
                     f"max |torch {str(x.dtype)[6:]} - fp32| = {(base.float() - ref).abs().max().item():.3e}, "
                     f"max |ref| = {ref.abs().max().item():.3e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    ap.add_argument("--tune", action="store_true", help="search tiles per count and write the best as JSON")
    ap.add_argument("--out", default=".", help="folder for the JSON table and the markdown table")
    ap.add_argument("--budget-s", type=float, default=150.0, help="tuning time per shape, seconds")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions (median)")
    ap.add_argument("--graph-max", type=int, default=512, help="largest count timed inside a CUDA graph")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch reference's timings")
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter's dot lacks bf16
    e, h, n, k = SHAPES[args.shape]
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    w13, w2 = make_weights(e, h, n, dev, dtype)
    print(f"# {args.shape}: E={e} H={h} N={n} top-{k}, {dtype}, {device_name or 'CPU (interpreter)'}, "
          f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    print(check(w13, w2, e, k, h, dev), flush=True)

    tokens = [int(t) for t in args.tokens.split(",")]
    expert_bytes = 3 * n * h * w13.element_size()
    header = "| tokens | experts read | tile (M,N,K,G,w,s) | triton us | GB/s | TFLOP/s | repo tile us | torch us |"
    rows = [header, "|---" * 8 + "|"]
    print(header, flush=True)
    best: dict[int, dict] = {}
    t_start = time.monotonic()
    for i, t in enumerate(tokens):
        routings = [make_routing(t, e, k, h, s, dev, dtype) for s in range(ROUTINGS)]
        touched = statistics.mean(ids.unique().numel() for _, _, ids in routings)
        graph = t <= args.graph_max

        def timed(cfg: dict | None, routings=routings, graph=graph) -> float:
            calls = [lambda r=r: fused_moe_launch(r[0], w13, w2, r[1], r[2], config=cfg) for r in routings]
            return time_us(calls, graph, args.reps)

        repo_cfg = tile_configs.tile_config(t, e, n, h, dtype, device_name)
        repo_us = timed(None)
        cfg, us = repo_cfg, repo_us
        if args.tune:
            deadline = t_start + args.budget_s * (i + 1) / len(tokens)  # later counts keep their share
            for cand in candidates(t * k / touched):
                if time.monotonic() > deadline:
                    break
                try:
                    cand_us = timed(cand)
                except Exception as exc:  # a tile past the shared memory or registers: skip it
                    print(f"  skip {tuple(cand.values())}: {type(exc).__name__}", file=sys.stderr)
                    continue
                if cand_us < us:
                    cfg, us = cand, cand_us
            best[t] = cfg
        torch_us = float("nan")
        if not args.no_torch:
            calls = [lambda r=r: fused_experts_torch(r[0], w13, w2, r[1], r[2]) for r in routings]
            torch_us = time_us(calls, False, max(3, args.reps // 2))
        gbps = touched * expert_bytes / (us * 1e-6) / 1e9
        tflops = 2 * t * k * 3 * n * h / (us * 1e-6) / 1e12
        tile = ",".join(str(cfg[key]) for key in tile_configs.KEYS)
        row = (f"| {t} | {touched:.1f} | {tile} | {us:.1f} | {gbps:.0f} | {tflops:.1f} | {repo_us:.1f} "
               f"| {torch_us:.1f} |")
        rows.append(row)
        print(row, flush=True)

    (out_dir / f"moe_bench_{args.shape}.md").write_text("\n".join(rows) + "\n")
    if args.tune:
        path = out_dir / tile_configs.config_file_name(e, n, h, dtype, device_name)
        note = (f"tuned by scripts/gpu_moe_kernel_bench.py --shape {args.shape} --tune on {device_name}, "
                f"torch {torch.__version__}, triton {triton.__version__}")
        tile_configs.write_table(path, best, note)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
