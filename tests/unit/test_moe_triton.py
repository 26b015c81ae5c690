"""The fused MoE Triton kernel (radixserve/layers/moe/triton_moe.py) against a per-token loop, in Triton's
interpreter on the CPU (fp32: only the summation order differs; fp16 for the rounding points), its
align step, its tile tables and its custom op."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed")

from radixserve.layers.moe import tile_configs, triton_moe  # noqa: E402
from radixserve.layers.moe.triton_moe import fused_experts_triton, fused_moe_launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-4, rtol=1e-4)
# small tiles: several K steps, several column blocks, a partial last one, GROUP_M > 1
SMALL_TILE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)


def make(t: int, e: int, h: int, n: int, k: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * n, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, n, generator=gen) / n**0.5
    weights, ids = torch.randn(t, e, generator=gen).softmax(-1).topk(k, dim=-1)
    return (x.to(DEVICE, dtype), w13.to(DEVICE, dtype), w2.to(DEVICE, dtype), weights.to(DEVICE),
            ids.to(DEVICE))


def reference(x, w13, w2, weights, ids, expert_map=None):
    """One (token, slot) at a time, rounding where an unfused model in x's dtype would."""
    n = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            gate, up = F.linear(x[t], w13[e, :n]), F.linear(x[t], w13[e, n:])
            act = F.silu(gate) * up
            out[t] += (F.linear(act, w2[e]).float() * weights[t, j]).to(x.dtype).float()
    return out.to(x.dtype)


@pytest.mark.parametrize("t, e, k, h, n", [
    (1, 4, 1, 48, 40), (5, 8, 2, 48, 40), (33, 8, 3, 48, 40),  # H, N not multiples of the tiles
    (33, 4, 2, 64, 32), (5, 4, 3, 64, 64), (1, 8, 2, 32, 16),  # multiples
])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_matches_per_token_reference(t, e, k, h, n, id_dtype):
    x, w13, w2, weights, ids = make(t, e, h, n, k, seed=t * 100 + e * 10 + k)
    got = fused_experts_triton(x, w13, w2, weights, ids.to(id_dtype))
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, reference(x, w13, w2, weights, ids), **TOL)


@pytest.mark.parametrize("t, h, n", [(33, 48, 40), (20, 56, 24)])
def test_small_tiles_walk_several_blocks(t, h, n):
    x, w13, w2, weights, ids = make(t, 4, h, n, 2, seed=7)
    got = fused_moe_launch(x, w13, w2, weights, ids, config=SMALL_TILE)
    torch.testing.assert_close(got, reference(x, w13, w2, weights, ids), **TOL)


def test_half_precision_rounds_like_the_unfused_path():
    x, w13, w2, weights, ids = make(17, 4, 64, 32, 2, seed=3, dtype=torch.float16)
    got = fused_experts_triton(x, w13, w2, weights, ids)
    assert got.dtype == torch.float16
    # the kernel sums the K slots in fp32, the reference in fp16 one at a time: a rounding apart
    torch.testing.assert_close(got, reference(x, w13, w2, weights, ids), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("tile", [None, SMALL_TILE])
def test_remote_experts_add_exactly_nothing(tile):
    e_global, t, k, h, n = 8, 33, 3, 48, 40
    x, w13, w2, weights, ids = make(t, e_global, h, n, k, seed=11)
    expert_map = torch.tensor([0, -1, 1, -1, -1, 2, 3, -1], dtype=torch.int32, device=DEVICE)
    local = expert_map >= 0
    w13_local, w2_local = w13[local].contiguous(), w2[local].contiguous()
    got = fused_moe_launch(x, w13_local, w2_local, weights, ids.int(), expert_map, config=tile)
    torch.testing.assert_close(got, reference(x, w13_local, w2_local, weights, ids, expert_map), **TOL)
    # tokens routed only to remote experts come out exactly zero (no NaN from unwritten rows)
    ids[:4] = torch.tensor([1, 3, 4], device=DEVICE)
    got = fused_moe_launch(x, w13_local, w2_local, weights, ids, expert_map, config=tile)
    assert torch.equal(got[:4], torch.zeros_like(got[:4]))
    assert torch.isfinite(got).all()
    # everything remote: the whole output is zero
    ids[:] = torch.tensor([1, 3, 7], device=DEVICE)
    assert torch.equal(fused_experts_triton(x, w13_local, w2_local, weights, ids, expert_map), torch.zeros_like(x))


@pytest.mark.parametrize("k", [1, 2])
def test_every_token_to_one_expert(k):
    t, e, h, n = 40, 4, 48, 40  # 40 rows of one expert: three row blocks of 16
    x, w13, w2, weights, _ = make(t, e, h, n, k, seed=5)
    ids = torch.tensor([2, 0][:k], device=DEVICE).expand(t, k).contiguous()
    for tile in (None, SMALL_TILE):
        got = fused_moe_launch(x, w13, w2, weights, ids, config=tile)
        torch.testing.assert_close(got, reference(x, w13, w2, weights, ids), **TOL)


def test_align_pads_each_expert_to_whole_blocks():
    ids = torch.tensor([3, 0, 3, -1, 1, 3, 0, -1, 3, 3], device=DEVICE)  # -1: another rank's expert
    sorted_ids, padded_end = triton_moe.align_by_expert(ids, 4, 4)
    pairs = ids.numel()
    assert sorted_ids.numel() == triton_moe.padded_bound(pairs, 4, 4) == 24  # 10 + 4 * 3, in whole blocks
    # expert 0: 2 rows, 1: 1, 2: none, 3: 5, then the remote bucket
    assert padded_end.tolist()[:4] == [4, 8, 8, 16]
    num_padded = padded_end[3].item()
    starts = [0] + padded_end.tolist()[:3]
    for expert in range(4):
        run = sorted_ids[starts[expert] : padded_end[expert]].tolist()
        real = [p for p in run if p < pairs]
        assert real == [i for i in range(pairs) if ids[i] == expert]  # in order, each once
        assert run == real + [pairs] * (len(run) - len(real))  # padding last
    # the remote pairs sit past the padded count, where no program reads
    assert sorted(sorted_ids[num_padded:].tolist())[:2] == [3, 7]


def test_tile_config_nearest_bucket(tmp_path):
    def cfg(bm: int) -> dict:
        return dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)

    name = tile_configs.config_file_name(8, 40, 48, torch.bfloat16, "NVIDIA H100 80GB HBM3")
    assert name == "E=8,N=40,H=48,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json"
    tile_configs.write_table(tmp_path / name, {1: cfg(16), 16: cfg(32), 256: cfg(128)}, "test")
    assert json.loads((tmp_path / name).read_text())["_note"] == "test"

    def pick(tokens: int) -> int:
        return tile_configs.tile_config(tokens, 8, 40, 48, torch.bfloat16, "NVIDIA H100 80GB HBM3",
                                        config_dir=str(tmp_path))["BLOCK_M"]

    assert [pick(t) for t in (1, 2, 8, 9, 10, 136, 137, 100000)] == [16, 16, 16, 32, 32, 32, 128, 128]
    # another GPU, dtype or shape: the built-in defaults, small BLOCK_M for decode, large for prefill
    for other in (dict(device_name="NVIDIA H200"), dict(dtype=torch.float16), dict(h=64)):
        kw = dict(num_tokens=1, num_experts=8, n=40, h=48, dtype=torch.bfloat16,
                  device_name="NVIDIA H100 80GB HBM3", config_dir=str(tmp_path)) | other
        assert tile_configs.tile_config(**kw) == tile_configs.default_config(1, 8, 40, kw["h"])
    assert tile_configs.default_config(1, 8, 14336, 4096)["BLOCK_M"] == 16
    assert tile_configs.default_config(8192, 8, 14336, 4096)["BLOCK_M"] == 128


