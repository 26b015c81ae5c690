"""sglang.srt.utils: process helpers the test files use to stop a server."""

from __future__ import annotations

import os

import psutil


def kill_process_tree(
    parent_pid: int | None,
    include_parent: bool = True,
    skip_pid: int | None = None,
    wait_timeout: float = 15.0,
) -> None:
    """SIGKILL a process and everything under it, then wait (bounded) until they are gone, so that the
    next server a test file starts can bind the same port."""
    if parent_pid is None:
        parent_pid = os.getpid()
        include_parent = False
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return
    procs = [p for p in parent.children(recursive=True) if p.pid != skip_pid]
    if include_parent:
        procs.append(parent)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=wait_timeout)
