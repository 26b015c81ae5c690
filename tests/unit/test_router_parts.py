"""The router's parts that need no server: its flags (SGLang's, unbuilt ones refused by name), the
circuit breaker, admission (concurrency, queue, 429/408), what it reads from request bodies, the
worker registry's draining, and the PD bootstrap fields and prompt-logprob merge."""

from __future__ import annotations

import asyncio

import pytest

from radixserve.router.admission import Admission, Rejected
from radixserve.router.args import RouterArgsError, parse_args
from radixserve.router.pd import merge_prompt_logprobs, with_bootstrap
from radixserve.router.policies import make_policy
from radixserve.router.registry import Registry, WorkerExists
from radixserve.router.request_info import describe
from radixserve.router.upstream import backoff_seconds
from radixserve.router.worker import BreakerConfig, CircuitBreaker, Worker


def test_sglang_router_flags_parse_with_its_defaults() -> None:
    args = parse_args(["--worker-urls", "http://a:1", "http://b:2/"])
    assert args.worker_urls == ["http://a:1", "http://b:2"]
    assert (args.policy, args.port, args.retry_max_retries, args.cb_failure_threshold) == ("cache_aware", 30000, 5, 10)
    assert args.max_payload_size == 512 * 1024 * 1024 and args.queue_size == 100
    pd = parse_args(["--pd-disaggregation", "--prefill", "http://p:30000", "8998", "--prefill", "http://q:1", "none",
                     "--decode", "http://d:30001", "--load-balance-method", "minimum_tokens",
                     "--decode-policy", "power_of_two", "--disable-retries"])
    assert [(p.url, p.bootstrap_port) for p in pd.prefill] == [("http://p:30000", 8998), ("http://q:1", None)]
    assert pd.policy == "minimum_tokens" and pd.decode_policy == "power_of_two" and pd.max_attempts == 1


@pytest.mark.parametrize("argv, phrase", [
    (["--worker-urls", "http://a:1", "--service-discovery"], "--service-discovery: Kubernetes service discovery"),
    (["--worker-urls", "http://a:1", "--history-backend", "oracle"], "--history-backend"),
    (["--worker-urls", "http://a:1", "--policy", "manual"], "manual and bucket are not built"),
    (["--prefill", "http://p:1"], "need --pd-disaggregation"),
    (["--pd-disaggregation", "--prefill", "http://p:1", "x9"], "bootstrap port 'x9'"),
    (["--worker-urls", "ftp://a:1"], "not of the form"),
    (["--worker-urls", "http://a:1", "--cache-threshold", "2"], "--cache-threshold"),
])
def test_unbuilt_or_wrong_flags_are_refused_with_one_line(argv, phrase) -> None:
    with pytest.raises(RouterArgsError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        parse_args(argv)


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    cb = CircuitBreaker(BreakerConfig(failure_threshold=3, success_threshold=2, timeout_secs=10, window_secs=60))
    for t in (0, 1, 2):
        assert cb.allows(t)
        cb.record(False, t)
    assert cb.state == "open" and not cb.allows(5)
    assert cb.allows(12) and cb.state == "half_open"  # a probe goes through after the timeout
    cb.record(False, 12)
    assert cb.state == "open" and not cb.allows(13)
    assert cb.allows(23)
    cb.record(True, 23)
    cb.record(True, 24)
    assert cb.state == "closed"
    # failures outside the window do not add up
    for t in (100, 200, 300):
        cb.record(False, t)
    assert cb.state == "closed"
    off = CircuitBreaker(BreakerConfig(failure_threshold=1, enabled=False))
    off.record(False, 0)
    assert off.allows(0)


def test_admission_queues_then_refuses_with_429_and_times_out_with_408() -> None:
    async def scenario() -> None:
        adm = Admission(max_concurrent=1, queue_size=1, queue_timeout=0.2, rate_per_second=None)
        await adm.acquire()
        queued = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0.01)
        with pytest.raises(Rejected) as full:
            await adm.acquire()
        assert full.value.status == 429
        adm.release()  # the queued one starts
        await queued
        with pytest.raises(Rejected) as late:
            await adm.acquire()  # waits in the queue past its timeout
        assert late.value.status == 408
        adm.release()
        assert adm.running == 0 and adm.queued == 0

    asyncio.run(scenario())


