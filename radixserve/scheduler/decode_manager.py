"""Decode: owns the running requests (DECODING), launches one decode step for all of them, and
retracts requests back to the waiting queue when the KV pool cannot hold the next step. Keeps the
new-token ratio, admission's estimate of how much of its output budget a request will use."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radixserve.scheduler.batch import build_decode_batch, record_sampled
from radixserve.scheduler.decode import decode_tokens_needed, retract_for_decode
from radixserve.scheduler.inflight import InFlightBatch
from radixserve.scheduler.kv import OutOfKVError
from radixserve.scheduler.state import ReqState, move

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.scheduler.req import Req
    from radixserve.scheduler.sampling import BatchSampler

logger = logging.getLogger("radixserve.scheduler")

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001
RETRACT_DECODE_STEPS = 20


@dataclass
class DecodeLaunch:
    inflight: InFlightBatch | None
    retracted: list[Req] = field(default_factory=list)  # now WAITING, for the prefill manager's queue
    finished: list[Req] = field(default_factory=list)  # out of KV even alone


class DecodeManager:
    def __init__(self, runner: ModelRunner, cache: PrefixCache, sampler: BatchSampler, log_interval: int) -> None:
        self.runner = runner
        self.cache = cache
        self.sampler = sampler
        self.page_size = runner.pools.page_size
        self.running: list[Req] = []
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self.log_interval = log_interval
        self.decode_steps = 0
        self.last_log_time = time.perf_counter()
        self.tokens_since_log = 0
        self.last_gen_throughput = 0.0

    def add(self, reqs: list[Req]) -> None:
        self.running.extend(reqs)

    def remove(self, reqs: list[Req]) -> None:
        if reqs:
            gone = {id(r) for r in reqs}
            self.running = [r for r in self.running if id(r) not in gone]

    def take_marked(self) -> list[Req]:
        """The running requests an abort marked (they leave this manager)."""
        gone = [r for r in self.running if r.to_abort]
        if gone:
            self.running = [r for r in self.running if not r.to_abort]
        return gone

    def needs_resolved_state(self) -> bool:
        """Whether the next launch must see the in-flight tokens first: sampling that reads a
        request's tokens (grammar, penalties, min_new_tokens), or a decode that may retract."""
        if any(r.needs_host_tokens for r in self.running):
            return True
        free = self.runner.pools.allocator.available_size() + self.cache.evictable_size()
        return decode_tokens_needed(self.running, self.page_size) > free

    def launch(self) -> DecodeLaunch:
        launch = DecodeLaunch(None, retracted=self._retract())
        # a request whose pending token is its last (max_new_tokens) needs no further step
        reqs = [r for r in self.running if r.num_generated < r.max_new_tokens]
        if not reqs:
            return launch
        try:
            batch = build_decode_batch(reqs, self.runner, self.cache)
        except OutOfKVError as e:
            # only one request is left and even it does not fit: fail it rather than spin
            for r in reqs:
                if r.kv_committed_len < r.seq_len - 1 or r.req_pool_idx is None:
                    continue
                r.finish_reason = {"type": "abort", "message": f"out of KV memory: {e}", "status_code": 503}
            launch.finished = [r for r in reqs if r.finished]
            self.running = [r for r in self.running if not r.finished]
            return launch
        out = self.runner.forward(batch)
        sampled = self.sampler.sample(reqs, out.next_token_logits, [True] * len(reqs))
        record_sampled(self.runner, batch, sampled.next_token_ids)
        for req in reqs:
            req.kv_committed_len += 1
            req.pending += 1
        self.decode_steps += 1
        self.tokens_since_log += len(reqs)
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        launch.inflight = InFlightBatch.start_copy(reqs, sampled)
        return launch

    def _retract(self) -> list[Req]:
        retracted = retract_for_decode(self.running, self.runner.pools, self.cache)
        if not retracted:
            return retracted
        for req in retracted:
            move(req, ReqState.WAITING)
        self.num_retractions += len(retracted)
        decoded = sum(len(r.output_ids) for r in self.running)
        max_new = sum(r.max_new_tokens for r in self.running) or 1
        estimate = (decoded + RETRACT_DECODE_STEPS * len(self.running)) / max_new
        self.new_token_ratio = min(1.0, max(self.new_token_ratio, estimate))
        logger.info("KV cache is full: retracted %d requests; #new_token_ratio: %.4f",
                    len(retracted), self.new_token_ratio)
        return retracted

    def log_due(self) -> bool:
        return self.decode_steps % self.log_interval == 0

    def gen_throughput(self) -> float:
        """Tokens per second since the last call (the decode log's figure)."""
        now = time.perf_counter()
        self.last_gen_throughput = self.tokens_since_log / max(now - self.last_log_time, 1e-9)
        self.last_log_time, self.tokens_since_log = now, 0
        return self.last_gen_throughput
