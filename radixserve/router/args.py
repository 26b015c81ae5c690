"""The router's flags: SGLang router's (`python -m sglang_router.launch_router --help`), with its
defaults, plus the runbook's `--load-balance-method` as another name for `--policy`. SGLang's flags
for parts radixserve's router does not have (Kubernetes discovery, history stores, MCP, TLS, JWT,
gateway mode...) are known, and refused with one line when given."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from radixserve.router.policies import POLICY_NAMES as POLICIES

DEFAULT_REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id", "x-trace-id", "request-id")

# SGLang router flags radixserve's router does not implement: what each belongs to
NOT_BUILT = {
    "--bucket-adjust-interval-secs": "the bucket prefill policy",
    "--max-idle-secs": "the manual policy",
    "--assignment-mode": "the manual policy",
    "--dp-aware": "DP-aware scheduling (route to a server; its DP controller picks the rank)",
    "--enable-igw": "gateway (multi-model) mode",
    "--mini-lb": "the mini load balancer",
    "--service-discovery": "Kubernetes service discovery",
    "--selector": "Kubernetes service discovery",
    "--service-discovery-port": "Kubernetes service discovery",
    "--service-discovery-namespace": "Kubernetes service discovery",
    "--prefill-selector": "Kubernetes service discovery",
    "--decode-selector": "Kubernetes service discovery",
    "--model-path": "router-side tokenization (gRPC workers)",
    "--tokenizer-path": "router-side tokenization (gRPC workers)",
    "--chat-template": "router-side tokenization (gRPC workers)",
    "--tokenizer-cache-enable-l0": "router-side tokenization (gRPC workers)",
    "--tokenizer-cache-l0-max-entries": "router-side tokenization (gRPC workers)",
    "--tokenizer-cache-enable-l1": "router-side tokenization (gRPC workers)",
    "--tokenizer-cache-l1-max-memory": "router-side tokenization (gRPC workers)",
    "--reasoning-parser": "router-side parsing (the servers parse)",
    "--tool-call-parser": "router-side parsing (the servers parse)",
    "--mcp-config-path": "MCP tools",
    "--backend": "OpenAI-backend mode",
    "--history-backend": "conversation history stores",
    "--oracle-wallet-path": "the Oracle history store",
    "--oracle-tns-alias": "the Oracle history store",
    "--oracle-connect-descriptor": "the Oracle history store",
    "--oracle-username": "the Oracle history store",
    "--oracle-password": "the Oracle history store",
    "--oracle-pool-min": "the Oracle history store",
    "--oracle-pool-max": "the Oracle history store",
    "--oracle-pool-timeout-secs": "the Oracle history store",
    "--postgres-db-url": "the Postgres history store",
    "--postgres-pool-max": "the Postgres history store",
    "--redis-url": "the Redis history store",
    "--redis-pool-max": "the Redis history store",
    "--redis-retention-days": "the Redis history store",
    "--client-cert-path": "mutual TLS to workers",
    "--client-key-path": "mutual TLS to workers",
    "--ca-cert-paths": "mutual TLS to workers",
    "--tls-cert-path": "TLS serving",
    "--tls-key-path": "TLS serving",
    "--enable-trace": "OpenTelemetry tracing",
    "--otlp-traces-endpoint": "OpenTelemetry tracing",
    "--control-plane-api-keys": "control-plane authentication",
    "--control-plane-audit-enabled": "control-plane authentication",
    "--jwt-issuer": "JWT authentication",
    "--jwt-audience": "JWT authentication",
    "--jwt-jwks-uri": "JWT authentication",
    "--jwt-role-mapping": "JWT authentication",
}
# flags that take no value (the rest take one or more)
NOT_BUILT_SWITCHES = {"--dp-aware", "--enable-igw", "--mini-lb", "--service-discovery", "--tokenizer-cache-enable-l0",
                      "--tokenizer-cache-enable-l1", "--enable-trace", "--control-plane-audit-enabled"}


class RouterArgsError(ValueError):
    pass


@dataclass
class PrefillSpec:
    url: str
    bootstrap_port: int | None = None


@dataclass
class RouterArgs:
    host: str = "0.0.0.0"
    port: int = 30000
    worker_urls: list[str] = field(default_factory=list)
    policy: str = "cache_aware"
    prefill_policy: str | None = None
    decode_policy: str | None = None
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 2**26
    max_payload_size: int = 512 * 1024 * 1024
    pd_disaggregation: bool = False
    prefill: list[PrefillSpec] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    worker_startup_timeout_secs: float = 1800.0
    worker_startup_check_interval: float = 30.0
    log_dir: str | None = None
    log_level: str = "info"
    prometheus_port: int = 29000
    prometheus_host: str = "0.0.0.0"
    prometheus_duration_buckets: list[float] | None = None
    request_id_headers: list[str] = field(default_factory=lambda: list(DEFAULT_REQUEST_ID_HEADERS))
    request_timeout_secs: float = 1800.0
    shutdown_grace_period_secs: float = 180.0
    cors_allowed_origins: list[str] = field(default_factory=list)
    max_concurrent_requests: int = -1
    queue_size: int = 100
    queue_timeout_secs: float = 60.0
    rate_limit_tokens_per_second: float | None = None
    retry_max_retries: int = 5
    retry_initial_backoff_ms: float = 50.0
    retry_max_backoff_ms: float = 30000.0
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    disable_retries: bool = False
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: float = 60.0
    cb_window_duration_secs: float = 120.0
    disable_circuit_breaker: bool = False
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_timeout_secs: float = 5.0
    health_check_interval_secs: float = 60.0
    health_check_endpoint: str = "/health"
    disable_health_check: bool = False
    api_key: str | None = None

    @property
    def max_attempts(self) -> int:
        """Tries per request, the first included (SGLang: --disable-retries means one)."""
        return 1 if self.disable_retries else max(1, self.retry_max_retries)

    def check(self) -> None:
        for name in ("policy", "prefill_policy", "decode_policy"):
            value = getattr(self, name)
            if value is not None and value not in POLICIES:
                raise RouterArgsError(f"--{name.replace('_', '-')} {value}: radixserve's router has the policies "
                                      f"{', '.join(POLICIES)} (SGLang's manual and bucket are not built)")
        if self.pd_disaggregation:
            if self.worker_urls:
                raise RouterArgsError("--worker-urls is for regular mode; with --pd-disaggregation name the "
                                      "servers with --prefill and --decode")
            if not self.prefill or not self.decode:
                raise RouterArgsError("--pd-disaggregation needs at least one --prefill and one --decode server "
                                      "(servers can also be added later through POST /workers)")
        elif self.prefill or self.decode:
            raise RouterArgsError("--prefill and --decode need --pd-disaggregation")
        for url in [*self.worker_urls, *(p.url for p in self.prefill), *self.decode]:
            check_url(url)
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise RouterArgsError(f"--cache-threshold must be in [0, 1], got {self.cache_threshold}")
        if not 0.0 <= self.retry_jitter_factor <= 1.0:
            raise RouterArgsError(f"--retry-jitter-factor must be in [0, 1], got {self.retry_jitter_factor}")
        if self.max_payload_size <= 0 or self.request_timeout_secs <= 0:
            raise RouterArgsError("--max-payload-size and --request-timeout-secs must be positive")
        if self.max_concurrent_requests == 0 or self.max_concurrent_requests < -1:
            raise RouterArgsError("--max-concurrent-requests is a positive number, or -1 for no limit")
        if self.rate_limit_tokens_per_second is not None and self.rate_limit_tokens_per_second <= 0:
            raise RouterArgsError("--rate-limit-tokens-per-second must be positive")
        if self.queue_size < 0:
            raise RouterArgsError("--queue-size must be 0 or more")
        if not self.health_check_endpoint.startswith("/"):
            raise RouterArgsError(f"--health-check-endpoint must be a path, got {self.health_check_endpoint!r}")


def check_url(url: str) -> str:
    """A worker's URL, without a trailing slash; refused unless http(s)://host[:port]."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise RouterArgsError(f"worker URL {url!r} has a malformed port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
        raise RouterArgsError(f"worker URL {url!r} is not of the form http://host:port")
    return url.rstrip("/")


