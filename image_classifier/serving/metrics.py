"""`GET /metrics`: what an operator's Prometheus scrapes, through prometheus-client: requests and
errors by route and status, request latency, the micro-batches' sizes, the queue's depth, each
labelled with the model's name and version. One registry per app, so several services in one
process (tests) do not share counters."""

from __future__ import annotations

import time

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, model: str, version: str, queue_depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.labels = {"model": model, "version": version}
        names = ["route", "method", "status", "model", "version"]
        self.requests = Counter(
            "image_classifier_requests", "HTTP requests answered", names, registry=self.registry
        )
        self.latency = Histogram(
            "image_classifier_request_seconds",
            "Time from request to response",
            ["route", "method", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "image_classifier_batch_size",
            "Images per micro-batch run by the model",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        queue = Gauge(
            "image_classifier_queue_depth",
            "Images waiting for the model",
            ["model", "version"],
            registry=self.registry,
        )
        queue.labels(**self.labels).set_function(queue_depth)
        info = Gauge(
            "image_classifier_model_info",
            "The model served (value 1)",
            ["model", "version"],
            registry=self.registry,
        )
        info.labels(**self.labels).set(1)

    def observe_batch(self, size: int) -> None:
        self.batch.labels(**self.labels).observe(size)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (`/v2/models/{model}/infer`, not
    each model name: bounded label values), method and status."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope) -> str:
        from starlette.routing import Match

        for r in self.routes():
            if r.matches(scope)[0] == Match.FULL:
                return getattr(r, "path", "other")
        return "unmatched"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route, method = self._route(scope), scope.get("method", "")
            m = self.metrics
            where = {"route": route, "method": method, **m.labels}
            m.requests.labels(status=str(status[0]), **where).inc()
            m.latency.labels(**where).observe(time.perf_counter() - started)
