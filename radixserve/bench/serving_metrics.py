"""What bench_serving measures: one record per request, the figures over a run, and the printed report.

Definitions (the ones SGLang's and vLLM's bench_serving use):
  TTFT  request sent -> first chunk with content.
  ITL   gap between consecutive content chunks; a chunk known to carry k tokens counts as k gaps of 1/k
        of its wait each. The first chunk only ends the TTFT.
  E2E   request sent -> stream closed.
  TPOT  per request, (E2E - TTFT) / (output tokens - 1), for requests with more than one output token.
  concurrency  sum of E2E over the run's duration: how many requests were in flight on average.
  cache hit rate  prompt tokens the server served from its prefix cache over all prompt tokens, from
        each reply's meta_info.cached_tokens or usage.prompt_tokens_details.cached_tokens (absent when
        the server reports neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (90, 99)


@dataclass
class RequestOutput:
    """One request's outcome. Times are seconds of time.perf_counter; `start` is when it was sent."""

    prompt_len: int
    output_len: int  # tokens asked for
    start: float = 0.0
    success: bool = False
    error: str = ""
    generated_text: str = ""
    output_tokens: int = 0  # tokens produced: the server's count, else the bench tokenizer's, else streamed_tokens
    streamed_tokens: int = 0  # tokens the content chunks carried (one per chunk where the format does not say)
    ttft: float = 0.0
    latency: float = 0.0  # E2E
    itl: list[float] = field(default_factory=list)
    last_chunk: float | None = None  # arrival of the latest content chunk
    server_prompt_tokens: int | None = None  # the prompt as the server counted it (template, BOS), if said
    cached_tokens: int | None = None  # prompt tokens the server took from its prefix cache, if said

    def on_content(self, now: float, num_tokens: int = 1) -> None:
        """Record a chunk with new content that arrived at `now` carrying `num_tokens` tokens."""
        self.streamed_tokens += max(1, num_tokens)
        if self.last_chunk is None:
            self.ttft = now - self.start
        else:
            # several tokens in one chunk arrived together; spread the wait evenly so ITL stays per token
            gap = (now - self.last_chunk) / max(1, num_tokens)
            self.itl.extend([gap] * max(1, num_tokens))
        self.last_chunk = now

    def finish(self, now: float) -> None:
        self.latency = now - self.start
        if self.last_chunk is None:  # no content at all (EOS first): the answer came at the end
            self.ttft = self.latency

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class LatencyStats:
    """Milliseconds. A run with no samples (say, every output one token long for TPOT) reports zeros."""

    mean: float = 0.0
    median: float = 0.0
    p90: float = 0.0
    p99: float = 0.0

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        if len(seconds) == 0:
            return cls()
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p90, p99 = (float(np.percentile(ms, p)) for p in PERCENTILES)
        return cls(float(ms.mean()), float(np.median(ms)), p90, p99)


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    duration: float
    total_input_tokens: int  # successful requests only, as every total and rate here
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float
    ttft: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    tpot: LatencyStats
    # prefix cache, None where no successful request's server reported cached tokens
    total_cached_tokens: int | None = None
    cache_hit_rate: float | None = None  # cached / prompt tokens of the requests that reported them

    def as_dict(self) -> dict[str, Any]:
        """Flat, SGLang-like keys: completed, ..., mean_ttft_ms, median_ttft_ms, p90_ttft_ms, ..."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                out.update({f"{stat}_{key}_ms": v for stat, v in value.items()})
            else:
                out[key] = value
        return out


def cache_hits(ok: Sequence[RequestOutput]) -> tuple[int | None, float | None]:
    """(total cached prompt tokens, their share of those requests' prompt tokens) over the requests whose
    server said; the server's prompt count is the denominator where given, as it counts what it cached."""
    said = [o for o in ok if o.cached_tokens is not None]
    if not said:
        return None, None
    cached = sum(o.cached_tokens or 0 for o in said)
    prompt = sum(o.prompt_len if o.server_prompt_tokens is None else o.server_prompt_tokens for o in said)
    return cached, cached / prompt if prompt > 0 else 0.0


def compute_metrics(outputs: Sequence[RequestOutput], duration: float) -> BenchmarkMetrics:
    ok = [o for o in outputs if o.success]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    total_cached, hit_rate = cache_hits(ok)

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(outputs) - len(ok),
        duration=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=rate(len(ok)),
        input_throughput=rate(total_in),
        output_throughput=rate(total_out),
        total_throughput=rate(total_in + total_out),
        concurrency=rate(sum(o.latency for o in ok)),
        ttft=LatencyStats.of([o.ttft for o in ok]),
        itl=LatencyStats.of([gap for o in ok for gap in o.itl]),
        e2e=LatencyStats.of([o.latency for o in ok]),
        tpot=LatencyStats.of([t for o in ok if (t := o.tpot) is not None]),
        total_cached_tokens=total_cached,
        cache_hit_rate=hit_rate,
    )


# ---- report --------------------------------------------------------------------------------------
WIDTH = 50


def _rule(title: str, fill: str) -> str:
    return f"{title:{fill}^{WIDTH}}"


def _row(label: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label + ':':<40} {text:<10}"


def format_report(m: BenchmarkMetrics, header: Sequence[tuple[str, Any]] = ()) -> str:
    """The result table in SGLang's layout; `header` rows (backend, request rate, ...) come first."""
    lines = [_rule(" Serving Benchmark Result ", "=")]
    lines += [_row(label, value) for label, value in header]
    lines += [
        _row("Successful requests", m.completed),
        _row("Failed requests", m.failed),
        _row("Benchmark duration (s)", m.duration),
        _row("Total input tokens", m.total_input_tokens),
        _row("Total generated tokens", m.total_output_tokens),
        _row("Request throughput (req/s)", m.request_throughput),
        _row("Input token throughput (tok/s)", m.input_throughput),
        _row("Output token throughput (tok/s)", m.output_throughput),
        _row("Total token throughput (tok/s)", m.total_throughput),
        _row("Concurrency", m.concurrency),
    ]
    if m.total_cached_tokens is not None and m.cache_hit_rate is not None:
        lines += [
            _row("Total cached input tokens", m.total_cached_tokens),
            _row("Prefix cache hit rate (%)", 100.0 * m.cache_hit_rate),
        ]
    sections = (
        ("End-to-End Latency", "E2E Latency", m.e2e),
        ("Time to First Token", "TTFT", m.ttft),
        ("Time per Output Token (excl. 1st token)", "TPOT", m.tpot),
        ("Inter-Token Latency", "ITL", m.itl),
    )
    for title, short, stats in sections:
        lines.append(_rule(title, "-"))
        for stat, value in asdict(stats).items():
            lines.append(_row(f"{stat.capitalize()} {short} (ms)", value))
    lines.append("=" * WIDTH)
    return "\n".join(lines)
