"""Two "nodes" on one machine: two launch_server processes with --nnodes 2 --tp-size 2 serve through
node 0 with transformers' greedy tokens; killing node 1 makes node 0 exit within --dist-timeout."""

from __future__ import annotations

import random
import signal
import time

import httpx
import pytest

from tests.e2e.server_utils import ServerProcess, free_port, start_server
from tests.helpers import hf_greedy, make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    return path, make_tiny_model("llama", path, seed=8)


def start_nodes(path: str, tmp_path, extra: list[str] | None = None) -> tuple[ServerProcess, ServerProcess]:
    import subprocess
    import sys

    from tests.e2e.server_utils import REPO

    dist = f"127.0.0.1:{free_port()}"
    common = ["--model-path", path, "--dtype", "float32", "--tp-size", "2", "--nnodes", "2",
              "--dist-init-addr", dist, "--dist-timeout", "30", *(extra or [])]
    port1 = free_port()
    log1 = str(tmp_path / "node1.log")
    proc1 = subprocess.Popen([sys.executable, "-m", "radixserve.launch_server", "--port", str(port1),
                              "--node-rank", "1", *common], stdout=open(log1, "w"), stderr=subprocess.STDOUT,
                             cwd=REPO, start_new_session=True)
    node1 = ServerProcess(proc1, port1, log1)
    try:
        node0 = start_server(["--node-rank", "0", *common], str(tmp_path / "node0.log"))
    except Exception:
        node1.stop(signal.SIGKILL)
        raise
    return node0, node1


def test_two_nodes_serve_and_fail_cleanly(model, tmp_path):
    path, hf_model = model
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(4, 30))] for _ in range(4)]
    want = [hf_greedy(hf_model, p, 10) for p in prompts]
    node0, node1 = start_nodes(path, tmp_path)
    try:
        assert httpx.get(node1.url + "/health", timeout=10).status_code == 200
        r = httpx.post(node0.url + "/generate", timeout=120, json={
            "input_ids": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": 10}})
        assert [o["output_ids"] for o in r.json()] == want
        node1.proc.send_signal(signal.SIGKILL)
        start = time.time()
        code = node0.proc.wait(timeout=60)
        assert code != 0 and time.time() - start < 35, node0.log()
        assert "died" in node0.log() or "rank" in node0.log()
    finally:
        node0.stop(signal.SIGKILL)
        node1.stop(signal.SIGKILL)


def test_node_that_cannot_reach_master_fails_within_timeout(model, tmp_path):
    import subprocess
    import sys

    path, _ = model
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "radixserve.launch_server", "--model-path", path, "--tp-size", "2", "--nnodes", "2",
         "--node-rank", "1", "--dist-init-addr", f"127.0.0.1:{free_port()}", "--dist-timeout", "5",
         "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "could not join" in proc.stdout + proc.stderr
    assert time.time() - start < 90


def test_nodes_that_disagree_fail_clearly(model, tmp_path):
    import subprocess
    import sys

    from tests.e2e.server_utils import REPO

    path, _ = model
    dist = f"127.0.0.1:{free_port()}"
    common = ["--model-path", path, "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", dist,
              "--dist-timeout", "30"]
    procs = [subprocess.Popen([sys.executable, "-m", "radixserve.launch_server", "--port", str(free_port()),
                               "--node-rank", str(rank), "--page-size", str(1 + rank), *common],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert any("started with different settings" in out and "page_size" in out for out in outputs), outputs
