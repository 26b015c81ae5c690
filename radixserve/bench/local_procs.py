"""Local server processes for benchmarks and tests: free ports, starting a command in its own process
group with its output in a log file, waiting for an HTTP endpoint, and stopping the group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalProc:
    name: str
    popen: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and its children so far (0 once it is gone)."""
        try:
            p = psutil.Process(self.pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for q in procs:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group started for it, then SIGKILL what is left after grace_s."""
        if not self.alive():
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)  # its own group (start_new_session): only what we started
        except ProcessLookupError:
            return
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)


def spawn(name: str, args: list[str], log_path: str, env: dict[str, str] | None = None) -> LocalProc:
    """Start `args` (after the Python interpreter when args[0] is "-m") in a new session."""
    cmd = [sys.executable, *args] if args and args[0] == "-m" else args
    log = open(log_path, "wb")
    try:
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=env)
    finally:
        log.close()  # the child holds its own descriptor
    return LocalProc(name, popen, log_path)


def spawn_mock_worker(port: int, log_path: str, *flags: str, host: str = "127.0.0.1") -> LocalProc:
    return spawn(f"mock:{port}", ["-m", "radixserve.bench.mock_worker", "--host", host, "--port", str(port),
                                  *flags], log_path)


def wait_http(url: str, proc: LocalProc | None = None, timeout_s: float = 30.0) -> None:
    """Poll GET url until it answers 200; raise with the process's log tail if it exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    tail = f":\n{proc.log_tail()}" if proc is not None else ""
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s{tail}")
