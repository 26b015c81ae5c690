"""Sample a batch's next tokens: grammar masks first, then the sampler, the same on every TP rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixserve.constrained import GrammarBackend, allocate_bitmask, apply_bitmask
from radixserve.distributed.parallel_state import tp_broadcast_tensor
from radixserve.layers.sampler import Sampler, SamplerOutput
from radixserve.sampling_batch import SamplingBatch, derive_step_seed

if TYPE_CHECKING:
    from radixserve.constrained.grammar import GrammarMatcher
    from radixserve.sampling_params import SamplingParams
    from radixserve.scheduler.req import Req


class BatchSampler:
    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int], device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device = device
        self.sampler = Sampler()
        self.grammar_backend: GrammarBackend | None = None  # built on the first structured request

    def new_grammar(self, params: SamplingParams) -> GrammarMatcher | None:
        spec = params.grammar_spec()
        if spec is None:
            return None
        if self.grammar_backend is None:
            # no free whitespace in JSON (json.dumps spacing only): small models otherwise pad it to the limit
            self.grammar_backend = GrammarBackend(self.tokenizer, self.vocab_size, sorted(self.eos_ids),
                                                  any_whitespace=False)
        return self.grammar_backend.new_matcher(spec)  # compiled once per distinct schema (LRU)

    def sample(self, reqs: list[Req], logits: torch.Tensor, masked: list[bool]) -> SamplerOutput:
        """masked[i]: row i's grammar constrains this token (not for a prompt chunk with more to come)."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and masked[i]]
        if rows:  # structured output: tokens the grammar forbids get -inf before sampling
            bitmask = allocate_bitmask(len(reqs), self.vocab_size)
            for i in rows:
                reqs[i].grammar.fill_bitmask(bitmask, i)
            apply_bitmask(logits, bitmask, rows)
        seeds = [
            None if r.params.seed is None else derive_step_seed(r.params.seed, r.num_generated)
            for r in reqs
        ]
        batch = SamplingBatch.build(
            [r.params for r in reqs], [r.output_ids for r in reqs], [r.origin_input_ids for r in reqs],
            [[] if r.params.ignore_eos else sorted(r.eos_ids) for r in reqs], seeds,
            self.vocab_size, self.device,
        )
        want_logprob = any(r.return_logprob for r in reqs)
        top_k = max((r.top_logprobs_num for r in reqs if r.return_logprob), default=0)
        out = self.sampler(logits, batch, want_logprob, top_k)
        tp_broadcast_tensor(out.next_token_ids)  # ranks sample alike, but must never diverge
        return out
