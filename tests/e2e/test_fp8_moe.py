"""FP8 experts on the CPU: tiny FP8 Mixtral and Qwen3-MoE checkpoints made here (every linear weight,
experts included, in e4m3 with 16x16 block factors, published per expert as
`experts.{e}.gate_proj.weight` + `.weight_scale_inv`; the routers stay in the model dtype) load and
match their twin, transformers holding the dequantized weights with its activations rounded as w8a8
does; at TP 2 (on the blocks) and EP 2 too; a TP split off the blocks is refused; `--quantization fp8`
on a plain MoE checkpoint matches its twin quantized the same way."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F

from radixserve import Engine
from radixserve.engine import EngineStartError
from radixserve.layers.quantization.fp8_utils import (
    dequantize_block,
    dequantize_per_token_group,
    quantize_activation_per_token_group,
    quantize_weight_block,
)
from tests.e2e.test_fp8_weights import GREEDY, assert_matches_rounding_twin, prompts
from tests.helpers import assert_pools_whole, make_tiny_model

BLOCK = (16, 16)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PROJECTIONS = ("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj")
# mixtral: N = 64, two 16-row blocks per rank at TP 2; qwen3_moe: N = 40, partial blocks (TP 2 refused)
ARCHS = {"mixtral": {"intermediate_size": 64}, "qwen3_moe": {}}


def rounded(x: torch.Tensor, group: int) -> torch.Tensor:
    q, scales = quantize_activation_per_token_group(x.reshape(-1, x.shape[-1]), group)
    return dequantize_per_token_group(q, scales, group).reshape(x.shape).to(x.dtype)


def w8a8_experts_forward(group: int, calls: list[int]):
    """transformers' experts loop with the inputs of both projections rounded as the FP8 kernel does."""
    def forward(self, hidden_states, top_k_index, top_k_weights):
        calls.append(1)
        out = torch.zeros_like(hidden_states)
        xq = rounded(hidden_states, group)
        for e in range(self.num_experts):
            token_idx, pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(xq[token_idx], self.gate_up_proj[e]).chunk(2, dim=-1)
            act = self.act_fn(gate) * up
            y = F.linear(rounded(act, group), self.down_proj[e]) * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    return forward


def rounding_like_w8a8(twin, group: int):
    """Attention projections round their input per token group (hooks); the experts' loop does its own.
    Returns an undo function."""
    def hook(_module, args):
        return (rounded(args[0], group),)

    hooks = [m.register_forward_pre_hook(hook) for name, m in twin.named_modules()
             if name.rpartition(".")[2] in ATTENTION]
    experts = [m for name, m in twin.named_modules() if name.endswith(".experts")]
    calls: list[int] = []
    for m in experts:
        m.forward = types.MethodType(w8a8_experts_forward(group, calls), m)

    def undo():
        assert experts and calls, "the twin's experts never ran the rounding loop"
        for h in hooks:
            h.remove()
        for m in experts:
            del m.forward

    return undo


def assert_equals_twin(twin, batch, outs, group: int) -> None:
    undo = rounding_like_w8a8(twin, group)
    try:
        assert_matches_rounding_twin(twin, batch, outs, GREEDY["max_new_tokens"])
    finally:
        undo()


