"""Where a request's KV lies in bytes, and the copies that move it from one pool to another.

A KV pool reports its buffers (KVPool.layout): slot s of a buffer is `bytes_per_slot` bytes at
`data_ptr + s * bytes_per_slot`. Moving a request means copying its slots of every buffer to the
peer's slots of the matching buffer; slots that are consecutive on both sides go as one copy, since
a transfer engine pays per copy (tens of microseconds each over TCP)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from radixserve.cache.pools import KVBuffer


class BufferSpec(msgspec.Struct, array_like=True, frozen=True):
    """One KV buffer as a peer sees it: its address, its slot size, its slot count."""

    data_ptr: int
    bytes_per_slot: int
    num_slots: int

    @classmethod
    def of(cls, buffer: KVBuffer) -> BufferSpec:
        return cls(buffer.data_ptr, buffer.bytes_per_slot, buffer.tensor.shape[0])

    @property
    def nbytes(self) -> int:
        return self.bytes_per_slot * self.num_slots


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
        if a.bytes_per_slot != b.bytes_per_slot:
            raise LayoutMismatch(f"buffer {k} has {a.bytes_per_slot} bytes a slot here and "
                                 f"{b.bytes_per_slot} at the peer (model, dtype or KV heads differ)")


def transfer_copies(src: Sequence[BufferSpec], src_slots: Sequence[int], dst: Sequence[BufferSpec],
                    dst_slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(source address, destination address, bytes) for every copy that moves these slots of
    every buffer."""
    check_layouts(src, dst)
    runs = slot_runs(src_slots, dst_slots)
    for s, d, n in runs:
        for a, b in zip(src, dst):
            if s < 0 or s + n > a.num_slots or d < 0 or d + n > b.num_slots:
                raise ValueError(f"slots {s}+{n} -> {d}+{n} lie outside the pools "
                                 f"({a.num_slots} and {b.num_slots} slots)")
    return [(a.data_ptr + s * a.bytes_per_slot, b.data_ptr + d * b.bytes_per_slot, n * a.bytes_per_slot)
            for a, b in zip(src, dst) for s, d, n in runs]
