"""The mock worker's behaviour knobs: set from its CLI flags at start and changed at runtime through
POST /mock/config, so a test can make a running worker slow, failing, crashing or unhealthy.

Counts and times are relative to when a knob is set (the process start for CLI flags): fail_first N
fails the next N generation requests, crash_on_request K exits on the K-th generation request from
then, fail_health_after S turns the health endpoints to 503 S seconds from then.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

KNOB_NAMES = ("latency_ms", "token_latency_ms", "status_code", "fail_first", "crash_on_request",
              "fail_health_after", "output_tokens", "model")


@dataclass
class MockKnobs:
    latency_ms: float = 0.0  # before the first byte of each generation answer
    token_latency_ms: float = 0.0  # between stream chunks (and per token after the first when not streaming)
    status_code: int = 0  # nonzero: every generation request gets this error status
    output_tokens: int = 8  # when the request names no max_new_tokens / max_tokens
    model: str = "mock-model"
    fail_remaining: int = 0  # the next this many generation requests get 500
    crash_at: int = 0  # nonzero: the generation request with this number exits the process
    health_fails_at: float | None = None  # time.monotonic() from which health endpoints answer 503

    def health_ok(self) -> bool:
        return self.health_fails_at is None or time.monotonic() < self.health_fails_at

    def update(self, body: dict[str, Any], requests_so_far: int) -> None:
        """Apply a /mock/config body; unknown keys raise ValueError so a typo in a test shows."""
        unknown = set(body) - set(KNOB_NAMES)
        if unknown:
            raise ValueError(f"unknown knobs {sorted(unknown)}; known: {list(KNOB_NAMES)}")
        if "latency_ms" in body:
            self.latency_ms = max(0.0, float(body["latency_ms"]))
        if "token_latency_ms" in body:
            self.token_latency_ms = max(0.0, float(body["token_latency_ms"]))
        if "status_code" in body:
            code = int(body["status_code"] or 0)
            if code and not 400 <= code <= 599:
                raise ValueError("status_code must be 0 (off) or in [400, 599]")
            self.status_code = code
        if "output_tokens" in body:
            self.output_tokens = max(0, int(body["output_tokens"]))
        if "model" in body:
            self.model = str(body["model"])
        if "fail_first" in body:
            self.fail_remaining = max(0, int(body["fail_first"] or 0))
        if "crash_on_request" in body:
            k = int(body["crash_on_request"] or 0)
            self.crash_at = requests_so_far + k if k > 0 else 0
        if "fail_health_after" in body:
            s = body["fail_health_after"]
            self.health_fails_at = None if s is None or float(s) < 0 else time.monotonic() + float(s)

    def view(self, requests_so_far: int) -> dict[str, Any]:
        """The knobs in /mock/config's input terms, as they stand now (counts and seconds left)."""
        left = None if self.health_fails_at is None else max(0.0, self.health_fails_at - time.monotonic())
        return {"latency_ms": self.latency_ms, "token_latency_ms": self.token_latency_ms,
                "status_code": self.status_code, "fail_first": self.fail_remaining,
                "crash_on_request": self.crash_at - requests_so_far if self.crash_at else 0,
                "fail_health_after": left, "output_tokens": self.output_tokens, "model": self.model}


def add_knob_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fault and speed knobs (also settable at runtime: POST /mock/config)")
    g.add_argument("--latency-ms", type=float, default=0.0, help="delay before the first byte of each answer")
    g.add_argument("--token-latency-ms", type=float, default=0.0, help="delay between stream chunks")
    g.add_argument("--status-code", type=int, default=0,
                   help="answer every generation request with this error status (0: off)")
    g.add_argument("--fail-first", type=int, default=0, help="the first N generation requests get 500")
    g.add_argument("--crash-on-request", type=int, default=0,
                   help="the K-th generation request makes the process exit at once (0: never)")
    g.add_argument("--fail-health-after", type=float, default=None,
                   help="health endpoints answer 503 from S seconds after start")
    g.add_argument("--output-tokens", type=int, default=8, help="tokens generated when a request names none")
    g.add_argument("--model", default="mock-model", help="model name served (/v1/models, server info)")


def knobs_from_args(args: argparse.Namespace) -> MockKnobs:
    knobs = MockKnobs()
    knobs.update({"latency_ms": args.latency_ms, "token_latency_ms": args.token_latency_ms,
                  "status_code": args.status_code, "fail_first": args.fail_first,
                  "crash_on_request": args.crash_on_request, "fail_health_after": args.fail_health_after,
                  "output_tokens": args.output_tokens, "model": args.model}, 0)
    return knobs
