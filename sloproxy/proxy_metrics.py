"""The proxy's own Prometheus metrics on ``/metrics``.

prometheus-client rather than the OpenTelemetry Prometheus exporter: Prometheus is what scrapes the
proxy, and prometheus-client renders its native text format directly, with custom collectors that read
plain Python numbers at scrape time. The per-request path therefore only bumps ints and floats (one
``bisect`` per histogram observation, no locks, no label lookups past a dict hit); the OTel metrics SDK
would put its aggregation machinery on every request. OpenTelemetry carries traces (tracing.py).

Every metric is listed in docs/observability.md.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .backends import BackendPool
from .errors import ProxyError
from .request import ProxyRequest
from .slo_outcome import (
    CLIENT_ERROR,
    outcome_kind,
    rejected_in_queue,
    rejection_reason,
    slo_met,
    time_per_output_token,
    was_rejected,
)

if TYPE_CHECKING:
    from .estimates import LengthEstimates
    from .outlier import OutlierDetector
    from .scheduler import Scheduler
    from .state.redis_state import RedisCoordinator

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# true reply length / predicted p50: 1 is a perfect prediction
PREDICTION_RATIO_BUCKETS = (0.125, 0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0)


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
        unknown = GaugeMetricFamily(
            "sloproxy_backend_load_unknown",
            "1 if the engine's /metrics answers without its load figures (e.g. vLLM --disable-log-stats).",
            labels=["backend"],
        )
        draining = GaugeMetricFamily(
            "sloproxy_backend_draining", "1 while an operator drains the backend (admin API).", labels=["backend"]
        )
        for backend in self.pool.backends:
            name = [backend.name]
            healthy.add_metric(name, 1.0 if backend.probe_healthy else 0.0)
            draining.add_metric(name, 1.0 if backend.draining else 0.0)
            in_flight.add_metric(name, backend.in_flight)
            stale.add_metric(name, 1.0 if backend.load_is_stale else 0.0)
            unknown.add_metric(name, 0.0 if backend.load_reported else 1.0)
            if backend.load is not None:
                running.add_metric(name, backend.load.running)
                waiting.add_metric(name, backend.load.waiting)
                if backend.load.kv_usage is not None:
                    kv.add_metric(name, backend.load.kv_usage)
        yield from (healthy, in_flight, running, waiting, kv, stale, unknown, draining)


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
        cap = GaugeMetricFamily(
            "sloproxy_backend_cap_requests",
            "Requests this replica may have on the backend: its budget, or with several replicas its share.",
            labels=["backend"],
        )
        kv_reserved = GaugeMetricFamily(
            "sloproxy_backend_kv_reserved_tokens",
            "KV tokens the scheduler holds for requests in flight on the backend (prompt + predicted reply).",
            labels=["backend"],
        )
        for backend in self.scheduler.pool.backends:
            budget.add_metric([backend.name], backend.budget)
            cap.add_metric([backend.name], backend.cap)
            kv_reserved.add_metric([backend.name], backend.kv_reserved_tokens)
        outcomes = CounterMetricFamily(
            "sloproxy_scheduler_events", "Requests shed, timed out or evicted.", labels=["event"]
        )
        for event, count in sorted(self.scheduler.counts.items()):
            outcomes.add_metric([event], count)
        yield from (depth, budget, cap, kv_reserved, outcomes)
        regions = self.scheduler.regions
        if regions is not None:
            held = GaugeMetricFamily(
                "sloproxy_region_held_requests", "Requests in the hold-back queue.", labels=["model", "region"]
            )
            used = GaugeMetricFamily(
                "sloproxy_region_kv_utilisation",
                "KV utilisation the region router reads (0..1).",
                labels=["model", "region"],
            )
            chosen = CounterMetricFamily(
                "sloproxy_region_dispatched",
                "Requests dispatched to backends of the region, by the backends' pool tag (empty: none).",
                labels=["model", "region", "pool"],
            )
            depths = regions.depths()
            for model, by_region in sorted(regions.by_model.items()):
                for region in sorted(by_region):
                    held.add_metric([model, region], depths.get((model, region), 0))
                    used.add_metric([model, region], regions.utilisation(model, region))
            for labels, count in regions.dispatched():
                chosen.add_metric(list(labels), count)
            yield from (held, used, chosen)


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


class _OutlierCollector:
    """The circuit breakers (outlier.py), read at scrape time."""

    STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}

    def __init__(self, detector: OutlierDetector) -> None:
        self.detector = detector

    def collect(self):
        state = GaugeMetricFamily(
            "sloproxy_backend_breaker_state",
            "Circuit breaker: 0 closed, 1 half open (trial requests), 2 open (ejected).",
            labels=["backend"],
        )
        ejections = CounterMetricFamily(
            "sloproxy_backend_ejections", "Times the backend was ejected for failing requests.", labels=["backend"]
        )
        refused = CounterMetricFamily(
            "sloproxy_backend_ejections_refused",
            "Ejections not made: the backend's models would have had too few backends left.",
            labels=["backend"],
        )
        for name, breaker in self.detector.states():
            state.add_metric([name], self.STATES[breaker.state])
            ejections.add_metric([name], breaker.total_ejections)
            refused.add_metric([name], breaker.refused)
        yield from (state, ejections, refused)


class _StateCollector:
    """Shared state in Redis (several replicas): syncs, failures, degraded mode, live replicas."""

    HELP = {
        "syncs": ("counter", "State syncs with Redis that succeeded."),
        "sync_failures": ("counter", "State syncs that failed or timed out (degraded meanwhile)."),
        "round_trips": ("counter", "Redis round trips made by the state sync."),
        "last_sync_ms": ("gauge", "Duration of the last successful state sync, milliseconds."),
        "degraded": ("gauge", "1 while Redis is unreachable: dispatching within the last known shares."),
        "live_replicas": ("gauge", "Proxy replicas alive in the fleet at the last sync."),
        "epoch_frozen": ("gauge", "1 while shares may not grow after Redis lost its data (one lease)."),
    }

    def __init__(self, coordinator: RedisCoordinator) -> None:
        self.coordinator = coordinator

    def collect(self):
        for key, value in sorted(self.coordinator.metrics().items()):
            kind, text = self.HELP.get(key, ("gauge", f"State {key}."))
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(f"sloproxy_state_{key}", text)
            family.add_metric([], value)
            yield family


class _Histogram:
    """A histogram as plain numbers (no lock: the event loop is its only writer and reader)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: Prometheus' `le`
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class _Series:
    """Everything counted per (model, SLO class)."""

    __slots__ = (
        "client_errors",
        "e2e",
        "evictions",
        "outcomes",
        "prediction_ratio",
        "predictions",
        "queue_wait",
        "rejections",
        "slo_evaluated",
        "slo_met",
        "tpot",
        "ttft",
        "within_p90",
    )

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.rejections: dict[str, int] = {}
        self.e2e = _Histogram(LATENCY_BUCKETS)
        self.ttft = _Histogram(LATENCY_BUCKETS)
        self.tpot = _Histogram(TPOT_BUCKETS)
        self.queue_wait = _Histogram(QUEUE_BUCKETS)
        self.prediction_ratio = _Histogram(PREDICTION_RATIO_BUCKETS)
        self.slo_evaluated = 0
        self.slo_met = 0
        self.client_errors = 0
        self.evictions = 0
        self.predictions = 0
        self.within_p90 = 0


