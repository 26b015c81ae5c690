"""Where a request's KV lies in bytes, and the copies that move it from one pool to another.

A KV pool reports its buffers (KVPool.layout): slot s of a buffer is `bytes_per_slot` bytes at
`data_ptr + s * bytes_per_slot`. Moving a request means copying its slots of every buffer to the
peer's slots of the matching buffer; slots that are consecutive on both sides go as one copy, since
a transfer engine pays per copy (tens of microseconds each over TCP).

Under tensor parallelism a rank's slot holds only its KV heads (heads [head_start, head_start +
num_heads) of the model's, each `bytes_per_slot / num_heads` bytes, in order). Between ranks of
different TP sizes each copy moves the heads both sides hold: a slot's part, one slot at a time."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from radixserve.cache.pools import KVBuffer


class BufferSpec(msgspec.Struct, array_like=True, frozen=True):
    """One KV buffer as a peer sees it: its address, its slot size, its slot count, and the KV heads
    a slot holds (a rank's share of the model's under TP)."""

    data_ptr: int
    bytes_per_slot: int
    num_slots: int
    head_start: int = 0
    num_heads: int = 1

    @classmethod
    def of(cls, buffer: KVBuffer, head_start: int = 0, num_heads: int = 1) -> BufferSpec:
        return cls(buffer.data_ptr, buffer.bytes_per_slot, buffer.tensor.shape[0], head_start, num_heads)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_slot * self.num_slots

    @property
    def head_end(self) -> int:
        return self.head_start + self.num_heads

    @property
    def bytes_per_head(self) -> int:
        return self.bytes_per_slot // self.num_heads


class LayoutMismatch(ValueError):
    """The two pools do not hold the same model's KV the same way."""


def slot_runs(src_slots: Sequence[int], dst_slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first source slot, first destination slot, count) for each stretch of slots that are
    consecutive on both sides."""
    if len(src_slots) != len(dst_slots):
        raise ValueError(f"{len(src_slots)} source slots for {len(dst_slots)} destination slots")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_slots, dst_slots):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def check_layouts(src: Sequence[BufferSpec], dst: Sequence[BufferSpec]) -> None:
    if len(src) != len(dst):
        raise LayoutMismatch(f"the pools have {len(src)} and {len(dst)} buffers")
    for k, (a, b) in enumerate(zip(src, dst)):
        if a.bytes_per_head != b.bytes_per_head:
            raise LayoutMismatch(f"buffer {k} has {a.bytes_per_head} bytes a KV head here and "
                                 f"{b.bytes_per_head} at the peer (model, dtype or head size differ)")


def transfer_copies(src: Sequence[BufferSpec], src_slots: Sequence[int], dst: Sequence[BufferSpec],
                    dst_slots: Sequence[int], heads: tuple[int, int] | None = None) -> list[tuple[int, int, int]]:
    """(source address, destination address, bytes) for every copy that moves these slots of
    every buffer: the KV heads both sides hold (and, when given, within heads = [first, end))."""
    check_layouts(src, dst)
    runs = slot_runs(src_slots, dst_slots)
    for s, d, n in runs:
        for a, b in zip(src, dst):
            if s < 0 or s + n > a.num_slots or d < 0 or d + n > b.num_slots:
                raise ValueError(f"slots {s}+{n} -> {d}+{n} lie outside the pools "
                                 f"({a.num_slots} and {b.num_slots} slots)")
    copies: list[tuple[int, int, int]] = []
    for a, b in zip(src, dst):
        first, end = max(a.head_start, b.head_start), min(a.head_end, b.head_end)
        if heads is not None:
            first, end = max(first, heads[0]), min(end, heads[1])
        if first >= end:
            continue  # no head in common
        size = (end - first) * a.bytes_per_head
        src_at = a.data_ptr + (first - a.head_start) * a.bytes_per_head
        dst_at = b.data_ptr + (first - b.head_start) * b.bytes_per_head
        if size == a.bytes_per_slot == b.bytes_per_slot:  # whole slots: a run is one copy
            copies += [(src_at + s * size, dst_at + d * size, n * size) for s, d, n in runs]
        else:
            copies += [(src_at + (s + i) * a.bytes_per_slot, dst_at + (d + i) * b.bytes_per_slot, size)
                       for s, d, n in runs for i in range(n)]
    return copies
