"""A real server driven as an outsider would: a huge n, a KV pool smaller than the context, deep
schemas, silent and slow connections, HTTP/1.0 streams, the OpenAPI document. One server (a tiny
random Llama with the bundled tokenizer, so text and grammars work) for the whole module."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.server_utils import assert_pool_whole, pool_state, start_server
from tests.helpers import make_tiny_model

CONTEXT = 4096
POOL = 600  # KV tokens: far below the context length
MAX_CONNECTIONS = 8
TIMEOUT = 2  # header and body deadlines, seconds


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_tiny_model("llama", path, seed=3, overrides={"max_position_embeddings": CONTEXT})
    log = str(tmp_path_factory.mktemp("server") / "server.log")
    srv = start_server(["--model-path", path, "--dtype", "float32", "--max-total-tokens", str(POOL),
                        "--http-header-timeout", str(TIMEOUT), "--http-body-timeout", str(TIMEOUT),
                        "--http-max-connections", str(MAX_CONNECTIONS), "--served-model-name", "m"], log)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def post(server, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=timeout)


def error_of(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.headers
    return r.json()["error"]


def raw_exchange(server, data: bytes, wait: float = 10) -> tuple[float, bytes]:
    """Send data on a fresh connection, read until the server closes it: (seconds, bytes read)."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        start = time.time()
        sock.sendall(data)
        sock.settimeout(wait)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return time.time() - start, out


# ---- n and huge calls -------------------------------------------------------------------------
def test_n_is_capped_at_openais_128(server):
    for path, body in (("/v1/completions", {"prompt": "hi", "n": 129, "max_tokens": 1}),
                       ("/generate", {"text": "hi", "sampling_params": {"n": 129, "max_new_tokens": 1}})):
        r = post(server, path, body)
        assert r.status_code == 400 and error_of(r)["param"] == "n" and "128" in error_of(r)["message"]
    most = post(server, "/v1/completions", {"prompt": "hi", "n": 128, "max_tokens": 1, "temperature": 0})
    assert most.status_code == 200 and len(most.json()["choices"]) == 128
    assert_pool_whole(server)


def test_a_huge_call_leaves_the_server_live_and_a_disconnect_frees_it(server):
    """51,200 sequences in one call (400 prompts x n 128): health keeps answering, the client's
    disconnect aborts them all, and the pool is whole again."""
    body = {"prompt": [f"prompt {i}" for i in range(400)], "n": 128, "max_tokens": 200, "ignore_eos": True}
    left: list[str] = []

    def huge() -> None:
        try:
            post(server, "/v1/completions", body, timeout=6)
        except httpx.ReadTimeout:
            left.append("timeout")

    caller = threading.Thread(target=huge)
    caller.start()
    slowest = 0.0
    while caller.is_alive():
        start = time.time()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.time() - start)
        time.sleep(0.2)
    caller.join()
    assert left == ["timeout"]
    assert slowest < 3, f"/health took {slowest:.1f} s while the call was queued"
    deadline = time.time() + 30
    while (state := pool_state(server))["num_waiting"] + state["num_running"] and time.time() < deadline:
        time.sleep(0.2)
    assert state["num_waiting"] == state["num_running"] == 0, state
    assert_pool_whole(server)


# ---- admission on a pool smaller than the context ---------------------------------------------
def test_a_request_without_max_tokens_is_admitted_and_others_are_not_starved(server):
    """No max_new_tokens means up to the context (4096), which the 600-token pool can never hold: the
    request is clipped to the pool (finish_reason length) instead of waiting forever, and a request
    sent behind it finishes too."""
    results: dict[str, dict] = {}

    def run(name: str, params: dict) -> None:
        results[name] = post(server, "/generate", {"input_ids": list(range(10, 30)), "sampling_params": params},
                             timeout=90).json()

    unbounded = threading.Thread(target=run, args=("unbounded", {"max_new_tokens": None, "ignore_eos": True}))
    unbounded.start()
    time.sleep(0.3)
    small = threading.Thread(target=run, args=("small", {"max_new_tokens": 8, "ignore_eos": True}))
    small.start()
    for t in (unbounded, small):
        t.join(120)
    assert results["small"]["meta_info"]["completion_tokens"] == 8, results["small"]
    meta = results["unbounded"]["meta_info"]
    assert meta["finish_reason"]["type"] == "length", meta
    assert 0 < meta["completion_tokens"] <= POOL - 20
    chat = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": None, "ignore_eos": True}).json()
    assert chat["choices"][0]["finish_reason"] == "length"
    assert chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"] <= POOL
    assert_pool_whole(server)


