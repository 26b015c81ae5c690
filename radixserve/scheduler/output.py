"""What a request takes from each sampled token, and what it sends on to the detokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.layers.logits import PromptLogprobs
from radixserve.layers.sampler import SamplerOutput
from radixserve.messages import ReqOutput
from radixserve.scheduler.req import Req


@dataclass
class SampledTokens:
    """One batch's sampled tokens (and logprobs) as Python lists, read off the host tensors once."""

    ids: list[int]
    logprobs: list[float] | None
    top_values: list[list[float]] | None
    top_ids: list[list[int]] | None

    @classmethod
    def of(cls, sampled: SamplerOutput) -> SampledTokens:
        top = sampled.top_logprobs
        lp = sampled.next_token_logprobs
        return cls(sampled.next_token_ids.tolist(), None if lp is None else lp.tolist(),
                   None if top is None else top[0].tolist(), None if top is None else top[1].tolist())


def append_token(req: Req, tokens: SampledTokens, i: int) -> None:
    """Give row i's token to req, then check its grammar and stop conditions."""
    token = tokens.ids[i]
    req.output_ids.append(token)
    if req.return_logprob and tokens.logprobs is not None:
        req.output_token_logprobs.append(tokens.logprobs[i])
        if req.top_logprobs_num > 0 and tokens.top_values is not None and tokens.top_ids is not None:
            k = req.top_logprobs_num
            req.output_top_logprobs.append(list(zip(tokens.top_values[i][:k], tokens.top_ids[i][:k])))
    if req.grammar is not None and not req.grammar.accept_token(token):
        if req.grammar.allows_nothing():
            # the bitmask allowed no token at all, so the sampler's pick was forced: the client's
            # grammar can match no text here, the client's error
            kind, done = req.params.grammar_spec().kind, len(req.output_ids) - 1  # the last is the forced one
            after = "at the start" if done == 0 else f"after {done} token{'s' if done > 1 else ''}"
            req.finish_reason = {"type": "abort", "status_code": 400,
                                 "message": f"the {kind} grammar allows no token {after}: it can match no text"}
            return
        # the bitmask forbids such tokens: reaching this is radixserve's bug, an internal error
        req.finish_reason = {"type": "abort", "message": f"token {token} violates the grammar", "status_code": 500}
        return
    req.check_finished()
    if req.grammar is not None and not req.finished and req.grammar.is_terminated():
        req.finish_reason = {"type": "stop", "matched": token}  # the grammar's end (EOS)


def record_prompt_logprobs(req: Req, entry: PromptLogprobs | None) -> None:
    """Append one prefill chunk's prompt logprobs (None: the chunk has no position to score, as a
    one-token prompt has none). The first prompt token has no logprob: None stands in for it."""
    if not req.input_token_logprobs and req.logprob_start_len == 0:
        req.input_token_logprobs.append(None)
        req.input_top_logprobs.append(None)
    if entry is None:
        return
    req.input_token_logprobs.extend(entry.token_logprobs)
    if req.top_logprobs_num > 0:
        k = req.top_logprobs_num
        for vals, ids in zip(entry.top_values, entry.top_ids):
            req.input_top_logprobs.append(list(zip(vals[:k], ids[:k])))


def take_output(req: Req, stream_interval: int = 1) -> ReqOutput | None:
    """What req has not sent yet, or None when it has nothing to report now. Non-streaming
    requests report only their first token (time-to-first-token metrics) and their end, unless
    the detokenizer must search their text for stops as it grows. Streaming ones report their
    first token, then every stream_interval tokens (the request's own, else the server's), and
    their end; every token while their text is searched for stops."""
    if not (req.stream or req.finished or len(req.output_ids) == 1 or req.has_text_stops):
        return None
    if req.stream and not req.finished and req.sent_ids > 0 and not req.has_text_stops:
        interval = req.params.stream_interval or stream_interval
        if len(req.output_ids) - req.sent_ids < interval:
            return None
    p = req.params
    out = ReqOutput(
        rid=req.rid, new_token_ids=req.output_ids[req.sent_ids :], finish_reason=req.finish_reason,
        prompt_tokens=len(req.origin_input_ids), completion_tokens=len(req.output_ids),
        cached_tokens=req.cached_tokens, skip_special_tokens=p.skip_special_tokens,
        spaces_between_special_tokens=p.spaces_between_special_tokens,
        stop_strings=list(p.stop or []), stop_regexes=list(p.stop_regex or []), stream=req.stream,
        no_stop_trim=p.no_stop_trim, min_new_tokens=p.min_new_tokens,
    )
    req.sent_ids = len(req.output_ids)
    if req.return_logprob:
        out.output_token_logprobs = req.output_token_logprobs[req.sent_output_logprobs :]
        out.output_top_logprobs = req.output_top_logprobs[req.sent_output_logprobs :]
        req.sent_output_logprobs = len(req.output_token_logprobs)
        if req.finished or req.prompt_logprobs_done:
            out.input_token_logprobs = req.input_token_logprobs[req.sent_input_logprobs :]
            out.input_top_logprobs = req.input_top_logprobs[req.sent_input_logprobs :]
            req.sent_input_logprobs = len(req.input_token_logprobs)
    return out
