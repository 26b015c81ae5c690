"""PD disaggregation across parallel ranks, on a tiny Qwen3 (one KV head: under TP 2 it is
replicated on both ranks): a prefill group spread over two "nodes" (--nnodes 2, recipe 3's shape)
writes into a TP-1 and a TP-2 decode server over Mooncake's TCP transport; a DP-2 prefill server
into a DP-2 decode server (each room's DP group on both sides is room % 2). All give transformers'
greedy tokens, and every pool is whole afterwards."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import subprocess
import sys

import httpx
import pytest

from tests.e2e.server_utils import (
    REPO,
    ServerProcess,
    assert_pool_whole,
    free_port,
    generate_both,
    start_server,
)
from tests.helpers import hf_greedy, make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    os.environ["MC_FORCE_TCP"] = "1"
    path = str(tmp_path_factory.mktemp("qwen3"))
    return path, make_tiny_model("qwen3", path, seed=11)


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    path, hf_model = model
    logs = tmp_path_factory.mktemp("pd_parallel")
    common = ["--model-path", path, "--dtype", "float32", "--host", "127.0.0.1"]
    bootstrap = free_port()
    prefill_group = [*common, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap),
                     "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    port1 = free_port()
    log1 = str(logs / "prefill_node1.log")
    node1 = ServerProcess(subprocess.Popen(
        [sys.executable, "-m", "radixserve.launch_server", "--port", str(port1), "--node-rank", "1", *prefill_group],
        stdout=open(log1, "w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True), port1, log1)
    started: list[ServerProcess] = [node1]
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(start_server, ["--node-rank", "0", *prefill_group], str(logs / "prefill.log")),
                       pool.submit(start_server, [*common, "--disaggregation-mode", "decode"], str(logs / "decode.log")),
                       pool.submit(start_server, [*common, "--disaggregation-mode", "decode", "--tp-size", "2"],
                                   str(logs / "decode_tp2.log"))]
        started += [f.result() for f in futures if f.exception() is None]
        for f in futures:
            if f.exception() is not None:
                raise f.exception()
        yield hf_model, bootstrap, started[1], started[2], started[3]
    finally:
        for server in reversed(started):
            server.stop(signal.SIGTERM)


@pytest.mark.parametrize("decode_tp", [1, 2])
def test_multinode_tp2_prefill_matches_transformers(servers, decode_tp):
    hf_model, bootstrap, prefill, decode1, decode2 = servers
    decode = decode1 if decode_tp == 1 else decode2
    rng = random.Random(decode_tp)
    for room in range(4):
        prompt = [rng.randrange(3, 49152) for _ in range(rng.randrange(3, 40))]
        body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 10},
                "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap, "bootstrap_room": 100 * decode_tp + room}
        assert generate_both(prefill, decode, body)["output_ids"] == hf_greedy(hf_model, prompt, 10)
    assert_pool_whole(prefill)
    assert_pool_whole(decode)


def test_dp2_prefill_into_dp2_decode_matches_transformers(model, tmp_path):
    path, hf_model = model
    common = ["--model-path", path, "--dtype", "float32", "--host", "127.0.0.1", "--dp-size", "2"]
    bootstrap = free_port()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, [*common, "--disaggregation-mode", "prefill",
                                              "--disaggregation-bootstrap-port", str(bootstrap)],
                               str(tmp_path / "prefill_dp2.log")),
                   pool.submit(start_server, [*common, "--disaggregation-mode", "decode"], str(tmp_path / "decode_dp2.log"))]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            if f.exception() is not None:
                raise f.exception()
        prefill, decode = started
        rng = random.Random(7)
        prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(3, 40))] for _ in range(4)]
        body = {"input_ids": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": 10},
                "bootstrap_host": ["127.0.0.1"] * 4, "bootstrap_port": [bootstrap] * 4, "bootstrap_room": [10, 11, 12, 13]}
        got = generate_both(prefill, decode, body)
        assert [o["output_ids"] for o in got] == [hf_greedy(hf_model, p, 10) for p in prompts]
        for server in (prefill, decode):
            groups = httpx.get(server.url + "/get_server_info", timeout=30).json()["internal_states"][0]["per_dp"]
            assert [g["pd"]["transfers"] for g in groups] == [2, 2]  # rooms 10, 12 and 11, 13
            assert_pool_whole(server)
    finally:
        for server in started:
            server.stop()