def test_admission_rate_limit_paces_starts() -> None:
    async def scenario() -> float:
        adm = Admission(max_concurrent=2, queue_size=10, queue_timeout=5, rate_per_second=20)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(6):  # two from the full bucket, then one per 50 ms
            await adm.acquire()
            adm.release()
        return loop.time() - t0

    assert asyncio.run(scenario()) >= 0.15


def test_request_bodies_give_text_tokens_stream_and_batch() -> None:
    gen = describe("/generate", {"text": ["ab" * 8, "cd" * 8], "sampling_params": {"max_new_tokens": 10},
                                 "stream": True, "return_logprob": True})
    assert gen.batch == 2 and gen.stream and gen.wants_logprobs and gen.key.tokens == 32 // 4 + 20
    ids = describe("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 5}})
    assert ids.batch is None and ids.key.tokens == 8 and ids.key.text == "1 2 3"
    chat = describe("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text",
                                                                                      "text": "hello"}]}],
                                             "max_tokens": 4, "n": 2})
    assert "hello" in chat.key.text and chat.key.tokens == len(chat.key.text) // 4 + 8
    assert describe("/v1/completions", {"prompt": "x" * 40}).key.tokens == 10 + 128


def test_a_removed_worker_drains_then_leaves_and_can_come_back() -> None:
    registry = Registry({"regular": make_policy("round_robin")}, BreakerConfig())
    a = registry.add("http://a:1", healthy=True)
    registry.add("http://b:1", healthy=True)
    with pytest.raises(WorkerExists):
        registry.add("http://a:1")
    a.started(10)
    registry.remove("http://a:1")
    assert [w.url for w in registry.candidates("regular")] == ["http://b:1"]
    assert "http://a:1" in registry.workers  # its request is still running
    again = registry.add("http://a:1", healthy=True)  # a new instance at the same address
    registry.release(a, 10, ok=True)
    assert registry.workers["http://a:1"] is again and len(registry.workers) == 2
    registry.remove("http://b:1")
    assert "http://b:1" not in registry.workers  # idle: gone at once
    with pytest.raises(ValueError, match="worker_type"):
        registry.add("http://c:1", "prefill")


def test_pd_bootstrap_fields_and_prompt_logprobs_merge() -> None:
    prefill = Worker("http://10.0.0.5:30000", "prefill", bootstrap_port=8998)
    one = with_bootstrap({"text": "hi"}, prefill, None)
    assert one["bootstrap_host"] == "10.0.0.5" and one["bootstrap_port"] == 8998
    assert 0 <= one["bootstrap_room"] < 2**63
    batch = with_bootstrap({"text": ["a", "b", "c"]}, prefill, 3)
    assert batch["bootstrap_host"] == ["10.0.0.5"] * 3 and len(set(batch["bootstrap_room"])) == 3
    decode = {"text": "x", "meta_info": {"input_token_logprobs": None, "output_token_logprobs": [[-1.0, 5, None]]}}
    merged = merge_prompt_logprobs(decode, {"meta_info": {"input_token_logprobs": [[None, 1, None]]}})
    assert merged["meta_info"]["input_token_logprobs"] == [[None, 1, None]]
    assert merged["meta_info"]["output_token_logprobs"] == [[-1.0, 5, None]]


def test_backoff_grows_is_capped_and_jittered() -> None:
    waits = [backoff_seconds(r, 50, 200, 2.0, 0.0) for r in (1, 2, 3, 4)]
    assert waits == [0.05, 0.1, 0.2, 0.2]
    jittered = {backoff_seconds(1, 100, 1000, 2.0, 0.5) for _ in range(50)}
    assert min(jittered) >= 0.05 and max(jittered) <= 0.15 and len(jittered) > 1


