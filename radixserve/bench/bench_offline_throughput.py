"""Offline throughput: radixserve's Engine against transformers `generate` on the same random prompts.

    python -m radixserve.bench_offline_throughput --num-prompts 64 --input-len 128 --output-len 128 \\
        --compare-transformers --result-file bench.jsonl

radixserve runs first (warm-up, then one timed `generate` over every prompt, then batch-1 calls);
transformers runs afterwards in this process, once the engine is shut down, so the two never share cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from radixserve.bench.serving_dataset import common_prefix
from radixserve.server_args import CHOICES, ServerArgs, ServerArgsError

# Engine flags this bench forwards; None means "leave it to the engine's default".
ENGINE_FLAGS = ("max_running_requests", "chunked_prefill_size", "page_size", "load_format", "device")
WARMUP_PROMPTS = 8
WARMUP_OUTPUT_LEN = 16


@dataclass
class Measurement:
    system: str  # "radixserve" or "transformers"
    mode: str  # "batched" or "batch-1"
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def requests_s(self) -> float:
        return self.num_requests / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "output_tok_s": self.output_tok_s, "total_tok_s": self.total_tok_s,
                "requests_s": self.requests_s}


# ---- CLI -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m radixserve.bench_offline_throughput", description=__doc__.splitlines()[0],
    )
    g = parser.add_argument_group("workload")
    g.add_argument("--model-path", default=None, help="HF folder or GGUF file (default: the bundled model)")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--input-len", type=int, default=128, help="prompt length in tokens (the maximum with --range-ratio)")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="prompt lengths are uniform in [input_len*(1-ratio), input_len]; 0 means exactly input-len")
    g.add_argument("--output-len", type=int, default=128, help="new tokens per prompt (EOS ignored)")
    g.add_argument("--seed", type=int, default=0, help="seed for the random prompt token ids and lengths")
    g.add_argument("--dtype", default="auto", choices=CHOICES["dtype"])
    g = parser.add_argument_group("engine (forwarded to radixserve; unset means the engine default)")
    g.add_argument("--max-running-requests", type=int, default=None)
    g.add_argument("--chunked-prefill-size", type=int, default=None)
    g.add_argument("--page-size", type=int, default=None)
    g.add_argument("--load-format", default=None, choices=CHOICES["load_format"])
    g.add_argument("--device", default=None, choices=CHOICES["device"])
    g.add_argument("--log-level", default="warning", help="engine log level (decode logs would clutter the table)")
    g = parser.add_argument_group("transformers comparison")
    g.add_argument("--compare-transformers", action="store_true",
                   help="also time transformers generate on the same prompts (after the engine shuts down)")
    g.add_argument("--hf-batch-size", type=int, default=None,
                   help="prompts per transformers generate call in the batched run (default: all)")
    g.add_argument("--hf-batch1-prompts", type=int, default=4,
                   help="first N prompts for the batch-1 runs of both systems (0 skips batch-1)")
    g = parser.add_argument_group("output")
    g.add_argument("--result-file", default=None, help="append one JSON line with the config and every figure")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for workload values that make no benchmark."""
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1; got {getattr(args, name)}")
    if not 0.0 <= args.range_ratio <= 1.0:
        raise ValueError(f"--range-ratio: must be in [0, 1]; got {args.range_ratio}")
    if args.hf_batch_size is not None and args.hf_batch_size < 1:
        raise ValueError(f"--hf-batch-size: must be >= 1; got {args.hf_batch_size}")
    if args.hf_batch1_prompts < 0:
        raise ValueError(f"--hf-batch1-prompts: must be >= 0; got {args.hf_batch1_prompts}")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model_path": args.model_path, "dtype": args.dtype, "log_level": args.log_level}
    kwargs.update({name: getattr(args, name) for name in ENGINE_FLAGS if getattr(args, name) is not None})
    ServerArgs(**kwargs)  # validate here so a bad flag fails before anything starts
    return kwargs


# ---- prompts -------------------------------------------------------------------------------------
def prompt_lengths(num_prompts: int, input_len: int, range_ratio: float, rng: random.Random) -> list[int]:
    low = max(1, int(input_len * (1.0 - range_ratio)))
    return [rng.randint(low, input_len) for _ in range(num_prompts)]


