"""bench_one_batch end to end on CPU: the tiny dummy Llama, two batch sizes, one JSON line each."""

from __future__ import annotations

import json
import math
import os

import pytest

from radixserve.bench.batch_driver import CONFIGS_DIR
from radixserve.bench.bench_one_batch import (
    ModelCost,
    build_parser,
    check_args,
    main,
    server_args_for,
)

TINY = os.path.join(CONFIGS_DIR, "tiny-llama")
TIMED_FIELDS = (
    "prefill_latency_s", "prefill_throughput_tok_s", "decode_median_ms", "decode_mean_ms",
    "decode_throughput_tok_s", "total_latency_s", "total_throughput_tok_s", "decode_bytes_per_step",
    "decode_achieved_gbps", "prefill_flops", "prefill_achieved_tflops",
)


@pytest.mark.timeout(60)
def test_tiny_llama_cpu_run(tmp_path, capsys):
    result_file = tmp_path / "one_batch.jsonl"
    rc = main([
        "--model-path", TINY, "--load-format", "dummy", "--dtype", "float32", "--device", "cpu",
        "--batch-size", "1", "2", "--input-len", "8", "--output-len", "4", "--run-name", "unit",
        "--result-file", str(result_file),
    ])
    assert rc == 0
    records = [json.loads(line) for line in result_file.read_text().splitlines()]
    assert [r["batch_size"] for r in records] == [1, 2]
    for r in records:
        assert "error" not in r
        assert (r["run_name"], r["input_len"], r["output_len"]) == ("unit", 8, 4)
        assert (r["device"], r["dtype"], r["load_format"]) == ("cpu", "float32", "dummy")
        assert r["attention_backend_class"]
        for name in TIMED_FIELDS:
            assert isinstance(r[name], float) and math.isfinite(r[name]) and r[name] > 0, name
        # the figures must agree with each other, not just be positive
        assert r["prefill_throughput_tok_s"] == pytest.approx(r["batch_size"] * 8 / r["prefill_latency_s"])
        assert r["decode_throughput_tok_s"] == pytest.approx(r["batch_size"] / (r["decode_median_ms"] / 1e3))
        assert r["total_latency_s"] >= r["prefill_latency_s"]
        assert r["total_latency_s"] == pytest.approx(r["prefill_latency_s"] + 3 * r["decode_mean_ms"] / 1e3)
        assert r["decode_floor_ms"] is None and r["prefill_floor_s"] is None  # limits are for CUDA only
        assert r["params"] == 139584 and r["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    out = capsys.readouterr().out
    assert "prefill tok/s" in out and "decode tok/s" in out


def test_bare_config_name_and_single_output_token(tmp_path):
    # output 1 has no decode step: decode figures are absent, not zero or NaN
    result_file = tmp_path / "r.jsonl"
    rc = main(["--model-path", "tiny-llama", "--load-format", "dummy", "--dtype", "float32", "--device", "cpu",
               "--input-len", "4", "--output-len", "1", "--warmup", "0", "--result-file", str(result_file)])
    assert rc == 0
    (r,) = [json.loads(line) for line in result_file.read_text().splitlines()]
    assert r["decode_median_ms"] is None and r["decode_throughput_tok_s"] is None
    assert r["prefill_latency_s"] > 0


def test_too_long_for_the_model_is_an_error(capsys):
    rc = main(["--model-path", TINY, "--load-format", "dummy", "--device", "cpu", "--input-len", "1020",
               "--output-len", "8"])
    assert rc == 2
    assert "context length" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--input-len", "0"], ["--output-len", "0"],
                                  ["--warmup", "-1"], ["--torch-compile-max-bs", "0"]])
def test_bad_workload_rejected(argv):
    with pytest.raises(ValueError, match=argv[0]):
        check_args(build_parser().parse_args(["--model-path", TINY, *argv]))


def test_torch_compile_flags_reach_the_runner_args():
    plain = server_args_for(build_parser().parse_args(["--model-path", TINY]))
    assert not plain.enable_torch_compile and plain.torch_compile_max_bs is None
    args = build_parser().parse_args(["--model-path", TINY, "--enable-torch-compile", "--torch-compile-max-bs", "4"])
    sargs = server_args_for(args)
    assert sargs.enable_torch_compile and sargs.torch_compile_max_bs == 4


