"""The mock worker (radixserve.bench.mock_worker) as routers and router tests see it: response shapes,
the worker echo, counting, /get_load, and each fault knob through its CLI flag or POST /mock/config."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from radixserve.bench.local_procs import LocalProc, free_port, spawn_mock_worker, wait_http

pytestmark = pytest.mark.timeout(60)


def call(base: str, path: str, body: dict | None = None,
         method: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    method = method or ("POST" if data is not None else "GET")
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def gen(base: str, tokens: int = 3, **extra) -> tuple[int, dict, bytes]:
    return call(base, "/generate", {"text": "hello mock world", "sampling_params": {"max_new_tokens": tokens},
                                    **extra})


def start(tmp_path, *flags: str) -> tuple[LocalProc, str]:
    port = free_port()
    proc = spawn_mock_worker(port, str(tmp_path / f"mock_{port}.log"), *flags)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/liveness", proc, timeout_s=20)
    return proc, base


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    proc, base = start(tmp_path_factory.mktemp("mock"))
    yield base
    proc.stop()


@pytest.fixture
def mock(worker):
    """The shared worker with its knobs and counters back at their defaults."""
    call(worker, "/mock/config", {"latency_ms": 0, "token_latency_ms": 0, "status_code": 0, "fail_first": 0,
                                  "crash_on_request": 0, "fail_health_after": None, "output_tokens": 8})
    call(worker, "/mock/reset", {})
    return worker


def test_generate_shape_echo_and_counts(mock):
    port = mock.rsplit(":", 1)[1]
    status, headers, body = gen(mock, tokens=3)
    assert status == 200 and headers["x-mock-worker"] == port
    out = json.loads(body)
    meta = out["meta_info"]
    assert out["text"] == " t t t" and len(out["output_ids"]) == 3
    assert meta["finish_reason"] == {"type": "length", "length": 3} and meta["completion_tokens"] == 3
    assert meta["worker"] == port and meta["prompt_tokens"] == 4 and meta["cached_tokens"] == 0

    status, _, body = call(mock, "/generate", {"input_ids": [[1, 2], [3]], "sampling_params": {}})
    # a batch; no max_new_tokens: the default output_tokens (8)
    assert status == 200 and [len(r["output_ids"]) for r in json.loads(body)] == [8, 8]
    st = json.loads(call(mock, "/mock/stats")[2])
    assert st["requests"] == 2 and st["ok"] == 2 and st["inflight"] == 0 and st["prompt_chars"] == 16


def test_streaming_shapes(mock):
    status, headers, body = gen(mock, tokens=3, stream=True)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e[len("data: "):] for e in body.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["text"] for c in chunks] == [" t", " t t", " t t t"]  # the whole text so far, as SGLang
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None, None]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    body = call(mock, "/v1/chat/completions", chat)[2].decode()
    events = [e[len("data: "):] for e in body.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " t t"
    out = json.loads(call(mock, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[2])
    assert out["choices"][0]["text"] == " t t" and out["usage"]["completion_tokens"] == 2


def test_status_code_and_fail_first(mock):
    assert json.loads(call(mock, "/mock/config", {"status_code": 429})[2])["status_code"] == 429
    status, _, body = gen(mock)
    assert status == 429 and json.loads(body)["error"]["code"] == 429
    call(mock, "/mock/config", {"status_code": 0, "fail_first": 2})
    assert [gen(mock)[0] for _ in range(3)] == [500, 500, 200]
    assert call(mock, "/mock/config", {"no_such_knob": 1})[0] == 400


def test_get_load_counts_inflight(mock):
    call(mock, "/mock/config", {"latency_ms": 400})
    threads = [threading.Thread(target=gen, args=(mock, 5)) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 3
    load = {}
    while time.monotonic() < deadline:
        load = json.loads(call(mock, "/get_load")[2])[0]
        if load["num_reqs"] == 3:
            break
        time.sleep(0.02)
    assert load["num_reqs"] == 3 and load["num_tokens"] == 3 * (4 + 5) and load["dp_rank"] == 0
    for t in threads:
        t.join()
    assert json.loads(call(mock, "/get_load")[2])[0]["num_reqs"] == 0


def test_abort_request(mock):
    call(mock, "/mock/config", {"latency_ms": 300})
    out: list = []
    t = threading.Thread(target=lambda: out.append(gen(mock, rid="r-1")))
    t.start()
    time.sleep(0.1)
    call(mock, "/abort_request", {"rid": "r-1"})
    t.join()
    assert json.loads(out[0][2])["meta_info"]["finish_reason"]["type"] == "abort"


def test_fail_health_after_at_runtime(mock):
    call(mock, "/mock/config", {"fail_health_after": 0.3})
    assert call(mock, "/health")[0] == 200
    time.sleep(0.4)
    assert [call(mock, p)[0] for p in ("/health", "/health_generate", "/readiness", "/liveness")] == [
        503, 503, 503, 200]
    call(mock, "/mock/config", {"fail_health_after": None})
    assert call(mock, "/health")[0] == 200


def test_cli_knobs_and_crash(tmp_path):
    proc, base = start(tmp_path, "--fail-first", "1", "--crash-on-request", "3", "--fail-health-after", "0",
                       "--output-tokens", "2")
    try:
        assert call(base, "/health")[0] == 503
        info = json.loads(call(base, "/get_server_info")[2])
        assert info["disaggregation_mode"] == "null" and info["dp_size"] == 1
        assert gen(base, tokens=None)[0] == 500
        status, _, body = call(base, "/generate", {"text": "x"})
        assert status == 200 and json.loads(body)["meta_info"]["completion_tokens"] == 2
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            call(base, "/generate", {"text": "x"})  # the 3rd: the process exits mid-request
        assert proc.popen.wait(5) == 1
    finally:
        proc.stop()
