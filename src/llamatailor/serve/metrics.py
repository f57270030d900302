"""Prometheus metrics of one server: requests by route and status, latency, time to first token, generation
speed, and the queue depth."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llamatailor_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llamatailor_request_seconds",
            "Request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "llamatailor_time_to_first_token_seconds",
            "From request to the first generated text",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.speed = Histogram(
            "llamatailor_generated_tokens_per_second",
            "Generated tokens per second, per request, after the first token",
            buckets=SPEED_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter("llamatailor_generated_tokens", "Generated tokens", registry=self.registry)
        self.queue = Gauge("llamatailor_queue_depth", "Requests waiting or running", registry=self.registry)
        self.queue.set_function(queue_depth)
