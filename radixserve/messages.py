"""The typed messages between processes. They cross sockets as MessagePack (ipc_codec.py), each tagged
with its class name and decoded against these types: never pickled, so a message from another host
can be no more than data."""

from __future__ import annotations

from typing import Any

import msgspec

from radixserve.sampling_params import SamplingParams


class Message(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    """Base of every message: the tag (the class name) says which type a payload decodes to."""


class GenerateReq(Message):
    """One request (one prompt, one sample): its fields are declared here alone. The API bodies and
    the Engine's arguments map onto it (entrypoints/requests.py), the API process validates and
    tokenizes it (entrypoints/validation.py), and this same struct is the message the scheduler
    receives and keeps (scheduler/req.py)."""

    rid: str
    input_ids: list[int]  # the prompt's token ids (empty while it is still text)
    sampling_params: SamplingParams  # parsed once, from the body; its checks run again on decode
    text: str | None = None  # the prompt as text, until tokenized (then None: text is not sent on)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # -1: no prompt logprobs
    stream: bool = False
    # PD disaggregation (later issue): where the decode peer finds this request's KV.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


class GenerateBatch(Message):
    """The requests of one API call (a prompt list, n samples), sent as one message: a call with
    many requests costs one send, not one each."""

    reqs: list[GenerateReq]


class AbortReq(Message):
    """Abort these requests (abort_all: every request). A status code marks an abort the server
    decided (shutdown timeout: 503), which the API reports as an error; without one (an operator's
    /abort_request) the request ends with finish_reason abort."""

    rids: list[str] = msgspec.field(default_factory=list)
    abort_all: bool = False
    message: str = "aborted"
    status_code: int | None = None


class FlushCacheReq(Message):
    pass


class FlushCacheReply(Message):
    success: bool
    message: str = ""


class GetStateReq(Message):
    pass


class ProfileReq(Message):
    """Start (start=True) or stop the torch profiler in every scheduler process (/start_profile,
    /stop_profile; SGLang's ProfileReq). The options are a start's; None takes the default
    (scheduler/profiler.py)."""

    start: bool
    profile_id: str = ""  # time-based, one for every rank of a start: it names the trace files
    output_dir: str | None = None
    num_steps: int | None = None  # stop after this many steps that ran a batch; None: at /stop_profile
    activities: list[str] | None = None  # "CPU", "GPU"
    with_stack: bool | None = None
    record_shapes: bool | None = None
    profile_prefix: str | None = None


class ProfileReply(Message):
    success: bool
    message: str = ""


class SchedulerState(Message):
    """Pool and queue counts, for /get_server_info, /get_load and tests that assert no leaks."""

    kv_total: int
    kv_available: int
    kv_evictable: int
    kv_protected: int
    req_rows_total: int
    req_rows_available: int
    num_running: int
    num_waiting: int
    new_token_ratio: float
    num_retractions: int
    gen_throughput: float = 0.0
    num_tokens: int = 0  # tokens held by running requests
    overlapped_launches: int = 0  # batches launched while the previous one's tokens were unread
    dp_rank: int = 0
    pd: PDStats | None = None  # a PD server's queues and transfers
    per_dp: list[SchedulerState] = msgspec.field(default_factory=list)  # filled by the DP controller


class LoadReport(Message):
    """A scheduler's load, sent to the DP controller whenever it changes."""

    dp_rank: int
    num_reqs: int  # running + waiting
    num_waiting: int
    outstanding_tokens: int  # prompt + tokens still to generate, over its requests
    received: int = 0  # requests received in all (lets the controller count those still in transit)


class ReqOutput(Message):
    """One step's news for one request, on its way scheduler -> detokenizer -> API."""

    rid: str
    new_token_ids: list[int]
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # decode options the detokenizer needs (sent every time: requests are stateless there)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stop_strings: list[str] = msgspec.field(default_factory=list)  # searched for by the detokenizer
    stop_regexes: list[str] = msgspec.field(default_factory=list)
    stream: bool = False  # the text of a non-streaming request may wait for its end
    no_stop_trim: bool = False
    min_new_tokens: int = 0  # stops may not end in the text of the tokens before the min_new_tokens-th
    # logprobs: increments since the last message
    output_token_logprobs: list[float] = msgspec.field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = msgspec.field(default_factory=list)
    input_token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = msgspec.field(default_factory=list)
    input_token_ids: list[int] = msgspec.field(default_factory=list)
    text: str = ""  # filled by the detokenizer
    # set by the detokenizer when a stop in the text ended the request while the scheduler still
    # runs it: the scheduler is told to stop it, and its release follows in BatchOut.released
    scheduler_holds: bool = False


class BatchOut(Message):
    outputs: list[ReqOutput]
    released: list[str] = msgspec.field(default_factory=list)  # see ReqOutput.scheduler_holds


class PeerRank(Message):
    """One TP rank of a PD server as its peer writes to or reads from it: its transfer engine and
    its KV buffers, [data_ptr, bytes_per_slot, num_slots, head_start, num_heads] each."""

    session_id: str
    layout: list[list[int]]


class KVDestination(Message):
    """Decode server -> prefill server: where the prompt of the request in `room` goes (the same
    slots on every decode rank)."""

    room: int
    notify: str  # the decode side's ZMQ endpoint for the KVDone
    slots: list[int]  # one per prompt token, in order
    ranks: list[PeerRank]  # the decode server's TP ranks


class KVDone(Message):
    """Prefill server -> decode server: the KV of `room` has landed (ok), or will not (message)."""

    room: int
    ok: bool
    first_token: int = 0  # sampled by the prefill server
    first_logprob: float | None = None
    first_top_logprobs: list[tuple[float, int]] = msgspec.field(default_factory=list)
    cached_tokens: int = 0
    message: str = ""


class KVCancel(Message):
    """Decode server -> prefill server: the request in `room` was aborted here; write nothing more
    into its slots and answer with a KVDone (ok=False) unless one is already on its way."""

    room: int
    notify: str  # where the answering KVDone goes


class PDDecision(Message):
    """A PD server's rank 0 -> every rank of it (with the requests, in the same broadcast): what
    rank 0 decided from clocks, threads and sockets, for all ranks to apply at the same step.
    kind: "expire" (prefill: these rooms waited past the bootstrap timeout), "claim" (decode:
    reserve KV for these rooms, in order, while it lasts), "fail" (decode: end these rooms'
    requests with `message`)."""

    kind: str
    rooms: list[int]
    message: str = ""


class PDStats(Message):
    """A PD server's queues and transfers (cumulative), for /metrics and the logs."""

    role: str  # "prefill" or "decode"
    num_bootstrap: int = 0  # prefill: waiting for their decode server's destination
    num_inflight: int = 0  # prefill: KV on its way to the decode server
    num_prealloc: int = 0  # decode: waiting for KV room or the prefill server's info
    num_transfer: int = 0  # decode: waiting for their prompt's KV
    transfers: int = 0  # prefill: KV writes done; decode: prompts received
    failures: int = 0
    bytes: int = 0  # prefill: bytes written
    chunk_writes: int = 0  # prefill: writes of a chunk's KV started before the prompt's prefill finished
    # prefill: seconds from the prompt's prefill finishing to its last KV written; decode: seconds from sending a destination to the KV landing.
    # Counts per bucket (bounds in metrics.LATENCY_BUCKETS, +Inf last), not cumulative.
    latency_counts: list[int] = msgspec.field(default_factory=list)
    latency_sum: float = 0.0


def to_dict(value: Any) -> Any:
    """A message's fields as plain data, nested messages included, without the tag (for JSON)."""
    if isinstance(value, msgspec.Struct):
        return {name: to_dict(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, list):
        return [to_dict(v) for v in value]
    return value


# every message a socket may carry: what a payload is decoded against
MESSAGE_TYPES = (GenerateReq, GenerateBatch, AbortReq, FlushCacheReq, FlushCacheReply, GetStateReq,
                 SchedulerState, LoadReport, ReqOutput, BatchOut, KVDestination, KVDone, KVCancel, PDStats,
                 PeerRank, PDDecision, ProfileReq, ProfileReply)
