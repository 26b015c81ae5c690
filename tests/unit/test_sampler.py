from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from radixserve.layers.penalties import PenaltyState, apply_penalties, token_counts
from radixserve.layers.sampler import Sampler
from radixserve.sampling_batch import SamplingBatch, derive_step_seed
from radixserve.sampling_params import SamplingParams

V = 64
sampler = Sampler()


def make_batch(
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int]] | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    eos_ids: Sequence[Sequence[int]] | None = None,
    seeds: Sequence[int | None] | None = None,
    vocab_size: int = V,
) -> SamplingBatch:
    bs = len(params)
    return SamplingBatch.build(
        list(params),
        [list(x) for x in output_ids] if output_ids is not None else [[] for _ in range(bs)],
        [list(x) for x in prompt_ids] if prompt_ids is not None else [[] for _ in range(bs)],
        [list(x) for x in eos_ids] if eos_ids is not None else [[] for _ in range(bs)],
        list(seeds) if seeds is not None else [None] * bs,
        vocab_size,
        "cpu",
    )


def logits_from_probs(probs: list[float], rows: int) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0).expand(rows, -1).contiguous()


def sampled_set(probs: list[float], params: SamplingParams, rows: int = 4000) -> set[int]:
    logits = logits_from_probs(probs, rows)
    out = sampler(logits, make_batch([params] * rows, vocab_size=len(probs)), return_logprob=False)
    return set(out.next_token_ids.tolist())


def test_all_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, V)
    batch = make_batch([SamplingParams(temperature=0.0)] * 8)
    assert batch.all_greedy and batch.penalties is None
    out = sampler(logits, batch, return_logprob=False)
    assert out.next_token_ids.dtype == torch.int64
    assert torch.equal(out.next_token_ids, logits.argmax(-1))
    assert out.next_token_logprobs is None and out.top_logprobs is None


def test_greedy_rows_in_mixed_batch_and_top_k_1() -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, V) * 3
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=1),
        SamplingParams(temperature=0.9, top_p=0.5),
        SamplingParams(temperature=0.7, top_k=1, top_p=0.3, min_p=0.2),
        SamplingParams(temperature=1e-7),  # below SAMPLING_EPS: greedy, no overflow
        SamplingParams(temperature=1.3),
    ]
    batch = make_batch(params)
    assert not batch.all_greedy
    assert batch.is_greedy.tolist() == [True, True, False, True, True, False]
    for _ in range(20):
        out = sampler(logits, batch, return_logprob=False)
        got = out.next_token_ids
        ref = logits.argmax(-1)
        for row in (0, 1, 3, 4):
            assert got[row] == ref[row]


def test_top_k_1_matches_greedy_many_rows() -> None:
    torch.manual_seed(2)
    logits = torch.randn(256, V)
    out = sampler(logits, make_batch([SamplingParams(temperature=0.7, top_k=1)] * 256), return_logprob=False)
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


def test_input_logits_not_modified() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, V)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.3),
        SamplingParams(frequency_penalty=1.0, presence_penalty=0.5, min_new_tokens=3),
        SamplingParams(temperature=0.0),
    ]
    batch = make_batch(
        params, output_ids=[[1, 2], [2, 2, 3], []], prompt_ids=[[4], [5], [6]], eos_ids=[[0]] * 3
    )
    sampler(logits, batch, return_logprob=True, max_top_k=3)
    assert torch.equal(logits, before)


def _draw_seeded(
    logits_row: torch.Tensor,
    seed: int,
    others: list[SamplingParams],
    pos: int,
    mine: SamplingParams | None = None,
) -> int:
    """Sample the seeded row at index `pos` of a batch padded with other (unseeded) rows."""
    torch.manual_seed(1234 + pos + len(others))  # disturb the default generator too
    params = list(others)
    params.insert(pos, mine or SamplingParams(temperature=0.8))
    seeds: list[int | None] = [None] * len(others)
    seeds.insert(pos, seed)
    other_logits = torch.randn(len(others), V)
    logits = torch.cat([other_logits[:pos], logits_row.unsqueeze(0), other_logits[pos:]])
    out = sampler(logits, make_batch(params, seeds=seeds), return_logprob=False)
    return int(out.next_token_ids[pos])


