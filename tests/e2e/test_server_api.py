"""A real server on the bundled model, driven by the openai client and raw HTTP: the OpenAI endpoints,
concurrency, metrics, the bad-input matrix, client disconnects, structured output and CORS (SGLang's
native routes: test_native_api.py)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server_utils import API_KEY, BODY_LIMIT, api_server, assert_pool_whole, pool_state, post


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from api_server(tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


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
