"""Where a bench_one_batch decode step's time goes: host phases one by one, GPU time, and the profile.

    python scripts/gpu_decode_step_breakdown.py [model] [--batch-size 1] [--input-len 128] [--steps 64]

Runs the same steps as bench_one_batch's BatchDriver (scheduler batch builders, CUDA graphs, greedy
Sampler). Three views of a step:
1. the whole step as bench_one_batch times it (sync before and after);
2. each phase on its own, with a device sync after it: host time to issue it, then time to drain;
3. a torch.profiler trace of a few steps: the top host operators and the GPU's busy share.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from radixserve.bench.batch_driver import BatchDriver, build_runner, resolve_model_path
from radixserve.sampling_batch import SamplingBatch
from radixserve.scheduler.batch import build_decode_batch, record_sampled
from radixserve.server_args import ServerArgs


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="radixserve/configs/llama-3.1-8b")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    return p.parse_args()


def main() -> None:
    args = parse()
    bs, steps = args.batch_size, args.steps
    total = 3 * steps + 8
    sargs = ServerArgs(model_path=resolve_model_path(args.model), load_format="dummy", dtype=args.dtype,
                       max_total_tokens=bs * (args.input_len + total + 8), max_running_requests=bs,
                       context_length=args.input_len + total + 8)
    runner = build_runner(sargs)
    driver = BatchDriver(runner, seed=0)
    cuda = runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode():
        driver.reset()
        reqs = driver.new_reqs(bs, args.input_len, total)
        driver.prefill(reqs)
        for _ in range(4):
            driver.decode(reqs)

        whole = [driver.timed(lambda: driver.decode(reqs)) for _ in range(steps)]
        print(f"whole step (bench_one_batch's timing): median {1e3 * statistics.median(whole):.3f} ms")

        phases: dict[str, list[tuple[float, float]]] = {}

        def phase(name: str, fn: Callable[..., object], *args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            value = fn(*args, **kwargs)
            t1 = time.perf_counter()
            sync()
            phases.setdefault(name, []).append((t1 - t0, time.perf_counter() - t1))
            return value

        n = len(reqs)
        for _ in range(steps):
            sync()
            batch = phase("build_decode_batch", build_decode_batch, reqs, runner, driver.cache)
            out = phase("forward (graph replay)", runner.forward, batch)
            params = phase("SamplingBatch.build", SamplingBatch.build, [r.params for r in reqs],
                           [r.output_ids for r in reqs], [r.origin_input_ids for r in reqs], [[]] * n,
                           [None] * n, runner.vocab_size, runner.device)
            sampled = phase("sampler", driver.sampler, out.next_token_logits, params, return_logprob=False)
            phase("record_sampled", record_sampled, runner, batch, sampled.next_token_ids)
            tokens = phase("tolist", sampled.next_token_ids.tolist)
            for req, token in zip(reqs, tokens):
                req.kv_committed_len += 1
                req.output_ids.append(token)
        print(f"{'phase':<26} {'host ms':>9} {'drain ms':>9}")
        for name, values in phases.items():
            host = statistics.median(v[0] for v in values) * 1e3
            drain = statistics.median(v[1] for v in values) * 1e3
            print(f"{name:<26} {host:>9.3f} {drain:>9.3f}")

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(8):
                driver.timed(lambda: driver.decode(reqs))
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
        gpu = sum(e.self_device_time_total for e in events) / 1e3 / 8
        print(f"GPU busy per step {gpu:.3f} ms")
        driver.reset()


if __name__ == "__main__":
    main()