def test_seeded_rows_reproduce_across_batches() -> None:
    # Some compositions take the sort/filter path, others not: the seeded row must not notice.
    torch.manual_seed(4)
    row = torch.randn(V)  # fairly flat: many plausible tokens
    compositions = [
        ([], 0),
        ([SamplingParams()] * 3, 0),
        ([SamplingParams()] * 3, 3),
        ([SamplingParams(temperature=0.0), SamplingParams(top_k=3), SamplingParams(min_p=0.2)], 1),
        ([SamplingParams(temperature=1.5)] * 7, 5),
    ]
    for step in range(6):
        seed = derive_step_seed(42, step)
        draws = {_draw_seeded(row, seed, others, pos) for others, pos in compositions}
        assert len(draws) == 1, (step, draws)
    per_step = [_draw_seeded(row, derive_step_seed(42, s), [], 0) for s in range(30)]
    assert len(set(per_step)) > 1  # different steps get different noise


def test_seeded_top_k_row_same_on_topk_and_sort_paths() -> None:
    torch.manual_seed(14)
    row = torch.randn(V)
    mine = SamplingParams(temperature=1.5, top_k=20, top_p=0.9)
    compositions = [
        ([], 0),  # filter_width 20: partial topk
        ([SamplingParams(top_k=30)] * 2, 1),  # filter_width 30
        ([SamplingParams()] * 2, 2),  # an unfiltered row forces the full sort
    ]
    for step in range(6):
        seed = derive_step_seed(9, step)
        draws = {_draw_seeded(row, seed, others, pos, mine) for others, pos in compositions}
        assert len(draws) == 1, (step, draws)


def test_seeded_batch_repeats_and_unseeded_differs() -> None:
    torch.manual_seed(5)
    logits = torch.randn(1, V).expand(200, -1).contiguous()
    params = [SamplingParams(temperature=1.0)] * 200
    seeded = make_batch(params, seeds=[derive_step_seed(i, 0) for i in range(200)])
    a = sampler(logits, seeded, return_logprob=False).next_token_ids
    b = sampler(logits, seeded, return_logprob=False).next_token_ids
    assert torch.equal(a, b)
    unseeded = make_batch(params)
    c = sampler(logits, unseeded, return_logprob=False).next_token_ids
    d = sampler(logits, unseeded, return_logprob=False).next_token_ids
    assert not torch.equal(c, d)
    assert len(set(c.tolist())) > 5  # identical rows, independent draws


def test_derive_step_seed() -> None:
    assert derive_step_seed(7, 3) == derive_step_seed(7, 3)
    values = {derive_step_seed(s, n) for s in range(20) for n in range(20)}
    assert len(values) == 400
    assert all(0 <= v < 2**63 for v in values)


def test_sampling_matches_distribution() -> None:
    probs = [0.5, 0.25, 0.15, 0.1]
    rows = 20000
    torch.manual_seed(6)
    out = sampler(logits_from_probs(probs, rows), make_batch([SamplingParams()] * rows, vocab_size=4), False)
    freq = torch.bincount(out.next_token_ids, minlength=4).float() / rows
    assert torch.allclose(freq, torch.tensor(probs), atol=0.02)
    # temperature 0.5 squares the probabilities (then renormalizes)
    sharp = torch.tensor(probs) ** 2
    sharp /= sharp.sum()
    batch = make_batch([SamplingParams(temperature=0.5)] * rows, vocab_size=4)
    out = sampler(logits_from_probs(probs, rows), batch, False)
    freq = torch.bincount(out.next_token_ids, minlength=4).float() / rows
    assert torch.allclose(freq, sharp, atol=0.02)


def test_top_p_keeps_only_nucleus() -> None:
    probs = [0.05, 0.5, 0.05, 0.3, 0.1]
    torch.manual_seed(7)
    assert sampled_set(probs, SamplingParams(top_p=0.7)) == {1, 3}
    assert sampled_set(probs, SamplingParams(top_p=0.85)) == {1, 3, 4}
    assert sampled_set(probs, SamplingParams(top_p=0.3)) == {1}
    assert sampled_set(probs, SamplingParams(top_p=1.0)) == {0, 1, 2, 3, 4}


def test_top_k_and_top_p_on_renormalized_top_k() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    torch.manual_seed(8)
    assert sampled_set(probs, SamplingParams(top_k=2)) == {0, 1}
    assert sampled_set(probs, SamplingParams(top_k=3)) == {0, 1, 2}
    # After top_k=3 the masses are 4/9, 3/9, 2/9: the first two already reach 0.75.
    assert sampled_set(probs, SamplingParams(top_k=3, top_p=0.75)) == {0, 1}


def test_min_p() -> None:
    probs = [0.1, 0.5, 0.3, 0.06, 0.04]
    torch.manual_seed(9)
    assert sampled_set(probs, SamplingParams(min_p=0.3)) == {1, 2}  # threshold 0.15
    assert sampled_set(probs, SamplingParams(min_p=0.1)) == {0, 1, 2, 3}  # threshold 0.05
    assert sampled_set(probs, SamplingParams(min_p=1.0)) == {1}


