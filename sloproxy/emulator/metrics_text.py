"""Render an engine's counters under its real metric names, as prometheus_client text.

vLLM labels everything with ``model_name`` and ``engine`` (and exports nothing of its own with
``disable_log_stats``); SGLang's scheduler gauges carry ``model_name``, ``engine_type`` and the
ranks (plus ``priority`` under priority scheduling), its tokenizer-side series ``model_name`` and
``engine_type``; TGI uses no model label. Rendering happens at scrape time from
:class:`.metrics_state.EngineStats` so the hot path only bumps integers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .instance import Instance
from .metrics_state import Histogram

if TYPE_CHECKING:
    from .engine import Sequence


def _gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, doc: str, labels: dict[str, str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _histogram(name: str, doc: str, labels: dict[str, str], hist: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), hist.cumulative(), hist.sum)
    return family


def vllm_metrics(instance: Instance) -> Iterator[Metric]:
    if instance.config.disable_log_stats:  # no stat loggers: /metrics keeps only non-engine families
        return
    engine, stats = instance.engine, instance.engine.stats
    labels = {"model_name": instance.config.model, "engine": "0"}
    yield _gauge("vllm:num_requests_running", "Requests in model execution batches.", labels, len(engine.running))
    yield _gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", labels, len(engine.waiting))
    yield _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, engine.kv.usage)
    yield _counter("vllm:num_preemptions", "Cumulative number of preemptions.", labels, stats.preemptions)
    yield _counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, stats.prompt_tokens)
    yield _counter("vllm:generation_tokens", "Number of generation tokens processed.", labels, stats.generation_tokens)
    success = CounterMetricFamily(
        "vllm:request_success", "Count of successfully processed requests.", labels=[*labels, "finished_reason"]
    )
    for reason in ("stop", "length", "abort"):
        success.add_metric([*labels.values(), reason], stats.finished.get(reason, 0))
    yield success
    yield _counter(
        "vllm:prefix_cache_queries", "Prefix cache queries, in terms of tokens.", labels, engine.kv.queries_tokens
    )
    yield _counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of tokens.", labels, engine.kv.hits_tokens)
    rejections = CounterMetricFamily(
        "vllm:admission_rejections",
        "Number of admission attempts rejected by a queue limit, by reason.",
        labels=["model_name", "reason"],
    )
    for reason in ("max_num_queued_reqs", "max_num_queued_tokens"):
        rejections.add_metric([instance.config.model, reason], stats.rejected.get(reason, 0))
    yield rejections
    profile = instance.config.profile
    capacity = engine.kv.num_blocks * engine.kv.block_size  # KV capacity in tokens (full attention)
    config = {
        "block_size": str(profile.block_size),
        "cache_dtype": "auto",
        "enable_prefix_caching": str(engine.kv.prefix_caching),
        "gpu_memory_utilization": str(profile.gpu_memory_utilization),
        "kv_cache_max_concurrency": str(capacity / instance.max_model_len),
        "kv_cache_size_tokens": str(capacity),
        "num_gpu_blocks": str(engine.kv.num_blocks),
        "engine": "0",
    }
    cache_info = GaugeMetricFamily(
        "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(config)
    )
    cache_info.add_metric(list(config.values()), 1.0)
    yield cache_info
    lora = GaugeMetricFamily(
        "vllm:lora_requests_info",
        "Running stats on lora requests.",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    lora.add_metric(["4", ",".join(instance.lora_adapters), ""], float(instance.started_at))
    yield lora
    sleep_state = GaugeMetricFamily(
        "vllm:engine_sleep_state", "Engine sleep state.", labels=["engine", "model_name", "sleep_state"]
    )
    current = {0: "awake", 1: "weights_offloaded", 2: "discard_all"}[engine.sleep_level]
    for state in ("awake", "weights_offloaded", "discard_all"):
        sleep_state.add_metric(["0", instance.config.model, state], 1.0 if state == current else 0.0)
    yield sleep_state
    yield _histogram(
        "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels, stats.ttft
    )
    yield _histogram(
        "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", labels, stats.itl
    )
    yield _histogram(
        "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", labels, stats.e2e
    )
    yield _histogram(
        "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase.", labels, stats.queue_time
    )
    yield _histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", labels, stats.prompt_len)
    yield _histogram(
        "vllm:request_generation_tokens", "Number of generation tokens processed.", labels, stats.generation_len
    )


def sglang_metrics(instance: Instance) -> Iterator[Metric]:
    engine, stats = instance.engine, instance.engine.stats
    model = instance.config.model
    prioritised = engine.priority_scheduling
    labels = {"model_name": model, "engine_type": "unified"}  # the tokenizer manager's series
    if prioritised:
        labels["priority"] = ""
    # The exporting scheduler's series (attention TP rank 0): the ranks as labels.
    ranks = {"model_name": model, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0", "moe_ep_rank": "0"}
    if prioritised:
        ranks["priority"] = ""
    used_tokens = engine.kv.used * engine.kv.block_size
    if prioritised:  # the collector logs every iteration: in steady state both gauges know every priority
        instance.seen_priorities.update(seq.priority for seq in [*engine.running, *engine.waiting])
    yield _queue_gauge(instance, "sglang:num_running_reqs", "The number of running requests.", ranks, engine.running)
    yield _queue_gauge(
        instance, "sglang:num_queue_reqs", "The number of requests in the waiting queue.", ranks, list(engine.waiting)
    )
    yield _gauge("sglang:num_used_tokens", "The number of used tokens.", ranks, used_tokens)
    yield _gauge("sglang:token_usage", "The token usage.", ranks, engine.kv.usage)
    hit_rate = engine.kv.hits_tokens / engine.kv.queries_tokens if engine.kv.queries_tokens else 0.0
    yield _gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", ranks, hit_rate)
    throughput = stats.generation_tokens / stats.busy_seconds if stats.busy_seconds else 0.0
    yield _gauge("sglang:gen_throughput", "The generation throughput (token/s).", ranks, throughput)
    capacity = engine.kv.num_blocks * engine.kv.block_size
    yield _gauge("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.", ranks, capacity)
    yield _gauge("sglang:context_len", "Maximum context length.", ranks, instance.max_model_len)
    yield _counter("sglang:prompt_tokens", "Number of prefill tokens processed.", labels, stats.prompt_tokens)
    yield _counter(
        "sglang:generation_tokens", "Number of generation tokens processed.", labels, stats.generation_tokens
    )
    yield _counter("sglang:num_aborted_requests", "Number of requests aborted.", labels, stats.finished.get("abort", 0))
    yield _histogram(
        "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels, stats.ttft
    )
    yield _histogram(
        "sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", labels, stats.itl
    )
    yield _histogram(
        "sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency.", labels, stats.e2e
    )
    yield _histogram("sglang:queue_time_seconds", "Histogram of queueing time in seconds.", labels, stats.queue_time)


def _queue_gauge(
    instance: Instance, name: str, doc: str, labels: dict[str, str], seqs: list[Sequence]
) -> GaugeMetricFamily:
    """The total under the default labels (``priority=""`` under priority scheduling), then, with
    priority scheduling, one series per priority seen so far (0 once a priority has gone)."""
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), len(seqs))
    if instance.engine.priority_scheduling:
        counts = Counter(seq.priority for seq in seqs)
        for priority in sorted(instance.seen_priorities):
            family.add_metric([*list(labels.values())[:-1], str(priority)], counts.get(priority, 0))
    return family


def tgi_metrics_text(instance: Instance) -> bytes:
    """TGI exports through the Rust ``metrics`` crate: counters carry no ``_total`` suffix."""
    engine, stats = instance.engine, instance.engine.stats
    lines: list[str] = []

    def scalar(kind: str, name: str, value: float, labels: str = "") -> None:
        lines.extend((f"# TYPE {name} {kind}", f"{name}{labels} {value}"))

    def histogram(name: str, hist: Histogram) -> None:
        lines.append(f"# TYPE {name} histogram")
        lines.extend(f'{name}_bucket{{le="{le}"}} {count:g}' for le, count in hist.cumulative())
        lines.extend((f"{name}_sum {hist.sum}", f"{name}_count {hist.count}"))

    succeeded = stats.finished.get("stop", 0) + stats.finished.get("length", 0)
    scalar("gauge", "tgi_queue_size", len(engine.waiting))
    scalar("gauge", "tgi_batch_current_size", len(engine.running))
    scalar("gauge", "tgi_batch_current_max_tokens", sum(s.computed for s in engine.running))
    scalar("gauge", "tgi_batch_max_total_tokens", engine.kv.num_blocks * engine.kv.block_size)
    scalar("counter", "tgi_request_count", stats.requests_received + sum(stats.rejected.values()))
    scalar("counter", "tgi_request_success", succeeded)
    lines.append("# TYPE tgi_request_failure counter")
    lines.extend(f'tgi_request_failure{{err="{err}"}} {count}' for err, count in sorted(stats.rejected.items()))
    histogram("tgi_request_duration", stats.e2e)
    histogram("tgi_request_queue_duration", stats.queue_time)
    histogram("tgi_request_mean_time_per_token_duration", stats.time_per_token)
    histogram("tgi_request_generated_tokens", stats.generation_len)
    return ("\n".join(lines) + "\n").encode()


class _Collector:
    def __init__(self, instance: Instance) -> None:
        self._instance = instance
        self._render = {"vllm": vllm_metrics, "sglang": sglang_metrics}[instance.config.engine]

    def collect(self) -> Iterable[Metric]:
        return self._render(self._instance)


def render_metrics(instance: Instance) -> bytes:
    if instance.config.engine == "tgi":
        return tgi_metrics_text(instance)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(instance))
    return generate_latest(registry)
