"""The one-token MoE GEMVs (layers/moe/triton_moe_decode.py) against fp32 on a GPU at real expert
shapes, beside the grouped kernel's and bf16 torch's error on the same token, all experts local and
with half of them on another rank (expert_map).

    python3 scripts/gpu_moe_decode_check.py            # Mixtral-8x7B and Qwen3-30B-A3B expert shapes
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_moe_kernel_bench import SHAPES, make_routing  # noqa: E402

from radixserve.layers.moe import triton_moe  # noqa: E402
from radixserve.layers.moe.torch_moe import fused_experts_torch  # noqa: E402
from radixserve.layers.moe.triton_moe_decode import moe_decode_one_token  # noqa: E402


def main() -> int:
    dev = torch.device("cuda")
    failed = 0
    for name in ("mixtral", "qwen3moe"):
        e, h, n, k = SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(0)
        w13 = (torch.randn(e, 2 * n, h, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        w2 = (torch.randn(e, h, n, device=dev, generator=gen) * 0.02).to(torch.bfloat16)
        for seed in range(4):
            x, weights, ids = make_routing(1, e, k, h, seed, dev, torch.bfloat16)
            for label, local in (("all local", None), ("half remote", e // 2)):
                emap, a13, a2 = None, w13, w2
                if local:
                    emap = torch.full((e,), -1, dtype=torch.int32, device=dev)
                    emap[:local] = torch.arange(local, dtype=torch.int32, device=dev)
                    a13, a2 = w13[:local].contiguous(), w2[:local].contiguous()
                ref = fused_experts_torch(x.float(), a13.float(), a2.float(), weights, ids, emap)
                gemv = moe_decode_one_token(x, a13, a2, weights, ids, emap).float()
                grouped = triton_moe.fused_moe_launch(x, a13, a2, weights, ids, emap,
                                                      config=triton_moe.tile_config(1, a13.shape[0], n, h, x.dtype,
                                                                                    torch.cuda.get_device_name()))
                bf16 = fused_experts_torch(x, a13, a2, weights, ids, emap).float()
                scale = ref.abs().max().item() or 1.0
                err = {lbl: (t - ref).abs().max().item() for lbl, t in
                       (("gemv", gemv), ("grouped", grouped.float()), ("torch bf16", bf16))}
                ok = err["gemv"] <= max(2 * err["torch bf16"], 2 * err["grouped"], 1e-2 * scale)
                failed += not ok
                print(f"{name} token {seed} {label}: max |ref| {scale:.3e}, "
                      + ", ".join(f"{lbl} {v:.3e}" for lbl, v in err.items()) + ("  ok" if ok else "  FAIL"),
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
