"""take_output's pacing of a streaming request: the first token at once, then every stream_interval
tokens (the request's own, else the server's --stream-interval), the end always; never held back
while the detokenizer must search the text for stop strings."""

from __future__ import annotations

from radixserve.messages import GenerateReq
from radixserve.sampling_params import SamplingParams
from radixserve.scheduler.output import take_output
from radixserve.scheduler.req import Req


def reported_lengths(params: SamplingParams, server_interval: int, steps: int, stream: bool = True) -> list[int]:
    req = Req(GenerateReq("r", [1, 2, 3], params, stream=stream), eos_ids=set())
    seen = []
    for step in range(steps):
        req.output_ids.append(7)
        if step == steps - 1:
            req.finish_reason = {"type": "length", "length": steps}
        out = take_output(req, server_interval)
        if out is not None:
            seen.append(out.completion_tokens)
    return seen


def test_server_interval_paces_streams() -> None:
    assert reported_lengths(SamplingParams(), 1, 5) == [1, 2, 3, 4, 5]
    assert reported_lengths(SamplingParams(), 3, 8) == [1, 4, 7, 8]


def test_request_interval_wins() -> None:
    assert reported_lengths(SamplingParams(stream_interval=2), 5, 6) == [1, 3, 5, 6]
    assert reported_lengths(SamplingParams(stream_interval=1), 5, 3) == [1, 2, 3]


def test_text_stops_and_non_streaming_are_not_paced() -> None:
    assert reported_lengths(SamplingParams(stop=["x"]), 4, 4) == [1, 2, 3, 4]
    assert reported_lengths(SamplingParams(), 4, 6, stream=False) == [1, 6]
