"""The FP8 KV cache (--kv-cache-dtype fp8_e4m3): the pool's quantised writes and reads, the Triton
store kernel, and the Triton decode and extend kernels against TorchNativeBackend on the same fp8
pool, all on CPU (the kernels through Triton's interpreter, fp32 queries).

The interpreter's own fp32 -> fp8 cast is inexact, so the store kernel rounds to the e4m3 grid first
(EXACT_CAST) and must then equal per_tensor_quantize bit for bit; the attention kernels only read fp8.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels) are imported

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with torch on Linux
    pytest.skip(f"triton is not importable: {exc}", allow_module_level=True)

from radixserve.attention.base import AttentionLayerSpec
from radixserve.attention.kernels import built_for_interpreter
from radixserve.attention.kernels.extend_attention import ExtendConfig, extend_attention
from radixserve.attention.torch_native import TorchNativeBackend
from radixserve.attention.triton_backend import TritonBackend
from radixserve.cache.memory import MemoryPools
from radixserve.cache.pools import KVPool, resolve_kv_dtype
from radixserve.layers import fused
from radixserve.layers.quantization.fp8_utils import FP8_DTYPE, FP8_MAX, per_tensor_quantize
from radixserve.model_executor.forward_batch import ForwardMode
from tests.unit.test_triton_attention import make_batch, run_both, scattered_table

if not built_for_interpreter():
    pytest.skip("kernels already built for a GPU in this process; run this file on its own",
                allow_module_level=True)

LAYERS, HEADS, DIM = 2, 2, 16
# scores and outputs: both sides accumulate in fp32 over the same e4m3 values; they differ in where the
# scale is applied (torch: every key; the kernels: the scores) and in summation order
ATOL = RTOL = 2e-4


def e4m3_error_bound(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Round to nearest e4m3: half a step, 2^-4 of a normal value, 2^-10 (of the scale) below 2^-6."""
    return x.abs() * 2.0**-4 + scale * 2.0**-10


def fp8_pool(num_slots: int = 32, page_size: int = 1, scales=None) -> KVPool:
    return KVPool(num_slots, page_size, LAYERS, HEADS, DIM, FP8_DTYPE, "cpu", kv_scales=scales)