class _RequestCollector:
    """Renders the per-class series at scrape time."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator:
        labels = ["model", "slo_class"]
        requests = CounterMetricFamily(
            "sloproxy_requests", "Requests by model, SLO class and outcome.", labels=[*labels, "outcome"]
        )
        rejections = CounterMetricFamily(
            "sloproxy_rejections", "Requests the proxy refused, by reason.", labels=[*labels, "reason"]
        )
        evaluated = CounterMetricFamily(
            "sloproxy_slo_evaluated",
            "Requests judged against their SLO class (attainment's denominator).",
            labels=labels,
        )
        met = CounterMetricFamily("sloproxy_slo_met", "Requests that met their SLO class.", labels=labels)
        client_errors = CounterMetricFamily(
            "sloproxy_client_errors",
            "Requests failed by their own fault (4xx but 408/429: invalid, unknown model, too long, auth); "
            "not judged against the SLO.",
            labels=labels,
        )
        evictions = CounterMetricFamily(
            "sloproxy_evictions", "Times the scheduler moved a request to another backend.", labels=labels
        )
        histograms = {
            "e2e": HistogramMetricFamily(
                "sloproxy_request_duration_seconds", "Arrival to last byte, in the proxy.", labels=labels
            ),
            "ttft": HistogramMetricFamily(
                "sloproxy_time_to_first_token_seconds",
                "Arrival to the first streamed content byte sent (queueing included).",
                labels=labels,
            ),
            "tpot": HistogramMetricFamily(
                "sloproxy_time_per_output_token_seconds",
                "Mean time per output token after the first, per streamed request.",
                labels=labels,
            ),
            "queue_wait": HistogramMetricFamily(
                "sloproxy_queue_wait_seconds", "Waiting for dispatch, all attempts.", labels=labels
            ),
            "prediction_ratio": HistogramMetricFamily(
                "sloproxy_predictor_error_ratio",
                "True reply length over the predicted p50 (1 is exact), for replies not cut by max_tokens.",
                labels=labels,
            ),
        }
        p90 = CounterMetricFamily(
            "sloproxy_predictor_within_p90", "Predicted replies no longer than their predicted p90.", labels=labels
        )
        predicted = CounterMetricFamily(
            "sloproxy_predictor_evaluated", "Predicted replies with a known true length.", labels=labels
        )
        for (model, slo_class), series in sorted(self.metrics.series.items()):
            key = [model, slo_class]
            for outcome, count in sorted(series.outcomes.items()):
                requests.add_metric([*key, outcome], count)
            for reason, count in sorted(series.rejections.items()):
                rejections.add_metric([*key, reason], count)
            evaluated.add_metric(key, series.slo_evaluated)
            met.add_metric(key, series.slo_met)
            client_errors.add_metric(key, series.client_errors)
            evictions.add_metric(key, series.evictions)
            predicted.add_metric(key, series.predictions)
            p90.add_metric(key, series.within_p90)
            for attribute, family in list(histograms.items()):
                histogram: _Histogram = getattr(series, attribute)
                family.add_metric(key, histogram.buckets(), histogram.sum)
        if not self.metrics.predicting:  # the predictor is off: no predictor series at all
            histograms.pop("prediction_ratio")
        yield from (requests, rejections, evaluated, met, client_errors, evictions, *histograms.values())
        if self.metrics.predicting:
            yield from (predicted, p90)
        upstream = HistogramMetricFamily(
            "sloproxy_upstream_time_to_first_token_seconds",
            "Upstream call to its first streamed event: the engine's TTFT as the proxy sees it.",
            labels=["model"],
        )
        for model, histogram in sorted(self.metrics.upstream_ttft.items()):
            upstream.add_metric([model], histogram.buckets(), histogram.sum)
        yield upstream
        tokens = CounterMetricFamily(
            "sloproxy_tokens", "Tokens the engines reported, by kind.", labels=["model", "kind"]
        )
        for model, (prompt, completion) in sorted(self.metrics.token_totals.items()):
            tokens.add_metric([model, "prompt"], prompt)
            tokens.add_metric([model, "completion"], completion)
        yield tokens


class ProxyMetrics:
    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.in_flight = 0  # a plain number on the hot path, read at scrape time
        Gauge("sloproxy_in_flight_requests", "Requests being served.", registry=self.registry).set_function(
            lambda: self.in_flight
        )
        self.series: dict[tuple[str, str], _Series] = {}
        self.upstream_ttft: dict[str, _Histogram] = {}
        self.predicting = False
        self.token_totals: dict[str, list[int]] = {}  # model -> [prompt, completion] (plain numbers, no locks)
        self.registry.register(_RequestCollector(self))
        self.registry.register(_BackendCollector(pool))

    def first_byte(self, model: str, seconds: float) -> None:
        """The upstream call's first streamed event (from its start)."""
        histogram = self.upstream_ttft.get(model)
        if histogram is None:
            histogram = self.upstream_ttft[model] = _Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)

    def attach_predictor(self, estimates: LengthEstimates) -> None:
        if estimates.enabled:
            self.predicting = True
            self.registry.register(_PredictorCollector(estimates))

    def attach_outlier(self, detector: OutlierDetector) -> None:
        self.registry.register(_OutlierCollector(detector))

    def attach_state(self, coordinator: RedisCoordinator) -> None:
        self.registry.register(_StateCollector(coordinator))

    def attach(self, scheduler: Scheduler) -> None:
        """Expose the scheduler's queues, budgets and events too."""
        self.registry.register(_SchedulerCollector(scheduler))

    def _series(self, model: str, slo_class: str) -> _Series:
        if model not in self.pool.by_model:
            model = "other"  # client-chosen names must not mint label values
        series = self.series.get((model, slo_class))
        if series is None:
            series = self.series[(model, slo_class)] = _Series()
        return series

    def finished(
        self, request: ProxyRequest | None, outcome: str, error: BaseException | None, ended: float | None = None
    ) -> bool | None:
        """Record one finished request; returns whether it met its SLO (None: not judged)."""
        ended = time.monotonic() if ended is None else ended
        client_error = outcome != "ok" and outcome_kind(outcome) == CLIENT_ERROR  # not judged, counted apart
        if request is None:  # refused before it could be parsed
            series = self._series("other", "none")
            series.outcomes[outcome] = series.outcomes.get(outcome, 0) + 1
            series.client_errors += client_error
            if isinstance(error, ProxyError):
                reason = rejection_reason(error)
                series.rejections[reason] = series.rejections.get(reason, 0) + 1
            return None
        series = self._series(request.model, request.slo.name if request.slo is not None else "none")
        series.outcomes[outcome] = series.outcomes.get(outcome, 0) + 1
        series.client_errors += client_error
        series.e2e.observe(ended - request.received_at)
        if request.queued_at is not None:
            wait = request.queue_wait_s + (ended - request.queued_at if rejected_in_queue(request) else 0.0)
            series.queue_wait.observe(wait)
        if request.first_token_at is not None:
            series.ttft.observe(request.first_token_at - request.received_at)
            tpot = time_per_output_token(request, ended)
            if tpot is not None:
                series.tpot.observe(tpot)
        if isinstance(error, ProxyError) and was_rejected(request):
            reason = rejection_reason(error)
            series.rejections[reason] = series.rejections.get(reason, 0) + 1
        if request.evictions:
            series.evictions += request.evictions
        met = slo_met(request, outcome, ended)
        if met is not None:
            series.slo_evaluated += 1
            series.slo_met += met
        tokens = request.completion_tokens
        if request.prompt_tokens is not None:
            totals = self.token_totals.get(request.model)
            if totals is None:
                totals = self.token_totals[request.model] = [0, 0]
            totals[0] += request.prompt_tokens
            totals[1] += tokens or 0
        if (
            request.estimate_source == "model"  # a prediction from the prompt (not a prior or a known length)
            and request.pred_p50 is not None
            and tokens is not None
            and outcome == "ok"
            and (request.max_tokens is None or tokens < request.max_tokens)
        ):
            series.predictions += 1
            series.prediction_ratio.observe(tokens / max(request.pred_p50, 1.0))
            series.within_p90 += tokens <= (request.pred_p90 or request.pred_p50)
        return met

    def render(self) -> bytes:
        return generate_latest(self.registry)
