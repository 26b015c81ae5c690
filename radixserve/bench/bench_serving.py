"""Online serving benchmark: streams requests at an OpenAI-compatible server (radixserve, vLLM, SGLang)
and reports throughput, TTFT, ITL, TPOT and E2E latency.

    python -m radixserve.bench_serving --backend openai --port 30000 --num-prompts 200 \\
        --random-input-len 512 --random-output-len 128 --request-rate 8 --output-file serving.jsonl

Backends: `openai` (/v1/completions), `openai-chat` (/v1/chat/completions), `radixserve` and `sglang`
(native /generate). Every request streams (SSE). Input tokens are counted with the bench tokenizer
(--tokenizer; the bundled SmolLM2 one by default, so pass the served model's for another model) on the raw
prompt, so a chat template's tokens are not in the input totals.

--tokenize-prompt (native backends only) sends random token ids as `input_ids` instead of text: prompt
lengths are exact, no tokenizer is loaded (so a config-only model with dummy weights can be benched), the
ids are drawn from [0, vocab size) with the size taken from --vocab-size or the server's /get_server_info,
and output tokens are the server's count (meta_info.completion_tokens, else the ids streamed).

--dataset-name generated-shared-prefix (SGLang's, --gsp-* flags) sends groups of prompts that share a random
system prompt; the report adds the server's prefix-cache hit rate wherever replies carry cached_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from radixserve.bench.serving_dataset import (
    DATASETS,
    DatasetRow,
    PromptSource,
    SharedPrefixShape,
    Tokenizer,
    TokenVocab,
    count_tokens,
    get_dataset,
    shared_prefix_shape,
)
from radixserve.bench.serving_metrics import RequestOutput, compute_metrics, format_report
from radixserve.bench.serving_stream import NATIVE, SSEParser, StreamDecoder

# backend -> endpoint path
BACKENDS = {
    "openai": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
    "radixserve": "/generate",
    "sglang": "/generate",
}
GSP = "generated-shared-prefix"
DEFAULT_NUM_PROMPTS = 1000
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600)  # long runs at high load are legitimate
MAX_ERRORS_KEPT = 10


class BenchError(RuntimeError):
    """The benchmark cannot run (server unreachable, no model, warm-up failed); one line for the user."""


# ---- SSE -----------------------------------------------------------------------------------------
def build_payload(backend: str, model: str | None, row: DatasetRow, ignore_eos: bool) -> dict[str, Any]:
    if backend in NATIVE:
        params: dict[str, Any] = {"max_new_tokens": row.output_len, "temperature": 0.0}
        if ignore_eos:
            params["ignore_eos"] = True
        prompt: dict[str, Any] = {"text": row.prompt} if row.input_ids is None else {"input_ids": row.input_ids}
        return {**prompt, "sampling_params": params, "stream": True}
    if row.input_ids is not None:
        raise ValueError(f"token-id prompts need a native backend ({', '.join(NATIVE)}); got {backend}")
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": row.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if backend == "openai-chat":
        payload["messages"] = [{"role": "user", "content": row.prompt}]
    else:
        payload["prompt"] = row.prompt
    if ignore_eos:
        payload["ignore_eos"] = True  # not OpenAI's; vLLM, SGLang and radixserve honour it
    return payload


async def send_request(
    session: aiohttp.ClientSession, url: str, backend: str, payload: dict[str, Any], row: DatasetRow,
    tokenizer: Tokenizer | None,
) -> RequestOutput:
    """Send one streaming request and time it; failures are recorded in the result, never raised."""
    out = RequestOutput(prompt_len=row.prompt_len, output_len=row.output_len)
    decoder, parser = StreamDecoder(backend), SSEParser()
    out.start = time.perf_counter()
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                raise BenchError(f"HTTP {resp.status}: {body}")
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()  # arrival time, taken before parsing
                for data in parser.feed(chunk):
                    _apply(out, decoder, data, now)
            for data in parser.close():
                _apply(out, decoder, data, time.perf_counter())
        out.finish(time.perf_counter())
        out.server_prompt_tokens, out.cached_tokens = decoder.prompt_tokens, decoder.cached_tokens
        if decoder.completion_tokens is not None:
            out.output_tokens = decoder.completion_tokens
        elif tokenizer is not None:
            out.output_tokens = count_tokens(tokenizer, out.generated_text)
        else:  # --tokenize-prompt against a server that gave no count: what the chunks carried
            out.output_tokens = out.streamed_tokens
        out.success = True
    except Exception as e:  # any failure is one failed request, reported with its text
        out.finish(time.perf_counter())
        out.error = f"{type(e).__name__}: {e}" if not isinstance(e, BenchError) else str(e)
    return out


def _apply(out: RequestOutput, decoder: StreamDecoder, data: str, now: float) -> None:
    """Apply one SSE event's data to `out`."""
    if data.strip() == "[DONE]":
        return
    delta = decoder.feed(json.loads(data))
    if delta.error is not None:
        raise BenchError(f"server error in stream: {delta.error}")
    if delta.has_content:
        out.on_content(now, delta.num_tokens if delta.num_tokens and delta.num_tokens > 0 else 1)
        out.generated_text += delta.text