def test_filtered_rows_next_to_unfiltered_rows() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    rows = 3000
    params = [SamplingParams(top_k=2) if i % 2 else SamplingParams() for i in range(rows)]
    torch.manual_seed(10)
    out = sampler(logits_from_probs(probs, rows), make_batch(params, vocab_size=4), False).next_token_ids
    assert set(out[1::2].tolist()) == {0, 1}
    assert set(out[0::2].tolist()) == {0, 1, 2, 3}


def test_repetition_penalty_matches_transformers() -> None:
    torch.manual_seed(11)
    logits = torch.randn(3, V) * 4
    prompts = [[1, 2, 3, 3], [10, 11], [5]]
    outputs = [[7, 1, 60], [], [5, 6]]
    penalties = [1.3, 0.7, 1.0]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    batch = make_batch(params, output_ids=outputs, prompt_ids=prompts)
    assert batch.penalties is not None
    got = apply_penalties(logits, batch.penalties)
    for i in range(3):
        ids = torch.tensor([prompts[i] + outputs[i]])
        ref = RepetitionPenaltyLogitsProcessor(penalty=penalties[i])(ids, logits[i : i + 1].clone())
        assert torch.allclose(got[i], ref[0]), i


def test_frequency_presence_penalty_reference() -> None:
    torch.manual_seed(12)
    logits = torch.randn(2, V)
    outputs = [[3, 3, 3, 9, 70], [4]]  # 70 is outside the vocabulary: ignored
    prompts = [[3, 8, 8], [4, 4]]  # prompt tokens never count for OpenAI penalties
    params = [
        SamplingParams(frequency_penalty=0.5, presence_penalty=1.5),
        SamplingParams(frequency_penalty=-1.0, presence_penalty=0.25),
    ]
    batch = make_batch(params, output_ids=outputs, prompt_ids=prompts)
    assert batch.penalties is not None
    got = apply_penalties(logits, batch.penalties)
    ref = logits.clone()
    ref[0, 3] -= 0.5 * 3 + 1.5
    ref[0, 9] -= 0.5 * 1 + 1.5
    ref[1, 4] -= -1.0 * 1 + 0.25
    assert torch.allclose(got, ref)


def test_penalties_change_greedy_choice() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 2.0
    logits[0, 6] = 1.9
    plain = sampler(logits, make_batch([SamplingParams(temperature=0.0)]), False).next_token_ids
    assert plain.tolist() == [5]
    batch = make_batch([SamplingParams(temperature=0.0, repetition_penalty=1.2)], output_ids=[[5]])
    assert sampler(logits, batch, False).next_token_ids.tolist() == [6]
    batch = make_batch([SamplingParams(temperature=0.0, presence_penalty=0.2)], output_ids=[[5]])
    assert sampler(logits, batch, False).next_token_ids.tolist() == [6]


def test_token_counts() -> None:
    counts = token_counts([[1, 1, 2], [], [3, -1, 99, 3, 3]], 4, "cpu")
    assert counts.tolist() == [[0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 3]]


def test_no_penalty_state_when_unused() -> None:
    params = [SamplingParams(min_new_tokens=2), SamplingParams()]
    batch = make_batch(params, output_ids=[[1, 2, 3], []], eos_ids=[[0], [0]])
    assert batch.penalties is None
    assert PenaltyState.build(params, [[1, 2], []], [[], []], [[0], [0]], V, "cpu") is None


def test_min_new_tokens_blocks_eos_and_stop_ids() -> None:
    logits = torch.zeros(2, V)
    logits[:, 0] = 50.0  # eos
    logits[:, 9] = 40.0  # stop token id
    logits[:, 12] = 30.0
    params = [
        SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[9]),
        SamplingParams(temperature=0.9, min_new_tokens=3, stop_token_ids=[9]),
    ]
    eos = [[0, 63], [0]]
    for _ in range(10):
        batch = make_batch(params, output_ids=[[1, 2], [1]], eos_ids=eos)
        assert sampler(logits, batch, False).next_token_ids.tolist() == [12, 12]
    batch = make_batch(params, output_ids=[[1, 2, 3], [1, 2, 3, 4]], eos_ids=eos)
    assert sampler(logits, batch, False).next_token_ids.tolist() == [0, 0]