def test_prefill_flops_formula():
    cost = ModelCost(params=0, weight_bytes=100, layer_matmul_params=10, lm_head_params=5, kv_bytes_per_token=2,
                     num_layers=1, num_q_heads=1, head_dim=1)
    # 2 tokens of 1 request: linear 2*(10*2 + 5*1) = 50; causal pairs 3, attention 4*3 = 12
    assert cost.prefill_flops(1, 2) == 62
    assert cost.decode_bytes(batch=2, context=3) == 100 + 2 * 2 * 3


def test_default_peaks_follow_the_gpu_model():
    from radixserve.bench.bench_one_batch import default_peaks

    assert default_peaks("NVIDIA H200") == (4300.0, 790.0)
    assert default_peaks("NVIDIA H100 80GB HBM3") == (3000.0, 800.0)
    assert default_peaks("NVIDIA A100-SXM4-80GB") == (3000.0, 800.0)  # not measured here: the H100's


def test_moe_cost_counts_the_experts_a_step_reaches():
    # 100 bytes of weights of which 80 are 8 experts, top 2: batch 1 reads exactly 2 of 8 experts
    cost = ModelCost(params=0, weight_bytes=100, layer_matmul_params=50, lm_head_params=0, kv_bytes_per_token=0,
                     num_layers=1, num_q_heads=1, head_dim=1, expert_bytes=80, expert_params=40, num_experts=8,
                     top_k=2)
    assert cost.experts_read_share(1) == pytest.approx(0.25)
    assert cost.decode_bytes(batch=1, context=0) == pytest.approx(20 + 80 * 0.25)
    # a large batch reaches (nearly) every expert
    assert cost.decode_bytes(batch=64, context=0) == pytest.approx(100, rel=1e-6)
    # a prompt token multiplies through the dense 10 params and 2/8 of the 40 expert params
    assert cost.prefill_flops(1, 1) == pytest.approx(2 * (10 + 10) + 4)


def test_moe_cost_of_a_real_runner(tmp_path):
    from radixserve.bench.batch_driver import build_runner
    from tests.helpers import make_tiny_model

    make_tiny_model("qwen3_moe", str(tmp_path), tokenizer=False)
    args = build_parser().parse_args(["--model-path", str(tmp_path), "--load-format", "dummy", "--device", "cpu",
                                      "--dtype", "float32", "--input-len", "16", "--output-len", "4"])
    cost = ModelCost.of(build_runner(server_args_for(args)))
    # 2 layers x 8 experts x (2*40*64 + 64*40) fp32 parameters
    assert cost.num_experts == 8 and cost.top_k == 2
    assert cost.expert_params == 2 * 8 * 3 * 40 * 64 and cost.expert_bytes == 4 * cost.expert_params


def test_mla_cost_of_a_real_runner(tmp_path):
    """DeepSeek (V3 shape, tiny): the latent is the KV (one kv_lora_rank + rope row per layer), and
    prefill attention is counted in the absorbed form (a query-key product over the latent plus the
    rope dims, a value product over the latent)."""
    from radixserve.bench.batch_driver import build_runner
    from tests.e2e.test_deepseek_parity import make_deepseek

    make_deepseek("v3", str(tmp_path), seed=0)
    args = build_parser().parse_args(["--model-path", str(tmp_path), "--load-format", "dummy", "--device", "cpu",
                                      "--dtype", "float32", "--input-len", "16", "--output-len", "4"])
    cost = ModelCost.of(build_runner(server_args_for(args)))
    assert cost.kv_bytes_per_token == 3 * (32 + 16) * 4  # 3 layers, kv_lora_rank 32, rope 16, fp32
    assert (cost.head_dim, cost.qk_head_dim, cost.num_q_heads) == (32, 48, 4)
    assert cost.num_experts == 8 and cost.top_k == 2
    # 2 MoE layers (the first is dense) x 8 experts x 3 matrices of 24 x 64
    assert cost.expert_params == 2 * 8 * 3 * 24 * 64
    linear_only = ModelCost(**{**cost.__dict__, "num_layers": 0})
    attention = cost.prefill_flops(1, 16) - linear_only.prefill_flops(1, 16)
    assert attention == pytest.approx(2.0 * 3 * 4 * (48 + 32) * 16 * 17 / 2)
