"""Admission and prefill: owns the waiting queue (WAITING) and the request whose prompt is being
computed in chunks (PREFILLING); admits requests within the budgets and launches extend batches.
Requests whose prompt is done leave for the decode manager (DECODING) or finish."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from radixserve.scheduler.batch import build_extend_batch, record_sampled
from radixserve.scheduler.inflight import InFlightBatch
from radixserve.scheduler.kv import OutOfKVError
from radixserve.scheduler.output import record_prompt_logprobs
from radixserve.scheduler.policy import order_waiting
from radixserve.scheduler.prefill import PrefillPlan, PrefillPlanner
from radixserve.scheduler.state import ReqState, move

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.model_executor.model_runner import ModelRunner
    from radixserve.scheduler.req import Req
    from radixserve.scheduler.sampling import BatchSampler

logger = logging.getLogger("radixserve.scheduler")


@dataclass
class ExtendLaunch:
    """What one extend batch did: the batch in flight, and where its requests went."""

    inflight: InFlightBatch | None
    to_decode: list[Req] = field(default_factory=list)  # prompt done: decode from the next step
    finished: list[Req] = field(default_factory=list)  # prompt logprobs were all they asked, or an error


class PrefillManager:
    def __init__(self, runner: ModelRunner, cache: PrefixCache, sampler: BatchSampler, planner: PrefillPlanner,
                 schedule_policy: str, radix_enabled: bool) -> None:
        self.runner = runner
        self.cache = cache
        self.sampler = sampler
        self.planner = planner
        self.schedule_policy = schedule_policy
        self.radix_enabled = radix_enabled
        self.waiting: list[Req] = []
        self.chunked: Req | None = None  # PREFILLING, its next chunk goes first

    # ---- the queue ---------------------------------------------------------------------------
    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def requeue(self, retracted: list[Req]) -> None:
        """Retracted requests (already WAITING, tokens kept) go to the front."""
        self.waiting = retracted + self.waiting

    def take_aborted(self, hit: Callable[[Req], bool]) -> list[Req]:
        """Remove the waiting requests hit by an abort (the caller finishes them); a chunked one is
        marked, to be dropped before the next launch."""
        gone = [r for r in self.waiting if hit(r)]
        if gone:
            self.waiting = [r for r in self.waiting if not hit(r)]
        return gone

    def take_marked(self) -> Req | None:
        """The chunked request if an abort marked it (it leaves this manager)."""
        req = self.chunked
        if req is None or not req.to_abort:
            return None
        self.chunked = None
        return req

    @property
    def num_in_prefill(self) -> int:
        return int(self.chunked is not None)

    # ---- admission and launch -------------------------------------------------------------------
    def plan(self, running: list[Req], new_token_ratio: float) -> PrefillPlan | None:
        """Admit what the budgets allow (WAITING -> PREFILLING); None when nothing is to prefill."""
        waiting = order_waiting(self.waiting, self.schedule_policy, self.cache, self.radix_enabled)
        plan = self.planner.plan(waiting, running, self.chunked, new_token_ratio)
        if not plan.reqs:
            return None
        admitted = {id(r) for r in plan.reqs}
        self.waiting = [r for r in self.waiting if id(r) not in admitted]
        self.chunked = plan.chunked_req
        return plan

    def launch(self, reqs: list[Req]) -> ExtendLaunch:
        try:
            batch = build_extend_batch(reqs, self.runner, self.cache)
        except OutOfKVError as e:  # the planner's budget makes this a bug, but never hang on it
            logger.error("prefill could not get KV: %s", e)
            for r in reqs:
                r.finish_reason = {"type": "abort", "message": f"out of KV memory: {e}", "status_code": 503}
            self.chunked = None
            return ExtendLaunch(None, finished=list(reqs))
        prompt_top_k = max((r.top_logprobs_num for r in reqs if r.wants_prompt_logprobs), default=0)
        out = self.runner.forward(batch, prompt_top_k)
        # a chunk with more of its prompt to come samples no real token: no grammar for it
        sampled = self.sampler.sample(reqs, out.next_token_logits, [r is not self.chunked for r in reqs])
        record_sampled(self.runner, batch, sampled.next_token_ids)
        launch = ExtendLaunch(None)
        discarded: set[int] = set()
        chunks: list[tuple[Req, int]] = []
        for i, req in enumerate(reqs):
            req.kv_committed_len += req.extend_len
            if req.wants_prompt_logprobs:
                record_prompt_logprobs(req, out.prompt_logprobs.get(i))
            if req is self.chunked:  # more of its prompt to go: no token yet
                self.cache.cache_unfinished_req(req)
                discarded.add(id(req))
                chunks.append((req, req.kv_committed_len))
                continue
            if req.wants_prompt_logprobs:
                req.prompt_logprobs_done = True
            if req.max_new_tokens == 0:  # the prompt's logprobs were all it asked for
                req.finish_reason = {"type": "length", "length": 0}
                discarded.add(id(req))
                launch.finished.append(req)
                continue
            move(req, ReqState.DECODING)
            req.pending += 1  # it can decode before its first token reaches the host
            launch.to_decode.append(req)
        launch.inflight = InFlightBatch.start_copy(reqs, sampled, discarded)
        launch.inflight.chunks = chunks
        return launch
