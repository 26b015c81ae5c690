"""sglang.srt.utils: process helpers the test files use to stop a server."""

from __future__ import annotations

import os

from radixserve.utils import process


def kill_process_tree(
    parent_pid: int | None,
    include_parent: bool = True,
    skip_pid: int | None = None,
    wait_timeout: float = 15.0,
) -> None:
    """SGLang's signature over radixserve's helper: SIGKILL a process and everything under it, then
    wait (bounded) until they are gone, so that the next server a test file starts can bind the same
    port. No pid: this process's children."""
    if parent_pid is None:
        parent_pid, include_parent = os.getpid(), False
    process.kill_process_tree(parent_pid, include_parent, wait_timeout, skip_pid)
