"""Time the FP8 fused MoE kernel (radixserve/layers/moe/triton_moe_fp8.py) beside the bf16 one.

    python scripts/gpu_moe_fp8_bench.py --check --out DIR                 # both shapes: check, then time
    python scripts/gpu_moe_fp8_bench.py --shape qwen3moe --tokens 1,32 --out DIR
    TRITON_INTERPRET=1 python scripts/gpu_moe_fp8_bench.py --shape tiny --tokens 1,5 --check   # CPU

One layer's experts at tensor parallel 1: Mixtral-8x7B (E=8, H=4096, N=14336, top-2) and Qwen3-30B-A3B
(E=128, H=2048, N=768, top-8). The bf16 weights are random (gpu_moe_kernel_bench.py's), the FP8 ones
their 128x128 block quantization in layers/moe/layer.py's layout. --check first compares, on 64 tokens
with all experts local and with half of them remote, the FP8 kernel against the torch path with the
same w8a8 numerics (torch_moe.fused_experts_fp8_torch: summation order apart, they should agree to a few
bf16 ulps) and both against the bf16 kernel (the FP8 rounding itself: a few percent); it exits 1 when
the kernel is off its reference by more than 2^-4 of the output's scale. Timings as
gpu_moe_kernel_bench.py takes them (ROUTINGS routings back to back, in a CUDA graph up to --graph-max
tokens); GB/s counts the expert bytes actually read (FP8: 1 byte a weight plus the block factors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_moe_kernel_bench import ROUTINGS, make_routing, make_weights, time_us  # noqa: E402

from radixserve.layers.moe.torch_moe import fused_experts_fp8_torch  # noqa: E402
from radixserve.layers.moe.triton_moe import fused_moe_launch  # noqa: E402
from radixserve.layers.moe.triton_moe_fp8 import fused_moe_fp8_launch  # noqa: E402
from radixserve.layers.quantization.fp8_utils import quantize_weight_block  # noqa: E402

SHAPES = {  # name: (E, H, N, top-k, block)
    "mixtral": (8, 4096, 14336, 2, (128, 128)),
    "qwen3moe": (128, 2048, 768, 8, (128, 128)),
    "tiny": (5, 64, 48, 2, (16, 16)),  # for the interpreter
}
TOKENS = (1, 32, 256, 4096)


@torch.no_grad()
def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, block: tuple[int, int]):
    """layer.py's layout: each expert's gate half, up half and down matrix with their own blocks."""
    n = w13.shape[1] // 2
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for e in range(w13.shape[0]):
        (gq, gs), (uq, us) = (quantize_weight_block(w13[e, :n].float(), block),
                              quantize_weight_block(w13[e, n:].float(), block))
        dq, ds = quantize_weight_block(w2[e].float(), block)
        for bucket, t in zip(parts, (torch.cat([gq, uq]), torch.cat([gs, us]), dq, ds)):
            bucket.append(t)
    return [torch.stack(b) for b in parts]


def check(w13, w2, fp8, e: int, k: int, h: int, block, dev) -> bool:
    x, weights, ids = make_routing(64, e, k, h, 0, dev, w13.dtype)
    ok = True
    for label, remote in (("all local", False), ("half remote", True)):
        expert_map, local = None, slice(None)
        if remote:
            expert_map = torch.full((e,), -1, dtype=torch.int32, device=dev)
            expert_map[: e // 2] = torch.arange(e // 2, dtype=torch.int32, device=dev)
            local = slice(0, e // 2)
        q = [t[local].contiguous() for t in fp8]
        got = fused_moe_fp8_launch(x, *q, weights, ids, expert_map, block).float()
        ref = fused_experts_fp8_torch(x, *q, weights, ids, expert_map, block).float()
        bf16 = fused_moe_launch(x, w13[local].contiguous(), w2[local].contiguous(), weights, ids, expert_map).float()
        scale = ref.abs().max().item()
        err = (got - ref).abs().max().item()
        rel = ((got - bf16).norm() / bf16.norm()).item()
        print(f"{label}: max |fp8 kernel - fp8 torch| = {err:.3e} (max |ref| {scale:.3e}); "
              f"|fp8 kernel - bf16 kernel| / |bf16| = {rel:.3%}; finite: {bool(torch.isfinite(got).all())}")
        ok &= err <= 2**-4 * scale and bool(torch.isfinite(got).all())
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), action="append",
                    help="repeatable; default: mixtral and qwen3moe")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    ap.add_argument("--check", action="store_true", help="compare against the torch reference first")
    ap.add_argument("--out", default=".", help="folder for the markdown tables")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions (median)")
    ap.add_argument("--graph-max", type=int, default=512, help="largest count timed inside a CUDA graph")
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter's dot lacks bf16
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (interpreter)"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    for shape in args.shape or ["mixtral", "qwen3moe"]:
        e, h, n, k, block = SHAPES[shape]
        w13, w2 = make_weights(e, h, n, dev, dtype)
        fp8 = quantize_experts(w13, w2, block)
        print(f"# {shape}: E={e} H={h} N={n} top-{k}, FP8 {block[0]}x{block[1]} blocks vs {dtype}, {device_name}, "
              f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
        if args.check and not check(w13, w2, fp8, e, k, h, block, dev):
            print(f"{shape}: the FP8 kernel is off its reference", flush=True)
            failed = True
            continue
        bf16_bytes = 3 * n * h * w13.element_size()
        fp8_bytes = 3 * n * h + 4 * (fp8[1][0].numel() + fp8[3][0].numel())
        header = "| tokens | experts read | bf16 us | bf16 GB/s | fp8 us | fp8 GB/s | bf16 / fp8 |"
        rows = [header, "|---" * 7 + "|"]
        print(header, flush=True)
        for t in (int(v) for v in args.tokens.split(",")):
            routings = [make_routing(t, e, k, h, s, dev, dtype) for s in range(ROUTINGS)]
            touched = sum(ids.unique().numel() for _, _, ids in routings) / len(routings)
            graph = t <= args.graph_max
            bf16_us = time_us([lambda r=r, w=(w13, w2): fused_moe_launch(r[0], *w, r[1], r[2])
                               for r in routings], graph, args.reps)
            fp8_us = time_us([lambda r=r, q=fp8, b=block: fused_moe_fp8_launch(r[0], *q, r[1], r[2], None, b)
                              for r in routings], graph, args.reps)
            row = (f"| {t} | {touched:.1f} | {bf16_us:.1f} | {touched * bf16_bytes / bf16_us / 1e3:.0f} "
                   f"| {fp8_us:.1f} | {touched * fp8_bytes / fp8_us / 1e3:.0f} | {bf16_us / fp8_us:.2f}x |")
            rows.append(row)
            print(row, flush=True)
        (out_dir / f"moe_fp8_bench_{shape}.md").write_text("\n".join(rows) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
