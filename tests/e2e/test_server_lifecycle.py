"""Server lifecycle: graceful SIGTERM with streams in flight, and exit when a child process dies."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.e2e.server_utils import start_server
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    make_tiny_model("llama", path, seed=9)
    return path


def descendants(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def all_gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


def private_tmpdir(tmp_path) -> dict[str, str]:
    """A TMPDIR of the server's own, to see what it leaves there."""
    (tmp_path / "tmp").mkdir()
    return {"TMPDIR": str(tmp_path / "tmp")}


def test_group_sigterm_drains_streams_then_exits_zero(model_dir, tmp_path):
    srv = start_server(["--model-path", model_dir, "--dtype", "float32", "--shutdown-timeout", "60"],
                       str(tmp_path / "server.log"), env=private_tmpdir(tmp_path))
    assert [p.name for p in (tmp_path / "tmp").glob("radixserve-*")], "no ipc socket folder where expected"
    children = descendants(srv.proc.pid)
    results: list[tuple[int, str]] = []
    # connect first, send together: on 2 busy cores, threads started one by one can be so far apart
    # that the first requests finish their 500 tokens before the last arrive
    ready = threading.Barrier(8)

    def stream(i: int) -> None:
        body = {"input_ids": [5 + i, 6, 7, 8], "stream": True,
                "sampling_params": {"max_new_tokens": 500, "ignore_eos": True, "temperature": 0}}
        with httpx.Client(timeout=120) as client:
            client.get(srv.url + "/health")
            ready.wait()
            with client.stream("POST", srv.url + "/generate", json=body) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        results.append((r.status_code, lines[-1] if lines else ""))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until all 8 are running
        info = httpx.get(srv.url + "/get_server_info", timeout=10).json()["internal_states"][0]
        if info["num_running"] + info["num_waiting"] == 8:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the 8 streams were never in flight together")
    # to the whole process group, as `systemctl stop` sends it: the children must outlive the drain
    os.killpg(srv.proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
    late = httpx.post(srv.url + "/generate", json={"text": "hi"}, timeout=10)
    assert late.status_code == 503 and "error" in late.json()
    for t in threads:
        t.join(120)
    assert len(results) == 8 and all(code == 200 and last == "data: [DONE]" for code, last in results), results
    assert srv.proc.wait(60) == 0, srv.log()
    assert all_gone(children), "child processes outlived the server"
    assert not list((tmp_path / "tmp").glob("radixserve-*")), "the ipc socket folder outlived the server"


def test_shutdown_timeout_ends_what_is_left_with_503_whatever_is_queued(model_dir, tmp_path):
    """SIGTERM with a stream running and 6,400 sequences queued: after --shutdown-timeout every one
    ends with an error, 503 (not 200 with finish_reason abort, which OpenAI does not define), on the
    native and the OpenAI API alike, and the server exits 0 soon after."""
    import openai

    srv = start_server(["--model-path", model_dir, "--dtype", "float32", "--shutdown-timeout", "2",
                        "--max-running-requests", "8"], str(tmp_path / "server.log"))
    answers: dict[str, object] = {}

    def queued() -> None:
        body = {"input_ids": [[5 + i, 6, 7] for i in range(50)],
                "sampling_params": {"n": 128, "max_new_tokens": 400, "ignore_eos": True}}
        answers["queued"] = httpx.post(srv.url + "/generate", json=body, timeout=120)

    def native_stream() -> None:
        body = {"input_ids": [9, 8, 7], "stream": True, "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}}
        with httpx.stream("POST", srv.url + "/generate", json=body, timeout=120) as r:
            answers["native_stream"] = [ln for ln in r.iter_lines() if ln.startswith("data: ")]

    def openai_stream() -> None:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        try:
            for _ in client.chat.completions.create(model=model_dir, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=400, stream=True, extra_body={"ignore_eos": True}):
                pass
            answers["openai_stream"] = "ended without an error"
        except openai.APIError as e:
            answers["openai_stream"] = e

    threads = [threading.Thread(target=f) for f in (native_stream, openai_stream, queued)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        info = httpx.get(srv.url + "/get_server_info", timeout=10).json()["internal_states"][0]
        if info["num_waiting"] > 1000 and info["num_running"] >= 2:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the calls were never in flight together")
    sent = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert srv.proc.wait(30) == 0, srv.log()
    assert time.time() - sent < 15, "the queued requests held the shutdown up"
    queued_reply = answers["queued"]
    assert queued_reply.status_code == 503, queued_reply.text
    assert "--shutdown-timeout" in queued_reply.json()["error"]["message"]
    events = answers["native_stream"]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == 503, events[-3:]
    assert isinstance(answers["openai_stream"], openai.APIError), answers["openai_stream"]
    assert "shut down" in str(answers["openai_stream"])


def test_child_death_exits_nonzero(model_dir, tmp_path):
    srv = start_server(["--model-path", model_dir, "--dtype", "float32"], str(tmp_path / "server.log"),
                       env=private_tmpdir(tmp_path))
    children = descendants(srv.proc.pid)
    # the scheduler and detokenizer are multiprocessing "spawn" children (the scheduler starts first)
    workers = [p for p in children if "spawn_main" in " ".join(psutil.Process(p).cmdline())]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    assert srv.proc.wait(30) != 0
    assert "process died" in srv.log()
    assert all_gone(children)
    assert not list((tmp_path / "tmp").glob("radixserve-*")), "the ipc socket folder outlived the server"


def test_bad_flag_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "radixserve.launch_server", "--enable-two-batch-overlap"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--enable-two-batch-overlap" in proc.stderr