def make_prompts(
    num_prompts: int,
    input_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int,
    exclude_ids: Iterable[int] = (),
) -> list[list[int]]:
    """Random token-id prompts, the same for the same arguments. Special tokens are left out so a prompt
    never holds an EOS or chat marker that either system might treat specially."""
    excluded = set(exclude_ids)
    allowed = [i for i in range(vocab_size) if i not in excluded]
    if not allowed:
        raise ValueError("no token ids left to draw prompts from")
    rng = random.Random(seed)
    lengths = prompt_lengths(num_prompts, input_len, range_ratio, rng)
    return [rng.choices(allowed, k=n) for n in lengths]


def token_space(args: argparse.Namespace) -> tuple[Any, int, list[int], int]:
    """(model source, vocab size to draw from, special ids to skip, pad id for transformers)."""
    from radixserve.loader.source import resolve_model_source
    from radixserve.loader.tokenizer import load_tokenizer

    source = resolve_model_source(args.model_path, args.load_format or "auto")
    vocab = int(source.hf_config.vocab_size)
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        return source, vocab, [], 0
    vocab = min(vocab, len(tokenizer))  # ids past the tokenizer would not detokenize
    specials = sorted(set(tokenizer.all_special_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return source, vocab, specials, int(pad or 0)


# ---- radixserve ----------------------------------------------------------------------------------
def run_radixserve(
    args: argparse.Namespace, prompts: list[list[int]], warmup: list[list[int]],
) -> tuple[list[Measurement], list[list[int]], dict[str, Any]]:
    """Batched and batch-1 measurements, the batch-1 output ids, and what the engine reported."""
    from radixserve import Engine

    params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    results: list[Measurement] = []
    with Engine(**engine_kwargs(args)) as engine:
        engine.generate(input_ids=warmup, sampling_params={**params, "max_new_tokens": WARMUP_OUTPUT_LEN})
        # the timed prompts must pay their own prefill, not hit what warm-up left in the radix cache
        engine.flush_cache()
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        seconds = time.perf_counter() - start
        state = engine.get_scheduler_state()
        results.append(Measurement(
            "radixserve", "batched", len(prompts), sum(o["meta_info"]["prompt_tokens"] for o in outs),
            sum(o["meta_info"]["completion_tokens"] for o in outs), seconds,
            {"retractions": state.num_retractions},
        ))
        batch1_outputs: list[list[int]] = []
        first = prompts[: args.hf_batch1_prompts]
        if first:
            engine.flush_cache()  # these prompts were just cached by the batched run
            start = time.perf_counter()
            singles = [engine.generate(input_ids=p, sampling_params=params) for p in first]
            seconds = time.perf_counter() - start
            batch1_outputs = [o["output_ids"] for o in singles]
            results.append(Measurement(
                "radixserve", "batch-1", len(first), sum(o["meta_info"]["prompt_tokens"] for o in singles),
                sum(o["meta_info"]["completion_tokens"] for o in singles), seconds,
            ))
        info = {k: engine.info.get(k) for k in
                ("max_total_num_tokens", "max_running_requests", "chunked_prefill_size", "dtype", "device")}
    return results, batch1_outputs, info


# ---- transformers --------------------------------------------------------------------------------
def load_hf_model(source: Any, dtype: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if source.kind == "gguf":
        # Dense weights, dequantized once, exactly as radixserve holds them: transformers' own GGUF
        # path keeps the weights quantized and dequantizes inside every matmul, a different workload.
        from radixserve.loader.weights import iter_weights

        model = AutoModelForCausalLM.from_config(source.hf_config, dtype=torch_dtype)
        state = {name: t.to(torch_dtype) for name, t in iter_weights(source)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"weights do not fit transformers' model: {missing[:3]} {unexpected[:3]}")
        model.tie_weights()
    elif source.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(source.model_path, dtype=torch_dtype)
    else:  # dummy: random weights of the same shape still time the same work
        # initialised where they will run: an 8B model's random init on the host takes minutes
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(source.hf_config, dtype=torch_dtype)
    return model.to(device).eval()


def hf_generate(model: Any, prompts: Sequence[list[int]], output_len: int, pad_id: int) -> list[list[int]]:
    """Greedy generate of exactly output_len tokens per prompt, left-padded into one batch."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    device = model.device
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
            max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=pad_id,
            temperature=None, top_p=None, top_k=None,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out[:, width:].tolist()


def run_transformers(
    args: argparse.Namespace, source: Any, prompts: list[list[int]], pad_id: int, dtype: str, device: str,
) -> tuple[list[Measurement], list[list[int]]]:
    model = load_hf_model(source, dtype, device)
    hf_generate(model, prompts[:2], min(args.output_len, 4), pad_id)  # warm-up, not timed
    batch = args.hf_batch_size or len(prompts)
    prompt_tokens = sum(len(p) for p in prompts)
    start = time.perf_counter()
    generated = 0
    for i in range(0, len(prompts), batch):
        generated += sum(len(o) for o in hf_generate(model, prompts[i:i + batch], args.output_len, pad_id))
    seconds = time.perf_counter() - start
    results = [Measurement("transformers", "batched", len(prompts), prompt_tokens, generated, seconds,
                           {"hf_batch_size": batch})]
    first = prompts[: args.hf_batch1_prompts]
    batch1_outputs: list[list[int]] = []
    if first:
        start = time.perf_counter()
        batch1_outputs = [hf_generate(model, [p], args.output_len, pad_id)[0] for p in first]
        seconds = time.perf_counter() - start
        results.append(Measurement("transformers", "batch-1", len(first), sum(len(p) for p in first),
                                   sum(len(o) for o in batch1_outputs), seconds))
    return results, batch1_outputs


# ---- report --------------------------------------------------------------------------------------
def ratios(results: list[Measurement]) -> dict[str, float]:
    """radixserve / transformers output tok/s per mode, for the modes both systems ran."""
    by_key = {(m.system, m.mode): m for m in results}
    out: dict[str, float] = {}
    for mode in ("batched", "batch-1"):
        ours, theirs = by_key.get(("radixserve", mode)), by_key.get(("transformers", mode))
        if ours and theirs and theirs.output_tok_s > 0:
            out[mode] = ours.output_tok_s / theirs.output_tok_s
    return out


def format_table(results: list[Measurement]) -> str:
    header = ("system", "mode", "requests", "output tok/s", "total tok/s", "req/s", "seconds")
    rows = [header] + [
        (m.system, m.mode, str(m.num_requests), f"{m.output_tok_s:.1f}", f"{m.total_tok_s:.1f}",
         f"{m.requests_s:.2f}", f"{m.seconds:.2f}")
        for m in results
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        engine_kwargs(args)
        source, vocab, specials, pad_id = token_space(args)
    except (ValueError, ServerArgsError) as e:
        print(f"bench_offline_throughput: error: {e}", file=sys.stderr)
        return 2
    import torch

    prompts = make_prompts(args.num_prompts, args.input_len, args.range_ratio, vocab, args.seed, specials)
    # a different seed: warm-up must not share prefixes with the timed prompts
    warmup = make_prompts(min(args.num_prompts, WARMUP_PROMPTS), args.input_len, args.range_ratio, vocab,
                          args.seed + 1, specials)
    threads = torch.get_num_threads()
    # on a shared machine other work steals cores; say so next to the figures it skews
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"workload: {args.num_prompts} prompts, input {args.input_len} tokens (range ratio {args.range_ratio}, "
          f"{sum(map(len, prompts))} in all), output {args.output_len} tokens, seed {args.seed}")
    print(f"torch {torch.__version__}, {threads} intra-op threads in this process "
          "(torch default, not changed; the engine's scheduler process keeps its own default too)")
    if load is not None:
        print(f"1-minute load average before the run: {load:.2f} on {os.cpu_count()} CPUs")

    results, ours_b1, engine_info = run_radixserve(args, prompts, warmup)
    print(f"radixserve engine: {engine_info}")
    agreement: dict[str, Any] | None = None
    if args.compare_transformers:
        results_hf, theirs_b1 = run_transformers(
            args, source, prompts, pad_id, engine_info["dtype"], engine_info["device"]
        )
        results += results_hf
        if source.kind != "dummy" and ours_b1:
            # a sanity check that both systems did the same work, not a parity test
            same = [common_prefix(a, b) for a, b in zip(ours_b1, theirs_b1)]
            agreement = {"identical": sum(n == args.output_len for n in same), "prompts": len(same),
                         "matching_prefix_tokens": same}

    print()
    print(format_table(results))
    rat = ratios(results)
    for mode, r in rat.items():
        print(f"radixserve / transformers output tok/s, {mode}: {r:.2f}x")
    retractions = results[0].notes.get("retractions", 0)
    if retractions:
        print(f"note: the scheduler retracted {retractions} requests (KV pool too small for the batch)")
    if agreement is not None:
        print(f"batch-1 greedy outputs identical to transformers: {agreement['identical']}/{agreement['prompts']} "
              f"(matching prefix tokens: {agreement['matching_prefix_tokens']})")

    if args.result_file:
        record = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": vars(args), "torch_threads": threads, "load_average_1m": load, "engine": engine_info,
            "results": [m.as_dict() for m in results], "ratios": rat, "batch1_agreement": agreement,
        }
        with open(args.result_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"appended results to {args.result_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