def test_logprobs_use_raw_logits() -> None:
    torch.manual_seed(13)
    logits = torch.randn(4, V) * 2
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=0.5, top_p=0.8),
        SamplingParams(temperature=1.2, frequency_penalty=1.0),
        SamplingParams(top_k=4, min_p=0.05),
    ]
    batch = make_batch(params, output_ids=[[1, 2], [3], [4, 4], []], prompt_ids=[[5]] * 4)
    out = sampler(logits, batch, return_logprob=True, max_top_k=5)
    ref = torch.log_softmax(logits, dim=-1)
    assert out.next_token_logprobs is not None
    assert out.next_token_logprobs.dtype == torch.float32
    assert torch.allclose(out.next_token_logprobs, ref.gather(1, out.next_token_ids[:, None]).squeeze(1))
    assert out.top_logprobs is not None
    values, ids = out.top_logprobs
    assert values.shape == (4, 5) and ids.shape == (4, 5)
    assert torch.all(values[:, :-1] >= values[:, 1:])
    assert torch.allclose(values, ref.gather(1, ids))
    ref_vals, _ = ref.sort(dim=-1, descending=True)
    assert torch.allclose(values, ref_vals[:, :5])


def test_top_logprobs_only_and_k_clamped() -> None:
    logits = torch.randn(2, 8)
    batch = make_batch([SamplingParams(temperature=0.0)] * 2, vocab_size=8)
    out = sampler(logits, batch, return_logprob=False, max_top_k=20)
    assert out.next_token_logprobs is None
    assert out.top_logprobs is not None and out.top_logprobs[0].shape == (2, 8)
    assert torch.equal(out.top_logprobs[1][:, 0], logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype: torch.dtype) -> None:
    logits = torch.randn(3, V).to(dtype)
    batch = make_batch([SamplingParams(temperature=0.0), SamplingParams(top_p=0.9), SamplingParams(top_k=3)])
    out = sampler(logits, batch, return_logprob=True)
    assert out.next_token_ids[0] == logits.float().argmax(-1)[0]
    assert out.next_token_logprobs is not None and out.next_token_logprobs.dtype == torch.float32


def test_build_rejects_ragged_inputs() -> None:
    with pytest.raises(ValueError, match="output_ids"):
        SamplingBatch.build([SamplingParams()], [], [[]], [[]], [None], V, "cpu")


def test_batch_fields() -> None:
    params = [
        SamplingParams(temperature=0.0, top_k=5),
        SamplingParams(temperature=0.5, top_k=100, top_p=0.9),
        SamplingParams(min_p=0.1),
    ]
    batch = make_batch(params, seeds=[7, 8, None])
    assert batch.temperatures.shape == (3, 1)
    assert batch.temperatures.flatten().tolist() == [1.0, 0.5, 1.0]
    assert batch.top_ks.tolist() == [V, V, V]  # greedy row neutral, top_k > V clamped
    assert batch.top_ks.dtype == torch.int64
    assert batch.top_ps.tolist() == pytest.approx([1.0, 0.9, 1.0])
    assert batch.min_ps.tolist() == pytest.approx([0.0, 0.0, 0.1])
    assert batch.seeded_rows == [1] and batch.seeds == [8]  # greedy rows need no noise
    assert (batch.need_top_k, batch.need_top_p, batch.need_min_p) == (False, True, True)
    assert batch.batch_size == 3
    assert batch.filter_width == V
    assert make_batch([SamplingParams(top_k=7), SamplingParams(top_k=3, min_p=0.2)]).filter_width == 7
    assert make_batch([SamplingParams(temperature=0.0), SamplingParams(top_k=3)]).filter_width == 3


def test_logit_bias_moves_greedy_and_sampled_rows_only_where_set() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, V, generator=gen)
    plain = logits.argmax(dim=-1)
    target = int((plain[0] + 1) % V)
    params = [
        SamplingParams(temperature=0.0, logit_bias={str(target): 100}),  # JSON-style key
        SamplingParams(temperature=0.0, logit_bias={int(plain[1]): -100.0}),  # ban the argmax
        SamplingParams(temperature=0.0),  # no bias: untouched by its neighbours'
    ]
    before = logits.clone()
    out = sampler(logits, make_batch(params), return_logprob=True).next_token_ids
    assert out[0] == target
    assert out[1] != plain[1] and out[1] == logits[1].topk(2).indices[1]
    assert out[2] == plain[2]
    assert torch.equal(logits, before)
    # a sampled row: a +100 bias on one token makes it (almost surely) the draw
    hot = make_batch([SamplingParams(temperature=1.0, seed=5, logit_bias={7: 100})], seeds=[11])
    assert sampler(logits[:1], hot, return_logprob=False).next_token_ids.tolist() == [7]


@pytest.mark.parametrize("bias", [{"x": 1}, {-1: 1}, {3: 101}, {3: "big"}, [1, 2], {True: 1}])
def test_logit_bias_rejects_bad_entries(bias) -> None:
    from radixserve.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError, match="logit_bias"):
        SamplingParams(logit_bias=bias)