def read_back(pool: KVPool, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k_scale, v_scale = pool.kv_scales(layer)
    k_buf, v_buf = pool.get_kv_buffer(layer)
    return k_buf[slots].float() * k_scale, v_buf[slots].float() * v_scale


# ---- the pool -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scales", [None, [(0.5, 2.0), (4.0, 0.03125)]])
def test_pool_round_trip_within_e4m3(scales):
    pool = fp8_pool(scales=scales)
    assert pool.k_buffers[0].dtype == pool.v_buffers[1].dtype == FP8_DTYPE and pool.is_fp8
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([3, 1, 17, 30, 5])
    for layer in range(LAYERS):
        k_scale, v_scale = pool.kv_scales(layer)
        # a spread of magnitudes (some subnormal after the scale), all within +-448 * scale
        k = torch.randn(5, HEADS, DIM, generator=gen) * 10 ** torch.empty(5, HEADS, DIM).uniform_(-3, 2, generator=gen)
        k = k.clamp(-400 * k_scale, 400 * k_scale)
        v = (torch.randn(5, HEADS * DIM, generator=gen) * 3 * v_scale)  # the flat [n, H*D] form too
        pool.set_kv(layer, slots, k, v)
        got_k, got_v = read_back(pool, layer, slots)
        assert (got_k - k).abs().le(e4m3_error_bound(k, k_scale)).all()
        v = v.view(5, HEADS, DIM)
        assert (got_v - v).abs().le(e4m3_error_bound(v, v_scale)).all()
        assert (got_v - v).abs().mean() < 0.03 * v.abs().mean()  # and it is not just within a loose bound
    assert pool.kv_scales(0) == ((1.0, 1.0) if scales is None else scales[0])


def test_large_values_clamp_without_nan():
    pool = fp8_pool(scales=[(0.5, 1.0)] * LAYERS)
    slots = torch.tensor([2, 4])
    k = torch.tensor([1e6, -1e6, 3e38, 224.0]).repeat(2, HEADS, DIM // 4)
    pool.set_kv(0, slots, k, -k)
    got_k, got_v = read_back(pool, 0, slots)
    assert not got_k.isnan().any() and not got_v.isnan().any()
    assert got_k[0, 0, :4].tolist() == [448 * 0.5, -448 * 0.5, 448 * 0.5, 224.0]
    assert got_v[0, 0, :4].tolist() == [-448.0, 448.0, -448.0, -224.0]


def test_fp8_pool_holds_a_token_in_half_the_bytes():
    for dtype, itemsize in ((torch.bfloat16, 2), (torch.float32, 4)):
        plain = KVPool(8, 1, LAYERS, HEADS, DIM, dtype, "cpu")
        assert fp8_pool(8).bytes_per_token() * itemsize == plain.bytes_per_token()
    pool = fp8_pool(8, page_size=4)
    assert pool.bytes_per_token() == 2 * LAYERS * HEADS * DIM  # one byte an element
    assert pool.bytes_per_page() == 4 * pool.bytes_per_token()
    # a transfer engine addresses the pool by bytes: a slot is HEADS * DIM bytes of each buffer
    layout = pool.layout()
    assert len(layout) == 2 * LAYERS and {b.bytes_per_slot for b in layout} == {HEADS * DIM}
    assert layout[1].span(4, 4) == (4 * HEADS * DIM, 4 * HEADS * DIM)
    assert KVPool.bytes_per_token_for(LAYERS, HEADS, DIM, FP8_DTYPE) == pool.bytes_per_token()


def test_memory_pools_and_flag_resolution():
    pools = MemoryPools.create(16, 2, 32, 4, LAYERS, HEADS, DIM, FP8_DTYPE, torch.device("cpu"),
                               kv_scales=[(2.0, 0.5)] * LAYERS)
    assert pools.kv.is_fp8 and pools.kv.kv_scales(1) == (2.0, 0.5)
    assert resolve_kv_dtype("auto", torch.bfloat16, "cpu") == torch.bfloat16
    assert resolve_kv_dtype("fp8_e4m3", torch.float32, "cpu") == FP8_DTYPE
    with pytest.raises(ValueError, match="expected one of auto, fp8_e4m3"):
        resolve_kv_dtype("fp8_e5m2", torch.float32)


@pytest.mark.parametrize("scales, match", [
    ([(1.0, 1.0)], "1 \\(k_scale, v_scale\\) pairs for 2 layers"),
    ([(1.0, 0.0), (1.0, 1.0)], "positive and finite"),
    ([(float("nan"), 1.0), (1.0, 1.0)], "positive and finite"),
])
def test_bad_scales_are_refused(scales, match):
    with pytest.raises(ValueError, match=match):
        fp8_pool(scales=scales)
    with pytest.raises(ValueError, match="fp8 KV cache"):
        KVPool(8, 1, LAYERS, HEADS, DIM, torch.bfloat16, "cpu", kv_scales=[(1.0, 1.0)] * LAYERS)


# ---- the Triton store ---------------------------------------------------------------------------


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 3.0)])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_store_kernel_quantises_like_the_pool(scales, src_dtype):
    """fused.store_kv into e4m3 buffers = per_tensor_quantize bit for bit: ties, subnormals, clamping,
    and strided k/v views as the fused qkv projection hands them over."""
    gen = torch.Generator().manual_seed(1)
    tokens, heads, dim = 37, 3, 24
    qkv = torch.randn(tokens, (2 + 2 * heads) * dim, generator=gen) * 10 ** torch.empty(
        tokens, (2 + 2 * heads) * dim).uniform_(-4, 3, generator=gen)
    qkv[0, 2 * dim:2 * dim + 4] = torch.tensor([1e5, -1e5, 448.0 * scales[0], -460.0 * scales[0]])
    qkv = qkv.to(src_dtype)
    k = qkv[:, 2 * dim:(2 + heads) * dim].view(tokens, heads, dim)
    v = qkv[:, (2 + heads) * dim:].view(tokens, heads, dim)
    assert fused.rows_are_contiguous(k) and not k.is_contiguous()
    k_buf = torch.zeros(64, heads, dim, dtype=FP8_DTYPE)
    v_buf = torch.zeros_like(k_buf)
    slots = torch.randperm(63, generator=gen)[:tokens] + 1
    fused.store_kv(k, v, k_buf, v_buf, slots, *scales)
    for buf, x, scale in ((k_buf, k, scales[0]), (v_buf, v, scales[1])):
        want = per_tensor_quantize(x, scale)
        assert torch.equal(buf[slots].view(torch.uint8), want.view(torch.uint8))
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[slots] = False
        assert not buf[untouched].float().any()
    assert k_buf[slots[0], 0, 0].float() == FP8_MAX and k_buf[slots[0], 0, 3].float() == -FP8_MAX


