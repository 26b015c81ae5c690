"""Turn a tokenized request into a scheduler request (WAITING), or refuse it.

The API process checks all of this first; these checks guard the scheduler against any other sender.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.constrained import GrammarError
from radixserve.messages import TokenizedGenerateReq
from radixserve.request_limits import RequestLimits
from radixserve.scheduler.req import Req
from radixserve.scheduler.sampling import BatchSampler


class Rejected(Exception):
    def __init__(self, message: str, prompt_tokens: int) -> None:
        super().__init__(message)
        self.message = message
        self.prompt_tokens = prompt_tokens


@dataclass
class RequestIntake:
    limits: RequestLimits
    vocab_size: int
    eos_ids: set[int]
    tokenizer: object | None
    sampler: BatchSampler  # builds the request's grammar

    def build(self, msg: TokenizedGenerateReq) -> Req:
        n = len(msg.input_ids)
        params = msg.sampling_params  # checked as the message was decoded
        if n == 0:
            raise Rejected("the prompt is empty", 0)
        if any(not 0 <= t < self.vocab_size for t in msg.input_ids):
            raise Rejected(f"input_ids must be in [0, {self.vocab_size})", n)
        problem = self.limits.check(n, params.max_new_tokens)
        if problem is not None:
            raise Rejected(problem[0], n)
        if self.tokenizer is None and (params.stop or params.stop_regex or params.grammar_spec() is not None):
            raise Rejected("stop strings and structured output need a tokenizer; this model has none", n)
        try:
            grammar = self.sampler.new_grammar(params)
        except GrammarError as e:
            raise Rejected(str(e), n) from None
        return Req(
            rid=msg.rid, origin_input_ids=list(msg.input_ids), params=params, eos_ids=self.eos_ids,
            grammar=grammar,
            return_logprob=msg.return_logprob, top_logprobs_num=msg.top_logprobs_num,
            logprob_start_len=msg.logprob_start_len, stream=msg.stream,
            max_new_tokens=self.limits.max_new_tokens(n, params.max_new_tokens),
        )
