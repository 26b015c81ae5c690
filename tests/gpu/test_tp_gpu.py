"""Tensor parallelism on two GPUs with NCCL (and CUDA graphs capturing the collectives): greedy
tokens equal transformers' (fp32). Skipped without two CUDA GPUs."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graph", "eager"])
def test_tp2_matches_transformers(tmp_path, graphs):
    from radixserve import Engine
    from tests.helpers import make_tiny_model

    model = make_tiny_model("qwen2", str(tmp_path), seed=2, tokenizer=False).cuda()
    rng = random.Random(0)
    batch = [[rng.randrange(3, 49152) for _ in range(rng.randrange(3, 60))] for _ in range(6)]
    want = []
    with torch.no_grad():
        for ids in batch:
            out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=16, do_sample=False,
                                 eos_token_id=2, pad_token_id=0,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"))
            new = out[0, len(ids):].tolist()
            want.append(new[: new.index(2) + 1] if 2 in new else new)
    with Engine(model_path=str(tmp_path), dtype="float32", tp_size=2, disable_cuda_graph=not graphs) as e:
        outs = e.generate(input_ids=batch, sampling_params={"temperature": 0, "max_new_tokens": 16})
        assert [o["output_ids"] for o in outs] == want
