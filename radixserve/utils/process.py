"""Process hygiene: children die with their parent, and shutdown leaves nothing behind."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

import psutil

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits, and watch for it as well
    (the parent may already be gone, or the platform may lack prctl)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def ignore_sigterm() -> None:
    """For child processes. `systemctl stop` (and `docker stop` of a process group, or `kill -TERM
    -PGID`) sends SIGTERM to every process of the server at once: the children must outlive it
    while the API process drains the requests in flight. They end with their parent (above) or by
    kill_process_tree's SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def kill_process_tree(pid: int, include_parent: bool = True, timeout: float = 5.0,
                      skip_pid: int | None = None) -> None:
    """SIGKILL a child process and its descendants but skip_pid (our children ignore SIGTERM, and by
    the time this runs there is nothing left for them to finish); wait up to timeout for them to go."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [p for p in proc.children(recursive=True) if p.pid != skip_pid] + ([proc] if include_parent else [])
    _kill_and_wait(procs, timeout)


def kill_process_trees(pids: list[int | None], timeout: float = 5.0) -> None:
    """SIGKILL several children and their descendants all at once, then wait up to timeout for them.
    Killed one at a time (waiting for each), ranks still alive would see their collectives break and
    log crashes (DP attention ranks meet in a collective every few ms)."""
    procs: list[psutil.Process] = []
    for pid in pids:
        if pid is None:
            continue
        try:
            proc = psutil.Process(pid)
            procs += proc.children(recursive=True) + [proc]
        except psutil.NoSuchProcess:
            continue
    _kill_and_wait(procs, timeout)


def _kill_and_wait(procs: list[psutil.Process], timeout: float) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)