def parse_prefill(values: list[str]) -> PrefillSpec:
    """--prefill URL [BOOTSTRAP_PORT|none]"""
    if not 1 <= len(values) <= 2:
        raise RouterArgsError(f"--prefill takes a URL and an optional bootstrap port, got {' '.join(values)}")
    port = None
    if len(values) == 2 and values[1].lower() != "none":
        try:
            port = int(values[1])
        except ValueError:
            raise RouterArgsError(f"--prefill {values[0]}: bootstrap port {values[1]!r} is not a number "
                                  "or 'none'") from None
        if not 0 < port < 65536:
            raise RouterArgsError(f"--prefill {values[0]}: bootstrap port {port} is out of range")
    return PrefillSpec(check_url(values[0]), port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m radixserve.launch_router",
                                description="radixserve's router: SGLang router's flags, regular or PD mode.")
    d = RouterArgs()
    add = p.add_argument
    add("--host", default=d.host)
    add("--port", type=int, default=d.port)
    add("--worker-urls", nargs="*", default=[], help="regular mode: the servers")
    add("--policy", "--load-balance-method", dest="policy", default=d.policy, help=f"one of {', '.join(POLICIES)}")
    add("--prefill-policy", default=None)
    add("--decode-policy", default=None)
    add("--cache-threshold", type=float, default=d.cache_threshold)
    add("--balance-abs-threshold", type=int, default=d.balance_abs_threshold)
    add("--balance-rel-threshold", type=float, default=d.balance_rel_threshold)
    add("--eviction-interval-secs", type=float, default=d.eviction_interval_secs)
    add("--max-tree-size", type=int, default=d.max_tree_size)
    add("--max-payload-size", type=int, default=d.max_payload_size)
    add("--pd-disaggregation", action="store_true")
    add("--prefill", nargs="+", action="append", default=[], metavar=("URL", "BOOTSTRAP_PORT"))
    add("--decode", action="append", default=[], metavar="URL")
    add("--worker-startup-timeout-secs", type=float, default=d.worker_startup_timeout_secs)
    add("--worker-startup-check-interval", type=float, default=d.worker_startup_check_interval)
    add("--log-dir", default=None)
    add("--log-level", default=d.log_level, choices=["debug", "info", "warn", "warning", "error"])
    add("--prometheus-port", type=int, default=d.prometheus_port)
    add("--prometheus-host", default=d.prometheus_host)
    add("--prometheus-duration-buckets", type=float, nargs="+", default=None)
    add("--request-id-headers", nargs="*", default=None)
    add("--request-timeout-secs", type=float, default=d.request_timeout_secs)
    add("--shutdown-grace-period-secs", type=float, default=d.shutdown_grace_period_secs)
    add("--cors-allowed-origins", nargs="*", default=[])
    add("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    add("--queue-size", type=int, default=d.queue_size)
    add("--queue-timeout-secs", type=float, default=d.queue_timeout_secs)
    add("--rate-limit-tokens-per-second", type=float, default=None)
    add("--retry-max-retries", type=int, default=d.retry_max_retries)
    add("--retry-initial-backoff-ms", type=float, default=d.retry_initial_backoff_ms)
    add("--retry-max-backoff-ms", type=float, default=d.retry_max_backoff_ms)
    add("--retry-backoff-multiplier", type=float, default=d.retry_backoff_multiplier)
    add("--retry-jitter-factor", type=float, default=d.retry_jitter_factor)
    add("--disable-retries", action="store_true")
    add("--cb-failure-threshold", type=int, default=d.cb_failure_threshold)
    add("--cb-success-threshold", type=int, default=d.cb_success_threshold)
    add("--cb-timeout-duration-secs", type=float, default=d.cb_timeout_duration_secs)
    add("--cb-window-duration-secs", type=float, default=d.cb_window_duration_secs)
    add("--disable-circuit-breaker", action="store_true")
    add("--health-failure-threshold", type=int, default=d.health_failure_threshold)
    add("--health-success-threshold", type=int, default=d.health_success_threshold)
    add("--health-check-timeout-secs", type=float, default=d.health_check_timeout_secs)
    add("--health-check-interval-secs", type=float, default=d.health_check_interval_secs)
    add("--health-check-endpoint", default=d.health_check_endpoint)
    add("--disable-health-check", action="store_true")
    add("--api-key", default=None)
    for flag in NOT_BUILT:  # known, so that giving one is refused by name rather than as unknown
        if flag in NOT_BUILT_SWITCHES:
            add(flag, action="store_true", default=None, help=argparse.SUPPRESS)
        else:
            add(flag, nargs="*", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> RouterArgs:
    ns = vars(build_parser().parse_args(argv))
    for flag, what in NOT_BUILT.items():
        if ns.pop(flag[2:].replace("-", "_")) is not None:
            raise RouterArgsError(f"{flag}: {what} is not built in radixserve's router")
    ns["prefill"] = [parse_prefill(v) for v in ns["prefill"]]
    ns["worker_urls"] = [check_url(u) for u in ns["worker_urls"]]
    ns["decode"] = [check_url(u) for u in ns["decode"]]
    if ns["request_id_headers"] is None:
        ns["request_id_headers"] = list(DEFAULT_REQUEST_ID_HEADERS)
    ns["request_id_headers"] = [h.lower() for h in ns["request_id_headers"]]
    if ns["log_level"] == "warn":
        ns["log_level"] = "warning"
    args = RouterArgs(**ns)
    args.check()
    return args
