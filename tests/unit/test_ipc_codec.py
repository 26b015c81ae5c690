"""Messages cross sockets as tagged MessagePack: every type round-trips with its field types (tuples
stay tuples), and a payload that is not a message, a pickle above all, is refused without running."""

from __future__ import annotations

import os
import pickle

import pytest

from radixserve import ipc_codec
from radixserve.messages import (
    MESSAGE_TYPES,
    AbortReq,
    BatchOut,
    FlushCacheReply,
    FlushCacheReq,
    GenerateBatch,
    GenerateReq,
    GetStateReq,
    KVCancel,
    KVDestination,
    KVDone,
    LoadReport,
    PDDecision,
    PDStats,
    PeerRank,
    ProfileReply,
    ProfileReq,
    ReqOutput,
    SchedulerState,
    to_dict,
)
from radixserve.sampling_params import SamplingParams

STATE = SchedulerState(100, 90, 5, 1, 8, 7, 1, 0, 0.7, 2, gen_throughput=12.5, num_tokens=33)
SAMPLES = [
    GenerateReq("r1", [1, 2, 3], SamplingParams(temperature=0.0, logit_bias={"7": -100}, stop="\n"),
                         return_logprob=True, top_logprobs_num=2, logprob_start_len=0, stream=True,
                         bootstrap_host="10.0.0.2", bootstrap_port=8998, bootstrap_room=12345),
    GenerateBatch([GenerateReq(f"r{i}", [i], SamplingParams(seed=i)) for i in range(3)]),
    AbortReq(["a", "b"], message="gone", status_code=503),
    AbortReq(abort_all=True),
    FlushCacheReq(),
    FlushCacheReply(False, "busy"),
    GetStateReq(),
    SchedulerState(**{**to_dict(STATE), "per_dp": [STATE, STATE]}),
    LoadReport(1, 4, 2, 900, received=10),
    ProfileReq(True, profile_id="1733412345.25", output_dir="/tmp/t", num_steps=5, activities=["CPU", "GPU"],
               with_stack=False, profile_prefix="run"),
    ProfileReq(False),
    ProfileReply(False, "no profile is running"),
    KVDestination((1 << 63) - 1, "tcp://10.0.0.3:40001", [9, 10, 11],
                  [PeerRank("10.0.0.3:15001", [[1 << 40, 256, 4096, 0, 2]]), PeerRank("10.0.0.3:15002", [])]),
    PeerRank("10.0.0.5:15001", [[1 << 41, 128, 8192, 1, 1]]),
    PDDecision("fail", [3, 4], "prefill server gone"),
    KVDone(5, True, first_token=42, first_logprob=-0.25, first_top_logprobs=[(-0.25, 42)], cached_tokens=3),
    KVCancel(6, "tcp://10.0.0.4:40002"),
    PDStats("prefill", num_bootstrap=2, num_inflight=1, transfers=9, failures=1, bytes=1 << 33,
            latency_counts=[0, 3, 6], latency_sum=0.125),
    SchedulerState(**{**to_dict(STATE), "pd": PDStats("decode", num_prealloc=1, num_transfer=4)}),
    ReqOutput("r1", [5, 6], {"type": "stop", "matched": "\n"}, 3, 2, 1, stop_strings=["\n"], stream=True,
              output_token_logprobs=[-0.5, -1.0], output_top_logprobs=[[(-0.5, 5), (-2.0, 9)], [(-1.0, 6)]],
              input_token_logprobs=[None, -3.0], input_top_logprobs=[None, [(-3.0, 2)]], text="hi"),
    BatchOut([ReqOutput("r2", [], None, 1, 0, 0)]),
]


def test_every_message_type_is_sampled():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_keeps_type_and_values(msg):
    back = ipc_codec.decode(ipc_codec.encode(msg))
    assert type(back) is type(msg) and back == msg


def test_nested_tuples_and_int_keys_survive():
    out = ipc_codec.decode(ipc_codec.encode(SAMPLES[-2]))
    assert out.output_top_logprobs[0][0] == (-0.5, 5) and isinstance(out.output_top_logprobs[0][0], tuple)
    req = ipc_codec.decode(ipc_codec.encode(SAMPLES[0]))
    assert req.sampling_params.logit_bias == {7: -100.0} and req.sampling_params.stop == ["\n"]
    assert ipc_codec.decode_list(ipc_codec.encode_list([ipc_codec.encode(m) for m in SAMPLES])) == SAMPLES


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/radixserve_pickle_ran",))


@pytest.mark.parametrize("payload", [
    pickle.dumps(Boom()),  # what recv_pyobj would have run
    b"",
    b"\xc1",
    ipc_codec._encoder.encode(["NoSuchMessage"]),
    ipc_codec._encoder.encode(["LoadReport", "zero", 1, 0, 0]),  # a field of the wrong type
    ipc_codec._encoder.encode(["LoadReport", 0]),  # fields missing
    ipc_codec._encoder.encode({"type": "LoadReport", "dp_rank": 0}),
    ipc_codec._encoder.encode([1, 2, 3]),
])
def test_anything_else_is_refused_as_data(payload, tmp_path):
    if os.path.exists("/tmp/radixserve_pickle_ran"):
        os.remove("/tmp/radixserve_pickle_ran")
    with pytest.raises(ipc_codec.BadMessage):
        ipc_codec.decode(payload)
    assert ipc_codec._decoded_or_none(payload) is None  # what the receive loops get: dropped, logged
    assert not os.path.exists("/tmp/radixserve_pickle_ran")


def test_sampling_params_are_checked_as_they_are_decoded():
    good = ipc_codec._encoder.encode(["GenerateReq", "r", [1], SamplingParams(temperature=0.5)])
    assert ipc_codec.decode(good).sampling_params.temperature == 0.5
    bad = ipc_codec._encoder.encode(["GenerateReq", "r", [1], [128, 0, -5.0]])  # temperature -5
    with pytest.raises(ipc_codec.BadMessage, match="temperature must be >= 0"):
        ipc_codec.decode(bad)


def test_to_dict_is_plain_data_without_tags():
    state = SAMPLES[7]
    plain = to_dict(state)
    assert "type" not in plain and plain["per_dp"][0]["kv_total"] == 100
    assert isinstance(plain["per_dp"][0], dict)
