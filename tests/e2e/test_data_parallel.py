"""Data parallelism: two DP groups behind the controller. Each --load-balance-method places requests
as it says (seen through /get_load), and greedy outputs equal transformers' (as with DP=1)."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from tests.e2e.server_utils import start_server
from tests.helpers import hf_greedy, make_tiny_model

# Long requests must outlive the scenario whatever the machine's speed (a few thousand tokens took
# only seconds, and a request that ended early failed the test); the scenario aborts them all.
LONG = {"temperature": 0, "ignore_eos": True}
CONTEXT = 32768


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    return path, make_tiny_model("llama", path, seed=6)


def loads(srv) -> list[int]:
    return [g["num_reqs"] for g in httpx.get(srv.url + "/get_load", timeout=10).json()]


def send(srv, ids: list[int], params: dict) -> threading.Thread:
    t = threading.Thread(target=lambda: httpx.post(srv.url + "/generate", timeout=120,
                                                   json={"input_ids": ids, "sampling_params": params}))
    t.start()
    return t


def wait_total(srv, n: int, timeout: float = 20) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = loads(srv)
        if sum(now) == n:
            return now
        time.sleep(0.02)
    raise AssertionError(f"expected {n} requests in flight, saw {loads(srv)}")


def group_of_new(srv, before: list[int], n: int) -> int:
    after = wait_total(srv, n)
    return next(g for g, (now, was) in enumerate(zip(after, before)) if now > was)


def run_scenario(srv) -> tuple[bool, bool]:
    """A long request, a short one that finishes, then two more long ones. Returns whether the
    second and the third long request landed in the same group as the first."""
    threads = [send(srv, [5, 6, 7] * 20, {**LONG, "max_new_tokens": 30000})]
    first = group_of_new(srv, [0, 0], 1)
    short = send(srv, [8, 9], {"temperature": 0, "max_new_tokens": 1})
    short.join()
    before = wait_total(srv, 1)
    threads.append(send(srv, [10, 11, 12], {**LONG, "max_new_tokens": 8000}))
    second = group_of_new(srv, before, 2)
    before = loads(srv)
    threads.append(send(srv, [13, 14, 15], {**LONG, "max_new_tokens": 8000}))
    third = group_of_new(srv, before, 3)
    httpx.post(srv.url + "/abort_request", json={"rid": ""}, timeout=10)
    for t in threads:
        t.join(60)
    return second == first, third == first


@pytest.mark.parametrize("method, expected", [
    # long1 -> A, short -> B, long2 -> A, long3 -> B
    ("round_robin", (True, False)),
    # long1 -> g0 (both empty); short -> g1; long2 -> the emptier g1; long3: 1 vs 1, ties go to g0
    ("shortest_queue", (False, True)),
    # long1's ~30,000 outstanding tokens keep its group the heaviest: both later requests go elsewhere
    ("minimum_tokens", (False, False)),
])
def test_load_balance_methods(model, tmp_path, method, expected):
    path, _ = model
    srv = start_server(["--model-path", path, "--dtype", "float32", "--dp-size", "2", "--context-length", str(CONTEXT),
                        "--load-balance-method", method], str(tmp_path / "server.log"))
    try:
        assert run_scenario(srv) == expected
    finally:
        assert srv.stop() == 0


def test_dp2_outputs_equal_transformers(model, tmp_path):
    path, hf_model = model
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(4, 30))] for _ in range(6)]
    want = [hf_greedy(hf_model, p, 10) for p in prompts]
    srv = start_server(["--model-path", path, "--dtype", "float32", "--dp-size", "2"], str(tmp_path / "s.log"))
    traces = tmp_path / "traces"
    try:
        # profiled meanwhile: the controller starts and stops it in both groups, each writing its trace
        started = httpx.post(srv.url + "/start_profile", json={"output_dir": str(traces)}, timeout=30)
        assert started.status_code == 200, started.text
        out = httpx.post(srv.url + "/generate", timeout=120, json={
            "input_ids": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": 10}}).json()
        assert [o["output_ids"] for o in out] == want
        assert len(loads(srv)) == 2
        assert httpx.post(srv.url + "/stop_profile", timeout=120).status_code == 200
        assert sorted(p.name.split("-TP-")[1] for p in traces.iterdir()) == \
            ["0-DP-0.trace.json.gz", "0-DP-1.trace.json.gz"]
        assert httpx.post(srv.url + "/stop_profile", timeout=30).status_code == 400
    finally:
        assert srv.stop() == 0
