"""Time the MLA decode kernel (kernels/mla_decode.py) at DeepSeek shapes, against the HBM bandwidth.

    python3 scripts/gpu_mla_bench.py --check          # check against torch first, then time
    python3 scripts/gpu_mla_bench.py --fp8 --check    # an e4m3 latent cache (scale 0.05)

Shapes: kv_lora_rank 512 + rope 64 (D = 576) for all; 16 heads (DeepSeek-V2-Lite, and V3 at TP 8: the
same attention shape) and 128 heads (V3 on one rank). Batches 1/32/128, every request at the same
context (1024 or 4096), its latents on shuffled slots (page size 1), as in serving. Each step is
timed as the backend runs it (both stages, workspace planned as TritonBackend plans it); the floor
is the latent read once: sum(context) * 576 * itemsize bytes over --peak-gbs (H200: 4800).
--check also runs the extend kernel once against the reference (4 requests, 192 cached + 64 new).
--sweep times every MLADecodeConfig of SWEEP (heads a program, keys a block, warps, stages) on the
batch-32/128 shapes instead, each checked against the reference, to pick mla_decode_config's defaults.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

from radixserve.attention.kernels.decode_attention import make_workspace, num_sms
from radixserve.attention.kernels.mla_decode import (
    MLADecodeConfig,
    mla_decode,
    mla_decode_config,
    plan_mla_splits,
)
from radixserve.attention.kernels.mla_extend import mla_extend
from radixserve.layers.quantization.fp8_utils import per_tensor_quantize

RANK, ROPE = 512, 64
D = RANK + ROPE
HEADS = ((16, "V2-Lite / V3 TP8"), (128, "V3"))
BATCHES, CONTEXTS = (1, 32, 128), (1024, 4096)
# (block_h, block_n, num_warps, num_stages)
SWEEP = ((16, 32, 8, 2), (16, 64, 4, 2), (32, 32, 8, 2), (32, 16, 4, 2), (64, 16, 8, 2), (64, 32, 8, 1),
         (64, 32, 8, 2), (64, 16, 4, 2), (128, 16, 8, 1))


def make_case(bs: int, ctx: int, heads: int, fp8: bool, dev: torch.device):
    slots = torch.randperm(bs * ctx, device=dev) + 1  # slot 0: the dummy
    table = torch.zeros(bs + 1, ctx, dtype=torch.int64, device=dev)
    table[1:] = slots.view(bs, ctx)
    latent = torch.randn(bs * ctx + 1, 1, D, device=dev)
    scale = 0.05 if fp8 else 1.0
    buf = per_tensor_quantize(latent, scale) if fp8 else latent.to(torch.bfloat16)
    q = torch.randn(bs, heads, D, device=dev, dtype=torch.bfloat16)
    return q, buf, scale, table, torch.arange(1, bs + 1, device=dev)


def reference(q, buf, scale, table, rows, lens, scaling):
    """The MLA formula in fp32: queries at positions prefix..len-1 of each row (lens: (prefix, len))."""
    outs = []
    start = 0
    for row, (prefix, n) in zip(rows.tolist(), lens):
        lat = buf[table[row, :n], 0].float() * scale
        qs = q[start : start + n - prefix].float()
        s = scaling * torch.einsum("thd,jd->thj", qs, lat)
        pos = torch.arange(prefix, n, device=q.device)
        s = s.masked_fill(torch.arange(n, device=q.device)[None, None, :] > pos[:, None, None], float("-inf"))
        outs.append(torch.softmax(s, -1) @ lat[:, :RANK])
        start += n - prefix
    return torch.cat(outs).to(q.dtype)


def check_extend(fp8: bool, dev: torch.device) -> float:
    bs, prefix, new, heads = 4, 192, 64, 16
    q, buf, scale, table, rows = make_case(bs, prefix + new, heads, fp8, dev)
    q = torch.randn(bs * new, heads, D, device=dev, dtype=torch.bfloat16)
    ext = torch.full((bs,), new, device=dev)
    out = torch.empty(bs * new, heads, RANK, device=dev, dtype=torch.bfloat16)
    mla_extend(q, buf, table, rows, torch.full((bs,), prefix, device=dev), ext, torch.cumsum(ext, 0) - ext, out,
               D**-0.5, RANK, new, latent_scale=scale)
    ref = reference(q, buf, scale, table, rows, [(prefix, prefix + new)] * bs, D**-0.5)
    return (out.float() - ref.float()).abs().max().item()


def run_shape(heads: int, name: str, bs: int, ctx: int, args: argparse.Namespace, dev: torch.device,
              config: MLADecodeConfig | None = None) -> bool:
    """Check (with --check) and time one decode shape; prints a row, returns whether the check failed."""
    q, buf, scale, table, rows = make_case(bs, ctx, heads, args.fp8, dev)
    seq_lens = torch.full((bs,), ctx, device=dev)
    block_h = (config or mla_decode_config(RANK)).block_h  # the tile mla_decode will run
    max_splits, min_split = plan_mla_splits(ctx, bs, heads, num_sms(dev), block_h=block_h)  # as TritonBackend plans
    ws = make_workspace(bs, heads, RANK, max_splits, seq_lens, min_split)
    out = torch.empty(bs, heads, RANK, device=dev, dtype=torch.bfloat16)

    def step() -> None:
        mla_decode(q, buf, table, rows, seq_lens, out, D**-0.5, RANK, workspace=ws, latent_scale=scale,
                   config=config)

    note, failed = "-", False
    if args.check:
        step()
        ref = reference(q, buf, scale, table, rows, [(ctx - 1, ctx)] * bs, D**-0.5)
        err = (out.float() - ref.float()).abs().max().item()
        failed = err > 3e-2
        note = f"{err:.1e} {'FAIL' if failed else 'ok'}"
    ms = triton.testing.do_bench(step, warmup=25, rep=200)
    gbs = bs * ctx * D * buf.element_size() / (ms * 1e-3) / 1e9
    tile = f" {config.block_h}h {config.block_n}n w{config.num_warps} s{config.num_stages}" if config else ""
    print(f"{heads:4d} {name:<16} {bs:5d} {ctx:8d} {max_splits:7d} {ms * 1e3:8.1f} us {gbs:8.0f} "
          f"{gbs / args.peak_gbs:8.0%}   {note}{tile}", flush=True)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="compare each shape with the torch reference first")
    parser.add_argument("--fp8", action="store_true", help="float8_e4m3fn latent cache (scale 0.05)")
    parser.add_argument("--sweep", action="store_true", help="time SWEEP's configs (4096 context)")
    parser.add_argument("--peak-gbs", type=float, default=4800.0, help="HBM bandwidth, GB/s (H200: 4800)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    failed = False
    if args.check:
        err = check_extend(args.fp8, dev)
        failed |= err > 3e-2
        print(f"extend check (4 x 192 + 64, 16 heads): max abs err {err:.2e} {'FAIL' if err > 3e-2 else 'ok'}")
    print(f"{torch.cuda.get_device_name(dev)}, latent {'e4m3' if args.fp8 else 'bf16'}, D = {RANK} + {ROPE}")
    print("heads              batch  context  splits      time     GB/s  of peak   check")
    if args.sweep:
        args.check = True
        for heads, name in HEADS:
            for bs in (32, 128) if heads > 16 else (128,):
                for block_h, block_n, warps, stages in SWEEP:
                    cfg = MLADecodeConfig(block_h=block_h, block_n=block_n, num_warps=warps, num_stages=stages)
                    try:
                        failed |= run_shape(heads, name, bs, 4096, args, dev, cfg)
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is reported
                        print(f"{heads:4d} {bs:5d} {cfg}: {type(exc).__name__} {str(exc)[:120]}", flush=True)
                    torch.cuda.empty_cache()
        return 1 if failed else 0
    for heads, name in HEADS:
        for bs in BATCHES:
            for ctx in CONTEXTS:
                failed |= run_shape(heads, name, bs, ctx, args, dev)
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
