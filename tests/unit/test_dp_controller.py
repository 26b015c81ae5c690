"""The DP load balancer's choices, from synthetic requests and load reports."""

from __future__ import annotations

from radixserve.messages import GenerateReq, LoadReport, ProfileReply, SchedulerState
from radixserve.sampling_params import SamplingParams
from radixserve.scheduler.dp_controller import DPController, LoadBalancer, merge_states


def req(n_prompt: int, max_new: int) -> GenerateReq:
    return GenerateReq(rid="r", input_ids=[1] * n_prompt, sampling_params=SamplingParams(max_new_tokens=max_new))


def test_round_robin_cycles():
    lb = LoadBalancer("round_robin", 3)
    assert [lb.pick(req(1, 1)) for _ in range(5)] == [0, 1, 2, 0, 1]


def test_shortest_queue_counts_requests_in_transit_until_received():
    lb = LoadBalancer("shortest_queue", 2)
    assert lb.pick(req(5, 5)) == 0
    assert lb.pick(req(5, 5)) == 1
    assert lb.pick(req(5, 5)) == 0  # 1 vs 1: ties go to the lowest rank
    # group 0 received both and finished one; group 1 has not reported yet
    lb.update(LoadReport(0, num_reqs=1, num_waiting=0, outstanding_tokens=10, received=2))
    assert lb.loads[0].num_reqs == 1 and lb.loads[1].num_reqs == 1
    lb.update(LoadReport(1, num_reqs=0, num_waiting=0, outstanding_tokens=0, received=1))  # came and went
    assert lb.pick(req(5, 5)) == 1


def test_minimum_tokens_uses_outstanding_tokens():
    lb = LoadBalancer("minimum_tokens", 2)
    assert lb.pick(req(100, 900)) == 0
    assert lb.pick(req(10, 10)) == 1
    assert lb.pick(req(10, 10)) == 1  # 20 < 1000 tokens, although both hold requests
    lb.update(LoadReport(0, num_reqs=0, num_waiting=0, outstanding_tokens=0, received=1))
    assert lb.pick(req(10, 10)) == 0


def test_merge_states_sums_pools_and_keeps_each_group():
    def state(rank: int, running: int) -> SchedulerState:
        return SchedulerState(kv_total=100, kv_available=90, kv_evictable=0, kv_protected=0, req_rows_total=8,
                              req_rows_available=8 - running, num_running=running, num_waiting=0,
                              new_token_ratio=0.5, num_retractions=0, dp_rank=rank)

    merged = merge_states([state(1, 2), state(0, 1)])
    assert merged.kv_total == 200 and merged.num_running == 3
    assert [s.dp_rank for s in merged.per_dp] == [0, 1]


def test_profile_replies_merge_to_one_failure_naming_each_cause_once():
    ok = DPController.merge(ProfileReply, [ProfileReply(True, "/t/a"), ProfileReply(True, "/t/b")])
    assert ok == ProfileReply(True, "")
    busy = "a profile is already running"
    merged = DPController.merge(ProfileReply, [ProfileReply(False, busy), ProfileReply(True), ProfileReply(False, busy)])
    assert merged == ProfileReply(False, busy)
