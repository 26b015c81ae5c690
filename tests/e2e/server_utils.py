"""Start a real `python -m radixserve.launch_server` process for a test module, and stop it."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from radixserve.bench.local_procs import free_port  # noqa: F401 - tests import it from here

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: str
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


_SPAWN_LOCK = threading.Lock()


def start_server(args: list[str], log_path: str, api_key: str | None = None, timeout: float = 180,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """Start `python -m radixserve.launch_server ARGS` and wait for /health; env adds to the environment.
    A free port can be taken by another process before the server binds it (servers and KV transfer
    engines starting in parallel): then it starts again on another."""
    for attempt in range(3):
        try:
            return _start_on_a_free_port(args, log_path, api_key, timeout, env)
        except PortTaken:
            if attempt == 2:
                raise


class PortTaken(RuntimeError):
    """The server exited because another process bound its port first."""


def _start_on_a_free_port(args: list[str], log_path: str, api_key: str | None, timeout: float,
                          env: dict[str, str] | None) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "radixserve.launch_server", "--port", str(port), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    log = open(log_path, "w")
    # one spawn at a time: two threads spawning at once (servers started in parallel) once had exec
    # fail with EFAULT ("Bad address") in CI; the servers still start up in parallel
    with _SPAWN_LOCK:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, **env} if env else None)
    server = ServerProcess(proc, port, log_path, api_key)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            error = PortTaken if f"('127.0.0.1', {port}): address already in use" in server.log() else RuntimeError
            raise error(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become healthy in {timeout}s:\n{server.log()}")


def pool_state(server: ServerProcess) -> dict:
    info = httpx.get(server.url + "/get_server_info", headers=server.headers(), timeout=30).json()
    return info["internal_states"][0]


def assert_pool_whole(server: ServerProcess, timeout: float = 10) -> None:
    """After flushing the prefix cache, every KV slot and request row is free."""
    deadline = time.time() + timeout
    while True:
        r = httpx.post(server.url + "/flush_cache", headers=server.headers(), timeout=30)
        state = pool_state(server)
        whole = (r.status_code == 200 and state["kv_available"] == state["kv_total"]
                 and state["req_rows_available"] == state["req_rows_total"])
        if whole:
            return
        if time.time() > deadline:
            raise AssertionError(f"pool not whole: flush={r.status_code} {r.text!r} state={state}")
        time.sleep(0.2)


@contextmanager
def pd_pair(path: str, prefill_flags: list[str], decode_flags: list[str], logs: Path,
            page_size: int = 2) -> Iterator[tuple[ServerProcess, ServerProcess, int]]:
    """(prefill server, decode server, bootstrap port) on one model over Mooncake's TCP transport,
    started together and stopped after."""
    os.environ["MC_FORCE_TCP"] = "1"
    common = ["--model-path", path, "--dtype", "float32", "--host", "127.0.0.1", "--page-size", str(page_size)]
    bootstrap = free_port()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, [*common, *prefill_flags, "--disaggregation-mode", "prefill",
                                              "--disaggregation-bootstrap-port", str(bootstrap)],
                               str(logs / "prefill.log")),
                   pool.submit(start_server, [*common, *decode_flags, "--disaggregation-mode", "decode"],
                               str(logs / "decode.log"))]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            if f.exception() is not None:
                raise f.exception()
        yield started[0], started[1], bootstrap
    finally:
        for server in started:
            server.stop()


def generate_both(prefill: ServerProcess, decode: ServerProcess, body: dict, timeout: float = 120) -> dict:
    """POST one /generate body (with its bootstrap fields) to both PD servers at once, as a PD router
    does; the decode server's answer."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        p, d = [pool.submit(httpx.post, s.url + "/generate", json=body, timeout=timeout) for s in (prefill, decode)]
        p, d = p.result(), d.result()
    assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
    return d.json()


# The bundled model as test_server_api.py and test_native_api.py serve it (a server per module)
API_KEY = "sk-test-radixserve"
BODY_LIMIT = 1 << 20


def api_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """For a module-scoped fixture: `yield from api_server(tmp_path_factory)`."""
    log = str(tmp_path_factory.mktemp("server") / "server.log")
    srv = start_server(["--dtype", "float32", "--max-request-body-size", str(BODY_LIMIT),
                        "--served-model-name", "smol"], log, api_key=API_KEY)
    yield srv
    assert srv.stop() == 0, srv.log()


def post(server: ServerProcess, path: str, body=None, content: bytes | None = None, headers=None) -> httpx.Response:
    h = {**server.headers(), **(headers or {})}
    if content is not None:
        return httpx.post(server.url + path, content=content, headers=h, timeout=120)
    return httpx.post(server.url + path, json=body, headers=h, timeout=120)
