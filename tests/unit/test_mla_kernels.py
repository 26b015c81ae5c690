"""The MLA Triton kernels (decode and extend) against a plain-torch reference of the MLA formula, on
the CPU through the Triton interpreter.

Reference (docs/notes' interface): for query t at position p, keys j = 0..p read from the pool,
L[j] = latent_buffer[slot_j, 0] * latent_scale, s = scaling * q[t] . L[j] (fp32),
out[t, h] = sum_j softmax_j(s[h]) * L[j, :kv_lora_rank].

Tolerances: fp32 q and latent 1e-4 (both sides accumulate in fp32; only the summation order
differs); bf16 2e-2 (the kernels round the probabilities to bf16 for the second dot and the output to
bf16). An fp8 latent is compared against the reference of the same stored e4m3 values (the rounding
is the pool's, not the kernel's), so it keeps q's tolerance. Small shapes only: the interpreter runs
every program in Python.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels) are imported

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with torch on Linux
    print(f"skipping MLA kernel tests: triton is not importable ({exc})")
    pytest.skip(f"triton is not importable: {exc}", allow_module_level=True)

from radixserve.attention.kernels import built_for_interpreter
from radixserve.attention.kernels.decode_attention import make_workspace
from radixserve.attention.kernels.mla_decode import mla_decode, mla_min_split_tokens, plan_mla_splits
from radixserve.attention.kernels.mla_extend import MLAExtendConfig, mla_extend
from radixserve.layers.quantization.fp8_utils import FP8_DTYPE, per_tensor_quantize

if not built_for_interpreter():  # e.g. tests/gpu imported them first, compiled for CUDA
    print("skipping Triton interpreter tests: the kernels were already built for a GPU in this process")
    pytest.skip("kernels already built for a GPU in this process; run this file on its own",
                allow_module_level=True)

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def interpreter_bf16_dots(monkeypatch):
    """Triton 3.9's interpreter multiplies bf16 dot operands as their raw uint16 bits (it keeps bf16 as
    uint16 and only converts fp8 operands before np.matmul), so any bf16 tl.dot gives garbage there.
    Convert bf16 operands exactly to fp32 first, as the GPU's bf16 MMA does; the kernels' own bf16
    roundings (the probabilities before the second dot, the output) still happen in the kernel."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data.reshape(x.data.shape), tl.float32)
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)

# (page_size, heads, kv_lora_rank, rope_dim): one head, an odd head count, a full 16-head block;
# a kv_lora_rank that is and one that is not a power of two; rope widths 16 and 8 (padded to 16).
SHAPES = [(1, 1, 32, 16), (4, 3, 48, 8), (4, 16, 32, 16)]


