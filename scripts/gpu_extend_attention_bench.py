"""Time the Triton extend (prefill) attention kernel against PyTorch's flash SDPA on the same shapes.

    python3 scripts/gpu_extend_attention_bench.py            # default tiles, on the GPU machine
    python3 scripts/gpu_extend_attention_bench.py --sweep    # also every tile/warp/stage choice

Llama-3.1-8B heads (32 q, 8 kv, head_dim 128), bf16, causal; q, k and v are strided views of one fused
qkv projection output, as the model hands them over. Fresh prefills (no prefix) take the new
tokens' K/V from the batch; the prefix case (4 x 3072 cached + 1024 new) also gathers the prefix
through a shuffled req_to_token table (page size 1), as in serving. SDPA gets contiguous [B, H, L, D]
tensors with the KV heads expanded, the layout a dense prefill would use (for the prefix case: the
last 1024 queries of a causal 4096 attention, via an explicit offset mask, so no flash path applies).
FLOPs count only the visible (causal) pairs: 4 * D * (sum over queries of keys seen) per head.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton

from radixserve.attention.kernels.extend_attention import ExtendConfig, extend_attention, extend_config

HQ, HK, D = 32, 8, 128
SHAPES = ((32, 0, 1024), (4, 0, 4096), (4, 3072, 1024))  # (batch, prefix, new tokens)


def make_case(bs: int, prefix: int, length: int, dev: torch.device):
    total = prefix + length
    t = bs * length
    dt = torch.bfloat16
    # q, k and v are views of one fused projection output [t, (HQ + 2 HK) * D], as in the model
    qkv = torch.randn(t, (HQ + 2 * HK) * D, device=dev, dtype=dt)
    q, k_new, v_new = (x.view(t, -1, D) for x in qkv.split([HQ * D, HK * D, HK * D], dim=1))
    k_all = torch.cat([torch.randn(bs, prefix, HK, D, device=dev, dtype=dt), k_new.view(bs, length, HK, D)], 1)
    v_all = torch.cat([torch.randn(bs, prefix, HK, D, device=dev, dtype=dt), v_new.view(bs, length, HK, D)], 1)
    slots = torch.randperm(bs * total, device=dev) + 1
    k_buf = torch.zeros(bs * total + 1, HK, D, device=dev, dtype=dt)
    v_buf = torch.zeros_like(k_buf)
    k_buf[slots], v_buf[slots] = k_all.reshape(-1, HK, D), v_all.reshape(-1, HK, D)
    table = torch.zeros(bs + 1, total, dtype=torch.int64, device=dev)
    table[1:] = slots.view(bs, total)
    meta = dict(
        req_to_token=table, req_pool_indices=torch.arange(1, bs + 1, device=dev),
        prefix_lens=torch.full((bs,), prefix, dtype=torch.int64, device=dev),
        extend_lens=torch.full((bs,), length, dtype=torch.int64, device=dev),
        extend_start_loc=torch.arange(bs, device=dev) * length,
    )
    return q, k_new, v_new, k_buf, v_buf, k_all, v_all, meta


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time every tile/warp/stage combination too")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    default = extend_config(D, torch.bfloat16)
    configs = [default]
    if args.sweep:
        for bm, bn, w, st, tma in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4), (False, True)):
            cfg = ExtendConfig(bm, bn, w, st, tma=tma)
            if cfg != default:
                configs.append(cfg)
    print(f"default {default}")
    print(f"{'batch':>5} {'prefix':>6} {'len':>5} {'sdpa ms':>8} {'TFLOP/s':>8} | config -> triton ms TFLOP/s err")
    for bs, prefix, length in SHAPES:
        q, k_new, v_new, k_buf, v_buf, k_all, v_all, meta = make_case(bs, prefix, length, dev)
        out = torch.empty(q.shape, device=dev, dtype=q.dtype)
        total = prefix + length
        qs = q.view(bs, length, HQ, D).transpose(1, 2)
        ks = k_all.transpose(1, 2).repeat_interleave(HQ // HK, dim=1)
        vs = v_all.transpose(1, 2).repeat_interleave(HQ // HK, dim=1)
        if prefix:
            rows = torch.arange(length, device=dev)[:, None] + prefix
            mask = torch.arange(total, device=dev)[None, :] <= rows

            def run_sdpa(qs=qs, ks=ks, vs=vs, mask=mask):
                return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        else:
            def run_sdpa(qs=qs, ks=ks, vs=vs):
                return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        ms_s = triton.testing.do_bench(run_sdpa, warmup=50, rep=300, return_mode="median")
        ref = run_sdpa().transpose(1, 2).reshape(-1, HQ, D).float()
        pairs = length * prefix + length * (length + 1) / 2
        flops = 4 * bs * HQ * D * pairs
        print(f"{bs:>5} {prefix:>6} {length:>5} {ms_s:>8.3f} {flops / ms_s / 1e9:>8.1f} |", flush=True)
        results = []
        for cfg in configs:
            def run(cfg=cfg, q=q, k_new=k_new, v_new=v_new, k_buf=k_buf, v_buf=v_buf, meta=meta, out=out,
                    length=length):
                extend_attention(q, k_new, v_new, k_buf, v_buf, out=out, scaling=D**-0.5,
                                 max_extend_len=length, config=cfg, **meta)
            try:
                out.zero_()
                run()
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                ms = triton.testing.do_bench(run, warmup=25, rep=150, return_mode="median")
            except Exception as exc:  # e.g. shared memory exhausted for big tiles with many stages
                print(f"      {cfg}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                continue
            results.append((ms, cfg, err))
            if cfg == default:
                print(f"      default {cfg}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOP/s err {err:.4f}", flush=True)
        for ms, cfg, err in sorted(results, key=lambda r: r[0])[:10 if args.sweep else 0]:
            print(f"      {cfg}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOP/s err {err:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
