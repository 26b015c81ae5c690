"""A real server on the bundled model, driven by the openai client and raw HTTP: OpenAI and native
endpoints, concurrency, metrics, the bad-input matrix and client disconnects."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server_utils import assert_pool_whole, pool_state, start_server

API_KEY = "sk-test-radixserve"
BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = str(tmp_path_factory.mktemp("server") / "server.log")
    srv = start_server(["--dtype", "float32", "--max-request-body-size", str(BODY_LIMIT),
                        "--served-model-name", "smol"], log, api_key=API_KEY)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, path: str, body=None, content: bytes | None = None, headers=None):
    h = {**server.headers(), **(headers or {})}
    if content is not None:
        return httpx.post(server.url + path, content=content, headers=h, timeout=120)
    return httpx.post(server.url + path, json=body, headers=h, timeout=120)


# ---- OpenAI API -------------------------------------------------------------------
def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smol"]
    card = client.models.retrieve("smol")
    assert card.id == "smol" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_completion_single_list_echo_logprobs(client):
    one = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
    assert one.choices[0].text and one.usage.completion_tokens == 6
    many = client.completions.create(model="smol", prompt=["1, 2, 3, 4,", "The capital of France is"],
                                     max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text
    echo = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=4, temperature=0,
                                     echo=True, logprobs=2)
    assert echo.choices[0].text.startswith("1, 2, 3, 4,")
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == echo.usage.prompt_tokens + echo.usage.completion_tokens
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])


def test_chat_plain_and_streaming_agree(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0)
    text = plain.choices[0].message.content
    assert "Paris" in text and plain.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_top_logprobs_n_stop_seed(client):
    messages = [{"role": "user", "content": "Count from 1 to 10."}]
    lp = client.chat.completions.create(model="smol", messages=messages, max_tokens=5, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    two = client.chat.completions.create(model="smol", messages=messages, max_tokens=8, n=2,
                                         temperature=1.0, seed=11)
    assert len(two.choices) == 2
    again = client.chat.completions.create(model="smol", messages=messages, max_tokens=8, n=2,
                                           temperature=1.0, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    full = client.chat.completions.create(model="smol", messages=messages, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    cut = text[5:8]
    stopped = client.chat.completions.create(model="smol", messages=messages, max_tokens=40, temperature=0,
                                             stop=[cut])
    assert stopped.choices[0].message.content == text[: text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_usage_reports_cached_tokens(client):
    messages = [{"role": "user", "content": "Tell me a fact about the moon. " * 4}]
    client.chat.completions.create(model="smol", messages=messages, max_tokens=2, temperature=0)
    second = client.chat.completions.create(model="smol", messages=messages, max_tokens=2, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0


# ---- native API ----------------------------------------------------------------------
def test_generate_plain_batch_stream(server):
    params = {"temperature": 0, "max_new_tokens": 8}
    one = post(server, "/generate", {"text": "The capital of France is", "sampling_params": params}).json()
    assert one["meta_info"]["completion_tokens"] == 8 and one["text"]
    batch = post(server, "/generate", {"text": ["The capital of France is", "1, 2, 3,"],
                                       "sampling_params": params}).json()
    assert isinstance(batch, list) and batch[0]["output_ids"] == one["output_ids"]
    ids = post(server, "/generate", {"input_ids": one["output_ids"][:3], "sampling_params": params}).json()
    assert ids["meta_info"]["prompt_tokens"] == 3
    with httpx.stream("POST", server.url + "/generate", headers=server.headers(), timeout=60,
                      json={"text": "The capital of France is", "sampling_params": params, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["output_ids"] == one["output_ids"] and last["text"] == one["text"]


def test_stop_string_ends_at_its_token_and_frees_the_request(server):
    """The detokenizer finds a stop string and the scheduler stops the request: the output ends at
    the token that completed the stop, the request is gone from the scheduler by the time the state
    is read, and its rid can be used again at once."""
    base = {"text": "The capital of France is", "rid": "stop-rid",
            "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}}
    full = post(server, "/generate", base).json()
    words = full["text"].split()
    assert len(words) > 3, full["text"]
    stop = words[2]
    for stream in (False, True):
        body = {**base, "sampling_params": {**base["sampling_params"], "stop": [stop]}, "stream": stream}
        if stream:
            with httpx.stream("POST", server.url + "/generate", headers=server.headers(), json=body,
                              timeout=60) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            got = json.loads(lines[-2][6:])
        else:
            got = post(server, "/generate", body).json()
        n = got["meta_info"]["completion_tokens"]
        assert got["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert got["output_ids"] == full["output_ids"][:n] and n < 24
        upto = post(server, "/detokenize", {"tokens": got["output_ids"]}).json()["text"]
        before = post(server, "/detokenize", {"tokens": got["output_ids"][:-1]}).json()["text"]
        assert stop in upto and stop not in before
        assert got["text"] == full["text"][: full["text"].index(stop)]
        state = pool_state(server)
        assert state["num_running"] == 0 and state["req_rows_available"] == state["req_rows_total"], state

@pytest.mark.parametrize("max_new_tokens", [4, 16])
def test_generate_text_ending_mid_character(server, max_new_tokens):
    # the output ends partway through an emoji: the text is still decode(output_ids), the tail
    # as U+FFFD, the same streamed or not
    body = {"text": "Here are some emojis: 🎉🎉🎉 😀", "sampling_params": {"max_new_tokens": max_new_tokens,
                                                                           "temperature": 0}}
    plain = post(server, "/generate", body).json()
    full = post(server, "/detokenize", {"tokens": plain["output_ids"]}).json()["text"]
    assert full.endswith("\ufffd") and full.rstrip("\ufffd")  # greedy output here is a run of 🎉 (3 tokens each)
    assert plain["text"] == full
    with httpx.stream("POST", server.url + "/generate", headers=server.headers(), timeout=60,
                      json={**body, "stream": True}) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert events[-1]["output_ids"] == plain["output_ids"] and events[-1]["text"] == full
    # while streaming, text already out is never taken back and never holds a partial character
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert all("\ufffd" not in t for t in texts[:-1])


def test_tokenize_detokenize_info_load(server):
    tok = post(server, "/tokenize", {"text": "hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    assert post(server, "/detokenize", {"tokens": tok["tokens"]}).json()["text"] == "hello world"
    h = server.headers()
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/health_generate", headers=h, timeout=60).status_code == 200
    info = httpx.get(server.url + "/get_model_info", headers=h).json()
    assert info["is_generation"] is True
    load = httpx.get(server.url + "/get_load", headers=h).json()
    assert load[0]["num_reqs"] == 0
    server_info = httpx.get(server.url + "/get_server_info", headers=h).json()
    assert server_info["max_total_num_tokens"] > 0 and server_info["page_size"] == 1


# ---- concurrency ------------------------------------------------------------------------
def test_64_concurrent_streams_match_sequential(server):
    prompts = [f"Write one sentence about the number {i}." for i in range(64)]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def stream_one(p: str) -> str:
        s = await client.completions.create(model="smol", prompt=p, max_tokens=12, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in s if c.choices])

    async def run() -> list[str]:
        return list(await asyncio.gather(*(stream_one(p) for p in prompts)))

    concurrent = asyncio.run(run())
    sync = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    sequential = [sync.completions.create(model="smol", prompt=p, max_tokens=12, temperature=0).choices[0].text
                  for p in prompts]
    assert concurrent == sequential
    assert_pool_whole(server)


def test_metrics_parse_and_move(server, client):
    def scrape() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics").text
        values = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                values[s.name] = values.get(s.name, 0.0) + s.value
        return values

    before = scrape()
    client.completions.create(model="smol", prompt="Hello there", max_tokens=5, temperature=0)
    after = scrape()
    assert after["radixserve:generation_tokens_total"] >= before.get("radixserve:generation_tokens_total", 0) + 5
    assert after["radixserve:prompt_tokens_total"] > before.get("radixserve:prompt_tokens_total", 0)
    assert after["radixserve:time_to_first_token_seconds_count"] > before.get(
        "radixserve:time_to_first_token_seconds_count", 0)
    assert after["radixserve:e2e_request_latency_seconds_count"] > before.get(
        "radixserve:e2e_request_latency_seconds_count", 0)
    assert after["radixserve:inter_token_latency_seconds_count"] > before.get(
        "radixserve:inter_token_latency_seconds_count", 0)
    for name in ("radixserve:num_running_reqs", "radixserve:num_queue_reqs", "radixserve:token_usage",
                 "radixserve:cache_hit_rate", "radixserve:gen_throughput"):
        assert name in after


# ---- bad input --------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
BAD_INPUTS = {
    "malformed_json": (CHAT, None, b'{"model": "smol", "messages": [', 400),
    "wrong_field_type": (CHAT, {"model": "smol", "messages": "hello"}, None, 400),
    "wrong_number_type": (CHAT, {"model": "smol", "messages": MSG, "temperature": "hot"}, None, 400),
    "prompt_too_long": ("/v1/completions", {"model": "smol", "prompt": "hello " * 9000, "max_tokens": 4}, None, 400),
    "max_tokens_too_large": (CHAT, {"model": "smol", "messages": MSG, "max_tokens": 10**6}, None, 400),
    "negative_temperature": (CHAT, {"model": "smol", "messages": MSG, "temperature": -1}, None, 400),
    "top_p_above_one": (CHAT, {"model": "smol", "messages": MSG, "top_p": 1.5}, None, 400),
    "unknown_model": (CHAT, {"model": "gpt-17", "messages": MSG}, None, 404),
    "empty_messages": (CHAT, {"model": "smol", "messages": []}, None, 400),
    "not_utf8": (CHAT, None, b'{"model": "smol", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    "body_too_large": (CHAT, None, b'{"x": "' + b"a" * (BODY_LIMIT + 10) + b'"}', 413),
    "unknown_route": ("/v1/nothing", {"a": 1}, None, 404),
    "bad_sampling_key": ("/generate", {"text": "hi", "sampling_params": {"temprature": 1}}, None, 400),
    "unknown_role": (CHAT, {"model": "smol", "messages": [{"role": "wizard", "content": "hi"}]}, None, 400),
    "negative_token_id": ("/v1/completions", {"model": "smol", "prompt": [-1, 5], "max_tokens": 2}, None, 400),
    "logit_bias_not_a_token": (CHAT, {"model": "smol", "messages": MSG, "logit_bias": {"abc": 1}}, None, 400),
    "logit_bias_out_of_vocab": (CHAT, {"model": "smol", "messages": MSG, "logit_bias": {"99999999": 1}}, None, 400),
    "logit_bias_too_big": (CHAT, {"model": "smol", "messages": MSG, "logit_bias": {"42": 500}}, None, 400),
    "tools_without_parser": (CHAT, {"model": "smol", "messages": MSG, "tools": [TOOL]}, None, 400),
    "tool_choice_unknown": (CHAT, {"model": "smol", "messages": MSG, "tools": [TOOL], "tool_choice": "sometimes"},
                            None, 400),
    "tool_choice_without_tools": (CHAT, {"model": "smol", "messages": MSG, "tool_choice": "required"}, None, 400),
    "top_logprobs_without_logprobs": (CHAT, {"model": "smol", "messages": MSG, "top_logprobs": 2}, None, 400),
    "user_content_null": (CHAT, {"model": "smol", "messages": [{"role": "user", "content": None}]}, None, 400),
    "best_of_above_n": ("/v1/completions", {"model": "smol", "prompt": "hi", "best_of": 3, "max_tokens": 2}, None, 400),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_envelope(server, case):
    path, body, raw, status = BAD_INPUTS[case]
    r = post(server, path, body, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and set(err) >= {"message", "type", "param", "code"}


def surrogate_body(template: str) -> bytes:
    """A JSON body with a lone UTF-16 surrogate escape where the template has @ (httpx cannot encode one)."""
    return template.replace("@", "\\ud800").encode()


CMPL = "/v1/completions"
# (path, json body or raw bytes, the param the error must name, words its message must have)
FIELD_ERRORS = {
    "stop_lone_surrogate": (CHAT, surrogate_body('{"messages": [{"role": "user", "content": "hi"}], "stop": "@"}'),
                            "stop", ["stop", "surrogate"]),
    "prompt_lone_surrogate": (CMPL, surrogate_body('{"prompt": "@abc", "max_tokens": 2}'), "prompt", ["surrogate"]),
    "generate_lone_surrogate": ("/generate", surrogate_body('{"text": "a@"}'), "text", ["surrogate"]),
    "generate_stop_lone_surrogate": ("/generate", surrogate_body('{"text": "a", "sampling_params": {"stop": ["@"]}}'),
                                     "sampling_params.stop.0", ["surrogate"]),
    "chat_lone_surrogate": (CHAT, surrogate_body('{"messages": [{"role": "user", "content": "@"}]}'),
                            "messages.0.content", ["surrogate"]),
    "tokenize_lone_surrogate": ("/tokenize", surrogate_body('{"text": "@"}'), "text", ["surrogate"]),
    "prompt_null": (CMPL, {"prompt": None}, "prompt", ["prompt"]),
    "prompt_bools": (CMPL, {"prompt": [True, False], "max_tokens": 2}, "prompt", ["token ids"]),
    "input_ids_bool": ("/generate", {"input_ids": [True, 2]}, "input_ids", ["token ids"]),
    "stop_token_ids_bool": (CHAT, {"messages": MSG, "stop_token_ids": [True]}, "stop_token_ids", ["token ids"]),
    "detokenize_bool": ("/detokenize", {"tokens": [1, True]}, "tokens", ["token ids"]),
    "logprobs_true": (CMPL, {"prompt": "hi", "logprobs": True, "max_tokens": 2}, "logprobs", ["integer"]),
    "content_part_text_int": (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                              "messages.0.content.0.text", ["string"]),
    "json_schema_and_response_format": (CHAT, {"messages": MSG, "json_schema": '{"type": "string"}',
                                               "response_format": {"type": "json_object"}},
                                        "response_format", ["json_schema", "response_format"]),
    "regex_and_response_format": (CHAT, {"messages": MSG, "regex": "a+", "response_format": {"type": "json_object"}},
                                  "response_format", ["regex", "response_format"]),
    "max_tokens_negative": (CHAT, {"messages": MSG, "max_tokens": -1}, "max_tokens", ["max_tokens must be >= 0"]),
    "max_completion_tokens_negative": (CHAT, {"messages": MSG, "max_completion_tokens": -1}, "max_completion_tokens",
                                       ["max_completion_tokens must be >= 0"]),
    "min_tokens_above_max": (CMPL, {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, "min_tokens",
                             ["min_tokens must be <= max_tokens"]),
    "max_tokens_past_context": (CMPL, {"prompt": "hi", "max_tokens": 10**6}, "max_tokens",
                                ["maximum context length is 8192 tokens", "1000000 in max_tokens"]),
    "chat_max_tokens_past_context": (CHAT, {"messages": MSG, "max_tokens": 10**6}, "max_tokens",
                                     ["maximum context length is 8192 tokens", "1000000 in max_tokens"]),
    "bad_response_format_schema": (CHAT, {"messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
        "response_format", ["response_format"]),
    "generate_keeps_native_names": ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}},
                                    "max_new_tokens", ["max_new_tokens must be >= 0"]),
}


@pytest.mark.parametrize("case", list(FIELD_ERRORS))
def test_bad_field_gets_400_naming_it(server, case):
    path, body, param, words = FIELD_ERRORS[case]
    raw = body if isinstance(body, bytes) else None
    r = post(server, path, None if raw else body, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and all(w in err["message"] for w in words), err
    if path.startswith("/v1/"):
        assert "new_tokens" not in err["message"], err  # the client's names, not the internal ones


def test_null_means_the_default(server):
    chat = post(server, CHAT, {"model": "smol", "messages": MSG, "max_tokens": 2, "temperature": 0, "n": None,
                               "stream": None, "logprobs": None, "stream_options": None, "ignore_eos": None})
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 1 and chat.json()["choices"][0]["logprobs"] is None
    cmpl = post(server, CMPL, {"prompt": "hi", "temperature": 0, "ignore_eos": True, "echo": None,
                               "n": None, "best_of": None, "stream": None})
    assert cmpl.status_code == 200, cmpl.text
    assert cmpl.json()["usage"]["completion_tokens"] == 16


def test_chunked_body_too_large_is_413(server):
    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "smol", "messages": [], "x": "'
        for _ in range(BODY_LIMIT // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(server.url + CHAT, content=chunks(), timeout=60,
                   headers={**server.headers(), "content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["message"] == (f"Payload Too Large: the request body is larger than {BODY_LIMIT} "
                                            "bytes (--max-request-body-size)")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["missing", "wrong"])
def test_api_key_required(server, headers):
    r = httpx.post(server.url + CHAT, json={"model": "smol", "messages": MSG}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/health_generate", timeout=60).status_code == 200  # a probe, as in SGLang
    assert httpx.get(server.url + "/get_server_info", headers=headers).status_code == 401


def test_after_bad_inputs_server_is_whole(server, client):
    out = client.chat.completions.create(model="smol", messages=MSG, max_tokens=4, temperature=0)
    assert out.choices[0].message.content is not None
    assert_pool_whole(server)


def test_tool_choice_none_and_best_of_n_answer_as_plain_requests(server, client):
    # tools with tool_choice "none" ask for no tool call; best_of == n keeps every sample
    plain = client.chat.completions.create(model="smol", messages=MSG, max_tokens=4, temperature=0)
    out = client.chat.completions.create(model="smol", messages=MSG, max_tokens=4, temperature=0, tools=[TOOL],
                                         tool_choice="none")
    assert out.choices[0].message.content == plain.choices[0].message.content
    done = client.completions.create(model="smol", prompt="hi", max_tokens=2, temperature=0, n=2, best_of=2)
    assert len(done.choices) == 2
    assert_pool_whole(server)


def test_logit_bias_forces_and_bans_tokens(server, client):
    def generate(params):
        r = post(server, "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"temperature": 0, **params}})
        assert r.status_code == 200, r.text
        return r.json()

    forced = generate({"max_new_tokens": 4, "logit_bias": {"42": 100}})
    assert forced["output_ids"] == [42] * 4
    out = client.completions.create(model="smol", prompt=[1, 2, 3], max_tokens=4, temperature=0,
                                    logit_bias={"42": 100})
    assert out.choices[0].text == forced["text"]
    plain = generate({"max_new_tokens": 1})["output_ids"]
    banned = generate({"max_new_tokens": 1, "logit_bias": {str(plain[0]): -100}})["output_ids"]
    assert len(banned) == 1 and banned != plain
    assert_pool_whole(server)


# ---- disconnects -------------------------------------------------------------------------
def test_disconnect_mid_stream_aborts_and_frees(server):
    body = {"model": "smol", "prompt": "Tell me a very long story.", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers(),
                      timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break
    start = time.time()
    while pool_state(server)["num_running"] and time.time() - start < 5:
        time.sleep(0.05)
    assert pool_state(server)["num_running"] == 0
    assert time.time() - start < 1.5, "the abandoned request kept running"
    assert_pool_whole(server)


def test_disconnect_non_streaming_aborts(server):
    body = {"model": "smol", "prompt": "Tell me a very long story.", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=server.headers(), timeout=1.0)
    start = time.time()
    while pool_state(server)["num_running"] and time.time() - start < 5:
        time.sleep(0.05)
    assert time.time() - start < 1.5
    assert_pool_whole(server)


def test_disconnect_non_streaming_ends_quietly(server):
    body = {"model": "smol", "prompt": "Tell me a very long story.", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + CMPL, json=body, headers=server.headers(), timeout=1.0)
    start = time.time()
    while "client disconnected" not in server.log() and time.time() - start < 5:
        time.sleep(0.1)
    log = server.log()
    assert "client disconnected from /v1/completions" in log
    assert "CancelledError" not in log and "Exception in ASGI application" not in log
    assert_pool_whole(server)


def test_stream_echo_carries_prompt_logprobs(client):
    kwargs = dict(model="smol", prompt="Hello world, my name", max_tokens=4, temperature=0, echo=True, logprobs=2)
    plain = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert chunks[0].text == "Hello world, my name"
    assert chunks[0].logprobs is not None and "".join(chunks[0].logprobs.tokens) == chunks[0].text
    assert chunks[0].logprobs.token_logprobs[0] is None
    assert "".join(c.text for c in chunks) == plain.text
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for key in merged:
            merged[key] += getattr(c.logprobs, key) if c.logprobs else []
    assert merged == {key: getattr(plain.logprobs, key) for key in merged}


# ---- structured output ----------------------------------------------------------------------
def test_chat_json_schema_output_validates(client):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    out = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Give me a person as JSON."}], max_tokens=80,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    data = json.loads(out.choices[0].message.content)
    jsonschema.validate(data, schema)
    obj = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Describe a cat as a JSON object with two keys."}],
        max_tokens=200, temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_regex_extra_and_bad_schema(server, client):
    import re

    out = client.completions.create(model="smol", prompt="Phone:", max_tokens=20, temperature=0,
                                    extra_body={"regex": "[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", out.choices[0].text)
    bad = post(server, "/v1/completions", {"model": "smol", "prompt": "x", "regex": "([a-"})
    assert bad.status_code == 400 and "regex" in bad.json()["error"]["message"]


def test_pd_router_fields_are_accepted(server, client):
    """What SGLang's PD router adds to each body (bootstrap fields, and its own defaults on
    /generate): a server that is not part of a PD pair answers as usual."""
    body = {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 2, "temperature": 0},
            "bootstrap_host": ["127.0.0.1"] * 2, "bootstrap_port": [8998, None], "bootstrap_room": [1, (1 << 63) - 1],
            "model": None, "return_text_in_logprobs": False, "log_metrics": True}
    r = post(server, "/generate", body)
    assert r.status_code == 200 and len(r.json()) == 2, r.text
    chat = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, n=2, temperature=0,
        extra_body={"bootstrap_host": ["127.0.0.1"] * 2, "bootstrap_port": [8998] * 2, "bootstrap_room": [5, 6]})
    assert len(chat.choices) == 2
    bad = post(server, "/generate", {**body, "bootstrap_room": [1, 2, 3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "bootstrap_room"


# ---- SGLang's native request forms ---------------------------------------------------------------
def sse_events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, headers=server.headers(), json=body, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]


def test_generate_takes_sglang_forms(server):
    """What SGLang's /generate takes beyond the basics: null sampling params as the default, its
    spellings (sampling_seed, custom_params), PUT, input_ids winning over text, one rid for a batch
    named per prompt, and meta_info's e2e_latency and weight_version."""
    greedy = {"temperature": 0, "max_new_tokens": 6}
    ref = post(server, "/generate", {"text": "The capital of France is", "sampling_params": greedy}).json()
    nulls = {**greedy, "top_p": None, "top_k": None, "min_p": None, "repetition_penalty": None, "n": None,
             "ignore_eos": None, "skip_special_tokens": None, "min_new_tokens": None, "stop": None}
    same = post(server, "/generate", {"text": "The capital of France is", "sampling_params": nulls})
    assert same.status_code == 200 and same.json()["output_ids"] == ref["output_ids"], same.text
    meta = same.json()["meta_info"]
    assert meta["weight_version"] == "default" and 0 < meta["e2e_latency"] < 60
    put = httpx.put(server.url + "/generate", headers=server.headers(), timeout=60,
                    json={"text": "The capital of France is", "sampling_params": greedy})
    assert put.status_code == 200 and put.json()["output_ids"] == ref["output_ids"]
    # sampled: sampling_seed is seed, custom_params are accepted (no custom logit processor runs)
    sampled = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    a, b, c = (post(server, "/generate", {"text": "Once upon a time", "sampling_params": {**sampled, **extra}}).json()
               for extra in ({"sampling_seed": 11}, {"seed": 11, "custom_params": {"x": 1}}, {"sampling_seed": 12}))
    assert a["output_ids"] == b["output_ids"] != c["output_ids"]
    ids = post(server, "/tokenize", {"text": "1, 2, 3,"}).json()["tokens"]
    both = post(server, "/generate", {"text": "The capital of France is", "input_ids": ids, "sampling_params": greedy})
    assert both.json()["meta_info"]["prompt_tokens"] == len(ids)
    batch = post(server, "/generate", {"text": ["a", "b"], "rid": "myrid", "sampling_params": greedy}).json()
    assert [r["meta_info"]["id"] for r in batch] == ["myrid_0", "myrid_1"]
    assert_pool_whole(server)