def test_unknown_routes_and_methods_get_the_error_envelope() -> None:
    import httpx

    from radixserve.launch_router import build_context
    from radixserve.router.app import create_app

    app = create_app(build_context(parse_args(["--disable-health-check"])))  # no workers yet

    async def calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
            return [await c.get("/nope"), await c.get("/generate"), await c.get("/v1/models"),
                    await c.post("/generate", content=b"[1, 2]"), await c.post("/workers", json={"url": "x"})]

    missing, wrong_method, no_worker, not_object, bad_url = asyncio.run(calls())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert no_worker.status_code == 503 and "no regular worker" in no_worker.json()["error"]["message"]
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]["message"]
    assert bad_url.status_code == 400 and "http://host:port" in bad_url.json()["error"]["message"]


@pytest.mark.parametrize("path, body", [
    ("/generate", {"input_ids": [[1, 2], 3]}),
    ("/generate", {"input_ids": [[1, 2], None]}),
    ("/generate", {"text": [1, None, {"a": 1}], "sampling_params": [None]}),
    ("/generate", {"text": {"a": 1}, "input_ids": "x", "sampling_params": "y", "n": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": 3, "content": [{"text": None}, {"text": {}}, 7]}, 9]}),
    ("/v1/chat/completions", {"messages": "hi", "max_tokens": "5", "n": "2"}),
    ("/v1/completions", {"prompt": [1, [2], None, "x"], "max_tokens": -3}),
])
def test_malformed_bodies_are_described_not_failed_on(path, body) -> None:
    # the worker answers them with its 400; the router must only route them (was a 500)
    info = describe(path, body)
    assert info.key.tokens >= 0 and isinstance(info.key.text, str)


def test_token_load_without_load_reports_is_the_routers_own_count() -> None:
    w = Worker("http://a:1")
    w.started(100)
    w.started(50)
    assert w.token_load == 150
    w.finished(100, ok=True)
    w.finished(50, ok=True)
    assert w.token_load == 0  # was 150 for ever: only a load report reset it
    w.report(30)
    w.started(10)
    assert w.token_load == 40  # once the worker reports, its count plus what was sent since


def test_cors_request_ids_and_options_on_every_route() -> None:
    import httpx

    from radixserve.launch_router import build_context
    from radixserve.router.app import create_app

    app = create_app(build_context(parse_args(["--disable-health-check", "--api-key", "k"])))
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}

    async def calls() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
            return [await c.options("/v1/chat/completions", headers=preflight),
                    await c.get("/health", headers={"Origin": "http://ui.example", "x-request-id": "abc"}),
                    await c.get("/v1/models"),
                    await c.options("/generate", headers={"Authorization": "Bearer k"}),
                    await c.post("/generate", json={"text": "x"}, headers={"x-correlation-id": "c-1"})]

    pre, health, unauthorized, options, serving = asyncio.run(calls())
    # no --cors-allowed-origins: any origin, as SGLang's router; preflights need no API key
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", "http://ui.example")
    assert health.status_code == 200 and health.headers["access-control-allow-origin"] == "*"
    assert health.headers["x-request-id"] == "abc"
    assert unauthorized.status_code == 401 and len(unauthorized.headers["x-request-id"]) == 32
    assert options.status_code == 405 and options.headers["allow"] == "POST"
    assert serving.status_code == 401 and serving.headers["x-request-id"] == "c-1"
    only = create_app(build_context(parse_args(["--disable-health-check", "--cors-allowed-origins", "http://a"])))

    async def other_origin() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=only), base_url="http://router") as c:
            return await c.get("/health", headers={"Origin": "http://b"})

    assert "access-control-allow-origin" not in asyncio.run(other_origin()).headers
