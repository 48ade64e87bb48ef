"""Prometheus metrics for /metrics: engine state read at scrape time, plus per-request
token counters and latency histograms recorded as outputs stream through the server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
    """Reads AsyncEngine.stats() when Prometheus scrapes, so nothing polls the engine."""

    def __init__(self, async_engine: AsyncEngine) -> None:
        self.async_engine = async_engine

    def collect(self):
        stats = self.async_engine.stats()
        yield GaugeMetricFamily("pagedserve_num_requests_running",
                                "Sequences in the running batch", value=stats.num_running)
        yield GaugeMetricFamily("pagedserve_num_requests_waiting",
                                "Sequences waiting to be scheduled", value=stats.num_waiting)
        yield GaugeMetricFamily("pagedserve_kv_cache_usage_perc",
                                "Fraction of KV cache blocks in use (0..1)",
                                value=stats.kv_cache_usage)
        yield CounterMetricFamily("pagedserve_prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache",
                                  value=stats.prefix_cache_queries)
        yield CounterMetricFamily("pagedserve_prefix_cache_hits",
                                  "Prompt tokens served from the prefix cache",
                                  value=stats.prefix_cache_hits)
        yield CounterMetricFamily("pagedserve_num_preemptions",
                                  "Sequences preempted for lack of KV cache blocks",
                                  value=stats.num_preemptions)
        yield GaugeMetricFamily("pagedserve_engine_healthy", "1 while the engine loop runs",
                                value=float(self.async_engine.is_healthy))


class ServerMetrics:
    """One registry per app, so several apps in one process (tests) do not collide."""

    def __init__(self, async_engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(async_engine))
        r = self.registry
        self.prompt_tokens = Counter("pagedserve_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("pagedserve_generation_tokens",
                                         "Tokens generated", registry=r)
        self.request_success = Counter("pagedserve_request_success",
                                       "Requests finished, by finish reason",
                                       ["finished_reason"], registry=r)
        self.request_aborted = Counter("pagedserve_request_aborted",
                                       "Requests that ended early (client gone, error)",
                                       registry=r)
        self.ttft = Histogram("pagedserve_time_to_first_token_seconds",
                              "Time from arrival to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pagedserve_inter_token_latency_seconds",
                             "Time between consecutive outputs of a request, per token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pagedserve_e2e_request_latency_seconds",
                             "Time from arrival to the last token", buckets=_LATENCY_BUCKETS,
                             registry=r)

    async def track(self, outputs: AsyncIterator[RequestOutput]
                    ) -> AsyncIterator[RequestOutput]:
        """Pass `outputs` (delta outputs) through, recording what they show. Closing this
        closes them."""
        arrival = last = time.monotonic()
        num_tokens = 0
        started = finished = False
        try:
            async for output in outputs:
                now = time.monotonic()
                if not started:
                    started = True
                    self.prompt_tokens.inc(len(output.prompt_token_ids))
                new = sum(len(o.token_ids) for o in output.outputs)  # delta outputs
                if new:
                    if num_tokens == 0:
                        self.ttft.observe(now - arrival)
                    else:
                        self.itl.observe((now - last) / new)
                    self.generation_tokens.inc(new)
                    num_tokens, last = num_tokens + new, now
                if output.finished:
                    finished = True
                    self.e2e.observe(now - arrival)
                    for o in output.outputs:
                        self.request_success.labels(o.finish_reason or "unknown").inc()
                yield output
        finally:
            if not finished:
                self.request_aborted.inc()
            await outputs.aclose()
