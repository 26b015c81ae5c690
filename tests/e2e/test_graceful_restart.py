"""deploy/graceful_restart.sh against radixserve's router: while 200 requests run at concurrency 16,
the script starts a new instance, waits for its health, adds it, removes the old one, waits for it
to drain and stops it. No request fails; the old instance has exited; the new one serves. Once with
mock workers, once with radixserve servers on the bundled model."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import subprocess
import sys
import threading

import httpx
import pytest

from radixserve.bench.local_procs import free_port, spawn, spawn_mock_worker, wait_http
from tests.e2e.server_utils import REPO, start_server

pytestmark = pytest.mark.timeout(600)
SCRIPT = os.path.join(REPO, "deploy", "graceful_restart.sh")


def test_graceful_restart_under_load_loses_nothing(tmp_path):
    old_port, keep_port, new_port, router_port = free_port(), free_port(), free_port(), free_port()
    old = spawn_mock_worker(old_port, str(tmp_path / "old.log"), "--latency-ms", "30")
    keep = spawn_mock_worker(keep_port, str(tmp_path / "keep.log"), "--latency-ms", "30")
    procs = [old, keep]
    try:
        for port, proc in ((old_port, old), (keep_port, keep)):
            wait_http(f"http://127.0.0.1:{port}/liveness", proc)
        # reap the old instance when it exits (our child), so that the script sees its pid gone
        threading.Thread(target=old.popen.wait, daemon=True).start()
        router = spawn("router", ["-m", "radixserve.launch_router", "--host", "127.0.0.1", "--port", str(router_port),
                                  "--prometheus-port", str(free_port()), "--policy", "round_robin", "--worker-urls",
                                  f"http://127.0.0.1:{old_port}", f"http://127.0.0.1:{keep_port}"],
                       str(tmp_path / "router.log"))
        procs.append(router)
        url = f"http://127.0.0.1:{router_port}"
        wait_http(url + "/readiness", router)

        def one(i: int) -> int:
            body = {"text": f"request {i}", "sampling_params": {"max_new_tokens": 4}}
            return httpx.post(url + "/generate", json=body, timeout=60).status_code

        start_new = (f"exec {sys.executable} -m radixserve.bench.mock_worker --host 127.0.0.1 --port {new_port} "
                     "--latency-ms 30")
        cmd = [SCRIPT, "--router", url, "--old", f"http://127.0.0.1:{old_port}",
               "--new", f"http://127.0.0.1:{new_port}", "--start-cmd", start_new, "--old-pid", str(old.pid),
               "--health-timeout", "60", "--drain-timeout", "60", "--new-log", str(tmp_path / "new.log")]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = pool.map(one, range(200))
            restart = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
            statuses = list(statuses)
        assert restart.returncode == 0, restart.stderr
        assert statuses == [200] * 200
        assert old.popen.poll() is not None  # the old instance was stopped
        workers = sorted(w["url"] for w in httpx.get(url + "/workers", timeout=10).json()["workers"])
        assert workers == sorted([f"http://127.0.0.1:{keep_port}", f"http://127.0.0.1:{new_port}"])
        served = {httpx.post(url + "/generate", json={"text": "x"}, timeout=30).headers["x-mock-worker"]
                  for _ in range(4)}
        assert served == {str(keep_port), str(new_port)}
    finally:
        for proc in procs:
            proc.stop()
        subprocess.run(["pkill", "-f", f"mock_worker --host 127.0.0.1 --port {new_port}"], check=False)


def test_graceful_restart_fails_with_status_1_when_the_new_instance_never_comes_up(tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([SCRIPT, "--router", nobody, "--old", nobody, "--new", nobody, "--health-timeout", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "was not healthy within 2s" in done.stderr
    assert subprocess.run([SCRIPT, "--router", nobody], capture_output=True, timeout=30).returncode == 2


def test_graceful_restart_of_a_real_server_under_load_loses_nothing(tmp_path):
    """The same with radixserve servers on the bundled model: requests keep coming (at concurrency
    16, at least 200 of them, until the restart is over) while the script replaces one server by a
    new one; none fails, the old server drains and exits 0, the new one serves."""
    old = start_server(["--host", "127.0.0.1"], str(tmp_path / "old.log"))
    keep = start_server(["--host", "127.0.0.1"], str(tmp_path / "keep.log"))
    new_port, router_port = free_port(), free_port()
    router = None
    try:
        threading.Thread(target=old.proc.wait, daemon=True).start()  # reaped when it exits
        router = spawn("router", ["-m", "radixserve.launch_router", "--host", "127.0.0.1", "--port", str(router_port),
                                  "--prometheus-port", str(free_port()), "--policy", "round_robin", "--worker-urls",
                                  old.url, keep.url], str(tmp_path / "router.log"))
        url = f"http://127.0.0.1:{router_port}"
        wait_http(url + "/readiness", router)
        done = threading.Event()

        def client(i: int) -> list[int]:
            statuses = []
            while not done.is_set() or len(statuses) * 16 < 200:
                body = {"text": f"Say something about {i}.", "sampling_params": {"max_new_tokens": 2}}
                statuses.append(httpx.post(url + "/generate", json=body, timeout=120).status_code)
            return statuses

        start_new = f"exec {sys.executable} -m radixserve.launch_server --host 127.0.0.1 --port {new_port}"
        cmd = [SCRIPT, "--router", url, "--old", old.url, "--new", f"http://127.0.0.1:{new_port}",
               "--start-cmd", start_new, "--old-pid", str(old.proc.pid), "--health-timeout", "240",
               "--drain-timeout", "120", "--new-log", str(tmp_path / "new.log")]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            clients = [pool.submit(client, i) for i in range(16)]
            try:
                restart = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
            finally:
                done.set()
            statuses = [s for c in clients for s in c.result()]
        assert restart.returncode == 0, restart.stderr
        assert len(statuses) >= 200 and set(statuses) == {200}, collections.Counter(statuses)
        assert old.proc.returncode == 0, old.log()  # drained and exited on SIGTERM
        workers = sorted(w["url"] for w in httpx.get(url + "/workers", timeout=10).json()["workers"])
        assert workers == sorted([keep.url, f"http://127.0.0.1:{new_port}"])
        body = {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}
        assert all(httpx.post(url + "/generate", json=body, timeout=60).status_code == 200 for _ in range(4))
    finally:
        if router is not None:
            router.stop()
        subprocess.run(["pkill", "-f", f"radixserve.launch_server --host 127.0.0.1 --port {new_port}"], check=False)
        keep.stop()
        old.stop()
