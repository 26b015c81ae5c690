"""radixserve's router in front of a real radixserve server (bundled model), driven by the openai
client: outputs equal the server's own (chat, completions with n = 2 and logprobs, streams,
/generate batches), the info routes answer, and a client leaving aborts the request on the
server, leaving its pool whole."""

from __future__ import annotations

import contextlib
import time

import httpx
import openai
import pytest

from radixserve.bench.local_procs import free_port, spawn, wait_http
from tests.e2e.server_utils import assert_pool_whole, start_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(["--dtype", "float32", "--host", "127.0.0.1"],
                       str(tmp_path_factory.mktemp("router_serving") / "server.log"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def router(server, tmp_path_factory):
    port = free_port()
    proc = spawn("router", ["-m", "radixserve.launch_router", "--worker-urls", server.url, "--host", "127.0.0.1",
                            "--port", str(port), "--prometheus-port", str(free_port()), "--policy", "cache_aware"],
                 str(tmp_path_factory.mktemp("router") / "router.log"))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readiness", proc, timeout_s=60)
    yield url
    proc.stop()


def clients(server, router) -> tuple[openai.OpenAI, openai.OpenAI, str]:
    via = openai.OpenAI(base_url=router + "/v1", api_key="none", max_retries=0, timeout=120)
    direct = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    return via, direct, direct.models.list().data[0].id


def test_outputs_through_the_router_equal_the_servers(server, router):
    via, direct, model = clients(server, router)
    assert via.models.list().data[0].id == model
    chat = {"model": model, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    got, want = (api.chat.completions.create(**chat) for api in (via, direct))
    assert got.choices[0].message.content == want.choices[0].message.content
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens, want.usage.completion_tokens)
    completion = {"model": model, "prompt": "1, 2, 3, 4,", "max_tokens": 8, "temperature": 0, "n": 2, "logprobs": 1}
    got, want = (api.completions.create(**completion) for api in (via, direct))
    assert [c.text for c in got.choices] == [c.text for c in want.choices]
    assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
    stream = via.chat.completions.create(**{**chat, "logprobs": False, "top_logprobs": None, "stream": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        direct.chat.completions.create(**chat).choices[0].message.content
    body = {"text": ["The capital of France is", "Water boils at"], "sampling_params": {"temperature": 0,
                                                                                       "max_new_tokens": 6}}
    got = httpx.post(router + "/generate", json=body, timeout=120).json()
    want = httpx.post(server.url + "/generate", json=body, timeout=120).json()
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    bad = httpx.post(router + "/v1/chat/completions", json={"model": model, "messages": "nope"}, timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()  # the server's own 400, passed on


def test_info_routes_answer(server, router):
    assert httpx.get(router + "/health", timeout=10).status_code == 200
    ready = httpx.get(router + "/readiness", timeout=10).json()
    assert ready["healthy_workers"] == 1 and ready["status"] == "ready"
    assert httpx.get(router + "/health_generate", timeout=60).status_code == 200
    info = httpx.get(router + "/get_server_info", timeout=10).json()
    assert info["model_path"] == httpx.get(server.url + "/get_server_info", timeout=10).json()["model_path"]
    assert "model_path" in httpx.get(router + "/get_model_info", timeout=10).json()
    loads = httpx.get(router + "/get_loads", timeout=10).json()["workers"]
    assert [w["worker"] for w in loads] == [server.url]
    assert httpx.post(router + "/flush_cache", timeout=30).status_code == 200
    text = httpx.get(router + "/metrics", timeout=10).text
    assert "radixserve_router_requests_total" in text and "radixserve_router_worker_healthy" in text


def running(server) -> int:
    return sum(g["num_reqs"] for g in httpx.get(server.url + "/get_load", timeout=10).json())


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_aborts_the_request_on_the_server(server, router, stream):
    body = {"text": "Tell me a long story.", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
            "stream": stream}
    with contextlib.suppress(httpx.ReadTimeout):
        with httpx.stream("POST", router + "/generate", json=body, timeout=2) as r:
            for _ in r.iter_lines():
                break  # the first event, then leave
    deadline = time.time() + 15
    while running(server):
        assert time.time() < deadline, "the request kept running after its client left"
        time.sleep(0.2)
    assert_pool_whole(server)
