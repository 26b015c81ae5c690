"""Map the generate() arguments (one prompt or many, token ids or text, n samples), as the native
body, the OpenAI bodies and the Engine give them, onto a flat list of GenerateReq: one per prompt and
sample, each with its sampling params parsed (once per dict the caller sent)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from radixserve.entrypoints.request_errors import RequestError
from radixserve.messages import GenerateReq
from radixserve.sampling_params import SamplingParams, SamplingParamsError, wrap_int64

MAX_N = 128  # samples per prompt: OpenAI's limit


def new_rid() -> str:
    return uuid.uuid4().hex


def _is_id_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def expand_requests(
    prompt: str | list[str] | None,
    input_ids: list[int] | list[list[int]] | None,
    sampling_params: dict | list[dict] | None,
    return_logprob: bool | list[bool] = False,
    top_logprobs_num: int | list[int] = 0,
    logprob_start_len: int | None | list[int | None] = None,
    stream: bool = False,
    rid: str | list[str] | None = None,
    bootstrap: Bootstrap | None = None,
) -> tuple[list[GenerateReq], bool]:
    """Returns the requests and whether the caller asked for one result (one prompt, n == 1). The
    logprob options are one value for every prompt or (SGLang's) a list with one per prompt; one rid
    for a batch names its prompts rid_0, rid_1, ... (SGLang's)."""
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
        parsed = [parse_sampling_params(sampling_params)] * len(items)  # one parse, shared
    elif isinstance(sampling_params, list) and len(sampling_params) == len(items):
        parsed = [parse_sampling_params(p) for p in sampling_params]
    else:
        raise RequestError("sampling_params must be a dict, or a list with one dict per prompt", "sampling_params")
    want_logprobs = _per_prompt("return_logprob", return_logprob, len(items))
    top_nums = _per_prompt("top_logprobs_num", top_logprobs_num, len(items))
    starts = _per_prompt("logprob_start_len", logprob_start_len, len(items))
    for top in top_nums:
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise RequestError("top_logprobs_num must be an integer >= 0", "top_logprobs_num")
    if isinstance(rid, list):
        rids = rid
    elif rid is not None and not single:
        rids = [f"{rid}_{k}" for k in range(len(items))]
    else:
        rids = [rid] * len(items)
    if len(rids) != len(items):
        raise RequestError("rid must have one entry per prompt", "rid")

    if bootstrap is not None:
        bootstrap.check()
    reqs: list[GenerateReq] = []
    total = sum(n for n, _ in parsed)
    for k, ((text, ids), (n, params), base_rid) in enumerate(zip(items, parsed, rids)):
        base_rid = base_rid or new_rid()
        logprob = bool(want_logprobs[k])
        # any negative start is -1, no prompt logprobs (a huge one would not fit the message's int)
        start = -1 if starts[k] is None or not logprob or starts[k] < 0 else starts[k]
        for i in range(n):
            # samples share one parsed params unless each needs its own seed: distinct yet reproducible
            # (wrapped, so that a seed near 2**63 stays the 64-bit integer the scheduler's check wants)
            p = (msgspec.structs.replace(params, seed=wrap_int64(params.seed + i))
                 if n > 1 and params.seed is not None else params)
            reqs.append(GenerateReq(
                rid=base_rid if n == 1 else f"{base_rid}-{i}", input_ids=ids if ids is not None else [],
                sampling_params=p, text=text, return_logprob=logprob,
                top_logprobs_num=top_nums[k], logprob_start_len=start, stream=stream,
            ))
            if bootstrap is not None:
                bootstrap.apply(reqs[-1], k, i, len(reqs) - 1, len(items), total)
        single = single and n == 1
    return reqs, single


def _per_prompt(name: str, value: Any, count: int) -> list[Any]:
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise RequestError(f"{name} must be one value, or a list with one entry per prompt ({count}); "
                           f"got {len(value)}", name)
    return value


def parse_sampling_params(params: Any) -> tuple[int, SamplingParams]:
    """n (samples of the prompt) and the sampling params of one params dict (None: the defaults)."""
    if params is not None and not isinstance(params, dict):
        raise RequestError(f"sampling_params must be an object, got {type(params).__name__}", "sampling_params")
    params = dict(params or {})
    n = params.pop("n", None)
    n = 1 if n is None else n  # null: the default, as for every sampling parameter
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise RequestError(f"n must be an integer in [1, {MAX_N}], got {n!r}", "n")
    try:
        return n, SamplingParams.from_dict(params)
    except SamplingParamsError as e:
        raise RequestError(str(e), e.param) from None


ROOM_LIMIT = 1 << 63  # bootstrap rooms are 63-bit (SGLang's router draws them below 2**63)


@dataclass
class Bootstrap:
    """Where a PD decode server finds a request's prefill (SGLang's bootstrap_host, bootstrap_port and
    bootstrap_room, as a PD router adds them). Each is one value, or a list with one entry per prompt
    (a batch) or per sample (chat with n > 1). A room given once for several requests names the first;
    the others take the rooms after it, which both servers derive alike."""

    host: str | list[str] | None = None
    port: int | None | list[int | None] = None
    room: int | list[int] | None = None

    def apply(self, req: GenerateReq, item: int, sample: int, flat: int, items: int, total: int) -> None:
        req.bootstrap_host = self._pick("bootstrap_host", self.host, item, flat, items, total)
        req.bootstrap_port = self._pick("bootstrap_port", self.port, item, flat, items, total)
        room = self.room
        if isinstance(room, list):
            picked = self._pick("bootstrap_room", room, item, flat, items, total)
            req.bootstrap_room = None if picked is None else (picked + (0 if len(room) == total else sample)) % ROOM_LIMIT
        elif room is not None:
            req.bootstrap_room = (room + flat) % ROOM_LIMIT

    @staticmethod
    def _pick(name: str, value, item: int, flat: int, items: int, total: int):
        if not isinstance(value, list):
            return value
        if len(value) == total:
            return value[flat]
        if len(value) == items:
            return value[item]
        raise RequestError(f"{name} must be one value, or a list with one entry per prompt ({items}) or per "
                           f"sample ({total}); got {len(value)}", name)

    def check(self) -> None:
        for room in self.room if isinstance(self.room, list) else [self.room]:
            if room is not None and not 0 <= room < ROOM_LIMIT:
                raise RequestError(f"bootstrap_room must be in [0, 2**63), got {room}", "bootstrap_room")
        for port in self.port if isinstance(self.port, list) else [self.port]:
            if port is not None and not 0 < port < 65536:
                raise RequestError(f"bootstrap_port must be a port number, got {port}", "bootstrap_port")
