"""PD timeouts, read from the environment under SGLang's names (SGLANG_DISAGGREGATION_*) or ours
(RADIXSERVE_DISAGGREGATION_*, which wins), with SGLang's defaults."""

from __future__ import annotations

import os

# a bootstrap host that names no server: requests with it run alone (SGLang's warm-up uses it)
FAKE_BOOTSTRAP_HOST = "2.2.2.2"


def env_seconds(name: str, default: float) -> float:
    for prefix in ("RADIXSERVE_DISAGGREGATION_", "SGLANG_DISAGGREGATION_"):
        value = os.environ.get(prefix + name)
        if value:
            return float(value)
    return default


def bootstrap_timeout() -> float:
    """Prefill: how long a request waits for its decode server's KV destination."""
    return env_seconds("BOOTSTRAP_TIMEOUT", 300.0)


def waiting_timeout() -> float:
    """Decode: how long a request waits for its prompt's KV once its destination is sent."""
    return env_seconds("WAITING_TIMEOUT", 300.0)


def heartbeat_interval() -> float:
    """Decode: seconds between checks that a prefill server with KV on its way still answers."""
    return env_seconds("HEARTBEAT_INTERVAL", 5.0)


def heartbeat_max_failure() -> int:
    """Decode: missed heartbeats in a row after which a prefill server counts as gone."""
    return max(1, int(env_seconds("HEARTBEAT_MAX_FAILURE", 2)))


def reachable_host(host: str) -> str:
    """The address peers use to reach a server bound to `host` (a wildcard means this machine)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
