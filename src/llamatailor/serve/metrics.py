"""Prometheus metrics of one server: requests by route and status, latency, time to first token, generation
speed, the queue depth, the tokens the engine generated, and the generations stopped because their client
went away (with the tokens generated after the stop was asked for)."""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

LiveCount = Callable[[], float]


class LiveCounters(Collector):
    """Counters kept by their owners (the engine, the scheduler), read at each scrape: `counters` maps a
    name (without `_total`) to its help text and the function that reads it."""

    def __init__(self, counters: dict[str, tuple[str, LiveCount]]) -> None:
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (documentation, read) in self.counters.items():
            yield CounterMetricFamily(name, documentation, value=read())


class ServerMetrics:
    """`generated_tokens`, `cancelled` and `tokens_after_cancel` read the backend's and the scheduler's own
    counters (see `serve.scheduler`); `tokens_after_cancel` None: the backend does not count them (llama.cpp's
    server counts tokens per slot, not per cancelled request)."""

    def __init__(
        self,
        queue_depth: LiveCount,
        generated_tokens: LiveCount,
        cancelled: LiveCount,
        tokens_after_cancel: LiveCount | None,
    ) -> None:
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
        self.queue = Gauge("llamatailor_queue_depth", "Requests waiting or running", registry=self.registry)
        self.queue.set_function(queue_depth)
        live = {
            "llamatailor_generated_tokens": (
                "Tokens the engine generated, those of cancelled generations included",
                generated_tokens,
            ),
            "llamatailor_cancelled_generations": (
                "Generations stopped because their client went away",
                cancelled,
            ),
        }
        if tokens_after_cancel is not None:  # an engine in this process: its own count
            live["llamatailor_tokens_after_cancel"] = (
                "Tokens the engine generated after a cancelled generation's stop was asked for",
                tokens_after_cancel,
            )
        self.registry.register(LiveCounters(live))