@pytest.fixture(scope="module", params=list(ARCHS))
def fp8_moe_checkpoint(request, tmp_path_factory):
    """(arch, fp8 folder, the transformers twin loaded from the dequantized weights)."""
    import transformers
    from safetensors.torch import load_file, save_file

    arch = request.param
    path = tmp_path_factory.mktemp(f"fp8-{arch}")
    twin_path = tmp_path_factory.mktemp(f"twin-{arch}")
    make_tiny_model(arch, str(path), seed=31, tokenizer=False, overrides=ARCHS[arch])
    make_tiny_model(arch, str(twin_path), seed=31, tokenizer=False, overrides=ARCHS[arch])
    tensors = load_file(str(path / "model.safetensors"))
    fp8, dequantized = {}, {}
    for name, tensor in tensors.items():
        piece = name.rpartition(".weight")[0].rpartition(".")[2]
        if name.endswith(".weight") and piece in ATTENTION + EXPERT_PROJECTIONS:
            w_fp8, scale_inv = quantize_weight_block(tensor.float(), BLOCK)
            fp8[name], fp8[name + "_scale_inv"] = w_fp8, scale_inv
            dequantized[name] = dequantize_block(w_fp8, scale_inv, BLOCK)
        else:
            fp8[name] = dequantized[name] = tensor
    assert any(".experts.3.w1.weight_scale_inv" in n or ".experts.3.gate_proj.weight_scale_inv" in n for n in fp8)
    save_file(fp8, str(path / "model.safetensors"))
    save_file(dequantized, str(twin_path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (path / "config.json").write_text(json.dumps(config))
    twin = transformers.AutoModelForCausalLM.from_pretrained(str(twin_path), dtype=torch.float32).eval()
    return arch, path, twin


def test_fp8_moe_checkpoint_equals_its_twin(fp8_moe_checkpoint):
    arch, path, twin = fp8_moe_checkpoint
    batch = prompts(6)
    with Engine(model_path=str(path), dtype="float32", log_level="warning") as engine:
        assert engine.info.get("quantization") == "fp8"
        outs = engine.generate(input_ids=batch, sampling_params=GREEDY, return_logprob=True)
        assert_pools_whole(engine)
    assert_equals_twin(twin, batch, outs, BLOCK[1])
    expected = [o["output_ids"] for o in outs]
    if arch == "mixtral":  # N = 64: each rank's 32 rows are whole 16-row blocks
        parallel = {"tp_size": 2}
    else:  # N = 40 is cut off the blocks by TP 2, but EP 2 keeps each expert whole
        with pytest.raises(EngineStartError, match="scale blocks"):
            Engine(model_path=str(path), dtype="float32", tp_size=2, log_level="error").shutdown()
        parallel = {"tp_size": 2, "ep_size": 2}
    with Engine(model_path=str(path), dtype="float32", log_level="warning", **parallel) as engine:
        assert [o["output_ids"] for o in engine.generate(input_ids=batch, sampling_params=GREEDY)] == expected
        assert_pools_whole(engine)


@torch.no_grad()
def quantize_twin_like_the_server(twin) -> None:
    """--quantization fp8 (128x128 blocks) applied to the twin: the fused q/k/v quantized as one matrix,
    o_proj alone, each expert's gate half, up half and down matrix on their own; routers untouched."""
    for layer in twin.model.layers:
        attn = layer.self_attn
        for names in (("q_proj", "k_proj", "v_proj"), ("o_proj",)):
            parts = [getattr(attn, n).weight for n in names]
            fused = dequantize_block(*quantize_weight_block(torch.cat(parts).float()))
            for part, rows in zip(parts, fused.split([p.shape[0] for p in parts])):
                part.copy_(rows)
        experts = layer.mlp.experts
        n = experts.gate_up_proj.shape[1] // 2
        for e in range(experts.num_experts):
            for rows in (slice(0, n), slice(n, 2 * n)):
                experts.gate_up_proj[e, rows] = dequantize_block(*quantize_weight_block(experts.gate_up_proj[e, rows]))
            experts.down_proj[e] = dequantize_block(*quantize_weight_block(experts.down_proj[e]))


def test_quantization_flag_quantizes_a_plain_moe_checkpoint(tmp_path):
    twin = make_tiny_model("qwen3_moe", str(tmp_path), seed=8, tokenizer=False)
    batch = prompts(5)
    with Engine(model_path=str(tmp_path), dtype="float32", quantization="fp8", log_level="warning") as engine:
        outs = engine.generate(input_ids=batch, sampling_params=GREEDY, return_logprob=True)
        assert_pools_whole(engine)
    quantize_twin_like_the_server(twin)
    assert_equals_twin(twin, batch, outs, 128)


def test_dummy_weights_with_fp8_experts(tmp_path):
    """--load-format dummy with FP8 experts (the GPU benches' setting) builds and generates."""
    make_tiny_model("mixtral", str(tmp_path), seed=2, tokenizer=False)
    with Engine(model_path=str(tmp_path), dtype="float32", quantization="fp8", load_format="dummy",
                log_level="warning") as engine:
        assert engine.info.get("quantization") == "fp8"
        out = engine.generate(input_ids=prompts(1)[0], sampling_params=GREEDY)
        assert 0 < len(out["output_ids"]) <= GREEDY["max_new_tokens"]
