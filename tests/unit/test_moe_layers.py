"""MoE building blocks on the CPU: routing as transformers routes, the torch experts path against a
per-token reference, the split of experts over TP/EP ranks (the ranks' partial sums add up to the
whole layer at any tp/ep combination), both checkpoint layouts of the experts, and ModelConfig."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixserve.distributed import parallel_state as ps
from radixserve.layers.moe.layer import FusedMoE
from radixserve.layers.moe.router import select_experts
from radixserve.layers.moe.torch_moe import fused_experts_torch
from radixserve.loader.model_config import ModelConfig
from tests.helpers import tiny_config


def reference(x, w13, w2, weights, ids):
    n = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = F.silu(w13[e, :n] @ x[t]) * (w13[e, n:] @ x[t])
            out[t] += weights[t, k] * (w2[e] @ h)
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_select_experts(renormalize):
    torch.manual_seed(0)
    logits = torch.randn(9, 6)
    weights, ids = select_experts(logits, 3, renormalize)
    probs = logits.softmax(-1)
    want_w, want_ids = probs.topk(3, -1)
    if renormalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights, want_w)


def test_torch_path_equals_per_token_reference():
    torch.manual_seed(1)
    x, w13, w2 = torch.randn(11, 24), torch.randn(5, 2 * 10, 24), torch.randn(5, 24, 10)
    weights, ids = select_experts(torch.randn(11, 5), 2, True)
    tol = dict(rtol=1e-5, atol=1e-4)  # sums of ~100 products of unit normals, in another order
    torch.testing.assert_close(fused_experts_torch(x, w13, w2, weights, ids), reference(x, w13, w2, weights, ids), **tol)
    # experts held elsewhere (-1 in the map) add nothing
    expert_map = torch.tensor([0, -1, 1, -1, 2], dtype=torch.int32)
    local = fused_experts_torch(x, w13[[0, 2, 4]], w2[[0, 2, 4]], weights, ids, expert_map)
    kept = weights * torch.isin(ids, torch.tensor([0, 2, 4]))
    torch.testing.assert_close(local, reference(x, w13, w2, kept, ids), **tol)


@pytest.fixture
def restore_parallel_state():
    yield
    ps.set_parallel_state(0, 1)
    ps.set_moe_parallel(1, None)


def _per_expert_checkpoint(num_experts: int, hidden: int, inter: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for e in range(num_experts):
        out[f"{e}.gate"] = torch.randn(inter, hidden, generator=g)
        out[f"{e}.up"] = torch.randn(inter, hidden, generator=g)
        out[f"{e}.down"] = torch.randn(hidden, inter, generator=g)
    return out


def _load(layer: FusedMoE, ckpt: dict[str, torch.Tensor], stacked: bool, num_experts: int) -> None:
    if stacked:  # transformers 5's layout: [E, 2N, H] gate then up, [E, H, N]
        gate_up = torch.stack([torch.cat([ckpt[f"{e}.gate"], ckpt[f"{e}.up"]]) for e in range(num_experts)])
        layer.weight_loader(layer.w13, gate_up, ("gate_up", None))
        layer.weight_loader(layer.w2, torch.stack([ckpt[f"{e}.down"] for e in range(num_experts)]), ("down", None))
        return
    for e in range(num_experts):
        layer.weight_loader(layer.w13, ckpt[f"{e}.gate"], ("gate", e))
        layer.weight_loader(layer.w13, ckpt[f"{e}.up"], ("up", e))
        layer.weight_loader(layer.w2, ckpt[f"{e}.down"], ("down", e))


@pytest.mark.parametrize("tp, ep", [(2, 1), (2, 2), (4, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("stacked", [False, True])
def test_rank_partial_sums_add_up_to_the_whole_layer(tp, ep, stacked, restore_parallel_state):
    num_experts, hidden, inter = 4, 16, 12
    ckpt = _per_expert_checkpoint(num_experts, hidden, inter)
    torch.manual_seed(4)
    x = torch.randn(7, hidden)
    weights, ids = select_experts(torch.randn(7, num_experts), 2, True)
    whole = FusedMoE(num_experts, hidden, inter)
    _load(whole, ckpt, stacked, num_experts)
    want = whole(x, weights, ids)
    total = torch.zeros_like(want)
    held = []
    for rank in range(tp):
        ps.set_parallel_state(rank, tp)
        ps.set_moe_parallel(ep, None)
        part = FusedMoE(num_experts, hidden, inter)
        _load(part, ckpt, stacked, num_experts)
        assert part.num_local == num_experts // ep and part.n_local == inter // (tp // ep)
        held.append((part.expert_start, part.n_start))
        total += part(x, weights, ids)
    assert len(set(held)) == tp  # each rank a different (experts, columns) block
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-4)


def test_uneven_splits_are_refused(restore_parallel_state):
    ps.set_parallel_state(0, 2)
    ps.set_moe_parallel(2, None)
    with pytest.raises(ValueError, match="--ep-size 2 does not divide the model's 3 experts"):
        FusedMoE(3, 8, 8)
    ps.set_moe_parallel(1, None)
    with pytest.raises(ValueError, match="intermediate size \\(7\\)"):
        FusedMoE(4, 8, 7)
    with pytest.raises(ValueError, match="must divide"):
        ps.set_moe_parallel(3, None)


def test_model_config_normalises_each_family():
    mixtral = ModelConfig.from_hf(tiny_config("mixtral"), "MixtralForCausalLM")
    assert mixtral.moe.num_experts == 8 and mixtral.moe.top_k == 2 and mixtral.moe.renormalize
    assert mixtral.moe.intermediate_size == 40 and all(mixtral.moe.sparse_layers)
    assert not (mixtral.qkv_bias or mixtral.o_bias or mixtral.qk_norm)
    qwen2 = ModelConfig.from_hf(tiny_config("qwen2_moe"), "Qwen2MoeForCausalLM")
    assert qwen2.moe.sparse_layers == (True, False, True)  # mlp_only_layers [1]
    assert qwen2.moe.shared_expert_intermediate_size == 56 and not qwen2.moe.renormalize
    assert qwen2.qkv_bias and not qwen2.o_bias
    qwen3 = ModelConfig.from_hf(tiny_config("qwen3_moe"), "Qwen3MoeForCausalLM")
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.moe.renormalize
    # transformers 5's Qwen3MoeConfig aliases num_experts as num_local_experts: still not Mixtral's
    # always-renormalised routing
    unnormed = tiny_config("qwen3_moe")
    unnormed.norm_topk_prob = False
    assert not ModelConfig.from_hf(unnormed, "Qwen3MoeForCausalLM").moe.renormalize
    step2 = tiny_config("qwen3_moe")
    step2.decoder_sparse_step = 2
    assert ModelConfig.from_hf(step2, "Qwen3MoeForCausalLM").moe.sparse_layers == (False, True)
    llama = ModelConfig.from_hf(tiny_config("llama"), "LlamaForCausalLM")
    assert llama.moe is None and llama.rope_scaling["rope_type"] == "llama3"
    assert llama.kv_layout == (2, 2, 16)


def test_checkpoint_layouts_load_the_same(tmp_path):
    """save_pretrained's per-expert tensors and transformers 5's in-memory stacked ones give one model."""
    import transformers

    from radixserve.models.registry import MODEL_CLASSES
    from tests.helpers import make_tiny_model

    hf = make_tiny_model("mixtral", str(tmp_path), seed=2, tokenizer=False)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert any(".block_sparse_moe.experts.0.w1." in k for k in saved)
    cfg = ModelConfig.from_hf(hf.config, "MixtralForCausalLM")
    per_expert, stacked = (MODEL_CLASSES["MixtralForCausalLM"](cfg, 64) for _ in range(2))
    per_expert.load_weights(saved.items())
    in_memory = hf.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in in_memory)
    stacked.load_weights(in_memory.items())
    a, b = dict(per_expert.named_parameters()), dict(stacked.named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert isinstance(hf, transformers.MixtralForCausalLM)
