"""The offline throughput bench's CLI and prompt generator. Nothing here starts an engine or times anything."""

from __future__ import annotations

import pytest

from radixserve.bench.bench_offline_throughput import (
    Measurement,
    build_parser,
    check_args,
    engine_kwargs,
    format_table,
    make_prompts,
    ratios,
)

DOCUMENTED_FLAGS = [
    "--model-path", "m.gguf", "--num-prompts", "8", "--input-len", "32", "--range-ratio", "0.5",
    "--output-len", "16", "--dtype", "bfloat16", "--seed", "3", "--max-running-requests", "4",
    "--chunked-prefill-size", "64", "--page-size", "4", "--load-format", "dummy", "--device", "cpu",
    "--compare-transformers", "--hf-batch-size", "2", "--hf-batch1-prompts", "1", "--result-file", "r.jsonl",
]


def test_documented_flags_parse():
    args = build_parser().parse_args(DOCUMENTED_FLAGS)
    assert (args.model_path, args.num_prompts, args.input_len, args.range_ratio) == ("m.gguf", 8, 32, 0.5)
    assert (args.output_len, args.dtype, args.seed) == (16, "bfloat16", 3)
    assert (args.max_running_requests, args.chunked_prefill_size, args.page_size) == (4, 64, 4)
    assert (args.load_format, args.device) == ("dummy", "cpu")
    assert args.compare_transformers and args.hf_batch_size == 2 and args.hf_batch1_prompts == 1
    assert args.result_file == "r.jsonl"
    check_args(args)


def test_defaults():
    args = build_parser().parse_args([])
    assert args.model_path is None
    assert (args.num_prompts, args.input_len, args.output_len, args.range_ratio) == (64, 128, 128, 0.0)
    assert args.dtype == "auto" and not args.compare_transformers
    assert args.hf_batch_size is None and args.hf_batch1_prompts == 4 and args.result_file is None
    # unset engine flags are left to the engine's own defaults
    assert engine_kwargs(args) == {"model_path": None, "dtype": "auto", "log_level": "warning"}


def test_engine_flags_forwarded():
    kwargs = engine_kwargs(build_parser().parse_args(DOCUMENTED_FLAGS))
    assert kwargs["page_size"] == 4 and kwargs["chunked_prefill_size"] == 64
    assert kwargs["max_running_requests"] == 4 and kwargs["load_format"] == "dummy" and kwargs["device"] == "cpu"


@pytest.mark.parametrize("argv", [
    ["--num-prompts", "0"], ["--input-len", "0"], ["--output-len", "0"], ["--range-ratio", "1.5"],
    ["--range-ratio", "-0.1"], ["--hf-batch-size", "0"], ["--hf-batch1-prompts", "-1"],
])
def test_bad_workload_rejected(argv):
    with pytest.raises(ValueError, match=argv[0]):
        check_args(build_parser().parse_args(argv))


def test_bad_choice_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dtype", "float64"])


def test_prompts_deterministic_with_seed():
    a = make_prompts(16, 32, 0.5, vocab_size=1000, seed=7)
    assert a == make_prompts(16, 32, 0.5, vocab_size=1000, seed=7)
    assert a != make_prompts(16, 32, 0.5, vocab_size=1000, seed=8)


def test_prompt_lengths_exact_without_range():
    prompts = make_prompts(10, 24, 0.0, vocab_size=500, seed=0)
    assert len(prompts) == 10 and all(len(p) == 24 for p in prompts)


def test_prompt_lengths_within_range():
    prompts = make_prompts(200, 100, 0.25, vocab_size=500, seed=1)
    lengths = [len(p) for p in prompts]
    assert min(lengths) >= 75 and max(lengths) <= 100
    assert len(set(lengths)) > 1  # the range is used, not one length
    # a full range still never makes an empty prompt
    assert all(len(p) >= 1 for p in make_prompts(50, 4, 1.0, vocab_size=50, seed=2))


def test_prompt_ids_in_vocab_and_skip_specials():
    prompts = make_prompts(20, 50, 0.0, vocab_size=10, seed=4, exclude_ids=[0, 1, 2])
    ids = {t for p in prompts for t in p}
    assert ids <= set(range(3, 10)) and len(ids) > 1


def test_ratios_and_table():
    results = [
        Measurement("radixserve", "batched", 4, 64, 32, 1.0),
        Measurement("transformers", "batched", 4, 64, 32, 2.0),
        Measurement("radixserve", "batch-1", 1, 16, 8, 1.0),
    ]
    assert ratios(results) == {"batched": 2.0}  # batch-1 has no transformers row to compare with
    assert results[0].output_tok_s == 32.0 and results[0].total_tok_s == 96.0 and results[0].requests_s == 4.0
    table = format_table(results)
    assert "output tok/s" in table and "total tok/s" in table and "seconds" in table
    assert len(table.splitlines()) == 2 + len(results)
