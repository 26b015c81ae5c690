"""A tiny DeepSeek-V3 FP8 checkpoint made as DeepSeek publishes V3: every linear weight in e4m3 with
block factors (`weight_scale_inv`, 16x16 blocks here) -- q_a_proj, q_b_proj, kv_a_proj_with_mqa,
kv_b_proj, o_proj, the dense MLP, the shared expert and each routed expert -- while the router (gate
weight and score correction bias), norms, embeddings and LM head stay in fp32. It loads and matches its
twin: transformers holding the dequantized weights (in float64), with the input of each FP8 linear
rounded per token and 16 columns as w8a8 does, except kv_b_proj's: radixserve absorbs kv_b_proj into
the attention as dequantized matrices applied in the model dtype, so nothing rounds its input. TP 2 and
TP 2 x EP 2 give the same tokens; --load-format dummy with the FP8 config runs in bf16."""

from __future__ import annotations

import json
import math
import shutil
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from torch import nn

from radixserve import Engine
from radixserve.layers.quantization.fp8_utils import dequantize_block, quantize_weight_block
from tests.e2e.test_deepseek_parity import COMMON, GREEDY, MAX_NEW, make_deepseek, prompts
from tests.e2e.test_fp8_moe import rounded, w8a8_experts_forward
from tests.e2e.test_fp8_weights import assert_matches_rounding_twin
from tests.helpers import assert_pools_whole

BLOCK = (16, 16)
SEED = 41
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": list(BLOCK)}
# the linears DeepSeek-V3 publishes in FP8 (the dense MLP and the shared and routed experts share the
# last three names); mlp.gate (the router) is not among them
FP8_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj")
# every FP8 linear but the absorbed kv_b_proj rounds its input to e4m3 (per token and BLOCK[1] columns)
ROUNDED_INPUTS = tuple(name for name in FP8_LINEARS if name != "kv_b_proj")
# the parity tests' experts are 24 wide, which TP 2 would cut mid-block; 32 splits into whole 16-blocks
# (routed and shared experts; the dense MLP's 96 gives 48 a rank, q_b/kv_b 64 rows, o_proj 32 columns)
DIMS = {"moe_intermediate_size": 32}
# 3 layers x 5 attention linears, the dense layer's 3, and 2 sparse layers x (shared + 8 routed) x 3
FP8_WEIGHT_COUNT = 3 * 5 + 3 + 2 * 9 * 3


@dataclass
class Fp8DeepseekV3:
    path: str
    # transformers holding the dequantized weights, in float64: the rounding to e4m3 is a step
    # function, and an fp32 twin's own summation error would sometimes flip one (on this seed, 3 of 8
    # prompts' logprobs then move by up to 0.07), which the float64 twin's does not
    twin: nn.Module
    batch: list[list[int]]


