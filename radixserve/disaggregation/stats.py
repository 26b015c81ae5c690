"""Counts of a PD server's KV transfers, kept by the scheduler and reported in SchedulerState.pd."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# upper bounds (seconds) of the transfer latency histogram; the last bucket is +Inf
TRANSFER_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class TransferCounts:
    transfers: int = 0
    failures: int = 0
    bytes: int = 0
    chunk_writes: int = 0  # writes started before the prompt's prefill finished (a chunk's KV)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(TRANSFER_BUCKETS) + 1))
    latency_sum: float = 0.0

    def done(self, seconds: float, nbytes: int = 0) -> None:
        self.transfers += 1
        self.bytes += nbytes
        self.latency_sum += seconds
        self.latency_counts[bisect.bisect_left(TRANSFER_BUCKETS, seconds)] += 1

    def failed(self) -> None:
        self.failures += 1
