"""ServerArgs: every runbook flag is accepted, defaults follow the runbook, errors name the flag."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from radixserve.server_args import ServerArgs, ServerArgsError

RUNBOOK_FLAGS = [
    "--model-path m", "--host 0.0.0.0", "--port 30001", "--tp-size 2", "--dp-size 1", "--page-size 4",
    "--chunked-prefill-size 8192", "--mem-fraction-static 0.85", "--max-running-requests 256",
    "--max-total-tokens 100000", "--context-length 4096", "--decode-log-interval 40",
    "--max-prefill-tokens 16384", "--enable-two-batch-overlap", "--disable-radix-cache",
    "--enable-torch-compile", "--enable-dp-attention", "--enable-dp-lm-head", "--moe-dense-tp-size 1",
    "--disaggregation-mode prefill", "--disaggregation-ib-device mlx5_0", "--disaggregation-bootstrap-port 9001",
    "--dist-init-addr 10.0.0.1:5000", "--nnodes 2", "--node-rank 1", "--base-gpu-id 1",
    "--trust-remote-code", "--moe-a2a-backend deepep", "--dist-timeout 3600", "--disable-cuda-graph",
    "--load-balance-method minimum_tokens", "--dtype bfloat16", "--load-format dummy", "--tokenizer-path t",
    "--attention-backend torch_native", "--schedule-policy fcfs", "--random-seed 7", "--device cpu",
]


def parse(argv: list[str]) -> ServerArgs:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))


def test_every_runbook_flag_parses():
    args = parse(" ".join(RUNBOOK_FLAGS).split())
    assert args.page_size == 4 and args.nnodes == 2 and args.node_rank == 1
    assert args.disaggregation_mode == "prefill" and args.load_balance_method == "minimum_tokens"
    assert args.enable_two_batch_overlap and args.disable_radix_cache and args.trust_remote_code


def test_runbook_defaults():
    a = ServerArgs()
    assert (a.page_size, a.decode_log_interval, a.max_prefill_tokens) == (1, 40, 16384)
    assert a.mem_fraction_static is None and a.chunked_prefill_size is None  # auto, resolved at start
    assert (a.tp_size, a.dp_size, a.port) == (1, 1, 30000)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"page_size": 0}, "--page-size"),
        ({"mem_fraction_static": 1.5}, "--mem-fraction-static"),
        ({"chunked_prefill_size": 0}, "--chunked-prefill-size"),
        ({"schedule_policy": "random"}, "--schedule-policy"),
        ({"dtype": "int3"}, "--dtype"),
        ({"nnodes": 2, "node_rank": 2}, "--node-rank"),
        ({"nnodes": 2, "tp_size": 3, "dist_init_addr": "h:1"}, "--tp-size"),
        ({"nnodes": 2, "tp_size": 2}, "--dist-init-addr"),
        ({"port": 70000}, "--port"),
        ({"max_total_tokens": "many"}, "--max-total-tokens"),
        ({"torch_compile_max_bs": 0}, "--torch-compile-max-bs"),
    ],
)
def test_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ServerArgsError, match=flag):
        ServerArgs(**kwargs)


def test_choice_errors_list_allowed_values():
    with pytest.raises(ServerArgsError, match="lpm, fcfs"):
        ServerArgs(schedule_policy="x")


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"enable_dp_attention": True, "tp_size": 2, "nnodes": 2, "dist_init_addr": "h:1"}, "--enable-dp-attention"),
     ({"enable_dp_attention": True, "tp_size": 2, "nnodes": 2, "dist_init_addr": "h:1",
       "disaggregation_mode": "prefill"}, "--enable-dp-attention"),
     ({"dp_size": 2, "nnodes": 2, "tp_size": 2, "dist_init_addr": "h:1"}, "--dp-size"),
     ({"enable_two_batch_overlap": True}, "--enable-two-batch-overlap"),
     ({"moe_a2a_backend": "deepep"}, "--moe-a2a-backend")],
)
def test_unbuilt_features_say_so_in_one_line(kwargs, flag):
    for parallel in ({"tp_size": 2, "nnodes": 2, "dist_init_addr": "h:1"}, {"dp_size": 2}):
        assert ServerArgs(disaggregation_mode="prefill", **parallel).unbuilt_feature() is None
    message = ServerArgs(**kwargs).unbuilt_feature()
    assert message and message.startswith(flag) and "\n" not in message
    assert ServerArgs().unbuilt_feature() is None


def test_dp_attention_is_built():
    args = parse(["--tp-size", "4", "--dp-size", "2", "--enable-dp-attention", "--enable-dp-lm-head"])
    assert args.enable_dp_attention and args.enable_dp_lm_head and args.unbuilt_feature() is None
    with pytest.raises(ServerArgsError, match=r"^--enable-dp-attention: --dp-size \(3\) must divide --tp-size \(4\)"):
        ServerArgs(tp_size=4, dp_size=3, enable_dp_attention=True)
    with pytest.raises(ServerArgsError, match="^--enable-dp-lm-head: needs --enable-dp-attention"):
        ServerArgs(enable_dp_lm_head=True)


def test_dp_attention_on_a_pd_server_is_built_on_one_node():
    for mode in ("prefill", "decode"):
        args = parse(["--tp-size", "16", "--dp-size", "8", "--enable-dp-attention", "--disaggregation-mode", mode])
        assert args.enable_dp_attention and args.unbuilt_feature() is None
        multinode = ServerArgs(tp_size=16, dp_size=8, enable_dp_attention=True, disaggregation_mode=mode,
                               nnodes=2, dist_init_addr="h:1")
        assert multinode.unbuilt_feature().startswith("--dp-size 8 with --nnodes 2")


def test_pd_modes_are_built_on_one_rank():
    assert ServerArgs(disaggregation_mode="prefill").unbuilt_feature() is None
    assert ServerArgs(disaggregation_mode="decode", disaggregation_transfer_backend="fake").unbuilt_feature() is None
    with pytest.raises(ServerArgsError, match="mooncake, nixl, fake"):
        ServerArgs(disaggregation_transfer_backend="rdma")


def test_torch_compile_is_built():
    args = parse(["--enable-torch-compile", "--torch-compile-max-bs", "16"])
    assert args.enable_torch_compile and args.torch_compile_max_bs == 16
    assert args.unbuilt_feature() is None
    assert ServerArgs().torch_compile_max_bs is None  # auto: 32, as in SGLang


def test_help_lists_torch_compile_flags():
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    text = parser.format_help()
    assert "--enable-torch-compile" in text and "--torch-compile-max-bs" in text


def test_cli_exits_with_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "radixserve.generate", "--enable-two-batch-overlap"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--enable-two-batch-overlap" in lines[0]


def test_each_dp_group_rendezvouses_at_its_own_port():
    from radixserve.engine import dist_init_method

    assert dist_init_method("10.0.0.1:5000", 0) == "tcp://10.0.0.1:5000"
    assert dist_init_method("10.0.0.1:5000", 3) == "tcp://10.0.0.1:5003"
    assert dist_init_method("[::1]:7000", 1) == "tcp://[::1]:7001"
    a, b = dist_init_method(None, 0), dist_init_method(None, 1)
    assert a.startswith("tcp://127.0.0.1:") and a != b


def test_dp_attention_runs_tp_size_processes_in_one_world():
    """Plain --dp-size: D groups of T ranks, each its own rendezvous; DP attention: T ranks in all, one
    rendezvous, group g being ranks g*T/D .. (g+1)*T/D - 1."""
    from radixserve.engine import scheduler_ranks

    plain = scheduler_ranks(ServerArgs(tp_size=2, dp_size=2, dist_init_addr="h:5000"))
    assert plain == [(0, 0, "tcp://h:5000"), (0, 1, "tcp://h:5000"), (1, 0, "tcp://h:5001"), (1, 1, "tcp://h:5001")]
    dpa = scheduler_ranks(ServerArgs(tp_size=4, dp_size=2, enable_dp_attention=True, dist_init_addr="h:5000"))
    assert dpa == [(0, 0, "tcp://h:5000"), (0, 1, "tcp://h:5000"), (1, 2, "tcp://h:5000"), (1, 3, "tcp://h:5000")]


@pytest.mark.parametrize("addr", ["h:", "h:port", "h:70000", "h:0"])
def test_dist_init_addr_port_must_be_a_port(addr):
    with pytest.raises(ServerArgsError, match="--dist-init-addr"):
        ServerArgs(dist_init_addr=addr)


def test_every_flag_is_declared_once_and_the_parser_follows_the_declaration():
    import dataclasses

    from radixserve.server_flags import declared, flag_name

    fields = dataclasses.fields(ServerArgs)
    assert len(declared(ServerArgs)) == len(fields)  # nothing outside the declarations
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    actions = {a.dest: a for a in parser._actions}
    for f in fields:
        action = actions[f.name]
        assert flag_name(f.name) in action.option_strings and action.help == f.metadata["flag"].help
        if f.metadata["flag"].choices:
            assert tuple(action.choices) == f.metadata["flag"].choices
    assert "--max-payload-size" in actions["max_request_body_size"].option_strings
    args = parse(["--shutdown-timeout", "2.5", "--max-logprobs", "-1", "--port", "8080"])
    assert (args.shutdown_timeout, args.max_logprobs, args.port) == (2.5, -1, 8080)


@pytest.mark.parametrize("kwargs, message", [
    ({"http_header_timeout": 0}, "--http-header-timeout: must be > 0 seconds"),
    ({"shutdown_timeout": -1}, "--shutdown-timeout: must be >= 0 seconds"),
    ({"mem_fraction_static": 0.0}, r"--mem-fraction-static: must be in \(0, 1\)"),
    ({"max_logprobs": -2}, "--max-logprobs: must be >= -1"),
    ({"random_seed": "7"}, "--random-seed: must be an integer"),
    ({"timeout_keep_alive": True}, "--timeout-keep-alive: must be a number"),
    ({"log_level": "loud"}, "--log-level: invalid value"),
])
def test_declared_bounds_are_checked_with_the_flag_named(kwargs, message):
    with pytest.raises(ServerArgsError, match=message):
        ServerArgs(**kwargs)


def test_moe_parallel_flags():
    args = parse(["--tp-size", "4", "--ep-size", "2", "--moe-dense-tp-size", "1"])
    assert (args.ep_size, args.moe_dense_tp_size) == (2, 1) and args.unbuilt_feature() is None
    assert parse(["--tp-size", "2", "--expert-parallel-size", "2"]).ep_size == 2
    assert parse(["--tp-size", "2", "--ep", "2"]).ep_size == 2
    with pytest.raises(ServerArgsError, match="--ep-size \\(3\\) must divide --tp-size \\(4\\)"):
        ServerArgs(tp_size=4, ep_size=3)
    with pytest.raises(ServerArgsError, match="--moe-dense-tp-size: 1 .* got 2"):
        ServerArgs(tp_size=4, moe_dense_tp_size=2)
    # deepep: one line, whether or not the package is there
    message = ServerArgs(moe_a2a_backend="deepep").unbuilt_feature()
    assert message.startswith("--moe-a2a-backend deepep") and "\n" not in message