def test_a_prompt_the_pool_can_never_hold_is_a_400(server):
    r = post(server, "/generate", {"input_ids": [5] * (POOL + 10), "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 400 and "KV cache" in error_of(r)["message"]
    assert_pool_whole(server)


def test_context_length_errors_use_the_phrases_clients_match(server, client):
    long_ids = [5] * CONTEXT
    for path, body in (("/generate", {"input_ids": long_ids}), ("/v1/completions", {"prompt": long_ids})):
        err = error_of(post(server, path, body))
        assert "maximum context length" in err["message"]
        assert "is longer than the model's context length" in err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="hello", max_tokens=CONTEXT)
    err = info.value.body
    assert "maximum context length" in err["message"] and err["param"] == "max_tokens"
    assert "max_tokens" in err["message"] and "max_new_tokens" not in err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=CONTEXT)
    assert "maximum context length" in info.value.body["message"]
    assert info.value.body["param"] == "max_completion_tokens"


# ---- schemas and logprobs -----------------------------------------------------------------------
def nested_schema(levels: int) -> str:
    return '{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}' + "}}" * levels


def test_schemas_nested_too_deep_are_a_400(server, client):
    deep_text = nested_schema(1000)  # as text: json.loads recursed and the server answered 500
    r = post(server, "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2, "json_schema": deep_text}})
    assert r.status_code == 400 and error_of(r)["param"] == "json_schema", r.text
    as_object = json.loads(nested_schema(100))  # parses, but would take xgrammar seconds to compile
    r = post(server, "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2, "json_schema": as_object}})
    assert r.status_code == 400 and "64 levels" in error_of(r)["message"], r.text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": as_object}})
    assert info.value.body["param"] == "response_format"
    fine = json.loads(nested_schema(10))
    r = post(server, "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2, "json_schema": fine}})
    assert r.status_code == 200, r.text
    assert_pool_whole(server)


def test_top_logprobs_num_is_capped_like_v1(server):
    body = {"text": "hi", "return_logprob": True, "sampling_params": {"max_new_tokens": 2}}
    r = post(server, "/generate", {**body, "top_logprobs_num": 21})
    assert r.status_code == 400 and error_of(r)["param"] == "top_logprobs_num" and "20" in error_of(r)["message"]
    ok = post(server, "/generate", {**body, "top_logprobs_num": 20}).json()
    assert all(len(top) == 20 for top in ok["meta_info"]["output_top_logprobs"])


# ---- streams -------------------------------------------------------------------------------------
def test_completion_stream_ends_on_its_last_content_chunk(client):
    chunks = [c.choices[0] for c in client.completions.create(
        model="m", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=1, stream=True) if c.choices]
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    # every chunk carries logprobs (none is a bare end marker with logprobs null), and they add up
    assert all(c.logprobs is not None for c in chunks)
    assert sum(len(c.logprobs.tokens) for c in chunks) == 6
    plain = client.completions.create(model="m", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert "".join(c.text for c in chunks) == plain.choices[0].text


def test_http10_stream_is_not_chunked(server):
    body = json.dumps({"text": "hi", "stream": True, "sampling_params": {"max_new_tokens": 4}}).encode()
    request = (b"POST /generate HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    _, reply = raw_exchange(server, request)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert b"transfer-encoding" not in head.lower()
    events = [ln for ln in payload.decode().split("\n") if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["meta_info"]["completion_tokens"] == 4


def test_abort_request_ends_v1_requests_with_an_error(server):
    """An operator's /abort_request: the native API reports finish_reason abort; the OpenAI API,
    which has no such finish_reason, answers with an error."""
    body = {"prompt": "x", "max_tokens": 500, "ignore_eos": True}
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(post(server, "/v1/completions", body)))
    caller.start()
    deadline = time.time() + 30
    while pool_state(server)["num_running"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert post(server, "/abort_request", {"rid": ""}).status_code == 200
    caller.join(60)
    assert answers[0].status_code == 503 and "aborted" in error_of(answers[0])["message"]
    assert_pool_whole(server)


# ---- connections ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "slow-headers"])
def test_connections_without_complete_headers_get_408_and_are_closed(server, data):
    took, reply = raw_exchange(server, data)
    assert reply.startswith(b"HTTP/1.1 408") and b'"code":408' in reply
    assert TIMEOUT - 0.5 < took < TIMEOUT + 5


def test_a_body_slower_than_its_deadline_gets_408(server):
    request = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    took, reply = raw_exchange(server, request)
    assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower()
    assert took < TIMEOUT + 5


def test_connections_past_the_limit_get_503(server):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        _, reply = raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503") and b"too many open connections" in reply
    finally:
        for sock in idle:
            sock.close()
    deadline = time.time() + 5
    while time.time() < deadline:  # the server notices the closes
        if httpx.get(server.url + "/health", timeout=5).status_code == 200:
            break
        time.sleep(0.1)
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


# ---- the HTTP surface -----------------------------------------------------------------------------
def test_openapi_declares_the_real_responses(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            codes = set(op["responses"])
            assert "422" not in codes, (path, method)
            if method == "post":
                assert {"400", "413"} <= codes, (path, method)
            schema = op["responses"]["200"]["content"]
            assert schema, (path, method)
    assert spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/CompletionResponse"}
    assert "text/event-stream" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert spec["paths"]["/generate"]["post"]["responses"]["400"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ErrorResponse"}


def test_health_has_a_content_type_and_405_names_the_allowed_methods(server):
    assert httpx.get(server.url + "/health").headers["content-type"].startswith("text/plain")
    wrong = httpx.delete(server.url + "/v1/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and error_of(wrong)["code"] == 405


def test_startup_polls_are_not_logged_as_errors(server):
    # start_server polled /health while the model loaded: those 503s are expected, not news
    assert "the server is starting" not in server.log()


# ---- what SGLang's own OpenAI-server tests ask of a server ----------------------------------------
def test_chat_carries_reasoning_content_null_and_continuous_usage(client):
    messages = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].message.reasoning_content is None  # the key is there: clients read it
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    with_choices = [c for c in chunks if c.choices]
    assert all(c.choices[0].delta.reasoning_content is None for c in with_choices)
    assert all(c.usage is not None for c in chunks)
    completions = [c.usage.completion_tokens for c in with_choices]
    assert completions == sorted(completions) and completions[-1] == 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4
    once = list(client.chat.completions.create(model="m", messages=messages, max_tokens=4, stream=True,
                                               stream_options={"include_usage": True}))
    assert [c.usage is not None for c in once] == [False] * (len(once) - 1) + [True]


def test_structural_tag_response_format_forces_the_text(server, client):
    answer = "The capital of France is Berlin."
    out = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=64, temperature=0,
        response_format={"type": "structural_tag", "format": {"type": "const_string", "value": answer}})
    assert out.choices[0].message.content == answer
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "yes"}}
    native = post(server, "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 8, "structural_tag": tag}})
    assert native.json()["text"] == "yes"
    bad = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "structural_tag", "format": {"type": "no-such-format"}}})
    assert bad.status_code == 400 and error_of(bad)["param"] == "response_format"


def test_stop_regex_stops_and_trims_like_sglang(client):
    import re

    kwargs = {"model": "m", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    full = client.completions.create(**kwargs).choices[0].text
    piece = full[6:9]
    pattern = re.escape(piece[0]) + "." + re.escape(piece[2])  # a real pattern, matching that piece
    first = re.search(pattern, full)
    out = client.completions.create(**kwargs, extra_body={"stop_regex": pattern}).choices[0]
    assert out.finish_reason == "stop" and out.model_extra["matched_stop"] == pattern
    assert out.text == full[: first.start()]
    streamed = [c.choices[0] for c in client.completions.create(**kwargs, stream=True,
                                                                 extra_body={"stop_regex": pattern})]
    assert "".join(c.text for c in streamed) == out.text and streamed[-1].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kwargs, extra_body={"stop_regex": "(unclosed"})
    assert info.value.body["param"] == "stop_regex"
