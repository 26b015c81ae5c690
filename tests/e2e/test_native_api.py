"""The bundled model's server through SGLang's native routes, by raw HTTP: /generate (plain, batch,
stream, stops, SGLang's request forms and logprob options, stream_interval), tokenize / detokenize,
the info routes, abort and the profiler."""

from __future__ import annotations

import gzip
import json
import re
import threading
import time

import httpx
import pytest

from tests.e2e.server_utils import api_server, assert_pool_whole, pool_state, post


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from api_server(tmp_path_factory)


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
