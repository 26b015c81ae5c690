"""radixserve's router in front of mock workers with fault knobs (radixserve.bench.mock_worker):
retries save what a retry can save, breakers open and close, health checks take workers out and
back, the limits answer 429/413/504/401, workers come and go under load with nothing failing, and
the policies route as they should."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time

import httpx
import pytest

from radixserve.bench.local_procs import LocalProc, free_port, spawn, spawn_mock_worker, wait_http

pytestmark = pytest.mark.timeout(180)


class Mock:
    def __init__(self, proc: LocalProc, port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    def config(self, **knobs) -> None:
        assert httpx.post(self.url + "/mock/config", json=knobs, timeout=10).status_code == 200

    def served(self) -> int:
        return httpx.get(self.url + "/mock/stats", timeout=10).json()["requests"]


def start_mock(tmp_path, *flags: str, port: int | None = None) -> Mock:
    port = port or free_port()
    proc = spawn_mock_worker(port, str(tmp_path / f"mock_{port}.log"), *flags)
    wait_http(f"http://127.0.0.1:{port}/liveness", proc, timeout_s=30)
    return Mock(proc, port)


@contextlib.contextmanager
def mocks(tmp_path, count: int, *flags: str):
    started = [start_mock(tmp_path, *flags) for _ in range(count)]
    try:
        yield started
    finally:
        for m in started:
            m.proc.stop()


@contextlib.contextmanager
def router(tmp_path, *flags: str, ready_workers: int | None = 1):
    port = free_port()
    proc = spawn("router", ["-m", "radixserve.launch_router", "--host", "127.0.0.1", "--port", str(port),
                            "--prometheus-port", str(free_port()), *flags], str(tmp_path / f"router_{port}.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/liveness", proc, timeout_s=30)
        if ready_workers:
            deadline = time.time() + 30
            while httpx.get(url + "/readiness", timeout=5).json()["healthy_workers"] < ready_workers:
                assert time.time() < deadline, proc.log_tail()
                time.sleep(0.1)
        yield url
    finally:
        proc.stop()


def generate(url: str, text: str = "hello there", tokens: int = 4, timeout: float = 30, **extra) -> httpx.Response:
    return httpx.post(url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": tokens}, **extra},
                      timeout=timeout)


def served_by(reply: httpx.Response) -> str:
    return reply.headers["x-mock-worker"]


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_crashed_worker_and_failing_ones_are_retried_to_200(tmp_path):
    with mocks(tmp_path, 2) as (a, b):
        with router(tmp_path, "--worker-urls", a.url, b.url, "--policy", "round_robin",
                    "--retry-initial-backoff-ms", "10", ready_workers=2) as url:
            a.config(crash_on_request=1)  # a's next request kills it mid-request
            replies = [generate(url) for _ in range(4)]
            assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
            assert all(served_by(r) == str(b.port) for r in replies)
            b.config(fail_first=2)  # b alone now: two 500s, then fine (retries may go back to it)
            reply = generate(url)
            assert reply.status_code == 200, reply.text
            assert metric(url, "radixserve_router_retries_total") >= 3
        with router(tmp_path, "--worker-urls", b.url, "--disable-retries") as url:
            b.config(fail_first=1)
            assert generate(url).status_code == 500  # no retry: the worker's answer as it is
            assert generate(url).status_code == 200


def test_the_circuit_breaker_opens_and_closes(tmp_path):
    with mocks(tmp_path, 2) as (bad, good):
        bad.config(status_code=503)
        flags = ["--worker-urls", bad.url, good.url, "--policy", "round_robin", "--cb-failure-threshold", "2",
                 "--cb-success-threshold", "1", "--cb-timeout-duration-secs", "2", "--retry-initial-backoff-ms", "1"]
        with router(tmp_path, *flags, ready_workers=2) as url:
            for _ in range(6):
                assert generate(url).status_code == 200
            state = httpx.get(f"{url}/workers/{bad.url}", timeout=5).json()
            assert state["circuit_state"] == "open", state
            tried = bad.served()
            for _ in range(6):
                assert generate(url).status_code == 200
            assert bad.served() == tried  # open: nothing sent to it
            bad.config(status_code=0)
            time.sleep(2.2)
            replies = [generate(url) for _ in range(4)]
            assert {served_by(r) for r in replies} == {str(bad.port), str(good.port)}  # half-open probe, closed
            assert httpx.get(f"{url}/workers/{bad.url}", timeout=5).json()["circuit_state"] == "closed"


def test_health_checks_take_a_worker_out_and_back_in(tmp_path):
    with mocks(tmp_path, 2) as (flaky, steady):
        flags = ["--worker-urls", flaky.url, steady.url, "--policy", "round_robin", "--health-check-interval-secs",
                 "0.2", "--health-failure-threshold", "2", "--health-success-threshold", "2"]
        with router(tmp_path, *flags, ready_workers=2) as url:
            flaky.config(fail_health_after=0)
            deadline = time.time() + 10
            while httpx.get(f"{url}/workers/{flaky.url}", timeout=5).json()["healthy"]:
                assert time.time() < deadline
                time.sleep(0.1)
            assert {served_by(generate(url)) for _ in range(4)} == {str(steady.port)}
            flaky.config(fail_health_after=None)
            deadline = time.time() + 10
            while not httpx.get(f"{url}/workers/{flaky.url}", timeout=5).json()["healthy"]:
                assert time.time() < deadline
                time.sleep(0.1)
            assert {served_by(generate(url)) for _ in range(4)} == {str(flaky.port), str(steady.port)}


def test_a_worker_down_at_startup_joins_when_it_comes_up(tmp_path):
    late_port = free_port()
    with mocks(tmp_path, 1) as (up,):
        flags = ["--worker-urls", f"http://127.0.0.1:{late_port}", up.url, "--policy", "round_robin",
                 "--worker-startup-check-interval", "0.5"]
        with router(tmp_path, *flags, ready_workers=1) as url:
            assert {served_by(generate(url)) for _ in range(3)} == {str(up.port)}
            late = start_mock(tmp_path, port=late_port)
            try:
                deadline = time.time() + 10
                while httpx.get(url + "/readiness", timeout=5).json()["healthy_workers"] < 2:
                    assert time.time() < deadline
                    time.sleep(0.1)
                assert {served_by(generate(url)) for _ in range(4)} == {str(up.port), str(late_port)}
            finally:
                late.proc.stop()


def test_limits_answer_429_413_504_and_401(tmp_path):
    with mocks(tmp_path, 1) as (slow,):
        slow.config(latency_ms=1500)
        flags = ["--worker-urls", slow.url, "--max-concurrent-requests", "1", "--queue-size", "0",
                 "--max-payload-size", "2000", "--request-timeout-secs", "1", "--api-key", "sk-test",
                 "--disable-retries"]
        with router(tmp_path, *flags) as url:
            auth = {"Authorization": "Bearer sk-test"}
            no_key = generate(url)
            assert no_key.status_code == 401 and no_key.json()["error"]["code"] == 401
            assert httpx.get(url + "/health", timeout=5).status_code == 200  # health needs no key
            big = httpx.post(url + "/generate", json={"text": "x" * 5000}, headers=auth, timeout=10)
            assert big.status_code == 413 and "max-payload-size" in big.json()["error"]["message"]
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                first = pool.submit(httpx.post, url + "/generate", json={"text": "a"}, headers=auth, timeout=10)
                time.sleep(0.3)
                second = httpx.post(url + "/generate", json={"text": "b"}, headers=auth, timeout=10)
                assert second.status_code == 429, second.text
                timed_out = first.result()
            assert timed_out.status_code == 504 and "request-timeout-secs" in timed_out.json()["error"]["message"]
            slow.config(latency_ms=0)
            ok = httpx.post(url + "/generate", json={"text": "c"}, headers=auth, timeout=10)
            assert ok.status_code == 200 and ok.headers["x-request-id"]
            given = httpx.post(url + "/generate", json={"text": "d"}, headers={**auth, "x-request-id": "abc"},
                               timeout=10)
            assert given.headers["x-request-id"] == "abc"
            bad = httpx.post(url + "/generate", content=b"{not json", headers=auth, timeout=10)
            assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_workers_replaced_under_load_lose_nothing(tmp_path):
    """The runbook's graceful restart through the worker API: add the new instance, remove the old
    one, while 200 requests run at concurrency 16: none fails, and the old one drains."""
    with mocks(tmp_path, 3, "--latency-ms", "20") as (old, keep, new):
        with router(tmp_path, "--worker-urls", old.url, keep.url, "--policy", "round_robin",
                    ready_workers=2) as url:
            def one(i: int) -> int:
                return generate(url, text=f"request {i}").status_code

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                results = pool.map(one, range(200))
                time.sleep(0.3)
                added = httpx.post(url + "/workers", json={"url": new.url}, timeout=10)
                assert added.status_code == 201 and added.json()["worker"]["healthy"], added.text
                removed = httpx.delete(f"{url}/workers/{old.url}", timeout=10)
                assert removed.status_code == 202, removed.text
                statuses = list(results)
            assert statuses == [200] * 200
            listed = [w["url"] for w in httpx.get(url + "/workers", timeout=5).json()["workers"]]
            assert sorted(listed) == sorted([keep.url, new.url])
            assert new.served() > 0
            served_before = old.served()
            for _ in range(5):
                assert generate(url).status_code == 200
            assert old.served() == served_before
            legacy = httpx.get(url + "/list_workers", timeout=5).json()["urls"]
            assert sorted(legacy) == sorted([keep.url, new.url])
            assert httpx.delete(f"{url}/workers/http://127.0.0.1:1", timeout=5).status_code == 404


def test_cache_aware_sends_a_shared_prefix_to_the_worker_that_holds_it(tmp_path):
    with mocks(tmp_path, 2) as (a, b):
        with router(tmp_path, "--worker-urls", a.url, b.url, "--policy", "cache_aware", ready_workers=2) as url:
            system = "You are a meticulous assistant. " * 40
            first = served_by(generate(url, text=system + "Question one?"))
            for q in ("Question two?", "Question three?", "Another one entirely?"):
                assert served_by(generate(url, text=system + q)) == first
            other = served_by(generate(url, text="Completely unrelated text about the sea. " * 30))
            assert other != first  # no match: the worker with the smaller tree


def test_minimum_tokens_balances_tokens_not_requests(tmp_path):
    with mocks(tmp_path, 2) as (a, b):
        with router(tmp_path, "--worker-urls", a.url, b.url, "--load-balance-method", "minimum_tokens",
                    ready_workers=2) as url:
            a.config(latency_ms=3000)
            b.config(latency_ms=3000)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                big = pool.submit(generate, url, "long " * 4000, 2000)  # ~7,000 tokens on one worker
                time.sleep(0.5)
                small = [pool.submit(generate, url, "hi", 4) for _ in range(6)]
                replies = [f.result() for f in small]
                heavy = served_by(big.result())
            # every small request went to the other worker, though it then held more requests
            assert all(r.status_code == 200 for r in replies)
            assert {served_by(r) for r in replies} == {str(b.port) if heavy == str(a.port) else str(a.port)}


def test_streams_pass_through_and_a_worker_dying_mid_stream_ends_it_with_an_error(tmp_path):
    with mocks(tmp_path, 1) as (m,):
        with router(tmp_path, "--worker-urls", m.url) as url:
            body = {"text": "stream me", "sampling_params": {"max_new_tokens": 5}, "stream": True}
            with httpx.stream("POST", url + "/generate", json=body, timeout=30) as r:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert r.status_code == 200 and events[-1] == "data: [DONE]" and len(events) >= 6
            m.config(token_latency_ms=300)
            lines = []
            with httpx.stream("POST", url + "/generate", json={**body, "sampling_params": {"max_new_tokens": 50}},
                              timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        if len(lines) == 2:
                            m.proc.stop(grace_s=0)  # the worker goes away mid-stream
            assert any('"error"' in line for line in lines[2:]), lines
            assert lines[-1] == "data: [DONE]"


def test_sigterm_lets_requests_in_flight_finish(tmp_path):
    with mocks(tmp_path, 1) as (slow,):
        slow.config(latency_ms=1500)
        port = free_port()
        proc = spawn("router", ["-m", "radixserve.launch_router", "--host", "127.0.0.1", "--port", str(port),
                                "--prometheus-port", str(free_port()), "--worker-urls", slow.url,
                                "--shutdown-grace-period-secs", "30"], str(tmp_path / "router.log"))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/readiness", proc, timeout_s=30)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                running = pool.submit(generate, url)
                time.sleep(0.5)
                proc.popen.send_signal(15)
                assert running.result().status_code == 200  # finished, though the router was stopping
            assert proc.popen.wait(20) == 0
            with pytest.raises(httpx.ConnectError):
                generate(url)
        finally:
            proc.stop()
