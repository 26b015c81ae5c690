"""A worker as the router sees it: its URL, role, health, circuit breaker and load."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class BreakerConfig:
    failure_threshold: int = 10  # failures within the window that open the circuit
    success_threshold: int = 3  # successes in half-open that close it again
    timeout_secs: float = 60.0  # open this long before one request is let through (half-open)
    window_secs: float = 120.0
    enabled: bool = True


@dataclass
class CircuitBreaker:
    """closed (requests flow) -> open after failure_threshold failures within the window (none
    flow) -> half-open after timeout_secs (requests flow as probes) -> closed after
    success_threshold successes in a row, or open again on a failure."""

    config: BreakerConfig = field(default_factory=BreakerConfig)
    state: str = "closed"
    opened_at: float = 0.0
    failures: deque = field(default_factory=deque)  # times of recent failures
    half_open_successes: int = 0
    transitions: int = 0

    def allows(self, now: float | None = None) -> bool:
        if not self.config.enabled or self.state == "closed":
            return True
        now = time.monotonic() if now is None else now
        if self.state == "open" and now - self.opened_at >= self.config.timeout_secs:
            self._to("half_open")
        return self.state == "half_open"

    def record(self, ok: bool, now: float | None = None) -> None:
        if not self.config.enabled:
            return
        now = time.monotonic() if now is None else now
        if ok:
            if self.state == "half_open":
                self.half_open_successes += 1
                if self.half_open_successes >= self.config.success_threshold:
                    self._to("closed")
            return
        if self.state == "half_open":
            self._to("open", now)
            return
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.config.window_secs:
            self.failures.popleft()
        if self.state == "closed" and len(self.failures) >= self.config.failure_threshold:
            self._to("open", now)

    def _to(self, state: str, now: float | None = None) -> None:
        self.state = state
        self.transitions += 1
        self.half_open_successes = 0
        if state == "open":
            self.opened_at = time.monotonic() if now is None else now
        if state == "closed":
            self.failures.clear()


@dataclass(eq=False)
class Worker:
    """One server behind the router. role: "regular", "prefill" or "decode"."""

    url: str  # "http://host:port", no trailing slash
    role: str = "regular"
    bootstrap_port: int | None = None  # a prefill server's (--prefill URL PORT)
    healthy: bool = True
    draining: bool = False  # removed: no new requests; in-flight ones finish
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    # load as the router tracks it
    inflight: int = 0  # requests sent and not finished
    inflight_tokens: int = 0  # their estimated tokens (prompt + max new), for minimum_tokens
    # load as the worker last reported it (GET /get_load): tokens queued and running, and when
    reported_tokens: int = 0
    reported_at: float = 0.0
    # tokens the router sent since that report (counted on top of it until the next one)
    tokens_since_report: int = 0
    ever_healthy: bool = False  # has passed a health check (or needs none)
    added_at: float = field(default_factory=time.monotonic)
    health_failures: int = 0  # consecutive failed health checks
    health_successes: int = 0  # consecutive passed ones (while unhealthy)
    total_requests: int = 0
    failed_requests: int = 0

    @property
    def available(self) -> bool:
        """May take a new request now."""
        return self.healthy and not self.draining and self.breaker.allows()

    @property
    def token_load(self) -> int:
        """Tokens queued and running on it: its last report plus what was sent since; before any
        report (the load poll runs for minimum_tokens only) the router's own count of its requests."""
        if self.reported_at == 0.0:
            return self.inflight_tokens
        return self.reported_tokens + self.tokens_since_report

    def started(self, tokens: int) -> None:
        self.inflight += 1
        self.inflight_tokens += tokens
        self.tokens_since_report += tokens
        self.total_requests += 1

    def finished(self, tokens: int, ok: bool) -> None:
        self.inflight -= 1
        self.inflight_tokens -= tokens
        if not ok:
            self.failed_requests += 1
        self.breaker.record(ok)

    def report(self, tokens: int) -> None:
        self.reported_tokens = tokens
        self.tokens_since_report = 0
        self.reported_at = time.monotonic()
