"""Time the Triton extend (prefill) attention kernel against PyTorch's flash SDPA on the same shapes.

    python3 scripts/gpu_extend_attention_bench.py            # on the GPU machine

Llama-3.1-8B heads (32 q, 8 kv, head_dim 128), bf16, causal, no prefix, batch x 1024 new tokens, KV read
through a shuffled req_to_token table (page size 1) as in serving. SDPA gets contiguous [B, H, L, D]
tensors with the KV heads expanded: the layout a dense prefill would use. FLOPs count only the causal
half (4 * L * (L + 1) / 2 * D per head).
"""

from __future__ import annotations

import sys

import torch
import triton

from radixserve.attention.kernels.extend_attention import extend_attention


def main() -> int:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    hq, hk, d = 32, 8, 128
    print(f"{'batch':>5} {'len':>5} {'triton ms':>10} {'TFLOP/s':>8} {'sdpa ms':>8} {'TFLOP/s':>8} {'max err':>8}")
    for bs, length in ((8, 1024), (32, 1024), (4, 4096)):
        t = bs * length
        q = torch.randn(t, hq, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(t, hk, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(t, hk, d, device=dev, dtype=torch.bfloat16)
        slots = torch.randperm(t, device=dev) + 1
        k_buf = torch.zeros(t + 1, hk, d, device=dev, dtype=torch.bfloat16)
        v_buf = torch.zeros_like(k_buf)
        k_buf[slots], v_buf[slots] = k, v
        table = torch.zeros(bs + 1, length, dtype=torch.int64, device=dev)
        table[1:] = slots.view(bs, length)
        rows = torch.arange(1, bs + 1, device=dev)
        prefix = torch.zeros(bs, dtype=torch.int64, device=dev)
        ext = torch.full((bs,), length, dtype=torch.int64, device=dev)
        start = torch.arange(bs, device=dev) * length
        out = torch.empty_like(q)

        def run_triton(q=q, k_buf=k_buf, v_buf=v_buf, table=table, rows=rows, prefix=prefix, ext=ext,
                       start=start, out=out, length=length):
            extend_attention(q, k_buf, v_buf, table, rows, prefix, ext, start, out, d**-0.5, length)

        qs = q.view(bs, length, hq, d).transpose(1, 2)
        ks = k.view(bs, length, hk, d).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
        vs = v.view(bs, length, hk, d).transpose(1, 2).repeat_interleave(hq // hk, dim=1)

        def run_sdpa(qs=qs, ks=ks, vs=vs):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        ms_t = triton.testing.do_bench(run_triton, warmup=50, rep=300, return_mode="median")
        ms_s = triton.testing.do_bench(run_sdpa, warmup=50, rep=300, return_mode="median")
        run_triton()
        ref = run_sdpa().transpose(1, 2).reshape(t, hq, d)
        err = (out.float() - ref.float()).abs().max().item()
        flops = 4 * bs * hq * d * length * (length + 1) / 2
        print(f"{bs:>5} {length:>5} {ms_t:>10.3f} {flops / ms_t / 1e9:>8.1f} {ms_s:>8.3f} "
              f"{flops / ms_s / 1e9:>8.1f} {err:>8.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
