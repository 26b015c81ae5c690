"""Prometheus metrics of the API process. Counters and latency histograms are fed by the tokenizer
manager as requests finish; the gauges are read from the scheduler when /metrics is scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from radixserve.disaggregation.stats import TRANSFER_BUCKETS
from radixserve.messages import PDStats, SchedulerState

PREFIX = "radixserve:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 640.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=LATENCY_BUCKETS, registry=r)

        self.num_running_reqs = gauge("num_running_reqs", "Requests running (prefilling or decoding)")
        self.num_queue_reqs = gauge("num_queue_reqs", "Requests waiting to be scheduled")
        self.token_usage = gauge("token_usage", "Fraction of KV slots held by requests in flight")
        self.kv_free_tokens = gauge("kv_free_tokens", "Free KV slots (not counting the evictable cache)")
        self.kv_total_tokens = gauge("kv_total_tokens", "KV pool capacity in tokens")
        self.cache_hit_rate = gauge("cache_hit_rate", "Prompt tokens served from the prefix cache / all")
        self.gen_throughput = gauge("gen_throughput", "Generation throughput (token/s) at the last log")
        self.dp_num_reqs = Gauge(PREFIX + "dp_num_reqs", "Requests in flight per DP group",
                                 ["model_name", "dp_rank"], registry=r)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests")
        self.cached_tokens = counter("cached_tokens", "Prompt tokens served from the prefix cache")
        self.num_requests = counter("num_requests", "Finished requests")
        self.num_aborted_requests = counter("num_aborted_requests", "Requests aborted or failed")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token")
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency from arrival to the last token")
        self.labels = {"model_name": model_name}
        self.pd = PDCollector(model_name)
        r.register(self.pd)
        self._prompt_total = 0
        self._cached_total = 0

    def observe_first_token(self, ttft: float) -> None:
        self.ttft.labels(**self.labels).observe(ttft)

    def observe_tokens(self, gap: float, num_tokens: int) -> None:
        """A gap during which num_tokens arrived: each counts as one inter-token interval."""
        if num_tokens <= 0:
            return
        per = gap / num_tokens
        hist = self.itl.labels(**self.labels)
        for _ in range(num_tokens):
            hist.observe(per)

    def observe_finish(self, prompt: int, completion: int, cached: int, e2e: float, aborted: bool) -> None:
        self.prompt_tokens.labels(**self.labels).inc(prompt)
        self.generation_tokens.labels(**self.labels).inc(completion)
        self.cached_tokens.labels(**self.labels).inc(cached)
        self.num_requests.labels(**self.labels).inc()
        if aborted:
            self.num_aborted_requests.labels(**self.labels).inc()
        self.e2e.labels(**self.labels).observe(e2e)
        self._prompt_total += prompt
        self._cached_total += cached

    def observe_abandoned(self, count: int, prompt: int, completion: int) -> None:
        """Requests that ended without a finish (the client left, or the call failed), counted in
        bulk: a call may leave thousands at once. No latency: they have none to report."""
        if count <= 0:
            return
        self.prompt_tokens.labels(**self.labels).inc(prompt)
        self.generation_tokens.labels(**self.labels).inc(completion)
        self.num_requests.labels(**self.labels).inc(count)
        self.num_aborted_requests.labels(**self.labels).inc(count)
        self._prompt_total += prompt

    def render(self, state: SchedulerState | None) -> bytes:
        if state is not None:
            lab = self.labels
            self.num_running_reqs.labels(**lab).set(state.num_running)
            self.num_queue_reqs.labels(**lab).set(state.num_waiting)
            used = state.kv_total - state.kv_available - state.kv_evictable
            self.token_usage.labels(**lab).set(used / max(1, state.kv_total))
            self.kv_free_tokens.labels(**lab).set(state.kv_available + state.kv_evictable)
            self.kv_total_tokens.labels(**lab).set(state.kv_total)
            self.gen_throughput.labels(**lab).set(state.gen_throughput)
            self.cache_hit_rate.labels(**lab).set(self._cached_total / max(1, self._prompt_total))
            for group in state.per_dp or [state]:
                self.dp_num_reqs.labels(dp_rank=str(group.dp_rank), **lab).set(group.num_running + group.num_waiting)
            self.pd.stats = state.pd
        return generate_latest(self.registry)


class PDCollector:
    """A PD server's queues and KV transfers, as the scheduler last reported them (totals kept there,
    so they are rendered as they are rather than counted here). Nothing on a server without PD."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: PDStats | None = None

    def collect(self):
        pd = self.stats
        if pd is None:
            return
        labels, values = ["model_name"], [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        if pd.role == "prefill":
            yield gauge("num_prefill_bootstrap_queue_reqs", "Requests waiting for their decode server's KV "
                        "destination", pd.num_bootstrap)
            yield gauge("num_prefill_inflight_queue_reqs", "Requests whose KV is being written to the decode "
                        "server", pd.num_inflight)
            yield counter("kv_transfers", "KV writes to decode servers that completed", pd.transfers)
            yield counter("kv_transfer_failures", "KV writes that failed", pd.failures)
            yield counter("kv_transfer_bytes", "Bytes of KV written to decode servers", pd.bytes)
            yield counter("kv_transfer_chunk_writes", "KV writes of a prompt's chunk started while the rest of "
                          "the prompt was still to prefill", pd.chunk_writes)
            name, doc = ("kv_transfer_latency_seconds", "Seconds from a prompt's prefill finishing to its KV fully "
                         "written (chunks written earlier overlap the prefill)")
        else:
            yield gauge("num_decode_prealloc_queue_reqs", "Requests waiting for KV room or their prefill "
                        "server", pd.num_prealloc)
            yield gauge("num_decode_transfer_queue_reqs", "Requests waiting for their prompt's KV", pd.num_transfer)
            yield counter("kv_transfers", "Prompts whose KV arrived from prefill servers", pd.transfers)
            yield counter("kv_transfer_failures", "Prompts whose KV did not arrive", pd.failures)
            name, doc = "kv_transfer_wait_seconds", "Seconds from sending a KV destination to the KV landing"
        if len(pd.latency_counts) == len(TRANSFER_BUCKETS) + 1:
            cumulative, total = [], 0
            for bound, count in zip([*map(str, TRANSFER_BUCKETS), "+Inf"], pd.latency_counts):
                total += count
                cumulative.append((bound, total))
            family = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
            family.add_metric(values, cumulative, pd.latency_sum)
            yield family
