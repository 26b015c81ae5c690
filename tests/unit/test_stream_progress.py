"""A request's progress grows by each increment alone: readers of deltas get the increment and the
live lists (no copies), and a result handed out is a snapshot that later increments leave alone."""

from __future__ import annotations

from radixserve.entrypoints.tokenizer_manager import Progress, TokenizerManager, _Clock
from radixserve.messages import GenerateReq, ReqOutput
from radixserve.sampling_params import SamplingParams


def merged(steps: int) -> tuple[Progress, list[dict]]:
    req = GenerateReq("r", [1, 2, 3], SamplingParams(), return_logprob=True, top_logprobs_num=1, stream=True)
    p = Progress(req, _Clock(0.0))
    snapshots = []
    for k in range(steps):
        done = k == steps - 1
        out = ReqOutput("r", [10 + k], {"type": "length", "length": steps} if done else None, 3, k + 1, 0,
                        output_token_logprobs=[-0.1 * k], output_top_logprobs=[[(-0.1 * k, 10 + k)]], text=f"t{k} ")
        TokenizerManager._merge(None, p, out)  # merging reads nothing of the manager
        view = p.view()
        assert view["text"] == f"t{k} " and view["meta_info"] is p.meta and view["output_ids"] is p.output_ids
        snapshots.append(p.result())
    return p, snapshots


def test_views_are_live_and_results_are_snapshots():
    p, snapshots = merged(5)
    assert p.finished and p.text == "t0 t1 t2 t3 t4 " and p.output_ids == [10, 11, 12, 13, 14]
    first = snapshots[0]
    assert first["text"] == "t0 " and first["output_ids"] == [10]
    assert first["meta_info"]["output_token_logprobs"] == [(-0.0, 10, None)]  # not grown by later steps
    assert first["meta_info"]["finish_reason"] is None
    assert snapshots[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert [len(s["output_ids"]) for s in snapshots] == [1, 2, 3, 4, 5]


def test_text_is_joined_once_and_stays_joined():
    p, _ = merged(3)
    assert p.text == "t0 t1 t2 " and p.parts == ["t0 t1 t2 "]