@pytest.fixture(scope="module")
def fp8_v3(tmp_path_factory) -> Fp8DeepseekV3:
    import transformers
    from safetensors.torch import load_file, save_file

    path, twin_path = tmp_path_factory.mktemp("v3-fp8"), tmp_path_factory.mktemp("v3-fp8-twin")
    with patch.dict(COMMON, DIMS):  # the parity tests' builder, with wider experts for this module only
        make_deepseek("v3", str(path), SEED)
    fp8, dequantized = {}, {}
    for name, tensor in load_file(str(path / "model.safetensors")).items():
        if name.endswith(".weight") and name.removesuffix(".weight").rpartition(".")[2] in FP8_LINEARS:
            w_fp8, scale_inv = quantize_weight_block(tensor.float(), BLOCK)
            fp8[name], fp8[name + "_scale_inv"] = w_fp8, scale_inv
            dequantized[name] = dequantize_block(w_fp8, scale_inv, BLOCK)
        else:
            fp8[name] = dequantized[name] = tensor
    assert sum(t.dtype == torch.float8_e4m3fn for t in fp8.values()) == FP8_WEIGHT_COUNT
    assert fp8["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert "model.layers.2.mlp.experts.7.down_proj.weight_scale_inv" in fp8
    save_file(fp8, str(path / "model.safetensors"))
    save_file(dequantized, str(twin_path / "model.safetensors"))
    for extra in Path(path).glob("*.json"):
        shutil.copy(extra, twin_path / extra.name)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (path / "config.json").write_text(json.dumps(config))
    # eager experts: transformers' grouped_mm one takes no float64
    twin = transformers.AutoModelForCausalLM.from_pretrained(str(twin_path), dtype=torch.float64,
                                                             experts_implementation="eager").eval()
    assert twin.model.layers[1].mlp.experts.down_proj.shape[-1] == DIMS["moe_intermediate_size"]
    return Fp8DeepseekV3(str(path), twin, prompts(SEED))


def rounding_like_w8a8(twin: nn.Module, group: int) -> Callable[[], None]:
    """Round the inputs of the twin's linears as radixserve's FP8 layers do (pre-hooks; the routed
    experts through test_fp8_moe's loop, which rounds both projections' inputs); kv_b_proj's input
    stays as it is. Returns an undo function."""
    def hook(_module, args):
        return (rounded(args[0], group),)

    hooks = [m.register_forward_pre_hook(hook) for name, m in twin.named_modules()
             if isinstance(m, nn.Linear) and name.rpartition(".")[2] in ROUNDED_INPUTS]
    # per layer: 4 attention linears, then gate/up/down of the dense MLP or of the shared expert
    assert len(hooks) == 3 * (4 + 3), len(hooks)
    experts = [m for name, m in twin.named_modules() if name.endswith(".mlp.experts")]
    calls: list[int] = []
    for m in experts:
        m.forward = types.MethodType(w8a8_experts_forward(group, calls), m)

    def undo():
        assert len(experts) == 2 and calls, "the twin's experts never ran the rounding loop"
        for h in hooks:
            h.remove()
        for m in experts:
            del m.forward

    return undo


@pytest.fixture(scope="module")
def tp1_run(fp8_v3) -> tuple[dict, list[dict]]:
    """(engine.info, greedy outputs with logprobs) of the checkpoint at TP 1, run once."""
    with Engine(model_path=fp8_v3.path, dtype="float32", log_level="warning") as engine:
        info = dict(engine.info)
        outs = engine.generate(input_ids=fp8_v3.batch, sampling_params=GREEDY, return_logprob=True)
        assert engine.generate(input_ids=fp8_v3.batch[3], sampling_params=GREEDY)["output_ids"] == \
            outs[3]["output_ids"]
        assert_pools_whole(engine)
    return info, outs


def test_fp8_v3_checkpoint_equals_its_twin(fp8_v3, tp1_run):
    info, outs = tp1_run
    assert info["quantization"] == "fp8"
    # as test_fp8_moe: radixserve's fp32 summation order may flip an e4m3 rounding of one activation
    # now and then, which moves the later logprobs of that prompt by a little; a twin off the w8a8
    # numerics (kv_b_proj's input rounded too, or nothing rounded) misses by 0.05 at the median
    undo = rounding_like_w8a8(fp8_v3.twin, BLOCK[1])
    try:
        assert_matches_rounding_twin(fp8_v3.twin, fp8_v3.batch, outs, MAX_NEW)
    finally:
        undo()


@pytest.mark.parametrize("parallel", [
    {"tp_size": 2},
    # experts 0..3 on rank 0, 4..7 on rank 1, each whole; the dense layer whole on both ranks
    {"tp_size": 2, "ep_size": 2, "moe_dense_tp_size": 1},
], ids=["tp2", "tp2-ep2"])
def test_fp8_v3_parallel_gives_the_same_tokens(fp8_v3, tp1_run, parallel):
    expected = [o["output_ids"] for o in tp1_run[1]]
    with Engine(model_path=fp8_v3.path, dtype="float32", log_level="warning", page_size=2, **parallel) as engine:
        assert engine.info["quantization"] == "fp8"
        outs = engine.generate(input_ids=fp8_v3.batch, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == expected
        assert_pools_whole(engine)


def test_fp8_v3_dummy_weights_in_bf16(fp8_v3):
    """--load-format dummy with the FP8 quantization_config (the GPU benches' DeepSeek-V3 setting): FP8
    weights with block factors, the absorbed matrices dequantized from them, activations in bf16."""
    with Engine(model_path=fp8_v3.path, load_format="dummy", dtype="bfloat16", log_level="warning",
                page_size=4) as engine:
        assert engine.info["quantization"] == "fp8"
        outs = engine.generate(input_ids=fp8_v3.batch[:3], sampling_params={"temperature": 0, "max_new_tokens": 4},
                               return_logprob=True)
        for out in outs:
            assert len(out["output_ids"]) == 4
            assert all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])
        assert_pools_whole(engine)
