"""A request as the scheduler sees it: its tokens, its KV bookkeeping and its state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from radixserve.messages import GenerateReq
from radixserve.sampling_params import SamplingParams
from radixserve.scheduler.state import ReqState


@dataclass(eq=False)
class Req:
    msg: GenerateReq  # the request as it arrived: rid, prompt, sampling params, options (read-only)
    eos_ids: set[int]
    grammar: Any = None  # a constrained.GrammarMatcher for structured output
    max_new_tokens: int = 0  # resolved against the context length and the KV pool

    output_ids: list[int] = field(default_factory=list)
    # Tokens sampled on the device whose values the host has not read yet (overlap scheduling: the
    # next batch is launched before the last one's results are processed). 0 or 1 between steps.
    pending: int = 0
    state: ReqState = ReqState.WAITING  # changed only by state.move
    finish_reason: dict[str, Any] | None = None
    # KV bookkeeping, shared with the prefix cache
    req_pool_idx: int | None = None
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: Any = None
    kv_committed_len: int = 0
    # host copy of the slot at position last_slot_pos (the newest one allocated), so that continuing
    # a partly filled page (--page-size > 1) needs no read of req_to_token on the device
    last_slot: int = 0
    last_slot_pos: int = -1
    # this pass: how many tokens of fill_ids are computed now
    extend_len: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    admitted_once: bool = False
    # outputs not yet sent
    sent_ids: int = 0
    output_token_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_token_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    prompt_logprobs_done: bool = False
    sent_output_logprobs: int = 0
    sent_input_logprobs: int = 0
    to_abort: bool = False
    abort_reason: dict[str, Any] | None = None  # the finish_reason an abort gives it

    # the message's fields under the names the scheduler uses
    @property
    def rid(self) -> str:
        return self.msg.rid

    @property
    def origin_input_ids(self) -> list[int]:
        return self.msg.input_ids

    @property
    def params(self) -> SamplingParams:
        return self.msg.sampling_params

    @property
    def return_logprob(self) -> bool:
        return self.msg.return_logprob

    @property
    def top_logprobs_num(self) -> int:
        return self.msg.top_logprobs_num

    @property
    def logprob_start_len(self) -> int:
        return self.msg.logprob_start_len

    @property
    def stream(self) -> bool:
        return self.msg.stream

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + self.num_generated

    @property
    def num_generated(self) -> int:
        """Output tokens sampled so far, counting those still on the device."""
        return len(self.output_ids) + self.pending

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and 0 <= self.logprob_start_len < len(self.origin_input_ids)

    @property
    def needs_host_tokens(self) -> bool:
        """Sampling this request reads its generated tokens on the host (grammar, penalties, the
        min_new_tokens EOS block), so its next batch waits until they are all there."""
        p = self.params
        return (self.grammar is not None or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
                or p.repetition_penalty != 1.0 or p.min_new_tokens > 0)

    def remaining_new_tokens(self) -> int:
        return max(0, self.max_new_tokens - self.num_generated)

    @property
    def has_text_stops(self) -> bool:
        """Stop strings or regexes: the detokenizer, which has the text, finds them and tells us."""
        return bool(self.params.stop or self.params.stop_regex)

    def check_finished(self) -> None:
        """Called after a token is appended: the token-level stops (EOS, stop_token_ids, the output
        budget); min_new_tokens holds off the first two."""
        if self.finished or not self.output_ids:
            return
        last = self.output_ids[-1]
        n_out = len(self.output_ids)
        if n_out >= self.params.min_new_tokens:
            if not self.params.ignore_eos and last in self.eos_ids:
                self.finish_reason = {"type": "stop", "matched": last}
                return
            if self.params.stop_token_ids and last in self.params.stop_token_ids:
                self.finish_reason = {"type": "stop", "matched": last}
                return
        if n_out >= self.max_new_tokens:
            self.finish_reason = {"type": "length", "length": n_out}
