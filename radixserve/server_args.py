"""ServerArgs: every flag of the runbook, declared once (default, help, group, allowed values, bounds:
server_flags.py derives the parser and the per-flag checks), and the checks that span flags."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from typing import Any

from radixserve.scheduler.output_estimate import clip_from_env
from radixserve.server_flags import ServerArgsError, add_arguments, check, declared, flag, flag_name

BUNDLED_MODEL_NAME = "smollm2-135m-instruct"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

MODEL, HTTP, MEMORY, KERNELS, PARALLEL, PD, LOGGING = (
    "model", "http", "memory and scheduling", "kernels", "parallelism", "pd disaggregation", "logging")
POSITIVE = {"minimum": 1}  # a count of at least one
PORT = {"minimum": 1, "maximum": 65535}
SECONDS = {"above": 0, "unit": "seconds"}


@dataclass
class ServerArgs:
    # ---- model --------------------------------------------------------------------------------
    model_path: str | None = flag(None, f"HF directory, GGUF file, or '{BUNDLED_MODEL_NAME}' (default: bundled model)",
                                  MODEL)
    tokenizer_path: str | None = flag(None, "tokenizer directory (default: the model's)", MODEL)
    dtype: str = flag("auto", "weight and activation dtype", MODEL, choices=("auto", "float32", "float16", "bfloat16"))
    quantization: str | None = flag(None, "weight quantization: fp8 quantizes a bf16/fp16 checkpoint's linear layers "
                                    "to FP8 (e4m3, 128x128 block scales) at load; a checkpoint that is FP8 already "
                                    "is detected from its quantization_config", MODEL, choices=("fp8",))
    kv_cache_dtype: str = flag("auto", "KV cache dtype: auto (the model dtype) or fp8_e4m3 (half the bytes; per-layer "
                               "scales from the checkpoint where it has them, else 1.0)", MEMORY,
                               choices=("auto", "fp8_e4m3"))
    load_format: str = flag("auto", "weight format; 'dummy' makes random weights from config.json", MODEL,
                            choices=("auto", "safetensors", "pt", "gguf", "dummy"))
    trust_remote_code: bool = flag(False, "let the model folder's own config and tokenizer code run (the model "
                                   "itself must be a built-in architecture)", MODEL)
    context_length: int | None = flag(None, "max tokens per sequence (default: from the model config)", MODEL,
                                      **POSITIVE)
    random_seed: int | None = flag(None, "seed for weights init and sampling", MODEL)
    # ---- http ---------------------------------------------------------------------------------
    host: str = flag("127.0.0.1", "address to bind", HTTP)
    port: int = flag(30000, "port to bind", HTTP, **PORT)
    api_key: str | None = flag(None, "require 'Authorization: Bearer KEY' (except /health and /metrics)", HTTP)
    served_model_name: str | None = flag(None, "model name in the OpenAI API (default: the model path)", HTTP)
    chat_template: str | None = flag(None, "a Jinja chat template, inline or a file path (default: the "
                                     "tokenizer's)", HTTP)
    enable_metrics: bool = flag(False, "serve Prometheus metrics at /metrics (always on)", HTTP)
    max_request_body_size: int = flag(32 * 1024 * 1024, "largest accepted request body in bytes (413 above); "
                                      "also --max-payload-size", HTTP, aliases=("--max-payload-size",), **POSITIVE)
    enable_cache_report: bool = flag(False, "report cached prompt tokens in usage (always on)", HTTP)
    grammar_backend: str = flag("xgrammar", "structured output backend (xgrammar; the others are not built)", HTTP,
                                choices=("xgrammar", "outlines", "llguidance", "none"))
    shutdown_timeout: float = flag(60.0, "seconds SIGTERM waits for requests in flight", HTTP, minimum=0,
                                   unit="seconds")
    max_logprobs: int = flag(20, "most top logprobs per token a request may ask for (/v1 logprobs and "
                             "top_logprobs, /generate top_logprobs_num); -1: no cap", HTTP, minimum=-1)
    stream_interval: int = flag(1, "a streaming request reports every this many tokens (its first at once; a "
                                "request's stream_interval overrides it)", HTTP, **POSITIVE)
    http_header_timeout: float = flag(30.0, "seconds a connection may take to send a request's headers (408, "
                                      "then closed)", HTTP, **SECONDS)
    http_body_timeout: float = flag(60.0, "seconds a request's body may take to arrive after its headers (408)",
                                    HTTP, **SECONDS)
    timeout_keep_alive: float = flag(5.0, "seconds an idle keep-alive connection is kept open", HTTP, **SECONDS)
    http_max_connections: int = flag(4096, "open connections at most; one more is answered 503 and closed", HTTP,
                                     **POSITIVE)
    # ---- memory and scheduling ----------------------------------------------------------------
    device: str = flag("auto", "device to run on", MEMORY, choices=("auto", "cpu", "cuda"))
    page_size: int = flag(1, "tokens per KV page", MEMORY, **POSITIVE)
    mem_fraction_static: float | None = flag(None, "fraction of GPU memory for weights + KV (default 0.9)", MEMORY,
                                             above=0, below=1)
    max_total_tokens: int | None = flag(None, "KV pool capacity in tokens", MEMORY, **POSITIVE)
    max_running_requests: int | None = flag(None, "max requests decoding at once", MEMORY, **POSITIVE)
    chunked_prefill_size: int | None = flag(None, "max tokens per prefill chunk; -1 disables chunking", MEMORY)
    max_prefill_tokens: int = flag(16384, "max new tokens in one prefill batch", MEMORY, **POSITIVE)
    schedule_policy: str = flag("lpm", "waiting-queue order: longest prefix match or first come", MEMORY,
                                choices=("lpm", "fcfs"))
    disable_radix_cache: bool = flag(False, "keep no prefix cache", MEMORY)
    decode_log_interval: int = flag(40, "log a decode line every N steps", MEMORY, **POSITIVE)
    # ---- kernels ------------------------------------------------------------------------------
    attention_backend: str | None = flag(None, "attention implementation (default: triton on CUDA, torch_native "
                                         "on CPU)", KERNELS, choices=("torch_native", "triton"))
    disable_cuda_graph: bool = flag(False, "do not capture CUDA graphs", KERNELS)
    cuda_graph_max_bs: int | None = flag(None, "largest decode batch run through CUDA graphs (default 256)", KERNELS,
                                         **POSITIVE)
    disable_overlap_schedule: bool = flag(False, "run scheduling and the GPU strictly in turn", KERNELS)
    enable_torch_compile: bool = flag(False, "torch.compile the model for decode batches up to "
                                      "--torch-compile-max-bs", KERNELS)
    torch_compile_max_bs: int | None = flag(None, "largest decode batch run through the torch.compile'd model "
                                            "(default 32)", KERNELS, **POSITIVE)
    enable_two_batch_overlap: bool = flag(False, "overlap two micro-batches", KERNELS)
    # ---- parallelism --------------------------------------------------------------------------
    tp_size: int = flag(1, "tensor parallel size", PARALLEL, aliases=("--tensor-parallel-size",), **POSITIVE)
    ep_size: int = flag(1, "expert parallel size (MoE models): the experts are dealt out over this many ranks of "
                        "the TP group, each expert's intermediate dim over the other tp/ep", PARALLEL,
                        aliases=("--expert-parallel-size", "--ep"), **POSITIVE)
    dp_size: int = flag(1, "data parallel size", PARALLEL, **POSITIVE)
    load_balance_method: str = flag("round_robin", "how the DP controller spreads requests", PARALLEL,
                                    choices=("round_robin", "shortest_queue", "minimum_tokens"))
    enable_dp_attention: bool = flag(False, "data parallel attention (MoE models): the --tp-size processes form "
                                     "--dp-size attention groups, each with its own requests and KV cache, and "
                                     "the MoE layers span all of them", PARALLEL)
    enable_dp_lm_head: bool = flag(False, "with --enable-dp-attention: split the LM head over each attention "
                                   "group instead of all --tp-size ranks", PARALLEL)
    moe_dense_tp_size: int | None = flag(None, "TP size for the dense MLP layers of MoE models: 1 keeps them "
                                         "whole on every rank (default: split like the rest)", PARALLEL)
    moe_a2a_backend: str = flag("none", "MoE token exchange between expert-parallel ranks: none (each rank "
                                "computes its experts for all tokens, one all-reduce) or deepep", PARALLEL,
                                choices=("none", "deepep"))
    dist_init_addr: str | None = flag(None, "HOST:PORT of node 0 for torch.distributed init (DP group i uses "
                                      "PORT + i)", PARALLEL)
    nnodes: int = flag(1, "number of nodes", PARALLEL, **POSITIVE)
    node_rank: int = flag(0, "this node's rank", PARALLEL, minimum=0)
    base_gpu_id: int = flag(0, "first GPU index to use", PARALLEL, minimum=0)
    dist_timeout: int | None = flag(None, "timeout in seconds for torch.distributed", PARALLEL, **POSITIVE)
    # ---- pd disaggregation --------------------------------------------------------------------
    disaggregation_mode: str = flag("null", "null, prefill or decode", PD, choices=("null", "prefill", "decode"))
    disaggregation_ib_device: str | None = flag(None, "InfiniBand device for KV transfer", PD)
    disaggregation_bootstrap_port: int = flag(8998, "bootstrap port of a prefill server", PD, **PORT)
    disaggregation_transfer_backend: str = flag("mooncake", "KV transfer engine between prefill and decode servers",
                                                PD, choices=("mooncake", "nixl", "fake"))
    # ---- logging ------------------------------------------------------------------------------
    log_level: str = flag("info", "python logging level", LOGGING)

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------
    def validate(self) -> None:
        for f, spec in declared(ServerArgs):
            check(f, spec, getattr(self, f.name))
        try:
            clip_from_env()
        except ValueError as e:
            raise ServerArgsError(str(e)) from None
        if self.log_level.lower() not in LOG_LEVELS:
            raise ServerArgsError(f"--log-level: invalid value {self.log_level!r}; allowed: {', '.join(LOG_LEVELS)}")
        if self.chunked_prefill_size is not None and (
            self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1
        ):
            raise ServerArgsError(
                f"{flag_name('chunked_prefill_size')}: must be a positive number of tokens or -1 "
                f"(disabled); got {self.chunked_prefill_size}"
            )
        if self.node_rank >= self.nnodes:
            raise ServerArgsError(
                f"--node-rank: must be below --nnodes ({self.nnodes}); got {self.node_rank}"
            )
        if self.tp_size % self.nnodes:
            raise ServerArgsError(
                f"--tp-size ({self.tp_size}) must be a multiple of --nnodes ({self.nnodes}): each node runs "
                "the same number of ranks"
            )
        if self.tp_size % self.ep_size:
            raise ServerArgsError(
                f"--ep-size ({self.ep_size}) must divide --tp-size ({self.tp_size}): expert-parallel ranks are "
                "ranks of the TP group"
            )
        if self.moe_dense_tp_size not in (None, 1, self.tp_size):
            raise ServerArgsError(
                f"--moe-dense-tp-size: 1 (dense layers whole on every rank) or the --tp-size ({self.tp_size}); "
                f"got {self.moe_dense_tp_size}"
            )
        if self.enable_dp_attention and self.tp_size % self.dp_size:
            raise ServerArgsError(
                f"--enable-dp-attention: --dp-size ({self.dp_size}) must divide --tp-size ({self.tp_size}); the "
                "--tp-size processes form --dp-size attention groups"
            )
        if self.enable_dp_lm_head and not self.enable_dp_attention:
            raise ServerArgsError("--enable-dp-lm-head: needs --enable-dp-attention (it splits the LM head over "
                                  "each DP attention group)")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ServerArgsError("--dist-init-addr HOST:PORT (node 0's address) is required with --nnodes > 1")
        if self.dist_init_addr is not None:
            port = self.dist_init_addr.rsplit(":", 1)[-1] if ":" in self.dist_init_addr else ""
            # each DP group rendezvouses at the port plus its DP rank
            if not port.isdigit() or not 1 <= int(port) <= 65535 - (self.dp_size - 1):
                raise ServerArgsError(f"--dist-init-addr: expected HOST:PORT; got {self.dist_init_addr!r}")

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def node_ranks(self) -> range:
        """The TP ranks this node runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    def unbuilt_feature(self) -> str | None:
        """The first accepted flag whose feature this build does not have yet, as one line."""
        pending = "is accepted but not built yet in this radixserve version"
        checks = [
            (self.dp_size > 1 and self.nnodes > 1,
             f"--dp-size {self.dp_size} with --nnodes {self.nnodes}: multi-node data parallelism {pending}"),
            (self.enable_two_batch_overlap, f"--enable-two-batch-overlap: two-batch overlap {pending}"),
            (self.grammar_backend != "xgrammar",
             f"--grammar-backend {self.grammar_backend}: radixserve's structured output runs on xgrammar only; "
             "use --grammar-backend xgrammar"),
            (self.enable_dp_attention and self.nnodes > 1,
             f"--enable-dp-attention with --nnodes {self.nnodes}: multi-node DP attention {pending}"),
            (self.moe_a2a_backend == "deepep" and importlib.util.find_spec("deep_ep") is None,
             "--moe-a2a-backend deepep: needs DeepEP (the deep_ep package), which is not installed; use "
             "--moe-a2a-backend none"),
            (self.moe_a2a_backend == "deepep",
             f"--moe-a2a-backend deepep: dispatch through DeepEP {pending} (it pays with --enable-dp-attention, "
             "also not built); use --moe-a2a-backend none"),
        ]
        for hit, message in checks:
            if hit:
                return message
        return None

    # ---- argparse ---------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        add_arguments(ServerArgs, parser)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerArgs:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    @classmethod
    def from_cli_or_exit(cls, args: argparse.Namespace) -> ServerArgs:
        """Validated args whose features are all built; otherwise one line on stderr and exit 2."""
        try:
            server_args = cls.from_cli_args(args)
            unbuilt = server_args.unbuilt_feature()
            if unbuilt:
                raise ServerArgsError(unbuilt)
        except ServerArgsError as e:
            print(f"radixserve: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return server_args


def chunked_prefill_size(args: ServerArgs, on_gpu: bool) -> int:
    """--chunked-prefill-size, or its default for the device (-1: no chunking)."""
    if args.chunked_prefill_size is not None:
        return args.chunked_prefill_size
    return 8192 if on_gpu else 2048



# allowed values by field name, for tools that take a few of the server's flags (benchmarks)
CHOICES: dict[str, tuple[Any, ...]] = {f.name: spec.choices for f, spec in declared(ServerArgs) if spec.choices}
__all__ = ["BUNDLED_MODEL_NAME", "CHOICES", "ServerArgs", "ServerArgsError", "chunked_prefill_size", "flag_name"]