def test_shipped_tables_load():
    files = sorted(tile_configs.CONFIG_DIR.glob("*.json"))
    assert len(files) >= 2
    for path in files:
        table = tile_configs.load_table(path.name)
        assert table and all(set(c) == set(tile_configs.KEYS) for c in table.values())
    mixtral = tile_configs.tile_config(1, 8, 14336, 4096, torch.bfloat16, "NVIDIA H100 80GB HBM3")
    assert mixtral["BLOCK_M"] == 16


def test_custom_op_and_fake():
    x, w13, w2, weights, ids = make(5, 4, 48, 40, 2, seed=1)
    torch.library.opcheck(triton_moe._fused_moe_op, (x, w13, w2, weights, ids, None),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = triton_moe._fused_moe_op(*(mode.from_tensor(a) for a in (x, w13, w2, weights, ids)), None)
    assert fake.shape == x.shape and fake.dtype == x.dtype
    compiled = torch.compile(fused_experts_triton, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w13, w2, weights, ids), fused_experts_triton(x, w13, w2, weights, ids))


def test_takes_triton_moe_only_on_cuda(monkeypatch):
    assert not triton_moe.takes_triton_moe(torch.randn(2, 8))  # CPU: the torch path
    if torch.cuda.is_available():
        x = torch.randn(2, 8, device="cuda", dtype=torch.bfloat16)
        assert triton_moe.takes_triton_moe(x)
        assert not triton_moe.takes_triton_moe(x.double())
        monkeypatch.setattr(triton_moe, "ENABLED", False)
        assert not triton_moe.takes_triton_moe(x)


@pytest.mark.parametrize("e, k, h, n", [(4, 1, 48, 40), (8, 2, 64, 32), (8, 3, 3000, 40), (6, 6, 40, 2100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_token_gemv_path(e, k, h, n, dtype, monkeypatch):
    """One token takes triton_moe_decode.py's GEMVs (no align): H and N past one 2048-wide step too."""
    from radixserve.layers.moe.triton_moe_decode import moe_decode_one_token

    x, w13, w2, weights, ids = make(1, e, h, n, k, seed=e + k + h, dtype=dtype)
    want = reference(x, w13, w2, weights, ids)
    tol = TOL if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(moe_decode_one_token(x, w13, w2, weights, ids), want, **tol)
    for gemv in (True, False):  # the launcher routes one token here by default; =0 keeps the grouped kernel
        monkeypatch.setattr(triton_moe, "DECODE_GEMV", gemv)
        torch.testing.assert_close(fused_experts_triton(x, w13, w2, weights, ids.int()), want, **tol)
    # with experts on other ranks: theirs add exactly nothing
    expert_map = torch.full((e,), -1, dtype=torch.int32, device=DEVICE)
    expert_map[::2] = torch.arange((e + 1) // 2, dtype=torch.int32, device=DEVICE)
    local = expert_map >= 0
    w13_l, w2_l = w13[local].contiguous(), w2[local].contiguous()
    got = moe_decode_one_token(x, w13_l, w2_l, weights, ids, expert_map)
    torch.testing.assert_close(got, reference(x, w13_l, w2_l, weights, ids, expert_map), **tol)
    assert torch.isfinite(got).all()
