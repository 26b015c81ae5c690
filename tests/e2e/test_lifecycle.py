"""No process is left behind: after shutdown, after a child crash, and after the parent dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from radixserve import Engine
from radixserve.entrypoints.tokenizer_manager import ServerDeadError
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_tiny_model("llama", path, seed=5)
    return path


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def test_shutdown_leaves_no_process(model_dir):
    engine = Engine(model_path=model_dir, dtype="float32")
    pids = [p.pid for p in engine._procs]
    assert engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})["output_ids"]
    engine.shutdown()
    assert wait_gone(pids) == []
    # every entry point refuses at once; none waits on the stopped event loop
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(input_ids=[5, 6, 7])
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(input_ids=[5, 6, 7], stream=True)
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(asyncio.wait_for(engine.async_generate(input_ids=[5, 6, 7]), 10))
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(asyncio.wait_for(engine.async_generate(input_ids=[5, 6, 7], stream=True), 10))


def test_child_crash_fails_requests_clearly(model_dir):
    with Engine(model_path=model_dir, dtype="float32") as engine:
        scheduler = engine._procs[0]
        os.kill(scheduler.pid, signal.SIGKILL)
        with pytest.raises(ServerDeadError, match="scheduler process died"):
            for _ in range(50):  # the watchdog notices within a second
                engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 400, "ignore_eos": True})
                time.sleep(0.1)
        pids = [p.pid for p in engine._procs]
    assert wait_gone(pids) == []


def test_parent_death_takes_children_down(model_dir, tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        from radixserve import Engine
        if __name__ == "__main__":
            e = Engine(model_path={model_dir!r}, dtype="float32")
            print(" ".join(str(p.pid) for p in e._procs), flush=True)
            os._exit(0)  # no shutdown, no atexit: a crash
    """)
    path = tmp_path / "crash.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    assert wait_gone(pids) == []
