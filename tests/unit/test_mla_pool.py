"""The MLA latent pool (sizes, bytes per token, layout, fp8 storage), the torch_native MLA attention
against a naive per-request reference over random pools and page layouts, and how memory sizing and
PD transfer see an MLA model."""

from __future__ import annotations

import pytest
import torch

from radixserve.attention.base import MLALayerSpec
from radixserve.attention.torch_native import TorchNativeBackend
from radixserve.cache.memory import MemoryPools
from radixserve.cache.pools import KVPool, MLAKVPool
from radixserve.layers.quantization.fp8_utils import FP8_DTYPE
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

RANK, ROPE = 32, 16
D = RANK + ROPE


def test_pool_shapes_and_bytes():
    pool = MLAKVPool(64, 4, 3, RANK, ROPE, torch.bfloat16, "cpu")
    assert pool.is_mla and not KVPool.is_mla and pool.num_kv_heads == 1 and pool.head_dim == D
    assert [tuple(b.shape) for b in pool.latent_buffers] == [(68, 1, D)] * 3
    assert pool.bytes_per_token() == 3 * D * 2 == MLAKVPool.bytes_per_token_for(3, RANK, ROPE, torch.bfloat16)
    assert pool.bytes_per_page() == 4 * pool.bytes_per_token()
    layout = pool.layout()
    assert [(b.layer, b.kind) for b in layout] == [(0, "latent"), (1, "latent"), (2, "latent")]
    assert layout[0].bytes_per_slot == D * 2
    # DeepSeek-V3's shape: 61 layers x 576 bf16 = 70272 bytes a token (Llama-shaped K+V, 128 heads x 128, ~2 MB)
    assert MLAKVPool.bytes_per_token_for(61, 512, 64, torch.bfloat16) == 70272
    pools = MemoryPools.create_mla(64, 4, 128, 4, 3, RANK, ROPE, torch.float32, torch.device("cpu"))
    assert isinstance(pools.kv, MLAKVPool) and pools.allocator.total_tokens == 64


def test_fp8_latent_round_trip_and_scale_checks():
    pool = MLAKVPool(16, 1, 2, RANK, ROPE, FP8_DTYPE, "cpu", latent_scales=[1.0, 0.5])
    x = torch.randn(5, D)
    slots = torch.tensor([3, 4, 9, 10, 11])
    pool.set_latent(1, slots, x)
    buf = pool.get_latent_buffer(1)
    assert buf.dtype == FP8_DTYPE and pool.bytes_per_token() == 2 * D
    back = buf[slots, 0].float() * pool.latent_scale(1)
    assert torch.allclose(back, x, rtol=0.07, atol=0.5 * 2**-9)
    assert pool.get_latent_buffer(0).float().abs().sum() == 0  # other layers untouched
    with pytest.raises(ValueError, match="fp8"):
        MLAKVPool(16, 1, 2, RANK, ROPE, torch.float32, "cpu", latent_scales=[1.0, 1.0])
    with pytest.raises(ValueError, match="2 layers"):
        MLAKVPool(16, 1, 2, RANK, ROPE, FP8_DTYPE, "cpu", latent_scales=[1.0])


def reference(q: torch.Tensor, keys: torch.Tensor, positions: list[int], scaling: float) -> torch.Tensor:
    """Naive MLA: query at absolute position p sees keys 0..p; the value is the latent's first RANK columns."""
    out = []
    for t, p in enumerate(positions):
        s = scaling * q[t].double() @ keys[: p + 1].double().t()  # [H, p+1]
        out.append(torch.softmax(s, dim=-1) @ keys[: p + 1, :RANK].double())
    return torch.stack(out).float()


def make_batch(mode, pool, table, rows, seq_lens, new_slots, extend_lens=None, prefix_lens=None):
    return ForwardBatch(
        mode=mode, input_ids=torch.zeros(len(new_slots), dtype=torch.int64),
        positions=torch.zeros(len(new_slots), dtype=torch.int64), req_pool_indices=rows, seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(), out_cache_loc=new_slots, req_to_token=table, kv_pool=pool,
        attn_backend=TorchNativeBackend(),
        extend_lens_cpu=None if extend_lens is None else torch.tensor(extend_lens),
        prefix_lens_cpu=None if prefix_lens is None else torch.tensor(prefix_lens),
    )


