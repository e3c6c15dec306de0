"""Prometheus metrics of one app: request counts and latency per route, completion-cache lookups, feedback phases.

Each app gets its own `CollectorRegistry` (no global state: two apps in one test process do not collide).
`Metrics` is stored on `app.state.metrics` and reached through `MetricsDep`; the feedback transaction observes
`feedback_phase_seconds`, `lock_wait_seconds` and `feedback_total`; gauges of the cache, the sleep state and the
adapter locks are read when `/metrics` is scraped.

Not here: the feedback JSON log (claas.feedback), request ids and log lines (claas.logs), tracing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PHASE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests_total: Counter  # labels: method, route, status
    request_seconds: Histogram  # labels: method, route
    cache_lookups: Counter  # labels: result = hit | miss
    cache_entries: Gauge
    adapter_recoveries: Counter  # labels: result = loaded | failed (adapter re-loaded after an upstream 404)
    feedback_phase_seconds: Histogram  # labels: phase (lock_wait, sleep, distill, save, reload, wake, total, ...)
    lock_wait_seconds: Histogram
    feedback_total: Counter  # labels: status (ok, error, conflict, ...)
    cache_bytes: Gauge
    inference_sleeping: Gauge  # 1 while a training step holds the inference server asleep
    sleep_holders: Gauge  # training steps that hold it asleep now
    lock_waiters: Gauge  # adapters whose lock someone in this process holds or waits for

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        reg = registry if registry is not None else CollectorRegistry()
        return cls(
            registry=reg,
            requests_total=Counter(
                "claas_http_requests", "HTTP requests by route and status.", ["method", "route", "status"], registry=reg
            ),
            request_seconds=Histogram(
                "claas_http_request_duration_seconds",
                "HTTP request latency (until the last byte of the response, streams included).",
                ["method", "route"],
                buckets=_LATENCY_BUCKETS,
                registry=reg,
            ),
            cache_lookups=Counter(
                "claas_completion_cache_lookups", "Completion-cache lookups by result.", ["result"], registry=reg
            ),
            cache_entries=Gauge("claas_completion_cache_entries", "Completions held in the cache.", registry=reg),
            adapter_recoveries=Counter(
                "claas_adapter_recoveries",
                "Adapters loaded on the inference server after it answered 404 for a known lora_id.",
                ["result"],
                registry=reg,
            ),
            feedback_phase_seconds=Histogram(
                "claas_feedback_phase_seconds",
                "Duration of each phase of the feedback transaction.",
                ["phase"],
                buckets=_PHASE_BUCKETS,
                registry=reg,
            ),
            lock_wait_seconds=Histogram(
                "claas_lora_lock_wait_seconds",
                "Time spent waiting for a LoRA's lock.",
                buckets=_PHASE_BUCKETS,
                registry=reg,
            ),
            feedback_total=Counter("claas_feedback", "Feedback requests by outcome.", ["status"], registry=reg),
            cache_bytes=Gauge(
                "claas_completion_cache_bytes", "Estimated bytes held by the completion cache.", registry=reg
            ),
            inference_sleeping=Gauge(
                "claas_inference_sleeping",
                "1 while a training step holds the inference server asleep (from the drain until the wake).",
                registry=reg,
            ),
            sleep_holders=Gauge(
                "claas_inference_sleep_holders", "Training steps holding the inference server asleep.", registry=reg
            ),
            lock_waiters=Gauge(
                "claas_lora_locks_in_use", "Adapters whose lock a request of this process holds or waits for.",
                registry=reg,
            ),
        )

    def record_cache_lookup(self, hit: bool) -> None:
        self.cache_lookups.labels(result="hit" if hit else "miss").inc()


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streams). The route label is the matched path
    template (`scope["route"]`), or `unmatched`, so label cardinality stays bounded."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests_total.labels(method=method, route=label, status=str(status)).inc()
            self.metrics.request_seconds.labels(method=method, route=label).observe(time.perf_counter() - start)


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text; gauges of state held elsewhere (cache, sleep coordinator, locks) are read at scrape time."""
    state = request.app.state
    metrics: Metrics = state.metrics
    cache = getattr(state, "cache", None)
    if cache is not None:
        metrics.cache_entries.set(len(cache))
        metrics.cache_bytes.set(cache.bytes)
    sleep = getattr(state, "sleep", None)
    if sleep is not None:
        metrics.inference_sleeping.set(1 if sleep.sleeping else 0)
        metrics.sleep_holders.set(sleep.holders)
    locks = getattr(state, "lora_locks", None)
    metrics.lock_waiters.set(len(locks) if locks is not None else 0)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
