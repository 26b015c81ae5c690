"""--enable-torch-compile on CPU (inductor's C++ backend), fp32: the same greedy tokens as the eager
model, with decode batches both below and above --torch-compile-max-bs, and whole pools after."""

from __future__ import annotations

import os
import random

import torch

import radixserve
from radixserve import Engine
from radixserve.loader.source import resolve_model_source
from radixserve.model_executor.compile import CompiledDecode, dummy_decode_batch
from radixserve.model_executor.model_runner import build_model_runner
from radixserve.server_args import ServerArgs
from tests.helpers import assert_pools_whole

TINY = os.path.join(os.path.dirname(radixserve.__file__), "configs", "tiny-llama")  # vocab 512
COMPILE_MAX_BS = 4


def requests() -> tuple[list[list[int]], list[dict]]:
    """7 prompts whose outputs end at different steps, so decode runs at every batch size 7..1."""
    rng = random.Random(5)
    batch = [[rng.randrange(3, 512) for _ in range(rng.randrange(3, 30))] for _ in range(7)]
    params = [{"temperature": 0, "max_new_tokens": 3 + 2 * i, "ignore_eos": True} for i in range(7)]
    return batch, params


def run_all(engine: Engine) -> list[list[int]]:
    batch, params = requests()
    outs = [o["output_ids"] for o in engine.generate(input_ids=batch, sampling_params=params)]
    alone = engine.generate(input_ids=batch[0], sampling_params={**params[0], "max_new_tokens": 6})
    return outs + [alone["output_ids"]]


def test_compiled_decode_matches_eager():
    common = dict(model_path=TINY, load_format="dummy", dtype="float32", device="cpu", random_seed=0,
                  max_total_tokens=2048)
    with Engine(**common) as eager:
        want = run_all(eager)
    with Engine(**common, enable_torch_compile=True, torch_compile_max_bs=COMPILE_MAX_BS) as compiled:
        got = run_all(compiled)
        assert_pools_whole(compiled)
    assert [len(o) for o in got] == [3, 5, 7, 9, 11, 13, 15, 6]
    assert got == want


def test_runner_routes_small_decode_batches_to_the_compiled_model(monkeypatch):
    args = ServerArgs(model_path=TINY, load_format="dummy", dtype="float32", device="cpu", random_seed=0,
                      max_total_tokens=1024, enable_torch_compile=True, torch_compile_max_bs=2)
    runner = build_model_runner(args, resolve_model_source(TINY, "dummy"), torch.device("cpu"), 128)
    assert isinstance(runner.compiled_decode, CompiledDecode) and runner.compiled_decode.max_bs == 2
    calls = []
    real = CompiledDecode.__call__
    monkeypatch.setattr(CompiledDecode, "__call__", lambda self, b: calls.append(b.batch_size) or real(self, b))
    for bs in (1, 2, 3):
        runner.forward(dummy_decode_batch(runner, bs))
    assert calls == [1, 2]


def test_compiled_decode_of_a_moe_model_matches_eager(tmp_path):
    """The experts' torch path is one custom op, so the fullgraph compile of a MoE decode holds."""
    from tests.helpers import make_tiny_model

    make_tiny_model("qwen2_moe", str(tmp_path), seed=3, tokenizer=False)
    common = dict(model_path=str(tmp_path), dtype="float32", device="cpu", max_total_tokens=2048)
    with Engine(**common) as eager:
        want = run_all(eager)
    with Engine(**common, enable_torch_compile=True, torch_compile_max_bs=COMPILE_MAX_BS) as compiled:
        got = run_all(compiled)
        assert_pools_whole(compiled)
    assert got == want