@pytest.mark.parametrize("heads,page", [(4, 1), (3, 4), (16, 2)])
def test_torch_native_mla_matches_reference(heads, page):
    """Extend over a cached prefix, then a decode step, for three requests scattered over a paged pool."""
    torch.manual_seed(heads * 10 + page)
    pool = MLAKVPool(256, page, 2, RANK, ROPE, torch.float32, "cpu")
    layer = MLALayerSpec(1, heads, RANK, ROPE, 0.3)
    prefix_lens, extend_lens = [0, 5, 9], [7, 3, 6]
    table = torch.zeros(4, 64, dtype=torch.int64)
    free = torch.randperm(256)[: 64] + page  # slots past the dummy page, in no order
    full = {}
    for i, (pre, ext) in enumerate(zip(prefix_lens, extend_lens)):
        n = pre + ext + 1
        slots = free[i * 20 : i * 20 + n]
        table[i + 1, :n] = slots
        full[i] = torch.randn(n, D)
        if pre:
            pool.set_latent(1, slots[:pre], full[i][:pre])
    rows = torch.tensor([1, 2, 3])
    # extend
    new_slots = torch.cat([table[i + 1, pre : pre + ext] for i, (pre, ext) in enumerate(zip(prefix_lens, extend_lens))])
    latent = torch.cat([full[i][pre : pre + ext] for i, (pre, ext) in enumerate(zip(prefix_lens, extend_lens))])
    q = torch.randn(len(new_slots), heads, D)
    seq_lens = torch.tensor([p + e for p, e in zip(prefix_lens, extend_lens)])
    batch = make_batch(ForwardMode.EXTEND, pool, table, rows, seq_lens, new_slots, extend_lens, prefix_lens)
    batch.attn_backend.init_forward_metadata(batch)
    out = layer(q, latent, batch)
    assert out.shape == (len(new_slots), heads, RANK)
    start = 0
    for i, (pre, ext) in enumerate(zip(prefix_lens, extend_lens)):
        want = reference(q[start : start + ext], full[i], list(range(pre, pre + ext)), 0.3)
        assert torch.allclose(out[start : start + ext], want, atol=1e-5)
        start += ext
    # decode: one more token each
    seq_lens = seq_lens + 1
    new_slots = torch.stack([table[i + 1, int(seq_lens[i]) - 1] for i in range(3)])
    latent = torch.stack([full[i][-1] for i in range(3)])
    q = torch.randn(3, heads, D)
    batch = make_batch(ForwardMode.DECODE, pool, table, rows, seq_lens, new_slots)
    batch.attn_backend.init_forward_metadata(batch)
    out = layer(q, latent, batch)
    for i in range(3):
        want = reference(q[i : i + 1], full[i], [int(seq_lens[i]) - 1], 0.3)
        assert torch.allclose(out[i : i + 1], want, atol=1e-5)


def test_sizing_and_pd_share_see_one_latent():
    import transformers

    from radixserve.disaggregation.ranks import kv_share
    from radixserve.loader.model_config import ModelConfig
    from radixserve.model_executor.model_runner import LoadedModel

    hf = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
                                       kv_lora_rank=RANK, qk_rope_head_dim=ROPE, qk_nope_head_dim=16,
                                       v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                       topk_group=1)
    cfg = ModelConfig.from_hf(hf, "DeepseekV3ForCausalLM")
    loaded = LoadedModel(model=None, cfg=cfg, dtype=torch.bfloat16, context_len=128)
    assert loaded.kv_bytes_per_token == 3 * D * 2
    assert loaded.kv_bytes_per_token_as(FP8_DTYPE) == 3 * D
    # every TP rank holds the whole latent: one head, replicated
    assert kv_share(hf, 2, 0) == kv_share(hf, 2, 1) == (0, 1, 1)
    # mlp_bias in a config: V2's MLPs take it, V3's (as transformers builds them) never have one
    hf.mlp_bias = True
    assert not ModelConfig.from_hf(hf, "DeepseekV3ForCausalLM").mlp_bias
    v2 = transformers.DeepseekV2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, kv_lora_rank=RANK,
                                       qk_rope_head_dim=ROPE, qk_nope_head_dim=16, v_head_dim=16, num_experts_per_tok=2,
                                       mlp_bias=True)
    assert ModelConfig.from_hf(v2, "DeepseekV2ForCausalLM").mlp_bias