def test_generate_logprob_options_follow_sglang(server):
    """Logprob options one per prompt; top lists only when asked for; tokens as text on request;
    a logprob_start_len at or past the prompt's end and token_ids_logprob are 400s."""
    params = {"temperature": 0, "max_new_tokens": 3}
    prompts = ["The capital of France is", "1, 2, 3,"]
    two = post(server, "/generate", {"text": prompts, "sampling_params": params, "return_logprob": [True, False],
                                     "top_logprobs_num": [2, 0], "logprob_start_len": [1, None]}).json()
    assert len(two[0]["meta_info"]["output_token_logprobs"]) == 3
    assert [len(top) for top in two[0]["meta_info"]["output_top_logprobs"]] == [2, 2, 2]
    assert "output_token_logprobs" not in two[1]["meta_info"]
    plain = post(server, "/generate", {"text": prompts[0], "sampling_params": params, "return_logprob": True,
                                       "logprob_start_len": 0}).json()["meta_info"]
    assert "output_top_logprobs" not in plain and "input_top_logprobs" not in plain
    assert len(plain["input_token_logprobs"]) == plain["prompt_tokens"]
    assert all(text is None for _, _, text in plain["output_token_logprobs"])
    body = {"text": prompts[0], "sampling_params": params, "return_logprob": True, "top_logprobs_num": 2,
            "logprob_start_len": 0, "return_text_in_logprobs": True}
    for meta in (post(server, "/generate", body).json()["meta_info"],
                 sse_events(server, "/generate", {**body, "stream": True})[-1]["meta_info"]):
        for _, token, text in meta["output_token_logprobs"] + meta["input_token_logprobs"][1:]:
            assert text == post(server, "/detokenize", {"tokens": [token]}).json()["text"]
        assert all(text is not None for top in meta["output_top_logprobs"] for _, _, text in top)
        assert meta["input_top_logprobs"][0] is None
    n = plain["prompt_tokens"]
    for start, status in ((n - 1, 200), (n, 400), (n + 50, 400)):
        r = post(server, "/generate", {"text": prompts[0], "sampling_params": params, "return_logprob": True,
                                       "logprob_start_len": start})
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["error"]["param"] == "logprob_start_len"
    for bad in ({"return_logprob": [True]}, {"top_logprobs_num": [1, 2, 3]}, {"token_ids_logprob": [5, 6]}):
        r = post(server, "/generate", {"text": prompts, "sampling_params": params, "return_logprob": True, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text
    assert_pool_whole(server)


def test_stream_interval_batches_increments(server):
    """sampling_params.stream_interval k: the first token at once, then every k tokens, then the end."""
    body = {"text": "Once upon a time", "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True, "stream_interval": 4}}
    events = sse_events(server, "/generate", body)
    assert [len(e["output_ids"]) for e in events] == [1, 5, 9, 12]
    whole = post(server, "/generate", {**body, "stream": False}).json()
    assert events[-1]["output_ids"] == whole["output_ids"] and events[-1]["text"] == whole["text"]
    every = sse_events(server, "/generate", {**body, "sampling_params": {**body["sampling_params"],
                                                                         "stream_interval": None}})
    assert [len(e["output_ids"]) for e in every] == list(range(1, 13))


def test_tokenize_detokenize_batches_and_v1_routes(server):
    many = post(server, "/v1/tokenize", {"prompt": ["Hello world", "Hi"]}).json()
    one = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert many["tokens"][0] == one["tokens"] and many["count"] == [len(t) for t in many["tokens"]]
    texts = post(server, "/v1/detokenize", {"tokens": many["tokens"]}).json()["text"]
    assert texts == ["Hello world", "Hi"]
    special = post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    kept = post(server, "/detokenize", {"tokens": special, "skip_special_tokens": False}).json()["text"]
    skipped = post(server, "/detokenize", {"tokens": special}).json()["text"]
    assert "<|im_start|>" in kept and "<|im_start|>" not in skipped and "Hi" in skipped
    assert post(server, "/detokenize", {"tokens": [[1, 2], [10**9]]}).status_code == 400


def test_info_aliases_and_abort_all(server):
    h = server.headers()
    for path in ("/model_info", "/get_model_info"):
        info = httpx.get(server.url + path, headers=h).json()
        assert info["weight_version"] == "default" and info["has_image_understanding"] is False
    assert httpx.get(server.url + "/server_info", headers=h).json()["page_size"] == 1
    assert httpx.get(server.url + "/get_weight_version", headers=h).json() == {"weight_version": "default"}
    body = {"text": "x", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    answers: list[dict] = []
    callers = [threading.Thread(target=lambda: answers.append(post(server, "/generate", body).json()))
               for _ in range(2)]
    for t in callers:
        t.start()
    deadline = time.time() + 30
    while pool_state(server)["num_running"] < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert post(server, "/abort_request", {"rid": "no-such-request", "abort_all": True}).status_code == 200
    for t in callers:
        t.join(60)
    assert [a["meta_info"]["finish_reason"]["type"] for a in answers] == ["abort", "abort"]
    assert_pool_whole(server)


# ---- profiling ----------------------------------------------------------------------------------
def read_trace(path) -> list[dict]:
    return json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]


def test_profile_writes_a_chrome_trace_per_rank(server, tmp_path):
    started = post(server, "/start_profile", {"output_dir": str(tmp_path), "profile_prefix": "e2e"})
    assert started.status_code == 200 and started.text == "Start profiling.\n"
    again = post(server, "/start_profile", {"output_dir": str(tmp_path)})
    assert again.status_code == 400 and "already running" in again.json()["error"]["message"]
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    assert post(server, "/generate", body).status_code == 200
    stopped = httpx.get(server.url + "/stop_profile", headers=server.headers(), timeout=120)  # GET too (SGLang's)
    assert stopped.status_code == 200 and stopped.text.startswith("Stop profiling.")
    [trace] = list(tmp_path.iterdir())  # written before the answer
    assert re.fullmatch(r"e2e-\d+\.\d+-TP-0\.trace\.json\.gz", trace.name), trace.name
    assert any(e.get("name", "").startswith("aten::") for e in read_trace(trace))
    second = post(server, "/stop_profile")
    assert second.status_code == 400 and "no profile is running" in second.json()["error"]["message"]
    assert_pool_whole(server)


def test_profile_of_num_steps_stops_by_itself(server, tmp_path):
    for bad, param in [({"num_steps": "2"}, "num_steps"), ({"start_step": 3}, "start_step")]:
        r = post(server, "/start_profile", {**bad, "output_dir": str(tmp_path)})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    for bad in ({"num_steps": 0}, {"activities": ["CPU", "MEM"]}, {"activities": ["GPU"]}):  # no CUDA here
        r = post(server, "/start_profile", {**bad, "output_dir": str(tmp_path)})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("profile not started"), r.text
    # SGLang's clients ask for CPU and GPU: on a CPU server GPU is left out
    body = {"output_dir": str(tmp_path), "num_steps": 2, "activities": ["CPU", "GPU"], "with_stack": False}
    assert post(server, "/start_profile", body).status_code == 200
    gen = {"text": "Hi", "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
    assert post(server, "/generate", gen).status_code == 200  # a prefill and 7 decode steps: past 2
    [trace] = list(tmp_path.iterdir())
    assert read_trace(trace)
    assert post(server, "/stop_profile").status_code == 400  # it stopped by itself
    assert "the GPU activity is left out" in server.log()
    assert_pool_whole(server)


def test_cors_any_origin_and_preflight_without_the_key(server):
    """As SGLang's server: any origin may call it from a browser; the preflight (which carries no
    Authorization) is answered before the API key is asked for, the real request still needs it."""
    origin = {"Origin": "http://ui.example"}
    pre = httpx.options(server.url + CHAT, timeout=10, headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in ("*", "http://ui.example")
    chat = post(server, CHAT, {"model": "smol", "messages": MSG, "max_tokens": 1}, headers=origin)
    assert chat.status_code == 200 and "access-control-allow-origin" in chat.headers
    keyless = httpx.post(server.url + CHAT, json={"model": "smol", "messages": MSG}, headers=origin, timeout=10)
    assert keyless.status_code == 401 and "access-control-allow-origin" in keyless.headers
