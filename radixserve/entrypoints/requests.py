"""Normalize the generate() arguments (one prompt or many, token ids or text, n samples) into a
flat list of single requests."""

from __future__ import annotations

from typing import Any

from radixserve.entrypoints.tokenizer_manager import MAX_N, RequestError, SingleRequest, TokenizerManager


def _is_id_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def expand_requests(
    prompt: str | list[str] | None,
    input_ids: list[int] | list[list[int]] | None,
    sampling_params: dict | list[dict] | None,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    logprob_start_len: int | None = None,
    stream: bool = False,
    rid: str | list[str] | None = None,
) -> tuple[list[SingleRequest], bool]:
    """Returns the requests and whether the caller asked for one result (one prompt, n == 1)."""
    if (prompt is None) == (input_ids is None):
        raise RequestError("give exactly one of prompt (text) or input_ids")
    if prompt is not None:
        if isinstance(prompt, str):
            texts, single = [prompt], True
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            texts, single = list(prompt), False
        else:
            raise RequestError("prompt must be a string or a non-empty list of strings", "prompt")
        items: list[tuple[str | None, list[int] | None]] = [(t, None) for t in texts]
    else:
        if _is_id_list(input_ids):
            items, single = [(None, list(input_ids))], True
        elif isinstance(input_ids, list) and input_ids and all(_is_id_list(x) for x in input_ids):
            items, single = [(None, list(x)) for x in input_ids], False
        else:
            raise RequestError("input_ids must be a list of token ids or a list of such lists", "input_ids")
    if sampling_params is None or isinstance(sampling_params, dict):
        params_list = [dict(sampling_params or {}) for _ in items]
    elif isinstance(sampling_params, list) and len(sampling_params) == len(items):
        params_list = [dict(p or {}) for p in sampling_params]
    else:
        raise RequestError("sampling_params must be a dict, or a list with one dict per prompt", "sampling_params")
    if not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
        raise RequestError("top_logprobs_num must be an integer >= 0", "top_logprobs_num")
    rids = rid if isinstance(rid, list) else [rid] * len(items)
    if len(rids) != len(items):
        raise RequestError("rid must have one entry per prompt", "rid")

    reqs: list[SingleRequest] = []
    for (text, ids), params, base_rid in zip(items, params_list, rids):
        n = params.pop("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise RequestError(f"n must be an integer in [1, {MAX_N}], got {n!r}", "n")
        base_rid = base_rid or TokenizerManager.new_rid()
        seed = params.get("seed")
        seeded = n > 1 and isinstance(seed, int) and not isinstance(seed, bool)  # else validation says why
        for i in range(n):
            # samples share one params dict (validated once) unless each needs its own seed
            p = {**params, "seed": seed + i} if seeded else params  # distinct yet reproducible
            reqs.append(SingleRequest(
                rid=base_rid if n == 1 else f"{base_rid}-{i}", text=text, input_ids=ids, sampling_params=p,
                return_logprob=bool(return_logprob), top_logprobs_num=top_logprobs_num,
                logprob_start_len=-1 if logprob_start_len is None else logprob_start_len, stream=stream,
            ))
        single = single and n == 1
    return reqs, single
