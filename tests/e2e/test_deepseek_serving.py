"""The MLA latent pool under the scheduler's harder paths, on the tiny random DeepSeek models of
test_deepseek_parity.py: retraction when the pool runs short (the retracted requests' latents are
freed and recomputed), and PD disaggregation (the prefill server writes each layer's latent rows into
the decode server's pool over Mooncake's TCP transport, from TP 1 into TP 2 where both ranks hold the
whole latent). Greedy tokens equal transformers' and every pool is whole afterwards."""

from __future__ import annotations

import httpx

from radixserve import Engine
from tests.e2e.server_utils import assert_pool_whole, generate_both, pd_pair
from tests.e2e.test_deepseek_parity import built
from tests.helpers import assert_pools_whole, hf_greedy

MAX_NEW = 16


def test_retraction_keeps_greedy_outputs(tmp_path_factory):
    _, path, model, batch, _ = built("v3", tmp_path_factory)
    params = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
    want = [hf_greedy(model, p, MAX_NEW) for p in batch]
    # room for the prompts, not for every request's whole output at once
    total_prompt = sum(len(p) for p in batch)
    with Engine(model_path=path, dtype="float32", log_level="warning", page_size=2,
                max_total_tokens=total_prompt // 2 + 48) as engine:
        got = [o["output_ids"] for o in engine.generate(input_ids=batch, sampling_params=params)]
        assert engine.get_scheduler_state().num_retractions > 0, "the pool was large enough: nothing retracted"
        assert got == want
        assert_pools_whole(engine)


def test_pd_transfer_of_latents_tp1_into_tp2(tmp_path_factory):
    _, path, model, batch, _ = built("v2_lite", tmp_path_factory)
    with pd_pair(path, [], ["--tp-size", "2"], tmp_path_factory.mktemp("pd_deepseek"), page_size=4) as (
            prefill, decode, bootstrap):
        n = len(batch)
        body = {"input_ids": batch, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW},
                "bootstrap_host": ["127.0.0.1"] * n, "bootstrap_port": [bootstrap] * n,
                "bootstrap_room": list(range(500, 500 + n))}
        got = [o["output_ids"] for o in generate_both(prefill, decode, body, timeout=180)]
        assert got == [hf_greedy(model, q, MAX_NEW) for q in batch]
        for server in (prefill, decode):  # every request's latents went through the transfer engine
            pd = httpx.get(server.url + "/get_server_info", timeout=30).json()["internal_states"][0]["pd"]
            assert pd["transfers"] == n, pd
            assert_pool_whole(server)
