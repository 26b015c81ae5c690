"""The router's Prometheus metrics (served on --prometheus-host:--prometheus-port and at /metrics):
requests by route and status, their latency, retries, admission rejections, and per worker its
load, health and circuit breaker state (read from the registry at each scrape)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "radixserve_router_"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class WorkerCollector:
    def __init__(self, workers: Callable[[], list], queue: Callable[[], tuple[int, int]]) -> None:
        self.workers = workers
        self.queue = queue

    def collect(self):
        labels = ["worker", "role"]
        families = {
            "inflight": GaugeMetricFamily(PREFIX + "worker_inflight_requests", "Requests in flight to the worker",
                                          labels=labels),
            "tokens": GaugeMetricFamily(PREFIX + "worker_token_load", "Tokens queued and running on the worker "
                                        "(last /get_load report plus what was sent since)", labels=labels),
            "healthy": GaugeMetricFamily(PREFIX + "worker_healthy", "1 when the worker passes its health checks",
                                         labels=labels),
            "breaker": GaugeMetricFamily(PREFIX + "worker_circuit_state", "Circuit breaker: 0 closed, 1 half-open, "
                                         "2 open", labels=labels),
            "requests": GaugeMetricFamily(PREFIX + "worker_requests", "Requests sent to the worker", labels=labels),
            "failures": GaugeMetricFamily(PREFIX + "worker_failed_requests", "Requests to the worker that failed",
                                          labels=labels),
        }
        for w in self.workers():
            values = [w.url, w.role]
            families["inflight"].add_metric(values, w.inflight)
            families["tokens"].add_metric(values, w.token_load)
            families["healthy"].add_metric(values, int(w.healthy))
            families["breaker"].add_metric(values, BREAKER_STATES.get(w.breaker.state, 0))
            families["requests"].add_metric(values, w.total_requests)
            families["failures"].add_metric(values, w.failed_requests)
        yield from families.values()
        running, queued = self.queue()
        g = GaugeMetricFamily(PREFIX + "inflight_requests", "Requests the router is serving now")
        g.add_metric([], running)
        yield g
        g = GaugeMetricFamily(PREFIX + "queued_requests", "Requests waiting for admission")
        g.add_metric([], queued)
        yield g


class RouterMetrics:
    def __init__(self, buckets: list[float] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "Requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram(PREFIX + "request_duration_seconds", "Seconds from a request's arrival to its "
                                 "response headers (a stream's whole length is not counted)", ["route"],
                                 buckets=tuple(buckets) if buckets else DEFAULT_BUCKETS, registry=self.registry)
        self.retries = Counter(PREFIX + "retries", "Attempts after a request's first (another worker)",
                               ["route"], registry=self.registry)
        self.rejected = Counter(PREFIX + "rejected_requests", "Requests refused before routing, by reason",
                                ["reason"], registry=self.registry)

    def attach(self, workers: Callable[[], list], queue: Callable[[], tuple[int, int]]) -> None:
        self.registry.register(WorkerCollector(workers, queue))

    def render(self) -> bytes:
        return generate_latest(self.registry)
