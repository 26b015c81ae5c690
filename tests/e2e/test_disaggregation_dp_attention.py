"""PD disaggregation under DP attention (recipe 4's shape, scaled down), over Mooncake's TCP
transport. A prefill server with --tp-size 2 --dp-size 2 --enable-dp-attention writes into a decode
server with the same flags, on a tiny DeepSeek-V3 (MLA: every rank holds the whole latent); each
room's DP group on both servers is room % 2, and a group with no request joins the other's forwards
idle. Then a tiny Mixtral from the same DP-attention prefill server into a plain --tp-size 2 decode
server: each prefill group holds both KV heads (attention TP 1), each decode rank one, so the
prefill side must publish its group's share of the heads. Greedy tokens equal transformers', each
group moved its rooms' KV, and every pool is whole."""

from __future__ import annotations

import random
import time

import httpx

from tests.e2e.server_utils import ServerProcess, assert_pool_whole, generate_both, pd_pair
from tests.e2e.test_deepseek_parity import VOCAB as DEEPSEEK_VOCAB
from tests.e2e.test_deepseek_parity import make_deepseek
from tests.helpers import hf_greedy, make_tiny_model

MAX_NEW = 8
DP_ATTENTION = ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"]


def batch_body(prompts: list[list[int]], bootstrap: int, rooms: list[int]) -> dict:
    n = len(prompts)
    return {"input_ids": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW},
            "bootstrap_host": ["127.0.0.1"] * n, "bootstrap_port": [bootstrap] * n, "bootstrap_room": rooms}


def pd_counts(server: ServerProcess) -> list[tuple[int, int]]:
    """(transfers, failures) of each DP group (one entry without --dp-size)."""
    state = httpx.get(server.url + "/get_server_info", timeout=30).json()["internal_states"][0]
    groups = state.get("per_dp") or [state]
    return [(g["pd"]["transfers"], g["pd"]["failures"]) for g in groups]


def random_prompts(seed: int, vocab: int, count: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(6, 40))] for _ in range(count)]


def test_deepseek_v3_dp_attention_prefill_into_dp_attention_decode(tmp_path):
    path = str(tmp_path / "deepseek_v3")
    hf_model = make_deepseek("v3", path, seed=51)
    prompts = random_prompts(5, DEEPSEEK_VOCAB)
    with pd_pair(path, DP_ATTENTION, DP_ATTENTION, tmp_path) as (prefill, decode, bootstrap):
        got = generate_both(prefill, decode, batch_body(prompts, bootstrap, [20, 21, 22, 23]))  # groups 0 1 0 1
        assert [o["output_ids"] for o in got] == [hf_greedy(hf_model, p, MAX_NEW) for p in prompts]
        # one request alone: group 1 runs it on both servers while group 0 joins every forward idle.
        # The idle group polls briefly, not for a second a step (which would stall group 1's
        # forwards: 7 decode steps, 7 s at least)
        start = time.monotonic()
        alone = generate_both(prefill, decode, batch_body(prompts[:1], bootstrap, [31]))
        elapsed = time.monotonic() - start
        assert alone[0]["output_ids"] == hf_greedy(hf_model, prompts[0], MAX_NEW)
        assert elapsed < 5, f"a lone request took {elapsed:.1f} s"
        for server in (prefill, decode):
            assert pd_counts(server) == [(2, 0), (3, 0)]  # rooms 20, 22 and 21, 23, 31
            assert_pool_whole(server)


def test_mixtral_dp_attention_prefill_into_tp2_decode(tmp_path):
    path = str(tmp_path / "mixtral")
    hf_model = make_tiny_model("mixtral", path, seed=52, tokenizer=False)
    prompts = random_prompts(6, 49152)
    with pd_pair(path, DP_ATTENTION, ["--tp-size", "2"], tmp_path) as (prefill, decode, bootstrap):
        got = generate_both(prefill, decode, batch_body(prompts, bootstrap, [40, 41, 42, 43]))
        assert [o["output_ids"] for o in got] == [hf_greedy(hf_model, p, MAX_NEW) for p in prompts]
        assert pd_counts(prefill) == [(2, 0), (2, 0)]  # the decode server's one group found both
        assert pd_counts(decode) == [(4, 0)]
        for server in (prefill, decode):
            assert_pool_whole(server)