# ---- the run -------------------------------------------------------------------------------------
def base_url_of(args: argparse.Namespace) -> str:
    url = args.base_url or f"http://{args.host}:{args.port}"
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url  # an OpenAI SDK-style base works too


async def fetch_model(session: aiohttp.ClientSession, base_url: str) -> str:
    try:
        async with session.get(f"{base_url}/v1/models") as resp:
            resp.raise_for_status()
            models = (await resp.json()).get("data") or []
    except Exception as e:
        raise BenchError(f"cannot list models at {base_url}/v1/models ({type(e).__name__}: {e}); "
                         "pass --model") from e
    if not models:
        raise BenchError(f"{base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


async def fetch_vocab_size(session: aiohttp.ClientSession, base_url: str) -> int:
    """The served model's vocabulary size: radixserve's /get_server_info carries the scheduler's
    `vocab_size` (the model's embedding rows, the bound /generate checks input_ids against)."""
    tried = []
    for route in ("/get_server_info", "/get_model_info"):
        try:
            async with session.get(base_url + route) as resp:
                resp.raise_for_status()
                info = await resp.json()
        except Exception as e:
            tried.append(f"{route}: {type(e).__name__}: {e}")
            continue
        size = info.get("vocab_size") if isinstance(info, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
        tried.append(f"{route}: no vocab_size")
    raise BenchError(f"cannot learn the vocabulary size from {base_url} ({'; '.join(tried)}); pass --vocab-size")


def num_requests(args: argparse.Namespace) -> int:
    """Timed requests: --num-prompts (default 1000), but generated-shared-prefix sends every prompt of
    every group, as SGLang (which ignores --num-prompts there) does."""
    if args.dataset_name == GSP:
        return shared_prefix_shape(args).num_requests
    return DEFAULT_NUM_PROMPTS if args.num_prompts is None else args.num_prompts


def shared_prefix_summary(rows: Sequence[DatasetRow]) -> str:
    """One line on a generated-shared-prefix workload as drawn (text lengths are the bench tokenizer's)."""
    groups: dict[int | None, int] = {}
    for row in rows:
        groups.setdefault(row.group, row.prefix_len)
    shared = sum(groups.values()) / max(1, len(groups))
    question = sum(r.prompt_len - r.prefix_len for r in rows) / max(1, len(rows))
    return (f"{GSP}: {len(groups)} groups, {len(rows)} prompts, system prompts of {shared:.1f} tokens "
            f"on average shared within a group, then {question:.1f} more tokens per prompt")


async def arrivals(rows: Sequence[DatasetRow], rate: float, rng: random.Random) -> AsyncIterator[DatasetRow]:
    """Rows at Poisson arrival times (exponential gaps, mean 1/rate); all at once for rate inf."""
    for i, row in enumerate(rows):
        if i > 0 and not math.isinf(rate):
            await asyncio.sleep(rng.expovariate(rate))
        yield row


async def run_benchmark(args: argparse.Namespace, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """Warm up, run every prompt, print the report, and return the result record (the JSON line).

    `tokenizer` is None under --tokenize-prompt, which needs none."""
    base_url = base_url_of(args)
    url = base_url + BACKENDS[args.backend]
    ignore_eos = not args.disable_ignore_eos
    tokenize_prompt: bool = args.tokenize_prompt
    vocab_size: int | None = args.vocab_size
    if not tokenize_prompt and tokenizer is None:
        raise BenchError("text prompts need a tokenizer")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0)  # aiohttp's default 100 connections would cap concurrency
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT, headers=headers, connector=connector) as session:
        model = args.model
        if model is None and args.backend not in NATIVE:
            model = await fetch_model(session, base_url)
        source: PromptSource
        if tokenize_prompt:
            if vocab_size is None:
                vocab_size = await fetch_vocab_size(session, base_url)
            source = TokenVocab(vocab_size)
        else:
            assert tokenizer is not None
            source = tokenizer
        count = num_requests(args)
        if args.num_prompts is not None and args.num_prompts != count:
            print(f"note: --num-prompts {args.num_prompts} is not used by {args.dataset_name}: it sends "
                  f"--gsp-num-groups x --gsp-prompts-per-group = {count} requests")
        rows = get_dataset(args, source, count, args.seed)
        # warm-up prompts come from another seed so they leave nothing in a prefix cache for the timed ones
        warmup_rows = get_dataset(args, source, args.warmup_requests, args.seed + 1) if args.warmup_requests else []

        async def one(row: DatasetRow) -> RequestOutput:
            payload = build_payload(args.backend, model, row, ignore_eos)
            return await send_request(session, url, args.backend, payload, row, tokenizer)

        prompts = f"token-id prompts, vocab {vocab_size}" if tokenize_prompt else "text prompts"
        print(f"{args.backend} -> {url}, model {model or '(server default)'}, {len(rows)} {prompts} "
              f"({sum(r.prompt_len for r in rows)} input tokens, {sum(r.output_len for r in rows)} output asked)")
        if args.dataset_name == GSP:
            print(shared_prefix_summary(rows))
        for row in warmup_rows:
            warm = await one(row)
            if not warm.success:
                raise BenchError(f"warm-up request failed: {warm.error}")

        from tqdm import tqdm

        pbar = tqdm(total=len(rows), disable=args.disable_tqdm)
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(row: DatasetRow) -> RequestOutput:
            async with limit or contextlib.nullcontext():
                result = await one(row)
            pbar.update(1)
            return result

        rng = random.Random(args.seed)
        start = time.perf_counter()
        tasks = [asyncio.create_task(limited(row)) async for row in arrivals(rows, args.request_rate, rng)]
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        pbar.close()

    metrics = compute_metrics(outputs, duration)
    header = [
        ("Backend", args.backend),
        ("Traffic request rate", args.request_rate),
        ("Max request concurrency", args.max_concurrency or "not set"),
    ]
    print(format_report(metrics, header))
    errors = list(dict.fromkeys(o.error for o in outputs if not o.success))[:MAX_ERRORS_KEPT]
    for err in errors:
        print(f"failed request: {err}")
    ok = [o for o in outputs if o.success]
    dataset: dict[str, Any] = {}
    if args.dataset_name == GSP:
        dataset = {f"gsp_{k}": v for k, v in dataclasses.asdict(shared_prefix_shape(args)).items()}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": args.backend, "base_url": base_url, "model": model,
        "tokenizer": None if tokenize_prompt else args.tokenizer or "bundled",
        "tokenize_prompt": tokenize_prompt, "vocab_size": vocab_size,
        "dataset_name": args.dataset_name, "num_prompts": len(rows), **dataset,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio, "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency, "seed": args.seed, "ignore_eos": ignore_eos,
        "warmup_requests": args.warmup_requests,
        **metrics.as_dict(),
        "input_lens": [o.prompt_len for o in ok], "output_lens": [o.output_tokens for o in ok],
        "errors": errors,
    }


