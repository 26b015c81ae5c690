"""--enable-torch-compile on the GPU: the same greedy tokens as the plain model in bf16 on the tiny
dummy Llama, with CUDA graphs (the graphs capture the compiled forward) and without (the compiled
function is called directly). Skipped without CUDA."""

from __future__ import annotations

import os
import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

COMPILE_MAX_BS = 8


def requests() -> tuple[list[list[int]], list[dict]]:
    """12 prompts ending at different steps: decode runs at every batch size 12..1, so buckets above
    and below --torch-compile-max-bs are both used."""
    rng = random.Random(3)
    batch = [[rng.randrange(3, 512) for _ in range(rng.randrange(3, 90))] for _ in range(12)]
    params = [{"temperature": 0, "max_new_tokens": 4 + 3 * i, "ignore_eos": True} for i in range(12)]
    return batch, params


def greedy(graphs: bool, compiled: bool) -> list[list[int]]:
    import radixserve
    from radixserve import Engine
    from tests.helpers import assert_pools_whole

    tiny = os.path.join(os.path.dirname(radixserve.__file__), "configs", "tiny-llama")
    batch, params = requests()
    with Engine(model_path=tiny, load_format="dummy", dtype="bfloat16", random_seed=0,
                disable_cuda_graph=not graphs, enable_torch_compile=compiled,
                torch_compile_max_bs=COMPILE_MAX_BS) as e:
        outs = [o["output_ids"] for o in e.generate(input_ids=batch, sampling_params=params)]
        outs.append(e.generate(input_ids=batch[0], sampling_params=params[3])["output_ids"])
        assert_pools_whole(e)
    return outs


@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graph", "no-graph"])
def test_compiled_matches_plain_bf16(graphs):
    want = greedy(graphs, compiled=False)
    got = greedy(graphs, compiled=True)
    assert [len(o) for o in got] == [4 + 3 * i for i in range(12)] + [13]
    assert got == want
