"""Admission on a KV pool smaller than the context: a request's output budget is clipped to the pool,
a request alone is admitted on its prompt's pages (its output estimate may exceed the pool), and one
that can never fit is refused with the phrases clients match on."""

from __future__ import annotations

import pytest

from radixserve.cache.allocator import KVAllocator
from radixserve.cache.pools import ReqToTokenPool
from radixserve.cache.radix import RadixCache
from radixserve.messages import GenerateReq
from radixserve.request_limits import RequestLimits
from radixserve.sampling_params import SamplingParams
from radixserve.scheduler.output_estimate import CLIP_ENV_NAMES, clip_from_env
from radixserve.scheduler.prefill import PrefillPlanner
from radixserve.scheduler.req import Req
from radixserve.server_args import ServerArgs, ServerArgsError

POOL = 64


def planner(page_size: int) -> PrefillPlanner:
    rows = ReqToTokenPool(4, 256, "cpu")
    allocator = KVAllocator(POOL, page_size, "cpu")
    cache = RadixCache(rows, allocator, page_size)
    return PrefillPlanner(cache, allocator, rows, chunked_prefill_size=256, max_prefill_tokens=256,
                          max_running_requests=4, page_size=page_size)


def request(rid: str, prompt_len: int, max_new: int) -> Req:
    return Req(GenerateReq(rid, list(range(1, prompt_len + 1)), SamplingParams()), eos_ids={0},
               max_new_tokens=max_new)


@pytest.mark.parametrize("page_size", [1, 16])
def test_a_request_alone_is_admitted_on_its_prompt_pages(page_size):
    limits = RequestLimits(context_len=256, kv_capacity=POOL)
    prompt = 40
    max_new = limits.max_new_tokens(prompt, None)  # up to the context, clipped to the pool
    assert max_new == POOL - prompt
    alone = request("a", prompt, max_new)
    # its prompt, a page of slack and its whole output (ratio 1.0, as after a retraction) exceed the pool
    assert prompt + page_size + max_new > POOL
    plan = planner(page_size).plan([alone], [], None, ratio=1.0)
    assert plan.reqs == [alone] and plan.new_tokens == prompt


def test_beside_a_running_request_the_output_estimate_still_counts():
    p = planner(1)
    first = request("a", 40, 24)
    assert p.plan([first], [], None, ratio=1.0).reqs == [first]
    p.allocator.alloc_for_sequence(0, 0, 40)  # what its prefill takes
    second = request("b", 10, 24)
    # 24 free slots, the running request's 24 future tokens reserved: the second waits its turn
    assert p.plan([second], [first], None, ratio=1.0).reqs == []


def test_limits_refuse_what_can_never_run_in_the_words_clients_match():
    limits = RequestLimits(context_len=100, kv_capacity=50)
    message, field = limits.check(100, None)
    assert field == "prompt"
    assert "maximum context length is 100" in message and "is longer than the model's context length" in message
    message, field = limits.check(10, 95)
    assert field == "max_new_tokens" and "maximum context length is 100 tokens" in message
    assert "you requested 105 tokens (10 in the prompt, 95 in max_new_tokens)" in message
    message, field = limits.check(50, 1)
    assert field == "prompt" and "KV cache" in message
    assert limits.check(49, 51) is None  # fits the context; the pool clips its output
    assert limits.max_new_tokens(49, 51) == 1 and limits.max_new_tokens(10, 5) == 5


def test_the_output_estimate_clip_lets_requests_without_max_tokens_run_together(monkeypatch):
    # SGLang's test_large_max_new_tokens: pool far below the context, no max_tokens, clip 256
    pool, context, prompt = 1536, 8192, 36
    limits = RequestLimits(context_len=context, kv_capacity=pool)
    rows = ReqToTokenPool(8, context, "cpu")
    allocator = KVAllocator(pool, 1, "cpu")
    cache = RadixCache(rows, allocator, 1)

    def plan_with(env: dict[str, str]) -> list[Req]:
        for name in CLIP_ENV_NAMES:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        p = PrefillPlanner(cache, allocator, rows, chunked_prefill_size=8192, max_prefill_tokens=8192,
                           max_running_requests=8, page_size=1)
        reqs = [request(str(i), prompt, limits.max_new_tokens(prompt, None)) for i in range(4)]
        admitted = p.plan(reqs, [], None, ratio=0.7).reqs
        for r in admitted:  # give the rows and prefix locks back for the next plan
            cache.dec_lock_ref(r.last_node)
            rows.free(r.req_pool_idx)
            r.req_pool_idx = None
        return admitted

    assert len(plan_with({})) == 1  # 4,096 clipped to the pool's 1,500: one at a time
    assert len(plan_with({"SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": "256"})) == 4
    assert len(plan_with({"RADIXSERVE_CLIP_MAX_NEW_TOKENS_ESTIMATION": "256",
                          "SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": "4096"})) == 4


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_a_bad_clip_is_refused_by_the_server_args(monkeypatch, value):
    monkeypatch.setenv("RADIXSERVE_CLIP_MAX_NEW_TOKENS_ESTIMATION", value)
    with pytest.raises(ServerArgsError, match="RADIXSERVE_CLIP_MAX_NEW_TOKENS_ESTIMATION"):
        ServerArgs()
    assert clip_from_env({"SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": "300"}) == 300
    assert clip_from_env({}) == 4096
