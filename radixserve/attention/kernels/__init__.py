"""Triton kernels for attention over the paged KV pool (imports triton; load only where it is used)."""

from __future__ import annotations

from radixserve.attention.kernels.decode_attention import (
    DecodeWorkspace,
    decode_attention,
    fill_num_splits,
    plan_max_splits,
)
from radixserve.attention.kernels.extend_attention import _extend_kernel, extend_attention
from radixserve.attention.kernels.mla_decode import mla_decode, plan_mla_splits
from radixserve.attention.kernels.mla_extend import mla_extend


def built_for_interpreter() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (decided once, at import)."""
    return type(_extend_kernel).__name__ == "InterpretedFunction"


__all__ = [
    "DecodeWorkspace",
    "built_for_interpreter",
    "decode_attention",
    "extend_attention",
    "fill_num_splits",
    "mla_decode",
    "mla_extend",
    "plan_max_splits",
    "plan_mla_splits",
]
