"""A launched batch whose sampled tokens are still on their way to the host.

Overlap scheduling launches batch N+1 before it reads batch N's tokens: the launch starts the
device-to-host copies and records an event, and the scheduler waits on that event only when it
processes the batch, by which time the device is already busy with the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixserve.layers.sampler import SamplerOutput
from radixserve.scheduler.req import Req
from radixserve.utils.transfer import start_host_copy


@dataclass
class InFlightBatch:
    reqs: list[Req]
    sampled: SamplerOutput  # host tensors, valid once `ready` has completed
    ready: torch.cuda.Event | None  # None on the CPU, where the copies were synchronous
    # requests whose sampled token is dropped: a chunked prompt's non-final chunk
    discarded: set[int] = field(default_factory=set)  # ids of Req objects
    # (request, prompt tokens with KV) of each chunk computed whose prompt continues later
    chunks: list[tuple[Req, int]] = field(default_factory=list)

    @classmethod
    def start_copy(cls, reqs: list[Req], sampled: SamplerOutput, discarded: set[int] | None = None) -> InFlightBatch:
        top = sampled.top_logprobs
        host = SamplerOutput(
            next_token_ids=start_host_copy(sampled.next_token_ids),
            next_token_logprobs=start_host_copy(sampled.next_token_logprobs),
            top_logprobs=None if top is None else (start_host_copy(top[0]), start_host_copy(top[1])),
        )
        ready = None
        if sampled.next_token_ids.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return cls(reqs, host, ready, discarded or set())

    def wait(self) -> SamplerOutput:
        if self.ready is not None:
            self.ready.synchronize()
        return self.sampled