# ---- attention over an fp8 pool -----------------------------------------------------------------


def make_fp8_case(page_size, q_heads, kv_heads, head_dim, prefix_lens, extend_lens, seed=0, scales=None):
    """test_triton_attention.make_case with an e4m3 pool: random prefix K/V (and junk in every other
    slot), the table, and fresh fp32 q/k/v for the new tokens."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    table, num_slots = scattered_table(seq_lens, page_size, gen)
    pool = KVPool(num_slots, page_size, 2, kv_heads, head_dim, FP8_DTYPE, "cpu", kv_scales=scales)
    for layer in range(2):
        k_scale, v_scale = pool.kv_scales(layer)
        pool.k_buffers[layer].copy_(per_tensor_quantize(torch.randn(pool.k_buffers[layer].shape, generator=gen), k_scale))
        pool.v_buffers[layer].copy_(per_tensor_quantize(torch.randn(pool.v_buffers[layer].shape, generator=gen), v_scale))
    rows = torch.arange(1, len(seq_lens) + 1)
    new_slots = torch.cat([table[r, p : p + e] for r, p, e in zip(rows.tolist(), prefix_lens, extend_lens)])
    t = int(sum(extend_lens))
    q = torch.randn(t, q_heads, head_dim, generator=gen)
    k = torch.randn(t, kv_heads, head_dim, generator=gen) * 2
    v = torch.randn(t, kv_heads, head_dim, generator=gen) * 2
    layer = AttentionLayerSpec(1, q_heads, kv_heads, head_dim, head_dim**-0.5)
    return pool, table, rows, torch.tensor(seq_lens), new_slots, q, k, v, layer


SCALES = {"unit": None, "scaled": [(1.0, 1.0), (0.25, 1.5)]}  # layer 1 is the one the cases attend with


@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("shape", [(1, 4, 4, 64), (4, 6, 2, 80)])
def test_decode_matches_torch_native(shape, scales):
    page_size, hq, hk, d = shape
    seq_lens = [1, 9, 70, 2]
    case = make_fp8_case(page_size, hq, hk, d, [n - 1 for n in seq_lens], [1] * len(seq_lens), seed=2,
                         scales=SCALES[scales])
    ref, got = run_both(ForwardMode.DECODE, case, triton_backend=TritonBackend(min_split_tokens=16))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("shape", [(1, 4, 4, 64), (4, 6, 2, 80)])
def test_extend_matches_torch_native(shape, scales):
    page_size, hq, hk, d = shape
    prefix, extend = [5, 0, 66, 17], [7, 9, 70, 1]  # past one key block (64), prefixes mid-page
    case = make_fp8_case(page_size, hq, hk, d, prefix, extend, seed=3, scales=SCALES[scales])
    ref, got = run_both(ForwardMode.EXTEND, case, prefix, extend)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("cfg", [ExtendConfig(16, 16, 4, 2, pack=2), ExtendConfig(32, 16, 4, 2, tma=True)], ids=str)
def test_extend_tiles_read_the_new_tokens_from_the_pool(cfg):
    """The kernel reads the new tokens' fp8 K/V through the table, never the fp32 k/v it is handed (which
    here are garbage), with several query and key blocks a request and a TMA config (not taken)."""
    prefix, extend = [0, 37, 16], [45, 20, 33]
    case = make_fp8_case(4, 4, 2, 32, prefix, extend, seed=4, scales=SCALES["scaled"])
    ref, _ = run_both(ForwardMode.EXTEND, case, prefix, extend)  # also stores the new K/V in the pool
    pool, table, rows, seq_lens, new_slots, q, k, v, layer = case
    k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
    out = torch.full_like(q, float("nan"))
    starts = torch.tensor(extend).cumsum(0) - torch.tensor(extend)
    extend_attention(q, torch.full_like(k, float("nan")), torch.full_like(v, float("nan")), k_buf, v_buf, table,
                     rows, torch.tensor(prefix), torch.tensor(extend), starts, out, layer.scaling, max(extend),
                     config=cfg, k_scale=0.25, v_scale=1.5)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", [TorchNativeBackend, TritonBackend])
def test_output_does_not_depend_on_where_the_prefix_came_from(backend):
    """A request's last tokens attend the same way whether its first tokens were computed in the same
    extend (fresh prefill) or read from the pool (a radix-cache hit, or the previous chunk)."""
    n, split = 40, 29
    fresh = make_fp8_case(1, 4, 2, 32, [0], [n], seed=5, scales=SCALES["scaled"])
    pool, table, rows, seq_lens, new_slots, q, k, v, layer = fresh
    batch = make_batch(ForwardMode.EXTEND, pool, table, rows, seq_lens, new_slots, backend(), [0], [n])
    batch.attn_backend.init_forward_metadata(batch)
    whole = layer(q.flatten(1), k.flatten(1), v.flatten(1), batch).view_as(q)
    # the same pool now holds the first `split` tokens: extend only the rest over them
    batch = make_batch(ForwardMode.EXTEND, pool, table, rows, seq_lens, new_slots[split:], backend(),
                       [split], [n - split])
    batch.attn_backend.init_forward_metadata(batch)
    tail = layer(q[split:].flatten(1), k[split:].flatten(1), v[split:].flatten(1), batch).view_as(q[split:])
    torch.testing.assert_close(tail, whole[split:], atol=1e-5, rtol=1e-5)


def test_fp8_attention_is_close_to_full_precision():
    """The e4m3 rounding of K/V moves the attention output by a few percent at most (random data)."""
    prefix, extend = [50, 0], [10, 30]
    case = make_fp8_case(1, 4, 2, 64, prefix, extend, seed=6)
    pool, table, rows, seq_lens, new_slots, q, k, v, layer = case
    exact = KVPool(pool.size, 1, 2, 2, 64, torch.float32, "cpu")
    for layer_id in range(2):
        exact.k_buffers[layer_id].copy_(pool.k_buffers[layer_id].float())
        exact.v_buffers[layer_id].copy_(pool.v_buffers[layer_id].float())
    (got,) = run_both(ForwardMode.EXTEND, case, prefix, extend)[1:]
    (want,) = run_both(ForwardMode.EXTEND, (exact, *case[1:]), prefix, extend)[:1]
    err = (got - want).norm() / want.norm()
    assert 0 < err < 0.05, err


def test_checkpoint_kv_scales_reach_the_pool(tmp_path):
    """Per-layer k_scale / v_scale tensors of a checkpoint (either spelling) become the FP8 pool's
    scales; an unquantized cache ignores them."""
    from safetensors.torch import load_file, save_file

    from radixserve.loader.source import resolve_model_source
    from radixserve.model_executor.model_runner import build_model_runner
    from radixserve.server_args import ServerArgs
    from tests.helpers import make_tiny_model

    make_tiny_model("llama", str(tmp_path), seed=1, tokenizer=False)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(2.0)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.5)
    tensors["model.layers.1.self_attn.k_proj.output_scale"] = torch.tensor([3.0])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = resolve_model_source(str(tmp_path))
    for kv_dtype, want in (("fp8_e4m3", [(2.0, 0.5), (3.0, 1.0)]), ("auto", [(1.0, 1.0), (1.0, 1.0)])):
        args = ServerArgs(model_path=str(tmp_path), dtype="float32", device="cpu", kv_cache_dtype=kv_dtype,
                          max_total_tokens=256)
        runner = build_model_runner(args, source, torch.device("cpu"), 128)
        assert [runner.pools.kv.kv_scales(layer) for layer in range(2)] == want
