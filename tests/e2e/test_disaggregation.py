"""Prefill/decode disaggregation on the bundled model: a prefill server and a decode server moving
each prompt's KV over Mooncake's TCP transport, driven directly (the same body to both, as a PD
router sends it) and through SGLang's own router. Outputs equal what one ordinary server gives."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.e2e.server_utils import assert_pool_whole, free_port, start_server

BOOTSTRAP_TIMEOUT = 8  # seconds the prefill server waits for a decode server to claim a request
HEARTBEAT_INTERVAL, HEARTBEAT_MAX_FAILURE = 0.5, 2  # the decode server's checks of its prefill servers
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Write a haiku about the sea."]
COMMON = ["--dtype", "float32", "--host", "127.0.0.1"]


@contextlib.contextmanager
def environ(**values: str):
    """Environment variables the servers started inside inherit (SGLang's names for the timeouts)."""
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            del os.environ[name]


def start_prefill(log: str, bootstrap: int, *more: str):
    with environ(SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT=str(BOOTSTRAP_TIMEOUT)):
        return start_server([*COMMON, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                             str(bootstrap), *more], log)


def start_decode(log: str, *more: str):
    with environ(SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL=str(HEARTBEAT_INTERVAL),
                 SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE=str(HEARTBEAT_MAX_FAILURE)):
        return start_server([*COMMON, "--disaggregation-mode", "decode", *more], log)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    os.environ["MC_FORCE_TCP"] = "1"  # the servers inherit it: Mooncake over loopback TCP
    logs = tmp_path_factory.mktemp("pd")
    bootstrap = free_port()
    prefill = start_prefill(str(logs / "prefill.log"), bootstrap)
    try:
        decode = start_decode(str(logs / "decode.log"))
    except Exception:
        prefill.stop()
        raise
    yield prefill, decode, bootstrap
    assert decode.stop() == 0, decode.log()
    assert prefill.stop() == 0, prefill.log()


def metric(server, name: str) -> float:
    """One sample of the server's /metrics (0 when it is not there)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    found = re.search(rf"^radixserve:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def kill(server) -> None:
    """SIGKILL the server and every process of its group: no chance to tell anyone."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def both(prefill, decode, path: str, body: dict, timeout: float = 120) -> tuple[httpx.Response, httpx.Response]:
    """What a PD router does: the same body to both servers at once."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        p = pool.submit(httpx.post, prefill.url + path, json=body, timeout=timeout)
        d = pool.submit(httpx.post, decode.url + path, json=body, timeout=timeout)
        return p.result(), d.result()


def alone(server, body: dict) -> dict:
    """The reference: the same request without bootstrap fields runs on one server as usual."""
    plain = {k: v for k, v in body.items() if not k.startswith("bootstrap_")}
    return httpx.post(server.url + "/generate", json=plain, timeout=120).json()


@pytest.mark.parametrize("room", [7, (1 << 63) - 1])
def test_decode_continues_from_the_prefill_servers_kv(pair, room):
    prefill, decode, bootstrap = pair
    for prompt in PROMPTS:
        body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 12},
                "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap, "bootstrap_room": room}
        p, d = both(prefill, decode, "/generate", body)
        assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
        assert p.json()["meta_info"]["completion_tokens"] == 1  # the prefill server stops at its first token
        want = alone(decode, body)
        got = d.json()
        assert got["output_ids"] == want["output_ids"] and got["text"] == want["text"]
        assert got["output_ids"][0] == p.json()["output_ids"][0]
    assert_pool_whole(prefill)
    assert_pool_whole(decode)


def test_a_batch_and_a_stream_through_the_pair(pair):
    prefill, decode, bootstrap = pair
    ids = [[1, 504, 3575, 282], [1, 28, 30, 216]]
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 8},
            "bootstrap_host": ["127.0.0.1"] * 2, "bootstrap_port": [bootstrap] * 2, "bootstrap_room": [100, 101]}
    p, d = both(prefill, decode, "/generate", body)
    assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
    assert [r["output_ids"] for r in d.json()] == [r["output_ids"] for r in alone(decode, body)]
    stream = {"text": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 8}, "stream": True,
              "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap, "bootstrap_room": 200}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        p = pool.submit(httpx.post, prefill.url + "/generate", json=stream, timeout=120)
        with httpx.stream("POST", decode.url + "/generate", json=stream, timeout=120) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert p.result().status_code == 200
    assert lines[-1] == "data: [DONE]"
    import json

    assert json.loads(lines[-2][6:])["output_ids"] == alone(decode, {**stream, "stream": False})["output_ids"]
    assert_pool_whole(prefill)
    assert_pool_whole(decode)


def test_requests_without_their_peer_end_and_hold_nothing(pair):
    """A prefill request no decode server claims ends with a 503 after the bootstrap timeout; a
    decode request whose prefill server cannot be reached holds nothing once its client leaves."""
    prefill, decode, bootstrap = pair
    start = time.time()
    lone = httpx.post(prefill.url + "/generate", timeout=60, json={
        "text": "hi", "sampling_params": {"max_new_tokens": 4}, "bootstrap_host": "127.0.0.1",
        "bootstrap_port": bootstrap, "bootstrap_room": 404})
    assert lone.status_code == 503 and "room 404" in lone.json()["error"]["message"]
    assert BOOTSTRAP_TIMEOUT <= time.time() - start < BOOTSTRAP_TIMEOUT + 10
    assert_pool_whole(prefill)
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": free_port(), "bootstrap_room": 5}
    # nothing listens on that port: the decode server cannot find the prefill server. It keeps
    # trying until the waiting timeout; the client going away aborts it sooner.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(decode.url + "/generate", json=body, timeout=2)
    assert_pool_whole(decode)


ROUTERS = {"sglang": "sglang_router.launch_router", "radixserve": "radixserve.launch_router"}


@contextlib.contextmanager
def pd_router(kind: str, prefills: list[tuple[str, int]], decodes: list[str]):
    """A PD router (SGLang's or radixserve's, same flags; round robin) in front of these servers;
    yields its URL once every worker is healthy."""
    port = free_port()
    cmd = [sys.executable, "-m", ROUTERS[kind], "--pd-disaggregation", "--host", "127.0.0.1",
           "--port", str(port), "--prometheus-port", str(free_port()), "--disable-retries", "--policy", "round_robin"]
    for url, bootstrap in prefills:
        cmd += ["--prefill", url, str(bootstrap)]
    for url in decodes:
        cmd += ["--decode", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    try:
        while True:
            try:
                if httpx.get(url + "/readiness", timeout=2).json().get("healthy_workers") == len(prefills) + len(decodes):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert proc.poll() is None and time.time() < deadline, f"{kind}'s router did not get ready"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module", params=list(ROUTERS))
def router(pair, request):
    prefill, decode, bootstrap = pair
    with pd_router(request.param, [(prefill.url, bootstrap)], [decode.url]) as url:
        yield url


def test_router_drives_the_pair(pair, router):
    prefill, decode, _ = pair
    client = openai.OpenAI(base_url=router + "/v1", api_key="none", max_retries=0, timeout=120)
    direct = openai.OpenAI(base_url=decode.url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = direct.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    via_router = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    want = direct.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    assert via_router.choices[0].message.content == want.choices[0].message.content
    assert via_router.usage.completion_tokens == want.usage.completion_tokens
    body = {"text": PROMPTS[1], "sampling_params": {"temperature": 0, "max_new_tokens": 10}}
    got = httpx.post(router + "/generate", json=body, timeout=120).json()
    assert got["output_ids"] == alone(decode, body)["output_ids"]
    assert_pool_whole(prefill)
    assert_pool_whole(decode)


def test_router_outputs_equal_one_servers(pair, router):
    """Through SGLang's router and radixserve's: chat, completions (n = 2, logprobs, a stream) and /generate with
    prompt and output logprobs give what one ordinary server gives."""
    prefill, decode, _ = pair
    client = openai.OpenAI(base_url=router + "/v1", api_key="none", max_retries=0, timeout=120)
    direct = openai.OpenAI(base_url=decode.url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = direct.models.list().data[0].id
    chat = {"model": model, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    got, want = (api.chat.completions.create(**chat) for api in (client, direct))
    assert got.choices[0].message.content == want.choices[0].message.content
    assert [t.token for t in got.choices[0].logprobs.content] == [t.token for t in want.choices[0].logprobs.content]
    for a, b in zip(got.choices[0].logprobs.content, want.choices[0].logprobs.content):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    completion = {"model": model, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "n": 2, "logprobs": 1}
    got, want = (api.completions.create(**completion) for api in (client, direct))
    assert [c.text for c in got.choices] == [c.text for c in want.choices] and len(got.choices) == 2
    assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
    stream = client.completions.create(**{**completion, "n": 1, "logprobs": None, "stream": True})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want.choices[0].text
    body = {"text": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 6}, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 2}
    got = httpx.post(router + "/generate", json=body, timeout=120).json()
    want = alone(decode, body)
    assert got["output_ids"] == want["output_ids"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert [t[1] for t in got["meta_info"][key]] == [t[1] for t in want["meta_info"][key]], key
        for a, b in zip(got["meta_info"][key], want["meta_info"][key]):
            assert a[0] == b[0] or a[0] == pytest.approx(b[0], abs=1e-3), key
    assert_pool_whole(prefill)
    assert_pool_whole(decode)


def test_a_client_leaving_frees_both_sides(pair):
    """A request whose client leaves holds nothing afterwards, on either side, long before any
    timeout: waiting at the decode server for KV (the prefill server is told and answers), waiting
    at the prefill server for its destination, and decoding on both."""
    prefill, decode, bootstrap = pair
    body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 4}, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": bootstrap, "bootstrap_room": 900}
    with pytest.raises(httpx.ReadTimeout):  # its prefill request never comes
        httpx.post(decode.url + "/generate", json=body, timeout=2)
    assert_pool_whole(decode, timeout=3)
    with pytest.raises(httpx.ReadTimeout):  # its decode request never comes
        httpx.post(prefill.url + "/generate", json={**body, "bootstrap_room": 901}, timeout=1)
    assert_pool_whole(prefill, timeout=3)
    long = {**body, "bootstrap_room": 902, "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        both(prefill, decode, "/generate", long, timeout=3)
    assert_pool_whole(prefill, timeout=3)
    assert_pool_whole(decode, timeout=3)
    body = {**body, "bootstrap_room": 903, "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    p, d = both(prefill, decode, "/generate", body)  # and the pair serves on
    assert d.status_code == 200 and d.json()["output_ids"] == alone(decode, body)["output_ids"]


def test_a_client_leaving_radixserves_router_frees_both_sides(pair):
    """Through radixserve's PD router: a client that leaves mid-stream, or before a long answer,
    aborts the request on the decode and the prefill server alike."""
    prefill, decode, bootstrap = pair
    with pd_router("radixserve", [(prefill.url, bootstrap)], [decode.url]) as url:
        long = {"text": PROMPTS[2], "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}
        with httpx.stream("POST", url + "/generate", json={**long, "stream": True}, timeout=60) as r:
            for _ in r.iter_lines():
                break  # the first event, then leave
        assert_pool_whole(decode, timeout=5)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/generate", json=long, timeout=2)
        assert_pool_whole(decode, timeout=5)
        assert_pool_whole(prefill, timeout=5)


def test_a_malformed_destination_costs_the_prefill_server_nothing(pair):
    """A peer's garbage on the handoff socket (an endpoint ZMQ refuses, buffer rows of the wrong
    shape, slots outside the pool) fails that one request's transfer; the server serves on."""
    import zmq

    from radixserve import ipc_codec
    from radixserve.messages import KVDestination, PeerRank

    prefill, decode, bootstrap = pair
    info = httpx.get(f"http://127.0.0.1:{bootstrap}/info", timeout=10).json()
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(info["groups"][0]["handoff"])
    failures = metric(prefill, "kv_transfer_failures_total")
    bad = [[PeerRank("127.0.0.1:1", [[1, 2]])], [PeerRank("127.0.0.1:1", [[0, 4, 1, 0, 1]] * 64)]]
    for room, ranks in zip((1200, 1201), bad):
        ipc_codec.send(sock, KVDestination(room, "no such endpoint", [10**9] * 6, ranks))
        reply = httpx.post(prefill.url + "/generate", timeout=60, json={
            "input_ids": [1, 504, 3575, 282, 4877, 314], "sampling_params": {"max_new_tokens": 4},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap, "bootstrap_room": room})
        assert reply.status_code in (200, 503), reply.text
    sock.close()
    wait_for(lambda: metric(prefill, "kv_transfer_failures_total") == failures + 2)
    assert_pool_whole(prefill)
    body = {"text": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 4},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap, "bootstrap_room": 1202}
    p, d = both(prefill, decode, "/generate", body)
    assert d.status_code == 200 and d.json()["output_ids"] == alone(decode, body)["output_ids"]


