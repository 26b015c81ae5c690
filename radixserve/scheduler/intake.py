"""Turn a request message into a scheduler request (WAITING), or refuse it.

The API process has validated it (entrypoints/validation.py); what is left is what only the
scheduler can do: compile its grammar and resolve its output budget against the KV pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.constrained import GrammarError
from radixserve.messages import GenerateReq
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
    eos_ids: set[int]
    sampler: BatchSampler  # builds the request's grammar

    def build(self, msg: GenerateReq) -> Req:
        n = len(msg.input_ids)
        params = msg.sampling_params
        try:
            grammar = self.sampler.new_grammar(params)
        except GrammarError as e:
            raise Rejected(str(e), n) from None
        return Req(msg, eos_ids=self.eos_ids, grammar=grammar,
                   max_new_tokens=self.limits.max_new_tokens(n, params.max_new_tokens))
