"""Requests a fuzz of the HTTP API once answered with a 500, a hang, a stalled event loop or a dead
scheduler, on the bundled model's server: each must now be a 4xx envelope (or a plain answer), and
the server must stay whole and serve the next request."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from radixserve.entrypoints.tokenizer_manager import TokenizerManager
from radixserve.messages import ProfileReply, ProfileReq
from tests.e2e.server_utils import api_server, assert_pool_whole, post

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from api_server(tmp_path_factory)


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"], err
    return err


# ---- integers past 64 bits: the scheduler's messages cannot carry them (were 500 OverflowError) ----
BIG = 2**64
TOO_BIG = {
    "chat_seed": (CHAT, {"messages": MSG, "seed": BIG}, "seed"),
    "chat_seed_negative": (CHAT, {"messages": MSG, "seed": -(2**63) - 1}, "seed"),
    "completion_top_k": (CMPL, {"prompt": "hi", "top_k": BIG}, "top_k"),
    "chat_min_tokens": (CHAT, {"messages": MSG, "min_tokens": 2**70}, "min_tokens"),
    "chat_stop_token_ids": (CHAT, {"messages": MSG, "stop_token_ids": [BIG]}, "stop_token_ids"),
    "generate_stream_interval": ("/generate", {"text": "hi", "stream": True,
                                               "sampling_params": {"stream_interval": BIG}}, "stream_interval"),
    "generate_sampling_seed": ("/generate", {"text": "hi", "sampling_params": {"sampling_seed": BIG}}, "seed"),
    # an integer no float holds (int too large to convert to float)
    "generate_temperature_400_digits": ("/generate", {"text": "hi", "sampling_params": {"temperature": 10**400}},
                                        "temperature"),
}


@pytest.mark.parametrize("case", list(TOO_BIG))
def test_integers_past_64_bits_are_a_400(server, case):
    path, body, param = TOO_BIG[case]
    err = error_of(post(server, path, {"max_tokens": 2, **body} if path != "/generate" else body))
    assert err["param"] == param, err
    # a 500 closed the connection too; the server answers the next request as ever
    assert post(server, CMPL, {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_a_seed_at_the_64_bit_edge_takes_n_samples(server):
    # sample i draws with seed + i: the second sample's seed wraps to -2**63 (same draws modulo 2**64)
    body = {"messages": MSG, "max_tokens": 4, "temperature": 1.0}
    two = post(server, CHAT, {**body, "n": 2, "seed": 2**63 - 1})
    assert two.status_code == 200, two.text
    wrapped = post(server, CHAT, {**body, "seed": -(2**63)})
    assert wrapped.status_code == 200, wrapped.text
    assert two.json()["choices"][1]["message"] == wrapped.json()["choices"][0]["message"]


def test_a_huge_negative_logprob_start_len_is_no_prompt_logprobs(server):
    r = post(server, "/generate", {"text": "1, 2, 3,", "return_logprob": True, "logprob_start_len": -(2**63) - 1,
                                   "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["input_token_logprobs"] == [] and len(meta["output_token_logprobs"]) == 2


# ---- the profiler: a bad start once hung the next one, or killed the scheduler -------------------
def test_profile_num_steps_past_64_bits_is_a_400_and_the_next_start_answers(server, tmp_path):
    err = error_of(post(server, "/start_profile", {"num_steps": BIG, "output_dir": str(tmp_path)}))
    assert err["param"] == "num_steps", err
    # the failed send once kept its place in the reply line: this start got its reply and hung
    start = httpx.post(server.url + "/start_profile", json={"output_dir": str(tmp_path)},
                       headers=server.headers(), timeout=30)
    assert start.status_code == 200, start.text
    stop = httpx.post(server.url + "/stop_profile", headers=server.headers(), timeout=60)
    assert stop.status_code == 200, stop.text
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("field", ["output_dir", "profile_prefix"])
def test_profile_nul_in_a_path_is_a_400_and_the_scheduler_lives(server, tmp_path, field):
    body = {"output_dir": str(tmp_path), field: (str(tmp_path) if field == "output_dir" else "p") + "\x00x"}
    err = error_of(post(server, "/start_profile", body))
    assert "NUL" in err["message"], err
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert post(server, CMPL, {"prompt": "hi", "max_tokens": 1}).status_code == 200
    assert post(server, "/stop_profile").status_code == 400  # none was started
    assert list(tmp_path.iterdir()) == []


def test_a_control_message_that_cannot_be_sent_leaves_no_waiter():
    """The cause of the hang above, whatever the message: a send that fails drops its waiter."""
    sent: list[bytes] = []

    async def send(data: bytes, copy: bool = True) -> None:
        sent.append(data)

    tm = TokenizerManager.__new__(TokenizerManager)  # no scheduler: the message fails to encode first
    tm._started, tm.dead, tm.draining, tm.control_waiters = True, None, {}, {}
    tm.send_sock = SimpleNamespace(send=send)
    with pytest.raises(OverflowError):
        asyncio.run(tm._control(ProfileReq(True, num_steps=BIG), ProfileReply))
    assert sent == [] and tm.control_waiters[ProfileReply] == []


def test_a_caller_cancelled_after_sending_does_not_stall_the_replies():
    """A control call cancelled while it waits (a client gone, a timeout): its reply, when it comes, is
    dropped, and the next caller gets its own; the receive loop lives on."""
    replies: asyncio.Queue = asyncio.Queue()

    async def send(data: bytes, copy: bool = True) -> None:
        replies.put_nowait(data)  # the scheduler answers every control message in order

    async def recv(copy: bool = False) -> SimpleNamespace:
        return SimpleNamespace(buffer=await replies.get())

    async def scenario() -> None:
        tm = TokenizerManager.__new__(TokenizerManager)
        tm._started, tm.dead, tm.draining, tm.control_waiters, tm.routes = True, None, {}, {}, {}
        tm.send_sock, tm.recv_sock = SimpleNamespace(send=send), SimpleNamespace(recv=recv)
        first = asyncio.ensure_future(tm._control(ProfileReq(True, profile_id="first"), ProfileReq))
        await asyncio.sleep(0)  # sent, now waiting
        first.cancel()
        loop = asyncio.ensure_future(tm._recv_loop())
        second = await asyncio.wait_for(tm._control(ProfileReq(True, profile_id="second"), ProfileReq), 5)
        assert second.profile_id == "second" and not loop.done()
        loop.cancel()

    asyncio.run(scenario())


# ---- a chat template from the request: runs in the event loop, for as long as it likes ----------
def test_a_request_chat_template_is_refused(server):
    # 10**8 loop turns: once ran (about 10 s here) with /health and every request waiting
    slow = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}x"
    err = error_of(post(server, CHAT, {"messages": MSG, "max_tokens": 1,
                                       "chat_template_kwargs": {"chat_template": slow}}))
    assert err["param"] == "chat_template_kwargs.chat_template", err
    # other keys are still the template's variables
    r = post(server, CHAT, {"messages": MSG, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text


# ---- a grammar that matches no text: the client's error (was 500 "token 0 violates the grammar") --
EMPTY_GRAMMARS = {
    "ebnf_no_text_at_all": {"ebnf": "root ::= a\na ::= a"},
    "ebnf_no_text_after_x": {"ebnf": 'root ::= "x" a\na ::= a'},
    "regex_empty_class": {"regex": "[^\\x00-\\U0010FFFF]"},
}


@pytest.mark.parametrize("case", list(EMPTY_GRAMMARS))
def test_a_grammar_that_matches_no_text_is_a_400(server, case):
    body = {"messages": MSG, "max_tokens": 4, "temperature": 1.0, **EMPTY_GRAMMARS[case]}
    err = error_of(post(server, CHAT, body))
    assert "can match no text" in err["message"], err
    # streaming: the status line is gone by then, so the 400 comes in-band
    r = post(server, CHAT, {**body, "stream": True})
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == 400 and r.text.rstrip().endswith("data: [DONE]"), r.text


def test_the_server_is_whole_after_the_regressions(server):
    assert_pool_whole(server)
    log = server.log()
    assert "Traceback" not in log and "error 500" not in log, log[-3000:]
