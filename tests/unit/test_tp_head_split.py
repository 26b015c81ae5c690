"""How QKVParallelLinear splits attention heads over tensor-parallel ranks, and the one-line refusal
of splits it cannot make (no process group needed: the rank and size are patched in)."""

from __future__ import annotations

import pytest

from radixserve.layers import linear


def qkv_on(monkeypatch, tp: int, rank: int, heads: int, kv_heads: int) -> linear.QKVParallelLinear:
    monkeypatch.setattr(linear, "get_tp_size", lambda: tp)
    monkeypatch.setattr(linear, "get_tp_rank", lambda: rank)
    return linear.QKVParallelLinear(hidden=8, head_dim=2, num_heads=heads, num_kv_heads=kv_heads, bias=False)


def test_whole_gqa_groups_per_rank(monkeypatch):
    # 9 heads over 3 KV heads at TP=2: 6+3 query heads, 2+1 KV heads
    split = [(q.num_heads, q.num_kv_heads) for q in (qkv_on(monkeypatch, 2, r, 9, 3) for r in range(2))]
    assert split == [(6, 2), (3, 1)]


def test_fewer_kv_heads_than_ranks_replicates_them(monkeypatch):
    # 4 heads, 2 KV heads, TP=4: each rank one query head; KV head 0 on ranks 0-1, head 1 on ranks 2-3
    ranks = [qkv_on(monkeypatch, 4, r, 4, 2) for r in range(4)]
    assert [(q.num_heads, q.kv_head_start) for q in ranks] == [(1, 0), (1, 0), (1, 1), (1, 1)]


@pytest.mark.parametrize("tp, heads, kv_heads", [(3, 4, 2), (4, 6, 2)])
def test_impossible_split_names_the_numbers(monkeypatch, tp, heads, kv_heads):
    with pytest.raises(ValueError, match=rf"--tp-size {tp} is larger than the model's {kv_heads} KV heads"):
        qkv_on(monkeypatch, tp, 0, heads, kv_heads)
