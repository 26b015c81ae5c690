"""Prefill/decode disaggregation with --disaggregation-transfer-backend nixl on the bundled model:
the prompt's KV moves from the prefill server's pool into the decode server's through NIXL (UCX,
CPU memory), and the output equals what one ordinary server gives."""

from __future__ import annotations

import pytest

from tests.e2e.server_utils import assert_pool_whole, free_port
from tests.e2e.test_disaggregation import PROMPTS, alone, both, metric, start_decode, start_prefill

NIXL = ["--disaggregation-transfer-backend", "nixl"]


@pytest.fixture(scope="module")
def nixl_pair(tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd-nixl")
    bootstrap = free_port()
    prefill = start_prefill(str(logs / "prefill.log"), bootstrap, *NIXL)
    try:
        decode = start_decode(str(logs / "decode.log"), *NIXL)
    except Exception:
        prefill.stop()
        raise
    yield prefill, decode, bootstrap
    assert decode.stop() == 0, decode.log()  # NIXL's libraries unload cleanly too
    assert prefill.stop() == 0, prefill.log()


def test_decode_continues_from_kv_written_through_nixl(nixl_pair):
    prefill, decode, bootstrap = nixl_pair
    for room, prompt in enumerate(PROMPTS, start=11):  # later requests reuse the loaded peer
        body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 12},
                "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap, "bootstrap_room": room}
        p, d = both(prefill, decode, "/generate", body)
        assert p.status_code == 200 and d.status_code == 200, (p.text, d.text)
        assert p.json()["meta_info"]["completion_tokens"] == 1
        want, got = alone(decode, body), d.json()
        assert got["output_ids"] == want["output_ids"] and got["text"] == want["text"]
        assert got["output_ids"][0] == p.json()["output_ids"][0]
    for side in (prefill, decode):
        assert metric(side, "kv_transfers_total") == len(PROMPTS)
        assert metric(side, "kv_transfer_failures_total") == 0
    assert metric(prefill, "kv_transfer_bytes_total") > 0
    assert_pool_whole(prefill)
    assert_pool_whole(decode)