def scattered_table(seq_lens: list[int], page_size: int, gen: torch.Generator, width: int = 160):
    """req_to_token with each request on shuffled pages (never page 0, the dummy). Rows 1..bs."""
    pages_needed = sum(-(-n // page_size) for n in seq_lens)
    num_pages = pages_needed + 6  # some pages stay unused, so slots are not a dense range
    order = (torch.randperm(num_pages, generator=gen) + 1).tolist()
    table = torch.zeros(len(seq_lens) + 2, width, dtype=torch.int64)
    for i, n in enumerate(seq_lens):
        pages = [order.pop() for _ in range(-(-n // page_size))]
        table[i + 1, :n] = torch.tensor([p * page_size + o for p in pages for o in range(page_size)])[:n]
    return table, (num_pages + 1) * page_size


def make_case(shape, prefix_lens, extend_lens, q_dtype=torch.float32, latent_dtype=None, scale=1.0, seed=0):
    """A latent buffer full of random values (junk where no request lives, so a wrong slot shows),
    the table, q for the new tokens, and the extend metadata."""
    page_size, heads, rank, rope = shape
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    table, num_slots = scattered_table(seq_lens, page_size, gen)
    latent = torch.randn(num_slots, 1, rank + rope, generator=gen)
    latent_dtype = latent_dtype or q_dtype
    buf = per_tensor_quantize(latent, scale) if latent_dtype == FP8_DTYPE else latent.to(latent_dtype)
    q = torch.randn(sum(extend_lens), heads, rank + rope, generator=gen).to(q_dtype)
    extend = torch.tensor(extend_lens)
    meta = dict(
        req_pool_indices=torch.arange(1, len(seq_lens) + 1), prefix_lens=torch.tensor(prefix_lens),
        extend_lens=extend, extend_start_loc=torch.cumsum(extend, 0) - extend, seq_lens=torch.tensor(seq_lens),
    )
    return q, buf, table, meta


def mla_reference(q, buf, scale, table, meta, rank, scaling):
    """Straight from the formula, per request, in fp32; returned in q's dtype."""
    outs = []
    for row, p, e, s0 in zip(*(meta[k].tolist() for k in ("req_pool_indices", "prefix_lens", "extend_lens",
                                                          "extend_start_loc"))):
        lat = buf[table[row, : p + e], 0].float() * scale  # [p + e, D]
        scores = scaling * torch.einsum("thd,jd->thj", q[s0 : s0 + e].float(), lat)
        pos = p + torch.arange(e)
        scores = scores.masked_fill(torch.arange(p + e)[None, None, :] > pos[:, None, None], float("-inf"))
        outs.append(torch.softmax(scores, -1) @ lat[:, :rank])
    return torch.cat(outs).to(q.dtype)


def run_decode(q, buf, table, meta, rank, scaling, scale=1.0, min_split=None):
    bs, heads = q.shape[0], q.shape[1]
    out = torch.empty(bs, heads, rank, dtype=q.dtype)
    ws = None
    if min_split is not None:  # many splits (or one): a workspace planned the way the backend plans
        ws = make_workspace(bs, heads, rank, 64, meta["seq_lens"], min_split)
    return mla_decode(q, buf, table, meta["req_pool_indices"], meta["seq_lens"], out, scaling, rank,
                      max_len_hint=int(meta["seq_lens"].max()), workspace=ws, latent_scale=scale)


def run_extend(q, buf, table, meta, rank, scaling, scale=1.0, config=None):
    out = torch.empty(q.shape[0], q.shape[1], rank, dtype=q.dtype)
    return mla_extend(q, buf, table, meta["req_pool_indices"], meta["prefix_lens"], meta["extend_lens"],
                      meta["extend_start_loc"], out, scaling, rank, int(meta["extend_lens"].max()),
                      latent_scale=scale, config=config)


# ---- decode -------------------------------------------------------------------------------------

DECODE_LENS = [1, 7, 33, 70, 2]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("min_split", [None, 256, 8])  # planned here; one split; several, uneven
def test_decode_fp32(shape, min_split):
    rank, scaling = shape[2], 0.3
    q, buf, table, meta = make_case(shape, [n - 1 for n in DECODE_LENS], [1] * len(DECODE_LENS))
    got = run_decode(q, buf, table, meta, rank, scaling, min_split=min_split)
    ref = mla_reference(q, buf, 1.0, table, meta, rank, scaling)
    assert got.shape == (len(DECODE_LENS), shape[1], rank)
    torch.testing.assert_close(got, ref, atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_decode_bf16(shape):
    rank, scaling = shape[2], 0.2
    q, buf, table, meta = make_case(shape, [n - 1 for n in DECODE_LENS], [1] * len(DECODE_LENS),
                                    q_dtype=torch.bfloat16, seed=1)
    got = run_decode(q, buf, table, meta, rank, scaling, min_split=8)
    ref = mla_reference(q, buf, 1.0, table, meta, rank, scaling)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_decode_fp8_latent_with_scale(q_dtype):
    shape, scale, scaling = (4, 3, 48, 8), 0.02, 0.25
    q, buf, table, meta = make_case(shape, [n - 1 for n in DECODE_LENS], [1] * len(DECODE_LENS),
                                    q_dtype=q_dtype, latent_dtype=FP8_DTYPE, scale=scale, seed=2)
    assert buf.dtype == FP8_DTYPE
    got = run_decode(q, buf, table, meta, 48, scaling, scale=scale, min_split=8)
    ref = mla_reference(q, buf, scale, table, meta, 48, scaling)
    torch.testing.assert_close(got, ref, atol=TOL[q_dtype], rtol=TOL[q_dtype])
    # the scale matters: ignoring it gives a different answer
    wrong = run_decode(q, buf, table, meta, 48, scaling, scale=1.0, min_split=8)
    assert not torch.allclose(wrong.float(), ref.float(), atol=0.1)


def test_decode_one_token_per_split():
    shape, scaling = (1, 3, 32, 16), 0.3
    q, buf, table, meta = make_case(shape, [4, 0, 9], [1, 1, 1], seed=3)
    got = run_decode(q, buf, table, meta, 32, scaling, min_split=1)
    torch.testing.assert_close(got, mla_reference(q, buf, 1.0, table, meta, 32, scaling), atol=1e-4, rtol=1e-4)


def test_split_plan():
    # a split gets at least 2 * heads tokens; head blocks of 16 count as the parallel units
    assert mla_min_split_tokens(16) == 64 and mla_min_split_tokens(128) == 256 and mla_min_split_tokens(3, 8) == 8
    assert plan_mla_splits(4096, 1, 128, 132) == (16, 256)  # by length: 4096 / 256
    assert plan_mla_splits(4096, 1, 16, 132) == (64, 64)  # capped at 64
    assert plan_mla_splits(4096, 32, 128, 132) == (3, 256)  # by occupancy: 528 / (32 * 8) programs
    assert plan_mla_splits(1024, 128, 16, 132) == (5, 64)


def test_bad_shapes_are_refused():
    shape = (1, 3, 32, 16)
    q, buf, table, meta = make_case(shape, [3], [1])
    out = torch.empty(1, 3, 32)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_decode(q, buf, table, meta["req_pool_indices"], meta["seq_lens"], out, 1.0, 48)
    with pytest.raises(ValueError, match="latent_buffer"):
        mla_decode(q, buf[:, :, :40], table, meta["req_pool_indices"], meta["seq_lens"], out, 1.0, 32)
    with pytest.raises(ValueError, match="out must be"):
        mla_decode(q, buf, table, meta["req_pool_indices"], meta["seq_lens"], torch.empty(1, 3, 48), 1.0, 32)


# ---- extend -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("lens", [([0, 0, 0], [1, 7, 33]), ([5, 17, 0, 64], [7, 1, 9, 33])],
                         ids=["no-prefix", "prefix"])
def test_extend_fp32(shape, lens):
    rank, scaling = shape[2], 0.3
    prefix, extend = lens
    q, buf, table, meta = make_case(shape, prefix, extend, seed=4)
    got = run_extend(q, buf, table, meta, rank, scaling)
    ref = mla_reference(q, buf, 1.0, table, meta, rank, scaling)
    torch.testing.assert_close(got, ref, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_extend_bf16():
    shape, scaling = (4, 3, 48, 8), 0.2
    prefix, extend = [5, 0, 40], [7, 20, 3]
    q, buf, table, meta = make_case(shape, prefix, extend, q_dtype=torch.bfloat16, seed=5)
    got = run_extend(q, buf, table, meta, 48, scaling)
    ref = mla_reference(q, buf, 1.0, table, meta, 48, scaling)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


def test_extend_fp8_latent_with_scale():
    shape, scale, scaling = (4, 3, 32, 16), 0.02, 0.25
    prefix, extend = [5, 0, 30], [7, 20, 3]
    q, buf, table, meta = make_case(shape, prefix, extend, latent_dtype=FP8_DTYPE, scale=scale, seed=6)
    got = run_extend(q, buf, table, meta, 32, scaling, scale=scale)
    ref = mla_reference(q, buf, scale, table, meta, 32, scaling)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


TILE_CONFIGS = [
    MLAExtendConfig(16, 16, 4, 1),          # one head a tile, query block = key block
    MLAExtendConfig(16, 32, 4, 2, pack=2),  # key block wider than the 8 tokens of a tile
    MLAExtendConfig(32, 16, 4, 2, pack=16),  # 2 tokens x 16 heads (capped by the head count)
]


@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=str)
@pytest.mark.parametrize("heads", [3, 16])
def test_extend_tile_configs(cfg, heads):
    """Every tile shape gives the same attention: head packing that does and does not divide the head
    count, several query blocks per request, prefixes that do and do not fill a key block."""
    shape, scaling = (4, heads, 32, 8), 0.3
    prefix, extend = [0, 37, 16], [21, 5, 2]
    q, buf, table, meta = make_case(shape, prefix, extend, seed=7)
    got = run_extend(q, buf, table, meta, 32, scaling, config=cfg)
    torch.testing.assert_close(got, mla_reference(q, buf, 1.0, table, meta, 32, scaling), atol=1e-4, rtol=1e-4)


def test_extend_of_one_token_equals_decode():
    """A one-token extend on a prefix is the decode of that token: the two kernels agree."""
    shape, scaling = (4, 16, 48, 16), 0.3
    q, buf, table, meta = make_case(shape, [n - 1 for n in DECODE_LENS], [1] * len(DECODE_LENS), seed=8)
    ext = run_extend(q, buf, table, meta, 48, scaling)
    dec = run_decode(q, buf, table, meta, 48, scaling, min_split=8)
    torch.testing.assert_close(ext, dec, atol=1e-5, rtol=1e-5)