def test_a_dead_prefill_server_fails_the_requests_waiting_on_it(pair, tmp_path):
    """Prefill server killed while the decode server waits for its KV: the decode request ends
    with a 503 within the heartbeat timeout and its slots are free again."""
    _, decode, _ = pair
    bootstrap = free_port()
    doomed = start_prefill(str(tmp_path / "doomed_prefill.log"), bootstrap)
    body = {"text": PROMPTS[2], "sampling_params": {"max_new_tokens": 4}, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": bootstrap, "bootstrap_room": 1000}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, decode.url + "/generate", json=body, timeout=120)
        wait_for(lambda: metric(decode, "num_decode_transfer_queue_reqs") == 1)
        kill(doomed)
        killed = time.time()
        reply = waiting.result()
    assert reply.status_code == 503, reply.text
    assert "stopped answering" in reply.json()["error"]["message"]
    assert time.time() - killed < HEARTBEAT_INTERVAL * (HEARTBEAT_MAX_FAILURE + 1) + 5
    assert_pool_whole(decode)


def test_a_dead_decode_server_costs_the_prefill_server_nothing(pair, tmp_path):
    """Decode server killed after sending where a prompt's KV goes: the prefill server's write
    fails, is counted, and the prefill server's KV is whole again."""
    prefill, _, bootstrap = pair
    doomed = start_decode(str(tmp_path / "doomed_decode.log"))
    body = {"text": PROMPTS[2], "sampling_params": {"max_new_tokens": 4}, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": bootstrap, "bootstrap_room": 1100}
    failures = metric(prefill, "kv_transfer_failures_total")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(httpx.post, doomed.url + "/generate", json=body, timeout=60)
        wait_for(lambda: metric(doomed, "num_decode_transfer_queue_reqs") == 1)
        kill(doomed)
    reply = httpx.post(prefill.url + "/generate", json=body, timeout=60)
    assert reply.status_code in (200, 503), reply.text
    wait_for(lambda: metric(prefill, "kv_transfer_failures_total") == failures + 1)
    assert_pool_whole(prefill)


def test_300_requests_at_concurrency_32_through_a_router(pair, router):
    """None lost, none failed, every prompt's KV moved, both pools whole; the queues show in the
    metrics and in the logs under SGLang's names."""
    prefill, decode, _ = pair
    before = [(metric(side, "kv_transfers_total"), metric(side, "kv_transfer_failures_total"))
              for side in (prefill, decode)]

    def one(i: int) -> dict:
        body = {"text": f"Item {i}: {PROMPTS[i % 3]}", "sampling_params": {"temperature": 0, "max_new_tokens": 3,
                                                                          "ignore_eos": True}}
        reply = httpx.post(router + "/generate", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        return reply.json()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(one, range(300)))
    assert all(len(out["output_ids"]) == 3 for out in outs)
    for side, (transfers, failures) in zip((prefill, decode), before):
        assert metric(side, "kv_transfers_total") - transfers >= 300
        assert metric(side, "kv_transfer_failures_total") == failures
    assert metric(prefill, "kv_transfer_bytes_total") > 0
    assert metric(prefill, "kv_transfer_latency_seconds_count") >= 300
    assert metric(decode, "kv_transfer_wait_seconds_count") >= 300
    assert_pool_whole(prefill)
    assert_pool_whole(decode)
    assert "#bootstrap-req: " in prefill.log() and "#inflight-req: " in prefill.log()
    assert "#prealloc-req: " in decode.log() and "#transfer-req: " in decode.log()


def test_2p2d_through_both_routers(pair, tmp_path):
    """Two prefill and two decode servers behind SGLang's router, then radixserve's: every
    prefill/decode combination gives one server's outputs, and every pool is whole afterwards."""
    prefill, decode, bootstrap = pair
    bootstrap2 = free_port()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(start_prefill, str(tmp_path / "prefill2.log"), bootstrap2),
                    pool.submit(start_decode, str(tmp_path / "decode2.log"))]
    extra = [f.result() for f in starting if f.exception() is None]
    if len(extra) < 2:
        for side in extra:
            side.stop()
        raise next(f.exception() for f in starting if f.exception() is not None)
    prefill2, decode2 = extra
    try:
        for kind in ROUTERS:
            before = [metric(side, "kv_transfers_total") for side in (prefill, prefill2, decode, decode2)]
            with pd_router(kind, [(prefill.url, bootstrap), (prefill2.url, bootstrap2)],
                           [decode.url, decode2.url]) as url:
                client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
                model = client.models.list().data[0].id
                prompts = [f"{p} ({i})" for i, p in enumerate(PROMPTS * 2)]  # round robin: each pairing, twice
                for prompt in prompts:
                    got = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
                    body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
                    assert got.choices[0].text == alone(decode, body)["text"], kind
                after = [metric(side, "kv_transfers_total") for side in (prefill, prefill2, decode, decode2)]
                assert all(a > b for a, b in zip(after, before)), (kind, before, after)  # all four took part
        for side in (prefill, decode, prefill2, decode2):
            assert_pool_whole(side)
    finally:
        for side in extra:
            assert side.stop() == 0, side.log()


def test_tp2_and_tp1_sides_exchange_kv(pair, tmp_path):
    """A prefill server at TP 2 (gloo) writes into a TP-1 decode server and a TP-2 one, and a TP-1
    prefill server into the TP-2 decode server: the bundled model's 3 KV heads split 2 + 1, so each
    slot is re-sliced between the sides. Greedy outputs equal one ordinary server's."""
    prefill, decode, bootstrap = pair
    bootstrap2 = free_port()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(start_prefill, str(tmp_path / "prefill_tp2.log"), bootstrap2, "--tp-size", "2"),
                    pool.submit(start_decode, str(tmp_path / "decode_tp2.log"), "--tp-size", "2")]
    extra = [f.result() for f in starting if f.exception() is None]
    if len(extra) < 2:
        for side in extra:
            side.stop()
        raise next(f.exception() for f in starting if f.exception() is not None)
    prefill2, decode2 = extra
    try:
        room = 2000
        for p_server, p_port, d_server in [(prefill2, bootstrap2, decode), (prefill, bootstrap, decode2),
                                           (prefill2, bootstrap2, decode2)]:
            for prompt in PROMPTS:
                room += 1
                body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8},
                        "bootstrap_host": "127.0.0.1", "bootstrap_port": p_port, "bootstrap_room": room}
                p, d = both(p_server, d_server, "/generate", body)
                assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
                assert d.json()["output_ids"] == alone(decode, body)["output_ids"], (p_server.url, d_server.url)
        for side in (prefill, decode, prefill2, decode2):
            assert_pool_whole(side)
    finally:
        for side in extra:
            assert side.stop() == 0, side.log()


