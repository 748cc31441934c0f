"""The proxy's own Prometheus metrics (prometheus-client: the de-facto Python exporter, and
what Prometheus scrapes natively; OpenTelemetry carries traces)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .backends import BackendPool

if TYPE_CHECKING:
    from .estimates import LengthEstimates
    from .scheduler import Scheduler

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _BackendCollector:
    """Reads backend state at scrape time, so the hot path updates nothing for it."""

    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool

    def collect(self):
        healthy = GaugeMetricFamily(
            "sloproxy_backend_healthy", "1 if the backend passes health checks.", labels=["backend"]
        )
        in_flight = GaugeMetricFamily(
            "sloproxy_backend_in_flight_requests", "Requests the proxy has on it.", labels=["backend"]
        )
        running = GaugeMetricFamily(
            "sloproxy_backend_running_requests", "Engine-reported running requests.", labels=["backend"]
        )
        waiting = GaugeMetricFamily(
            "sloproxy_backend_waiting_requests", "Engine-reported waiting requests.", labels=["backend"]
        )
        kv = GaugeMetricFamily(
            "sloproxy_backend_kv_usage_ratio", "Engine-reported KV-cache usage, 0..1.", labels=["backend"]
        )
        stale = GaugeMetricFamily(
            "sloproxy_backend_load_stale", "1 if the last load reading is stale.", labels=["backend"]
        )
        for backend in self.pool.backends:
            name = [backend.name]
            healthy.add_metric(name, 1.0 if backend.healthy else 0.0)
            in_flight.add_metric(name, backend.in_flight)
            stale.add_metric(name, 1.0 if backend.load_is_stale else 0.0)
            if backend.load is not None:
                running.add_metric(name, backend.load.running)
                waiting.add_metric(name, backend.load.waiting)
                if backend.load.kv_usage is not None:
                    kv.add_metric(name, backend.load.kv_usage)
        yield from (healthy, in_flight, running, waiting, kv, stale)


class _SchedulerCollector:
    """Queue depths, budgets and scheduler outcomes, read at scrape time."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        depth = GaugeMetricFamily(
            "sloproxy_queue_depth_requests", "Requests waiting in the proxy queue.", labels=["model", "slo_class"]
        )
        for (model, slo_class), count in sorted(self.scheduler.state.queue_depths().items()):
            depth.add_metric([model, slo_class], count)
        budget = GaugeMetricFamily(
            "sloproxy_backend_budget_requests", "Dispatch budget per backend.", labels=["backend"]
        )
        for backend in self.scheduler.pool.backends:
            budget.add_metric([backend.name], backend.budget)
        outcomes = CounterMetricFamily(
            "sloproxy_scheduler_events", "Requests shed, timed out or evicted.", labels=["event"]
        )
        for event, count in sorted(self.scheduler.counts.items()):
            outcomes.add_metric([event], count)
        yield from (depth, budget, outcomes)


class _PredictorCollector:
    """The length predictor's live error and online-learning counts, read at scrape time."""

    HELP = {
        "live_mae_log": "Mean absolute error of log(1 + tokens), p50 vs true, over recent replies.",
        "live_mae_tokens": "Mean absolute error in tokens, p50 vs true, over recent replies.",
        "live_p90_coverage": "Share of recent replies no longer than the predicted p90.",
        "store_samples": "Finished requests kept for retraining.",
        "model_generation": "Online retrains adopted since start (0: the loaded model).",
    }

    def __init__(self, estimates: LengthEstimates) -> None:
        self.estimates = estimates

    def collect(self):
        for key, value in sorted(self.estimates.metrics().items()):
            if value != value:  # NaN: nothing measured yet
                continue
            name = f"sloproxy_predictor_{key}"
            if key.endswith("_total"):
                family = CounterMetricFamily(name[: -len("_total")], f"Predictor {key[:-6]} count.")
            else:
                family = GaugeMetricFamily(name, self.HELP.get(key, f"Predictor {key}."))
            family.add_metric([], value)
            yield family


class ProxyMetrics:
    def __init__(self, pool: BackendPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sloproxy_requests", "Requests by model and outcome.", ["model", "outcome"], registry=self.registry
        )
        self.latency = Histogram(
            "sloproxy_request_duration_seconds",
            "End-to-end time in the proxy.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "sloproxy_time_to_first_token_seconds",
            "Time to the first streamed content byte.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "sloproxy_upstream_retries",
            "Requests retried on another backend before their first byte.",
            ["backend"],
            registry=self.registry,
        )
        self.disconnects = Counter(
            "sloproxy_client_disconnects",
            "Clients that went away before their reply ended.",
            ["model"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "sloproxy_tokens", "Tokens the engines reported, by kind.", ["model", "kind"], registry=self.registry
        )
        self.in_flight = 0  # a plain number on the hot path, read at scrape time
        Gauge("sloproxy_in_flight_requests", "Requests being served.", registry=self.registry).set_function(
            lambda: self.in_flight
        )
        self.registry.register(_BackendCollector(pool))
        self._finished: dict[tuple[str, str], tuple] = {}
        self._ttft: dict[str, Histogram] = {}

    def first_byte(self, model: str, seconds: float) -> None:
        child = self._ttft.get(model)
        if child is None:
            child = self._ttft[model] = self.ttft.labels(model)
        child.observe(seconds)

    def attach_predictor(self, estimates: LengthEstimates) -> None:
        if estimates.enabled:
            self.registry.register(_PredictorCollector(estimates))

    def attach(self, scheduler: Scheduler) -> None:
        """Expose the scheduler's queues, budgets and events too."""
        self.registry.register(_SchedulerCollector(scheduler))

    def finished(self, model: str, outcome: str, seconds: float, prompt: int | None, completion: int | None) -> None:
        """Record one finished request (label lookups cached: this runs for every request)."""
        children = self._finished.get((model, outcome))
        if children is None:
            children = self._finished[(model, outcome)] = (
                self.requests.labels(model, outcome),
                self.latency.labels(model),
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
            )
        requests, latency, prompt_tokens, completion_tokens = children
        requests.inc()
        latency.observe(seconds)
        if prompt is not None:
            prompt_tokens.inc(prompt)
            completion_tokens.inc(completion or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
