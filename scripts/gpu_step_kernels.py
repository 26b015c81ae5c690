"""Kernel by kernel, what one decode step (batch 1, or --batch-size) costs inside its CUDA graph, per projection variant.

    python scripts/gpu_step_kernels.py [model] [--variants model cublas ...] [--steps 64] [--per-shape]

Variants: `model` is the model as it ships (the Triton GEMV of radixserve/layers/gemv.py for one
row, gate/up fused with SiLU-and-mul); `model-nosilu` leaves that fusion out, `model-nohead` puts
the LM head on cuBLAS; `cublas` routes every projection to F.linear (as RADIXSERVE_TRITON_GEMV=0
does). `--quantization fp8` profiles the model quantized at load (the FP8 GEMV; `model` then fuses
gate/up with SiLU-and-mul as RADIXSERVE_FP8_GEMV_SILU=1 does, `model-nosilu` runs fp8_gemv and
silu_and_mul apart, the shipped default). For each one the decode graph is captured again, and the script prints:
1. the step as bench_one_batch times it (scheduler batch builder, graph replay, greedy sampling,
   sync before and after), median of --steps;
2. the graph replay alone, timed with events over back-to-back replays;
3. a profile of replays: each kernel's mean duration per step, grouped by kind, inside the graph
   (the kernels a decode step really runs, with no host launch between them).

--per-shape first times each projection kind alone over the model's own weights (cuBLAS against the
model's GEMV), and reports what Triton built for the GEMV kernels (registers, spills, PTX).

An experiment, not a serving path: it answers why a GEMV that is faster alone can be slower in the
step (docs/gpu.md, "Batch-1 projections").
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "scripts")
from gpu_gemv_bench import graph_time_us, replay_ms  # noqa: E402

from radixserve.bench.batch_driver import BatchDriver, build_runner, resolve_model_path  # noqa: E402
from radixserve.layers import gemv as model_gemv  # noqa: E402
from radixserve.layers.quantization import fp8_kernels  # noqa: E402
from radixserve.model_executor.cuda_graph import CudaGraphRunner  # noqa: E402
from radixserve.server_args import ServerArgs  # noqa: E402


def use_variant(name: str) -> None:
    """model-nosilu: gate/up and SiLU-and-mul unfused (bf16 and FP8); model-nohead: the LM head on cuBLAS; cublas:
    every projection on F.linear."""
    from radixserve.layers import embedding
    from radixserve.models import llama

    if name not in ("model", "model-nosilu", "model-nohead", "model-nosilu-nohead", "cublas"):
        raise SystemExit(f"unknown variant {name!r}")
    model_gemv.ENABLED = name != "cublas"
    llama.takes_gemv = (lambda x, w: False) if "nosilu" in name else model_gemv.takes_gemv
    fp8_kernels.GEMV_SILU = "nosilu" not in name  # the FP8 gate/up GEMV with SiLU-and-mul fused, or not
    embedding.takes_gemv = (lambda x, w: False) if "nohead" in name else model_gemv.takes_gemv


def per_shape(model: torch.nn.Module) -> None:
    """Each projection kind over the 32 layers' own weights (distinct, far beyond L2), captured in
    one CUDA graph per implementation: us per call."""
    kinds = {
        "qkv": [layer.self_attn.qkv_proj.weight for layer in model.layers],
        "o": [layer.self_attn.o_proj.weight for layer in model.layers],
        "gate_up": [layer.mlp.gate_up_proj.weight for layer in model.layers],
        "down": [layer.mlp.down_proj.weight for layer in model.layers],
        "lm_head": [model.lm_head.weight] * 4,
    }
    print(f"\n{'kind':<8} {'cuBLAS':>8} {'model gemv':>10} {'silu fused':>10}  (us per call)")
    for kind, weights in kinds.items():
        x = torch.randn(1, weights[0].shape[1], device="cuda", dtype=weights[0].dtype)
        cublas = graph_time_us([lambda w=w, x=x: F.linear(x, w) for w in weights])
        ours = graph_time_us([lambda w=w, x=x: model_gemv.gemv(x, w) for w in weights])
        fused = (graph_time_us([lambda w=w, x=x: model_gemv.gemv_silu_mul(x, w) for w in weights])
                 if kind == "gate_up" else 0.0)
        print(f"{kind:<8} {cublas:8.2f} {ours:10.2f} {fused:10.2f}", flush=True)
    compiled_report()


def compiled_report() -> None:
    """What Triton built for each GEMV kernel: registers, spills, stages, shared memory, and the PTX
    (written to $OUT when set), to tell a code difference from a launch difference."""
    import os

    out_dir = os.environ.get("OUT")
    for label, fn in (("gemv", model_gemv._gemv_kernel), ("gemv_silu_mul", model_gemv._gemv_silu_mul_kernel)):
        caches = getattr(fn, "device_caches", {})
        for device, entry in caches.items():
            for i, kernel in enumerate(entry[0].values()):
                meta = kernel.metadata
                print(f"{label}[{i}] dev {device}: regs {kernel.n_regs} spills {kernel.n_spills} warps "
                      f"{meta.num_warps} stages {meta.num_stages} shared {meta.shared} "
                      f"consts {getattr(kernel.src, 'constants', '?')} attrs {getattr(kernel.src, 'attrs', '?')}")
                if out_dir:
                    with open(os.path.join(out_dir, f"{label}_{i}.ptx"), "w") as f:
                        f.write(kernel.asm.get("ptx", ""))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for tag, kind in (("splitkreduce", "cuBLAS split-K reduce"), ("gemv", "GEMV"), ("gemm", "GEMV"),
                      ("nvjet", "GEMV"), ("cutlass", "GEMV"),
                      ("group_quant", "fp8 quantiser"), ("rmsnorm", "rmsnorm"), ("rotary", "rotary"), ("store_kv", "store_kv"),
                      ("silu", "silu_mul"), ("decode_split", "attention split"),
                      ("decode_merge", "attention merge")):
        if tag in low:
            return kind
    return "other"


def profile_replays(graph: torch.cuda.CUDAGraph, n: int) -> dict[str, tuple[int, float]]:
    """{kernel name: (calls per step, mean us per call)} over n replays."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
    sums: dict[str, list[float]] = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            sums[e.name].append(e.device_time_total)
    return {name: (len(v) // n, statistics.fmean(v)) for name, v in sums.items()}


def profile_steps(driver: BatchDriver, reqs: list, n: int) -> None:
    """Where a whole step's time goes beside the graph: host ops by self time, and every kernel,
    per step, over n timed steps as bench_one_batch runs them."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            driver.timed(lambda: driver.decode(reqs))
    averages = prof.key_averages()
    print(f"   -- host ops by self time, us per step (over {n} steps)")
    for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"   {e.self_cpu_time_total / n:9.1f} us  {e.count // n:>3} calls  {e.key[:90]}")
    print("   -- kernels and copies, us per step")
    on_device = [e for e in averages if e.self_device_time_total > 0]
    for e in sorted(on_device, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"   {e.self_device_time_total / n:9.1f} us  {e.count // n:>3} calls  {e.key[:90]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="radixserve/configs/llama-3.1-8b")
    p.add_argument("--variants", nargs="+", default=["model", "cublas", "model", "cublas"])
    p.add_argument("--batch-size", type=int, default=1, help="rows a step (a CUDA graph bucket: 1-8, then steps of 8)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--kernels", action="store_true", help="also list every kernel name")
    p.add_argument("--per-shape", action="store_true", help="also time each projection kind on its own")
    p.add_argument("--step-profile", action="store_true",
                   help="also profile whole steps (host ops and kernels): what the step spends outside the graph")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="the model quantized at load (the FP8 GEMV at one row; --per-shape needs bf16 weights)")
    args = p.parse_args()
    total = 4 * args.steps * len(args.variants) + 64
    ctx = args.input_len + total
    bs = args.batch_size
    sargs = ServerArgs(model_path=resolve_model_path(args.model), load_format="dummy", dtype="bfloat16",
                       max_total_tokens=bs * (ctx + 8), max_running_requests=bs, context_length=ctx + 8,
                       quantization=args.quantization)
    runner = build_runner(sargs)
    driver = BatchDriver(runner, seed=0)
    summary = []
    with torch.inference_mode():
        reqs = driver.new_reqs(bs, args.input_len, total)
        driver.prefill(reqs)
        if args.per_shape:
            per_shape(runner.model)
        for name in args.variants:
            use_variant(name)
            runner.graph_runner = CudaGraphRunner(runner, bs)
            for _ in range(4):
                driver.decode(reqs)
            step = statistics.median(driver.timed(lambda: driver.decode(reqs)) for _ in range(args.steps)) * 1e3
            graph = runner.graph_runner.graphs[bs]
            replay = replay_ms(graph, 100, warmup=5)
            kernels = profile_replays(graph, 10)
            by_kind: dict[str, float] = collections.defaultdict(float)
            for kname, (calls, us) in kernels.items():
                by_kind[kernel_kind(kname)] += calls * us
            busy = sum(by_kind.values()) / 1e3
            print(f"\n== {name}: bench step {step:.3f} ms, graph replay {replay:.3f} ms, kernels {busy:.3f} ms")
            for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
                print(f"   {kind:<24} {us / 1e3:8.3f} ms")
            top = sorted(kernels.items(), key=lambda kv: -kv[1][0] * kv[1][1])
            for kname, (calls, us) in top if args.kernels else top[:12]:
                print(f"   {calls:>4} x {us:8.2f} us  {kname[:110]}")
            if args.step_profile:
                profile_steps(driver, reqs, 20)
            summary.append((name, step, replay, busy, by_kind.get("GEMV", 0.0) / 1e3))
    print(f"\n{'variant':<32} {'step ms':>8} {'replay ms':>9} {'kernels ms':>10} {'GEMV ms':>8}")
    for name, step, replay, busy, gemv_ms in summary:
        print(f"{name:<32} {step:8.3f} {replay:9.3f} {busy:10.3f} {gemv_ms:8.3f}")


if __name__ == "__main__":
    main()