def test_paged_chunked_pair_matches_and_reuses_the_prefill_cache(tmp_path):
    """Pages of 4 and prompts prefilled in chunks of 8 on both servers: outputs still equal one
    server's, each chunk's KV is written out before the prompt's prefill ends, and a prompt sent
    again is served from the prefill server's prefix cache."""
    bootstrap = free_port()
    common = [*COMMON, "--page-size", "4", "--chunked-prefill-size", "8"]
    prefill = start_server([*common, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                            str(bootstrap)], str(tmp_path / "prefill.log"))
    decode = None
    try:
        decode = start_server([*common, "--disaggregation-mode", "decode"], str(tmp_path / "decode.log"))
        prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,"
        cached = []
        for room in (1, 2):
            body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 10},
                    "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap, "bootstrap_room": room}
            p, d = both(prefill, decode, "/generate", body)
            assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
            assert d.json()["output_ids"] == alone(decode, body)["output_ids"]
            cached.append(p.json()["meta_info"]["cached_tokens"])
        assert cached[0] == 0 and cached[1] >= 8
        # ~22 prompt tokens in chunks of 8: two chunks written early the first time, one the second
        assert metric(prefill, "kv_transfer_chunk_writes_total") >= 2
        assert metric(prefill, "kv_transfers_total") == 2
        assert_pool_whole(prefill)
        assert_pool_whole(decode)
    finally:
        if decode is not None:
            assert decode.stop() == 0, decode.log()
        assert prefill.stop() == 0, prefill.log()
