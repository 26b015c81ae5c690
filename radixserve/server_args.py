"""ServerArgs: every flag of the runbook, its default, its validation and its argparse group."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from radixserve.scheduler.output_estimate import clip_from_env

BUNDLED_MODEL_NAME = "smollm2-135m-instruct"

CHOICES: dict[str, tuple[Any, ...]] = {
    "dtype": ("auto", "float32", "float16", "bfloat16"),
    "load_format": ("auto", "safetensors", "pt", "gguf", "dummy"),
    "attention_backend": ("torch_native", "triton"),
    "schedule_policy": ("lpm", "fcfs"),
    "device": ("auto", "cpu", "cuda"),
    "disaggregation_mode": ("null", "prefill", "decode"),
    "moe_a2a_backend": ("none", "deepep"),
    "load_balance_method": ("round_robin", "shortest_queue", "minimum_tokens"),
    "grammar_backend": ("xgrammar", "outlines", "llguidance", "none"),
}

# Other spellings of a flag, as SGLang accepts them
ALIASES: dict[str, tuple[str, ...]] = {"max_request_body_size": ("--max-payload-size",)}


class ServerArgsError(ValueError):
    """A flag has a bad value. The message names the flag and what is allowed."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str | None = None
    tokenizer_path: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    trust_remote_code: bool = False
    context_length: int | None = None
    random_seed: int | None = None
    # HTTP
    host: str = "127.0.0.1"
    port: int = 30000
    # Memory and scheduling
    device: str = "auto"
    page_size: int = 1
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None
    max_prefill_tokens: int = 16384
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    decode_log_interval: int = 40
    # Kernels
    attention_backend: str | None = None
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None
    disable_overlap_schedule: bool = False
    enable_torch_compile: bool = False
    torch_compile_max_bs: int | None = None
    enable_two_batch_overlap: bool = False
    # Parallelism
    tp_size: int = 1
    dp_size: int = 1
    load_balance_method: str = "round_robin"
    enable_dp_attention: bool = False
    enable_dp_lm_head: bool = False
    moe_dense_tp_size: int | None = None
    moe_a2a_backend: str = "none"
    dist_init_addr: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    base_gpu_id: int = 0
    dist_timeout: int | None = None
    # PD disaggregation
    disaggregation_mode: str = "null"
    disaggregation_ib_device: str | None = None
    disaggregation_bootstrap_port: int = 8998
    # HTTP server
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    enable_metrics: bool = False  # metrics are always served; the flag is accepted for compatibility
    max_request_body_size: int = 32 * 1024 * 1024
    enable_cache_report: bool = False  # accepted: usage always reports cached tokens
    grammar_backend: str = "xgrammar"
    shutdown_timeout: float = 60.0
    max_logprobs: int = 20  # top logprobs per token a request may ask for; -1: no cap (vLLM's flag)
    # slow or idle clients: seconds for a request's headers, for its body, between requests
    http_header_timeout: float = 30.0
    http_body_timeout: float = 60.0
    timeout_keep_alive: float = 5.0
    http_max_connections: int = 4096
    # Logging
    log_level: str = "info"

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------
    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ServerArgsError(
                    f"{flag_name(name)}: invalid value {value!r}; allowed: {', '.join(map(str, allowed))}"
                )
        self._check_int("page_size", minimum=1)
        self._check_int("port", minimum=1, maximum=65535)
        self._check_int("tp_size", minimum=1)
        self._check_int("dp_size", minimum=1)
        self._check_int("nnodes", minimum=1)
        self._check_int("node_rank", minimum=0)
        self._check_int("base_gpu_id", minimum=0)
        self._check_int("decode_log_interval", minimum=1)
        self._check_int("max_prefill_tokens", minimum=1)
        self._check_int("max_total_tokens", minimum=1)
        self._check_int("max_running_requests", minimum=1)
        self._check_int("context_length", minimum=1)
        self._check_int("dist_timeout", minimum=1)
        self._check_int("disaggregation_bootstrap_port", minimum=1, maximum=65535)
        self._check_int("max_request_body_size", minimum=1)
        self._check_int("cuda_graph_max_bs", minimum=1)
        self._check_int("torch_compile_max_bs", minimum=1)
        if not isinstance(self.shutdown_timeout, int | float) or self.shutdown_timeout < 0:
            raise ServerArgsError(f"--shutdown-timeout: must be >= 0 seconds; got {self.shutdown_timeout!r}")
        for name in ("http_header_timeout", "http_body_timeout", "timeout_keep_alive"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ServerArgsError(f"{flag_name(name)}: must be > 0 seconds; got {value!r}")
        self._check_int("http_max_connections", minimum=1)
        try:
            clip_from_env()
        except ValueError as e:
            raise ServerArgsError(str(e)) from None
        self._check_int("max_logprobs", minimum=-1)
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ServerArgsError(
                f"--log-level: invalid value {self.log_level!r}; allowed: debug, info, warning, error, critical"
            )
        if self.chunked_prefill_size is not None and (
            self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1
        ):
            raise ServerArgsError(
                f"{flag_name('chunked_prefill_size')}: must be a positive number of tokens or -1 "
                f"(disabled); got {self.chunked_prefill_size}"
            )
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ServerArgsError(
                f"{flag_name('mem_fraction_static')}: must be in (0, 1); got {self.mem_fraction_static}"
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
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ServerArgsError("--dist-init-addr HOST:PORT (node 0's address) is required with --nnodes > 1")
        if self.dist_init_addr is not None:
            port = self.dist_init_addr.rsplit(":", 1)[-1] if ":" in self.dist_init_addr else ""
            # each DP group rendezvouses at the port plus its DP rank
            if not port.isdigit() or not 1 <= int(port) <= 65535 - (self.dp_size - 1):
                raise ServerArgsError(f"--dist-init-addr: expected HOST:PORT; got {self.dist_init_addr!r}")

    def _check_int(self, name: str, minimum: int | None = None, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise ServerArgsError(f"{flag_name(name)}: must be an integer; got {value!r}")
        if minimum is not None and value < minimum:
            raise ServerArgsError(f"{flag_name(name)}: must be >= {minimum}; got {value}")
        if maximum is not None and value > maximum:
            raise ServerArgsError(f"{flag_name(name)}: must be <= {maximum}; got {value}")

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
            (self.disaggregation_mode != "null",
             f"--disaggregation-mode {self.disaggregation_mode}: PD disaggregation {pending}"),
            (self.disaggregation_ib_device is not None,
             "--disaggregation-ib-device: InfiniBand KV transfer needs Mooncake, which is not installed"),
            (self.enable_two_batch_overlap, f"--enable-two-batch-overlap: two-batch overlap {pending}"),
            (self.grammar_backend != "xgrammar",
             f"--grammar-backend {self.grammar_backend}: radixserve's structured output runs on xgrammar only; "
             "use --grammar-backend xgrammar"),
            (self.enable_dp_attention, f"--enable-dp-attention: DP attention (MoE models) {pending}"),
            (self.enable_dp_lm_head, f"--enable-dp-lm-head: DP LM head {pending}"),
            (self.moe_dense_tp_size is not None, f"--moe-dense-tp-size: MoE models {pending}"),
            (self.moe_a2a_backend != "none",
             f"--moe-a2a-backend {self.moe_a2a_backend}: needs DeepEP, which is not installed; use 'none'"),
        ]
        for hit, message in checks:
            if hit:
                return message
        return None

    # ---- argparse ---------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d = ServerArgs.__dataclass_fields__

        def default(name: str) -> Any:
            f = d[name]
            return f.default if f.default is not dataclasses.MISSING else None

        def add(group: argparse._ArgumentGroup, name: str, help_text: str, **kw: Any) -> None:
            if d[name].type in ("bool", bool):
                group.add_argument(flag_name(name), action="store_true", help=help_text)
                return
            if name in CHOICES:
                kw.setdefault("choices", CHOICES[name])
            group.add_argument(flag_name(name), *ALIASES.get(name, ()), default=default(name), help=help_text, **kw)

        g = parser.add_argument_group("model")
        add(g, "model_path", f"HF directory, GGUF file, or '{BUNDLED_MODEL_NAME}' (default: bundled model)")
        add(g, "tokenizer_path", "tokenizer directory (default: the model's)")
        add(g, "dtype", "weight and activation dtype")
        add(g, "load_format", "weight format; 'dummy' makes random weights from config.json")
        add(g, "trust_remote_code", "let the model folder's own config and tokenizer code run (the model "
            "itself must be a built-in architecture)")
        add(g, "context_length", "max tokens per sequence (default: from the model config)", type=int)
        add(g, "random_seed", "seed for weights init and sampling", type=int)
        g = parser.add_argument_group("http")
        add(g, "host", "address to bind")
        add(g, "port", "port to bind", type=int)
        add(g, "api_key", "require 'Authorization: Bearer KEY' (except /health and /metrics)")
        add(g, "served_model_name", "model name in the OpenAI API (default: the model path)")
        add(g, "chat_template", "a Jinja chat template, inline or a file path (default: the tokenizer's)")
        add(g, "enable_metrics", "serve Prometheus metrics at /metrics (always on)")
        add(g, "max_request_body_size", "largest accepted request body in bytes (413 above); also "
            "--max-payload-size", type=int)
        add(g, "enable_cache_report", "report cached prompt tokens in usage (always on)")
        add(g, "grammar_backend", "structured output backend (xgrammar; the others are not built)")
        add(g, "shutdown_timeout", "seconds SIGTERM waits for requests in flight", type=float)
        add(g, "max_logprobs", "most top logprobs per token a request may ask for (/v1 logprobs and "
            "top_logprobs, /generate top_logprobs_num); -1: no cap", type=int)
        add(g, "http_header_timeout", "seconds a connection may take to send a request's headers (408, "
            "then closed)", type=float)
        add(g, "http_body_timeout", "seconds a request's body may take to arrive after its headers (408)",
            type=float)
        add(g, "timeout_keep_alive", "seconds an idle keep-alive connection is kept open", type=float)
        add(g, "http_max_connections", "open connections at most; one more is answered 503 and closed",
            type=int)
        g = parser.add_argument_group("memory and scheduling")
        add(g, "device", "device to run on")
        add(g, "page_size", "tokens per KV page", type=int)
        add(g, "mem_fraction_static", "fraction of GPU memory for weights + KV (default 0.9)", type=float)
        add(g, "max_total_tokens", "KV pool capacity in tokens", type=int)
        add(g, "max_running_requests", "max requests decoding at once", type=int)
        add(g, "chunked_prefill_size", "max tokens per prefill chunk; -1 disables chunking", type=int)
        add(g, "max_prefill_tokens", "max new tokens in one prefill batch", type=int)
        add(g, "schedule_policy", "waiting-queue order: longest prefix match or first come")
        add(g, "disable_radix_cache", "keep no prefix cache")
        add(g, "decode_log_interval", "log a decode line every N steps", type=int)
        g = parser.add_argument_group("kernels")
        add(g, "attention_backend", "attention implementation (default: torch_native)")
        add(g, "disable_cuda_graph", "do not capture CUDA graphs")
        add(g, "cuda_graph_max_bs", "largest decode batch run through CUDA graphs (default 256)", type=int)
        add(g, "disable_overlap_schedule", "run scheduling and the GPU strictly in turn")
        add(g, "enable_torch_compile", "torch.compile the model for decode batches up to --torch-compile-max-bs")
        add(g, "torch_compile_max_bs", "largest decode batch run through the torch.compile'd model (default 32)",
            type=int)
        add(g, "enable_two_batch_overlap", "overlap two micro-batches")
        g = parser.add_argument_group("parallelism")
        add(g, "tp_size", "tensor parallel size", type=int)
        add(g, "dp_size", "data parallel size", type=int)
        add(g, "load_balance_method", "how the DP controller spreads requests")
        add(g, "enable_dp_attention", "data parallel attention (MoE models)")
        add(g, "enable_dp_lm_head", "data parallel LM head (with DP attention)")
        add(g, "moe_dense_tp_size", "TP size for dense layers of MoE models", type=int)
        add(g, "moe_a2a_backend", "MoE all-to-all backend")
        add(g, "dist_init_addr", "HOST:PORT of node 0 for torch.distributed init (DP group i uses PORT + i)")
        add(g, "nnodes", "number of nodes", type=int)
        add(g, "node_rank", "this node's rank", type=int)
        add(g, "base_gpu_id", "first GPU index to use", type=int)
        add(g, "dist_timeout", "timeout in seconds for torch.distributed", type=int)
        g = parser.add_argument_group("pd disaggregation")
        add(g, "disaggregation_mode", "null, prefill or decode")
        add(g, "disaggregation_ib_device", "InfiniBand device for KV transfer")
        add(g, "disaggregation_bootstrap_port", "bootstrap port of a prefill server", type=int)
        g = parser.add_argument_group("logging")
        add(g, "log_level", "python logging level")

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