# ---- CLI -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    parser = argparse.ArgumentParser(prog="python -m radixserve.bench_serving", description=summary)
    g = parser.add_argument_group("server")
    g.add_argument("--backend", default="openai", choices=list(BACKENDS))
    g.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:30000 (overrides --host/--port)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=30000)
    g.add_argument("--model", default=None, help="model name to send (default: the first id of /v1/models)")
    g.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder, .gguf file or 'smollm2-135m-instruct' (default: the bundled one)")
    g.add_argument("--tokenize-prompt", action="store_true",
                   help="send integer ids (input_ids) instead of strings, so prompt lengths are exact; loads "
                        "no tokenizer (works with a config-only model); native backends only")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="with --tokenize-prompt: draw ids from [0, N) (default: the server's vocab_size "
                        "from /get_server_info)")
    g = parser.add_argument_group("workload")
    g.add_argument("--dataset-name", default="random", choices=list(DATASETS))
    g.add_argument("--num-prompts", type=int, default=None,
                   help=f"requests to send (default {DEFAULT_NUM_PROMPTS}; {GSP} always sends groups x "
                        "prompts per group, as SGLang does)")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=1024)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len*ratio, len]; 1.0 makes every length exact")
    g.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    g.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--disable-ignore-eos", action="store_true",
                   help="let requests stop at EOS (by default ignore_eos makes outputs as long as asked)")
    g.add_argument("--warmup-requests", type=int, default=1, help="untimed requests sent one by one first")
    g = parser.add_argument_group(f"{GSP} dataset (SGLang's flags and defaults)")
    gsp = SharedPrefixShape()
    g.add_argument("--gsp-num-groups", type=int, default=gsp.num_groups,
                   help="system prompts; each group's prompts all start with the group's one "
                        "(default: %(default)s)")
    g.add_argument("--gsp-prompts-per-group", type=int, default=gsp.prompts_per_group,
                   help="prompts (requests) per system prompt (default: %(default)s)")
    g.add_argument("--gsp-system-prompt-len", type=int, default=gsp.system_prompt_len,
                   help="tokens of each random system prompt (0: none) (default: %(default)s)")
    g.add_argument("--gsp-question-len", type=int, default=gsp.question_len,
                   help="tokens of each prompt's own random question, after the system prompt "
                        "(default: %(default)s)")
    g.add_argument("--gsp-output-len", type=int, default=gsp.output_len,
                   help="tokens asked for per request (default: %(default)s)")
    g.add_argument("--gsp-range-ratio", type=float, default=gsp.range_ratio,
                   help="each length is uniform in [len*ratio, len]; 1.0 makes them exact "
                        "(default: %(default)s)")
    g = parser.add_argument_group("output")
    g.add_argument("--disable-tqdm", action="store_true")
    g.add_argument("--output-file", default=None, help="append the result as one JSON line")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for values that make no benchmark."""
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError(f"--num-prompts: must be >= 1; got {args.num_prompts}")
    for name, low in (("random_input_len", 1), ("random_output_len", 1), ("gsp_num_groups", 1),
                      ("gsp_prompts_per_group", 1), ("gsp_system_prompt_len", 0), ("gsp_question_len", 1),
                      ("gsp_output_len", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= {low}; got {getattr(args, name)}")
    for name in ("random_range_ratio", "gsp_range_ratio"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')}: must be in [0, 1]; got {getattr(args, name)}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate: must be > 0 (inf for all at once); got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency: must be >= 1; got {args.max_concurrency}")
    if args.warmup_requests < 0:
        raise ValueError(f"--warmup-requests: must be >= 0; got {args.warmup_requests}")
    if args.tokenize_prompt:
        if args.backend not in NATIVE:
            raise ValueError(f"--tokenize-prompt: only the native backends ({', '.join(NATIVE)}) take input_ids; "
                             f"got --backend {args.backend}")
        if args.tokenizer is not None:
            raise ValueError("--tokenizer: --tokenize-prompt loads no tokenizer; drop one of the two")
    if args.vocab_size is not None:
        if not args.tokenize_prompt:
            raise ValueError("--vocab-size: only means something with --tokenize-prompt")
        if args.vocab_size < 1:
            raise ValueError(f"--vocab-size: must be >= 1; got {args.vocab_size}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"bench_serving: error: {e}", file=sys.stderr)
        return 2
    tokenizer = None  # --tokenize-prompt needs none, so it works where none exists
    if not args.tokenize_prompt:
        try:
            from radixserve.bench.serving_dataset import load_bench_tokenizer

            tokenizer = load_bench_tokenizer(args.tokenizer)
        except Exception as e:
            print(f"bench_serving: error: cannot load tokenizer {args.tokenizer or '(bundled)'}: {e}; "
                  "pass --tokenizer", file=sys.stderr)
            return 2
    try:
        record = asyncio.run(run_benchmark(args, tokenizer))
    except BenchError as e:
        print(f"bench_serving: error: {e}", file=sys.stderr)
        return 1
    if args.output_file:
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"appended the result to {args.output_file}")
    return 0 if record["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
