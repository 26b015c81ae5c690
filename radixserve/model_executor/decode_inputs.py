"""A decode step's device inputs, from what the host knows of each request: its request-table row,
its length after this step, and the KV slot of its new token.

Every way of building them ends in the same two device ops (`write_decode_inputs`): the new slot goes
into the request table at position seq_len - 1, and each row's input token is read from
`MemoryPools.last_token`, where the previous batch's sampler left it (the host may not have it yet).

- Eager (`eager_decode_batch`): one host-to-device copy of the four rows, then those two ops.
- CUDA graphs (`CudaGraphRunner.stage_decode`): the host copies the rows, padded to the graph's
  bucket, straight into that graph's static input block, and the two ops were captured inside the
  graph. A step then costs the host one copy and one graph launch, which matters most at batch 1,
  where the GPU otherwise idles while the host issues a dozen small ops before every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from radixserve.utils.transfer import upload_int64

if TYPE_CHECKING:
    from radixserve.model_executor.model_runner import ModelRunner


def write_decode_inputs(table: torch.Tensor, last_token: torch.Tensor, rows: torch.Tensor,
                        positions: torch.Tensor, slots: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Device ops only (capturable): record each new slot in the request table, gather the inputs."""
    table[rows, positions] = slots
    torch.index_select(last_token, 0, rows, out=input_ids)


def eager_decode_batch(runner: ModelRunner, rows: list[int], seq_lens: list[int], slots: list[int]) -> ForwardBatch:
    dev_rows, positions, dev_seq_lens, dev_slots = upload_int64(
        [rows, [n - 1 for n in seq_lens], seq_lens, slots], runner.device
    )
    table = runner.pools.req_to_token.req_to_token
    input_ids = torch.empty_like(dev_rows)
    write_decode_inputs(table, runner.pools.last_token, dev_rows, positions, dev_slots, input_ids)
    return ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=input_ids, positions=positions, req_pool_indices=dev_rows,
        seq_lens=dev_seq_lens, seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64), out_cache_loc=dev_slots,
        req_to_token=table, kv_pool=runner.pools.kv, attn_backend=runner.attn_backend,
    )
