"""Static-batch latency: one prefill and a decode loop on a ModelRunner, with no scheduler loop.

    python -m radixserve.bench_one_batch --model-path radixserve/configs/llama-3.1-8b --load-format dummy \\
        --batch-size 1 32 --input-len 1024 --output-len 16 --result-file one_batch.jsonl

Every (batch size, input length) pair gets --warmup untimed runs, then one timed run: a prefill of
batch x input tokens, then output_len - 1 decode steps. Batches are built by the scheduler's own
build_extend_batch / build_decode_batch and sampled greedily by its Sampler, so the timings cover
the real per-step path (batch building, forward, sampling, the host copy of the new ids). The KV
pool is sized to the largest run unless --max-total-tokens says otherwise, and reset between runs.

Beside each timing it prints the work the step cannot avoid: the bytes a decode step must read
(weights + the batch's KV) and the FLOPs of the prefill, as achieved GB/s and TFLOP/s; on CUDA also
the time the step would take at --peak-gbps / --peak-tflops (defaults: the rates measured on the GPU
model found, H100 or H200; see MEASURED_PEAKS).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from radixserve.bench.batch_driver import BatchDriver, build_runner, resolve_model_path
from radixserve.layers.moe.layer import FusedMoE
from radixserve.server_args import CHOICES, ServerArgs, ServerArgsError

WARMUP_MAX_OUTPUT = 32  # warm-up decodes this many steps at most: enough to settle allocators
# (GB/s, dense bf16 TFLOP/s) measured on the lent machines: a device-to-device copy counting bytes read
# and written, and an 8192^3 bf16 matmul on random data. Matched against the device name, first hit wins.
MEASURED_PEAKS = (("H200", (4300.0, 790.0)), ("H100", (3000.0, 800.0)))


# ---- physical limits ---------------------------------------------------------------------------
@dataclass
class ModelCost:
    """What a forward pass must move and compute, whatever the kernels: the roofline inputs."""

    params: int  # distinct parameters (a tied embedding counts once)
    weight_bytes: int  # bytes a decode step reads: every weight but the unread embedding rows
    layer_matmul_params: int  # weights every token multiplies through (decoder layers)
    lm_head_params: int  # applied once per request in prefill, not per token
    kv_bytes_per_token: int
    num_layers: int
    num_q_heads: int
    head_dim: int  # the width values (and the output) have
    qk_head_dim: int = 0  # the width a query-key product has, when not head_dim (MLA: latent + rope dims)
    # Mixture of experts: the experts' share of weight_bytes and layer_matmul_params, and the routing
    expert_bytes: int = 0
    expert_params: int = 0
    num_experts: int = 0
    top_k: int = 0

    @classmethod
    def of(cls, runner: Any) -> ModelCost:
        model = runner.model
        unique = {id(p): p for p in model.parameters()}.values()
        params = sum(p.numel() for p in unique)
        total_bytes = sum(p.numel() * p.element_size() for p in unique)
        embed = model.embed_tokens.weight
        lm_head = model.lm_head.weight
        tied = embed is lm_head
        # an untied embedding is only gathered row by row: a decode step reads bs rows of it
        weight_bytes = total_bytes - (0 if tied else embed.numel() * embed.element_size())
        layer_params = sum(p.numel() for p in model.layers.parameters() if p.dim() >= 2)
        spec = model.layers[0].self_attn.attn
        experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
        expert_tensors = [p for m in experts for p in (m.w13, m.w2)]
        moe = getattr(runner.cfg, "moe", None)
        return cls(
            params=params, weight_bytes=weight_bytes, layer_matmul_params=layer_params,
            lm_head_params=lm_head.numel(), kv_bytes_per_token=runner.pools.kv.bytes_per_token(),
            num_layers=len(model.layers), num_q_heads=spec.num_heads, head_dim=spec.head_dim,
            qk_head_dim=spec.head_dim + getattr(spec, "qk_rope_head_dim", 0),
            expert_bytes=sum(p.numel() * p.element_size() for p in expert_tensors),
            expert_params=sum(p.numel() for p in expert_tensors),
            num_experts=moe.num_experts if moe and experts else 0, top_k=moe.top_k if moe and experts else 0,
        )

    def experts_read_share(self, batch: int) -> float:
        """The expected share of a layer's experts a decode step reads: a batch of `batch` tokens, each
        routed to top_k of num_experts uniformly, leaves an expert untouched with (1 - k/E)^batch. At
        batch 1 it is exactly k/E."""
        if not self.num_experts:
            return 1.0
        return 1.0 - (1.0 - self.top_k / self.num_experts) ** batch

    def decode_bytes(self, batch: int, context: float) -> float:
        """One decode step: every dense weight once, the experts the batch reaches once, plus the KV
        of `context` tokens for each request."""
        weights = self.weight_bytes - self.expert_bytes + self.expert_bytes * self.experts_read_share(batch)
        return weights + self.kv_bytes_per_token * batch * context

    def prefill_flops(self, batch: int, input_len: int) -> float:
        """2 FLOPs per multiply-add: layer weights per token (of the experts, the top_k a token goes
        through), LM head per request, causal attention."""
        tokens = batch * input_len
        per_token = self.layer_matmul_params
        if self.num_experts:
            per_token -= self.expert_params * (1.0 - self.top_k / self.num_experts)
        linear = 2.0 * (per_token * tokens + self.lm_head_params * batch)
        # QK^T and PV: 2 * (qk_head_dim + head_dim) per (query, visible key) pair and head (MLA's absorbed
        # form attends over the latent: 576 + 512 for DeepSeek)
        pairs = batch * input_len * (input_len + 1) / 2
        attention = 2.0 * self.num_layers * self.num_q_heads * ((self.qk_head_dim or self.head_dim) + self.head_dim) * pairs
        return linear + attention


# ---- one measured configuration -----------------------------------------------------------------
@dataclass
class RunResult:
    run_name: str
    batch_size: int
    input_len: int
    output_len: int
    prefill_latency_s: float
    prefill_throughput_tok_s: float
    decode_median_ms: float | None
    decode_mean_ms: float | None
    decode_throughput_tok_s: float | None
    total_latency_s: float
    total_throughput_tok_s: float
    decode_bytes_per_step: float
    decode_achieved_gbps: float | None
    prefill_flops: float
    prefill_achieved_tflops: float
    decode_floor_ms: float | None = None  # at the peak bandwidth (CUDA only)
    prefill_floor_s: float | None = None  # at the peak FLOP rate (CUDA only)


def summarize(
    name: str, bs: int, input_len: int, output_len: int, prefill_s: float, steps: list[float],
    cost: ModelCost, peaks: tuple[float, float] | None,
) -> RunResult:
    decode_s, median = sum(steps), statistics.median(steps) if steps else None
    mean = decode_s / len(steps) if steps else None
    # decode step i (1-based) attends over input_len + i tokens: use the mean context
    context = input_len + (len(steps) + 1) / 2
    step_bytes = cost.decode_bytes(bs, context)
    flops, total = cost.prefill_flops(bs, input_len), prefill_s + decode_s
    result = RunResult(
        run_name=name, batch_size=bs, input_len=input_len, output_len=output_len,
        prefill_latency_s=prefill_s, prefill_throughput_tok_s=bs * input_len / prefill_s,
        decode_median_ms=None if median is None else median * 1e3,
        decode_mean_ms=None if mean is None else mean * 1e3,
        decode_throughput_tok_s=None if median is None else bs / median,
        total_latency_s=total, total_throughput_tok_s=bs * (input_len + output_len) / total,
        decode_bytes_per_step=step_bytes,
        decode_achieved_gbps=None if median is None else step_bytes / median / 1e9,
        prefill_flops=flops, prefill_achieved_tflops=flops / prefill_s / 1e12,
    )
    if peaks is not None:  # (GB/s, TFLOP/s)
        result.decode_floor_ms = step_bytes / peaks[0] / 1e6 if steps else None
        result.prefill_floor_s = flops / peaks[1] / 1e12
    return result


# ---- setup ---------------------------------------------------------------------------------------
def server_args_for(args: argparse.Namespace) -> ServerArgs:
    runs = [(b, i) for b in args.batch_size for i in args.input_len]
    needed = max(b * (i + args.output_len) for b, i in runs)
    return ServerArgs(
        model_path=resolve_model_path(args.model_path), load_format=args.load_format, dtype=args.dtype,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        device=args.device, attention_backend=args.attention_backend,
        disable_cuda_graph=args.disable_cuda_graph, mem_fraction_static=args.mem_fraction_static,
        # a pool (and request table) just big enough for the largest run: nothing wasted, no OOM
        max_total_tokens=args.max_total_tokens or needed, max_running_requests=max(args.batch_size),
        context_length=max(args.input_len) + args.output_len, random_seed=args.seed,
        enable_torch_compile=args.enable_torch_compile, torch_compile_max_bs=args.torch_compile_max_bs,
    )


def environment(runner: Any, args: argparse.Namespace) -> dict[str, Any]:
    device = runner.device
    env: dict[str, Any] = {
        "model_path": resolve_model_path(args.model_path), "load_format": args.load_format,
        "dtype": str(runner.dtype).replace("torch.", ""), "device": str(device),
        "attention_backend": args.attention_backend or "torch_native",
        # what actually ran, in case the runner ignores or falls back from the requested backend
        "attention_backend_class": type(runner.attn_backend).__name__,
        "disable_cuda_graph": args.disable_cuda_graph, "enable_torch_compile": args.enable_torch_compile,
        "kv_pool_tokens": runner.plan.max_total_tokens,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["peak_gbps"], env["peak_tflops"] = args.peak_gbps, args.peak_tflops
    return env


# ---- report --------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[RunResult], cuda: bool) -> str:
    header = ["batch", "input", "output", "prefill s", "prefill tok/s", "decode med ms", "decode mean ms",
              "decode tok/s", "total s", "decode GB/s", "prefill TFLOP/s"]
    if cuda:
        header += ["decode floor ms", "prefill floor s"]
    rows = [header]
    for r in results:
        row = [str(r.batch_size), str(r.input_len), str(r.output_len), _fmt(r.prefill_latency_s, ".4f"),
               _fmt(r.prefill_throughput_tok_s, ".1f"), _fmt(r.decode_median_ms, ".3f"),
               _fmt(r.decode_mean_ms, ".3f"), _fmt(r.decode_throughput_tok_s, ".1f"),
               _fmt(r.total_latency_s, ".3f"), _fmt(r.decode_achieved_gbps, ".1f"),
               _fmt(r.prefill_achieved_tflops, ".2f")]
        if cuda:
            row += [_fmt(r.decode_floor_ms, ".3f"), _fmt(r.prefill_floor_s, ".4f")]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def limits_note(results: list[RunResult], args: argparse.Namespace) -> str:
    lines = [f"limits: {args.peak_gbps:.0f} GB/s memory, {args.peak_tflops:.0f} TFLOP/s dense (--peak-gbps, "
             "--peak-tflops); a floor is the step's unavoidable bytes or FLOPs at that peak"]
    for r in results:
        bw = "-" if r.decode_achieved_gbps is None else f"{100 * r.decode_achieved_gbps / args.peak_gbps:.0f}%"
        fl = f"{100 * r.prefill_achieved_tflops / args.peak_tflops:.0f}%"
        lines.append(f"  batch {r.batch_size} x input {r.input_len}: decode at {bw} of peak bandwidth "
                     f"({r.decode_bytes_per_step / 1e9:.2f} GB/step), prefill at {fl} of peak FLOP/s")
    return "\n".join(lines)


# ---- CLI -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m radixserve.bench_one_batch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True,
                        help="model folder, or a packaged config name such as llama-3.1-8b")
    parser.add_argument("--load-format", default="auto", choices=CHOICES["load_format"],
                        help="'dummy' builds random weights from config.json alone")
    parser.add_argument("--dtype", default="auto", choices=CHOICES["dtype"])
    parser.add_argument("--quantization", default=None, choices=CHOICES["quantization"],
                        help="fp8: linear weights quantized to e4m3 at load (as the server's flag)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=CHOICES["kv_cache_dtype"])
    parser.add_argument("--device", default="auto", choices=CHOICES["device"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[1024])
    parser.add_argument("--output-len", type=int, default=16, help="tokens per request, the prefill's included")
    parser.add_argument("--attention-backend", default=None, choices=CHOICES["attention_backend"])
    parser.add_argument("--disable-cuda-graph", action="store_true")
    parser.add_argument("--enable-torch-compile", action="store_true",
                        help="decode batches up to --torch-compile-max-bs run the torch.compile'd model")
    parser.add_argument("--torch-compile-max-bs", type=int, default=None)
    parser.add_argument("--mem-fraction-static", type=float, default=None)
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help="KV pool tokens (default: what the largest batch x (input + output) needs)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each timed one")
    parser.add_argument("--seed", type=int, default=0, help="seed for the dummy weights and prompt ids")
    parser.add_argument("--run-name", default="default")
    parser.add_argument("--result-file", default=None, help="append one JSON line per configuration")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="memory bandwidth limit (default: measured for the GPU found; H100 ~3000, H200 ~4300)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense FLOP/s limit (default: measured for the GPU found; H100/H200 bf16 ~800)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "input_len"):
        if min(getattr(args, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: every value must be >= 1")
    if args.output_len < 1:
        raise ValueError(f"--output-len: must be >= 1; got {args.output_len}")
    if args.torch_compile_max_bs is not None and args.torch_compile_max_bs < 1:
        raise ValueError(f"--torch-compile-max-bs: must be >= 1; got {args.torch_compile_max_bs}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: must be >= 0; got {args.warmup}")
    if (args.peak_gbps is not None and args.peak_gbps <= 0) or (args.peak_tflops is not None and args.peak_tflops <= 0):
        raise ValueError("--peak-gbps and --peak-tflops must be > 0")


def default_peaks(gpu_name: str) -> tuple[float, float]:
    """The measured limits of the first MEASURED_PEAKS model named in gpu_name (an H100's otherwise)."""
    return next((peaks for model, peaks in MEASURED_PEAKS if model in gpu_name), MEASURED_PEAKS[-1][1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        sargs = server_args_for(args)
        unbuilt = sargs.unbuilt_feature()
        if unbuilt:
            raise ServerArgsError(unbuilt)
        runner = build_runner(sargs)
    except (ValueError, ServerArgsError) as e:
        print(f"bench_one_batch: error: {e}", file=sys.stderr)
        return 2
    cuda = runner.device.type == "cuda"
    if cuda:
        gbps, tflops = default_peaks(torch.cuda.get_device_name(runner.device))
        args.peak_gbps = args.peak_gbps or gbps
        args.peak_tflops = args.peak_tflops or tflops
    env = environment(runner, args)
    cost = ModelCost.of(runner)
    print(f"model {env['model_path']} ({cost.params / 1e6:,.1f} M params, {cost.weight_bytes / 1e6:,.1f} MB "
          f"read per decode step), {env['dtype']} on {env.get('gpu', env['device'])}, attention "
          f"{env['attention_backend_class']}, KV pool {env['kv_pool_tokens']} tokens, torch {env['torch']}")
    driver = BatchDriver(runner, args.seed)
    peaks = (args.peak_gbps, args.peak_tflops) if cuda else None
    results: list[RunResult] = []
    for bs in args.batch_size:
        for input_len in args.input_len:
            record: dict[str, Any] = {
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **env, "params": cost.params, "weight_bytes": cost.weight_bytes,
                "kv_bytes_per_token": cost.kv_bytes_per_token,
            }
            try:
                for _ in range(args.warmup):
                    driver.run(bs, input_len, min(args.output_len, WARMUP_MAX_OUTPUT))
                prefill_s, steps = driver.run(bs, input_len, args.output_len)
            except RuntimeError as e:  # CUDA OOM included
                # one shape that does not fit should not lose the others' figures
                message = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"batch {bs} x input {input_len}: failed: {message}", file=sys.stderr)
                record.update(run_name=args.run_name, batch_size=bs, input_len=input_len,
                              output_len=args.output_len, error=message)
            else:
                result = summarize(args.run_name, bs, input_len, args.output_len, prefill_s, steps, cost, peaks)
                results.append(result)
                record.update(asdict(result))
                print(f"batch {bs} x input {input_len}: prefill {result.prefill_latency_s:.4f} s, decode "
                      f"median {_fmt(result.decode_median_ms, '.3f')} ms/step", flush=True)
            if args.result_file:
                with open(args.result_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
    print()
    print(format_table(results, cuda))
    if cuda and results:
        print(limits_note(results, args))
    if args.result_file:
        print(f"appended {len(args.batch_size) * len(args.input_len)} lines to {args.result_file}")
    return 0 if len(results) == len(args.batch_size) * len(args.input_len) else 1


if __name__ == "__main__":
    sys.exit(main())
