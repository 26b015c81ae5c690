"""Profile one prefill and decode steps of a dummy-weight model on the GPU (kernel time breakdown).

    python scripts/gpu_profile.py radixserve/configs/llama-3.1-8b
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from radixserve.bench.bench_one_batch import main as one_batch_main  # noqa: F401 (import check)
from radixserve.loader.source import resolve_model_source
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.model_executor.model_runner import build_model_runner
from radixserve.server_args import ServerArgs


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "radixserve/configs/llama-3.1-8b"
    args = ServerArgs(model_path=path, load_format="dummy", dtype="bfloat16", max_total_tokens=40000,
                      max_running_requests=64, context_length=4096)
    runner = build_model_runner(args, resolve_model_source(path, "dummy"), torch.device("cuda"), 4096)
    table = runner.pools.req_to_token.req_to_token
    print("graphs:", runner.graph_runner is not None and runner.graph_runner.sizes[-1])

    def batch(mode: ForwardMode, bs: int, n_new: int, ctx: int) -> ForwardBatch:
        for i in range(bs):
            table[i + 1, :ctx] = torch.arange(1 + i * ctx, 1 + (i + 1) * ctx, device="cuda")
        if mode is ForwardMode.DECODE:  # as the scheduler builds it: staged in a graph when one fits
            return runner.decode_batch(list(range(1, bs + 1)), [ctx] * bs, [1 + i * ctx + ctx - 1 for i in range(bs)])
        rows = torch.arange(1, bs + 1, device="cuda")
        seq = torch.full((bs,), ctx, dtype=torch.int64)
        pos = torch.cat([torch.arange(ctx - n_new, ctx) for _ in range(bs)])
        slots = torch.cat([table[i + 1, ctx - n_new:ctx] for i in range(bs)])
        return ForwardBatch(mode=mode, input_ids=torch.randint(0, 1000, (bs * n_new,), device="cuda"),
                            positions=pos.cuda(), req_pool_indices=rows, seq_lens=seq.cuda(), seq_lens_cpu=seq,
                            out_cache_loc=slots, req_to_token=table, kv_pool=runner.pools.kv,
                            attn_backend=runner.attn_backend,
                            extend_lens_cpu=torch.full((bs,), n_new), prefix_lens_cpu=torch.full((bs,), ctx - n_new),
                            logits_indices=torch.arange(n_new - 1, bs * n_new, n_new, device="cuda"))

    def timed(fb: ForwardBatch, n: int = 20) -> float:
        for _ in range(3):
            runner.forward(fb)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            runner.forward(fb)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e3

    for bs, ctx in ((1, 256), (32, 1024)):
        fb = batch(ForwardMode.DECODE, bs, 1, ctx)
        with_graph = timed(fb)
        saved, runner.graph_runner = runner.graph_runner, None
        eager = timed(batch(ForwardMode.DECODE, bs, 1, ctx))
        runner.graph_runner = saved
        print(f"decode bs={bs} ctx={ctx}: graph {with_graph:.2f} ms, eager {eager:.2f} ms")
        if bs == 1:  # kernel times of one eager step (the graph replays the same kernels, minus launch gaps)
            saved, runner.graph_runner = runner.graph_runner, None
            fb = batch(ForwardMode.DECODE, bs, 1, ctx)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runner.forward(fb)
                torch.cuda.synchronize()
            runner.graph_runner = saved
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))
    fb = batch(ForwardMode.EXTEND, 32, 1024, 1024)  # the prefill target's shape
    print(f"prefill 32x1024: {timed(fb, 5):.1f} ms (forward only)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.forward(fb)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
    total = sum(e.self_device_time_total for e in events) / 1e3
    gemm = sum(e.self_device_time_total for e in events if is_gemm(e.key)) / 1e3
    print(f"GPU time {total:.1f} ms, GEMMs {gemm:.1f} ms ({100 * gemm / total:.0f}%)")


def is_gemm(name: str) -> bool:
    return any(tag in name.lower() for tag in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas"))


if __name__ == "__main__":
    main()
