"""deploy/health_check.sh against live endpoints (mock workers answering /health as radixserve's servers and
router do): all healthy exits 0 with a ✓ each; one down, unhealthy (503) or silent past the timeout exits 1
with its ✗, the others still checked."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import httpx
import pytest

from radixserve.bench.local_procs import free_port, spawn_mock_worker, wait_http
from tests.deploy.tools import DEPLOY

pytestmark = pytest.mark.timeout(120)
SCRIPT = os.path.join(DEPLOY, "health_check.sh")


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTH_CHECK_")}
    full_env.update(env or {})
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60, env=full_env)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Three mock workers standing in for prefill, decode and router."""
    logs = tmp_path_factory.mktemp("health")
    ports = [free_port() for _ in range(3)]
    procs = [spawn_mock_worker(p, str(logs / f"{p}.log")) for p in ports]
    try:
        for port, proc in zip(ports, procs):
            wait_http(f"http://127.0.0.1:{port}/liveness", proc)
        yield [f"http://127.0.0.1:{p}" for p in ports], procs
    finally:
        for proc in procs:
            proc.stop()


def test_all_healthy_exits_0_with_a_tick_each(workers):
    urls, _ = workers
    done = check(*[u + "/health" for u in urls])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"✓ {u}/health" for u in urls]


def test_endpoints_from_the_environment_and_bare_urls_get_health(workers):
    urls, _ = workers
    done = check(env={"HEALTH_CHECK_ENDPOINTS": ",".join(urls), "HEALTH_CHECK_TIMEOUT": "3"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"✓ {u}/health" for u in urls]


def test_an_unhealthy_endpoint_exits_1_and_the_rest_are_still_checked(workers):
    urls, _ = workers
    httpx.post(urls[0] + "/mock/config", json={"fail_health_after": 0}, timeout=10).raise_for_status()
    try:
        done = check(*urls)
        assert done.returncode == 1
        assert done.stdout.splitlines() == [f"✗ {urls[0]}/health", f"✓ {urls[1]}/health", f"✓ {urls[2]}/health"]
    finally:
        httpx.post(urls[0] + "/mock/config", json={"fail_health_after": -1}, timeout=10).raise_for_status()


def test_a_silent_endpoint_fails_within_its_timeout(workers):
    urls, _ = workers
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}/health"
        start = time.monotonic()
        done = check("--timeout", "1", hung, urls[1])
        elapsed = time.monotonic() - start
    assert done.returncode == 1 and done.stdout.splitlines() == [f"✗ {hung}", f"✓ {urls[1]}/health"]
    assert elapsed < 10


def test_a_stopped_endpoint_exits_1(workers):
    urls, procs = workers
    procs[2].stop()
    done = check(*urls)
    assert done.returncode == 1
    assert done.stdout.splitlines() == [f"✓ {urls[0]}/health", f"✓ {urls[1]}/health", f"✗ {urls[2]}/health"]


def test_the_runbook_defaults_and_bad_arguments():
    # nothing of ours listens on the runbook's ports here unless a developer runs a deployment: only the shape
    done = check("--timeout", "1")
    assert [line[2:] for line in done.stdout.splitlines()] == [
        "http://127.0.0.1:30000/health", "http://127.0.0.1:30001/health", "http://127.0.0.1:8000/health"]
    assert check("--timeout", "soon").returncode == 2
    assert check("--bogus").returncode == 2
