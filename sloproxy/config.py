"""Proxy configuration: one YAML file, decoded strictly into typed structs.

Unknown or ill-typed fields are refused at start with a message that names the field
(msgspec's path, e.g. ``$.backends[1].url``), so a typo never silently changes behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from .auth import DIGEST_PREFIX, is_digest, stored_form
from .fleet.profile import load_profile
from .regions import RegionsConfig
from .scheduler_config import SchedulingConfig
from .slo import DEFAULT_CLASSES, ModelDefaults, SLOClass, TenantConfig

ENGINES = ("vllm", "tgi", "sglang", "openai")


class Listen(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    engine: Literal["vllm", "tgi", "sglang", "openai"]
    url: str
    models: list[str]
    api_key: str | None = None  # sent as a bearer token (OpenAI-compatible backends)
    priority_scheduling: bool = False  # the engine runs with priority scheduling: pass priority hints
    # Model swapping (swapping.py): instances sharing one GPU group, at most `swapping.awake_per_group`
    # awake at a time. None: never put to sleep. vLLM sleeps at `sleep_level` 1 (weights to host
    # memory) or 2 (dropped); SGLang releases memory (one level); other engines need both commands.
    gpu_group: str | None = None
    sleep_level: Literal[1, 2] = 1
    sleep_command: list[str] | None = None  # argv run to stop it (engines without a sleep API)
    wake_command: list[str] | None = None  # argv run to start it again; ready once /health answers 200
    region: str = "default"  # regions.py: interactive work prefers regions, held-back work waits per region
    pool: str | None = None  # a free tag ("spot", "reserved"): shown in /admin/fleet and the metrics
    # The backend's context window in tokens (prompt + reply). None: learned from the engine at start and
    # on health checks (vLLM /v1/models, SGLang /model_info, TGI /info); set, it wins over the engine's.
    # Required for `engine: openai`, whose servers do not say.
    max_context_tokens: int | None = None


class PolicyConfig(msgspec.Struct, forbid_unknown_fields=True):
    name: str = "slo"  # the combined preset: beat least-load in every capacity sweep (docs/policies.md)
    params: dict[str, Any] = msgspec.field(default_factory=dict)  # validated by the policy's own type


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    """What one request may cost the proxy. Every refusal is a 4xx OpenAI-format error naming the limit."""

    max_body_bytes: int = 4 * 1024 * 1024  # larger bodies: 413 (before reading them when the length is declared)
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0  # an upstream silent this long (before headers or mid-stream) has failed
    # A stream whose engine sends nothing this long before its first event has failed (retried elsewhere).
    # Shorter than read_timeout_s: a hung engine must not hold a client for minutes; but a queued engine
    # legitimately takes long to its first token under load, so not too short (docs/architecture.md).
    first_byte_timeout_s: float = 60.0
    retries_before_first_byte: int = 1
    receive_timeout_s: float = 30.0  # a request must arrive whole this long after its first byte (408: slowloris)
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this long
    send_timeout_s: float = 60.0  # a client that reads none of its reply for this long is disconnected
    max_headers: int = 100  # header lines in one request (431 beyond)
    max_json_depth: int = 64  # arrays and objects nested in a body (400 beyond; Python's own limit is ~990)
    max_prompt_chars: int = 1_000_000  # prompt characters (token ids count one each); 400 before any featurisation
    max_n: int = 16  # choices per request (`n`); each is a full generation on the engine
    max_tokens: int = 131_072  # ceiling for `max_tokens` / `max_completion_tokens`


class ContextConfig(msgspec.Struct, forbid_unknown_fields=True):
    """What the proxy does with a request longer than a backend's window (context.py)."""

    # Where an engine refuses prompt + max_tokens over its window (SGLang, TGI, OpenAI), send the
    # largest reply limit that fits instead, and say so in the `x-sloproxy-max-tokens-clamped` header.
    # Backends that hold the request whole are preferred either way.
    clamp_max_tokens: bool = True


class AccessLogConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One JSON line per finished request (access_log.py): ids, tenant, model, class, backend, status,
    outcome, times and token counts; never keys or prompt text."""

    enabled: bool = False
    path: str | None = None  # appended to; None: standard output


class HealthConfig(msgspec.Struct, forbid_unknown_fields=True):
    interval_s: float = 2.0
    timeout_s: float = 1.0
    unhealthy_after: int = 2  # consecutive failures
    healthy_after: int = 1  # consecutive successes


class OutlierConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Circuit breaking by passive outlier ejection (outlier.py): a backend whose requests fail
    ``consecutive_failures`` times in a row takes no new requests for an ejection time that doubles on
    each repeat, from ``base_ejection_s`` up to ``max_ejection_s``; then ``half_open_requests`` trials
    decide. At most ``max_ejected_fraction`` of a model's backends are ejected, and never its last one."""

    enabled: bool = True
    consecutive_failures: int = 5
    base_ejection_s: float = 10.0
    max_ejection_s: float = 300.0
    max_ejected_fraction: float = 0.5
    half_open_requests: int = 2  # trial requests at once while the breaker is half open


class LoadPolling(msgspec.Struct, forbid_unknown_fields=True):
    interval_s: float = 1.0
    timeout_s: float = 1.0
    stale_after_s: float = 5.0  # older readings are marked stale


class PredictorConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The reply-length predictor. ``auto``: on when the policy reads predictions (queued policies),
    off for the no-queue baselines, which would only pay its cost."""

    mode: Literal["auto", "on", "off"] = "auto"
    model: str | None = None  # an artifact directory; None: the model shipped with the package
    online: bool = True  # learn from finished requests and hot-swap a better model
    retrain_every: int = 5000  # new samples that trigger a retrain
    retrain_interval_s: float | None = 3600.0
    min_samples: int = 500
    store_capacity: int = 20000


class TracingConfig(msgspec.Struct, forbid_unknown_fields=True):
    """OpenTelemetry traces. Every field left unset falls back to the standard ``OTEL_*`` variable
    (``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``,
    ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``); with neither, tracing is off. See docs/observability.md."""

    exporter: Literal["otlp", "console", "none"] | None = None
    endpoint: str | None = None  # OTLP base URL, as OTEL_EXPORTER_OTLP_ENDPOINT (http: /v1/traces is appended)
    protocol: Literal["http/protobuf", "grpc"] | None = None
    service_name: str | None = None
    sample_ratio: float | None = None  # parent-based trace-id ratio; None: OTEL_TRACES_SAMPLER or always on


class StateConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Where the scheduler's shared state lives. ``embedded``: in this process (one replica, nothing
    to install). ``redis``: several replicas share budgets, queue depths, tenant counters and the
    predictor model through Redis (docs/architecture.md, "Several replicas")."""

    backend: Literal["embedded", "redis"] = "embedded"
    url: str | None = None  # redis://[:password@]host:port/db (required with backend: redis)
    namespace: str = "sloproxy"  # key prefix: several fleets can share one Redis
    replica_id: str | None = None  # None: hostname-pid-random (unique per process)
    lease_s: float = 3.0  # a replica silent this long is dead: its reservations expire
    sync_interval_s: float = 0.05  # how often a replica exchanges its numbers with Redis
    # Redis unreachable at start: refuse to start (exit 2, one line), unless this is set; then start
    # degraded (dispatching within the last known shares: none) and join once Redis answers.
    start_without_redis: bool = False


class AdminConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The admin API (``/admin/...``: fleet state, drain, reload). Without a key it is disabled,
    unless no key is configured at all (open mode: docs/security.md)."""

    api_keys: list[str] = msgspec.field(default_factory=list)  # "sha256:<hex>" digests (`sloproxy hash-key`)


class PlacementConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Proactive placement (placement_loop.py): which model each GPU group keeps awake, from demand."""

    enabled: bool = False  # off: only the reactive rule swaps (a model waits, nothing routable)
    window_s: float = 60.0  # demand is arrivals per second, decaying over this window
    min_interval_s: float = 5.0  # re-evaluate this often while the demand mix moves...
    max_interval_s: float = 120.0  # ...and at least this often while it is stable
    shift: float = 0.2  # a mix this far (total variation) from the placed one counts as moved
    horizon_s: float = 60.0  # a placement must repay its swaps within this long...
    margin: float = 1.5  # ...by this factor (hysteresis: similar demand never ping-pongs)
    default_swap_s: float = 30.0  # swap cost assumed until one is measured
    capacity_rps: dict[str, float] = msgspec.field(default_factory=dict)  # per model, one instance (wins)
    profiles: list[str] = msgspec.field(default_factory=list)  # `sloproxy profile` files: capacity otherwise 1


class SwappingConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Model swapping between backends that share a ``gpu_group`` (swapping.py, docs/fleet.md)."""

    awake_per_group: int = 1  # instances of one group awake at once (what its GPUs' memory holds)
    drain_timeout_s: float = 120.0  # a swap whose victim still has requests in flight after this is called off
    call_timeout_s: float = 600.0  # one sleep or wake call (or hook command, or /health wait after it)
    min_awake_s: float = 10.0  # a busy instance is not swapped out sooner after waking (no ping-pong)
    cost_smoothing: float = 0.3  # EWMA weight of the newest measured sleep / wake duration
    placement: PlacementConfig = msgspec.field(default_factory=PlacementConfig)


class ProxyConfig(msgspec.Struct, forbid_unknown_fields=True):
    backends: list[BackendConfig]
    listen: Listen = msgspec.field(default_factory=Listen)
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)
    limits: Limits = msgspec.field(default_factory=Limits)
    context: ContextConfig = msgspec.field(default_factory=ContextConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    load_polling: LoadPolling = msgspec.field(default_factory=LoadPolling)
    outlier: OutlierConfig = msgspec.field(default_factory=OutlierConfig)
    scheduling: SchedulingConfig = msgspec.field(default_factory=SchedulingConfig)
    slo_classes: list[SLOClass] = msgspec.field(default_factory=list)  # empty: interactive + batch
    default_class: str | None = None
    tenants: list[TenantConfig] = msgspec.field(default_factory=list)
    models: dict[str, ModelDefaults] = msgspec.field(default_factory=dict)
    predictor: PredictorConfig = msgspec.field(default_factory=PredictorConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    access_log: AccessLogConfig = msgspec.field(default_factory=AccessLogConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    swapping: SwappingConfig = msgspec.field(default_factory=SwappingConfig)
    regions: RegionsConfig = msgspec.field(default_factory=RegionsConfig)
    # Keys in tenants' and the admin's `api_keys` are SHA-256 digests (`sloproxy hash-key`). A key in
    # plain text is refused unless this is set, and then warned about at every start.
    allow_plaintext_keys: bool = False


class ConfigError(ValueError):
    """A configuration problem, worded for the operator."""


def parse_config(raw: Any, source: str = "config") -> ProxyConfig:
    try:
        config = msgspec.convert(raw, ProxyConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check(config, source)
    return config


def load_config(path: str | Path) -> ProxyConfig:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, str(path))


def _check(config: ProxyConfig, source: str) -> None:
    if not config.backends:
        raise ConfigError(f"{source}: `$.backends` needs at least one backend")
    names = [b.name for b in config.backends]
    for index, backend in enumerate(config.backends):
        where = f"`$.backends[{index}]`"
        if names.count(backend.name) > 1:
            raise ConfigError(f"{source}: {where}: backend name {backend.name!r} is used twice")
        if not backend.url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: {where}.url must start with http:// or https://")
        if not backend.models:
            raise ConfigError(f"{source}: {where}.models must list at least one model")
        if backend.max_context_tokens is not None and backend.max_context_tokens < 2:
            raise ConfigError(f"{source}: {where}.max_context_tokens must be at least 2")
        if backend.engine == "openai" and backend.max_context_tokens is None:
            raise ConfigError(
                f"{source}: {where}.max_context_tokens is required for `engine: openai` (its servers do not "
                "report their context window)"
            )
    state = config.state
    if state.backend == "redis":
        if not state.url or not state.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"{source}: `$.state.url` needs a redis://, rediss:// or unix:// URL (backend: redis)")
        if state.lease_s <= 0 or not 0 < state.sync_interval_s < state.lease_s / 3:
            raise ConfigError(f"{source}: `$.state.sync_interval_s` must be positive and under a third of `lease_s`")
    _check_limits(config.limits, source)
    _check_tenants(config, source)
    _check_resilience(config, source)
    _check_swapping(config, source)
    _check_regions(config, source)
    classes = {c.name for c in (config.slo_classes or DEFAULT_CLASSES)}
    references = [("`$.default_class`", config.default_class)]
    references += [(f"`$.tenants[{i}].default_class`", t.default_class) for i, t in enumerate(config.tenants)]
    references += [(f"`$.models.{m}.default_class`", d.default_class) for m, d in config.models.items()]
    for where, name in references:
        if name is not None and name not in classes:
            raise ConfigError(
                f"{source}: {where} names unknown SLO class {name!r} (known: {', '.join(sorted(classes))})"
            )


def _check_tenants(config: ProxyConfig, source: str) -> None:
    """Tenant names and keys are unique; a tenant's allowed models exist. Messages never quote a key."""
    served = {model for backend in config.backends for model in backend.models}
    seen_names: set[str] = set()
    seen_keys: dict[str, str] = {}
    for index, tenant in enumerate(config.tenants):
        where = f"`$.tenants[{index}]`"
        if tenant.name in seen_names:
            raise ConfigError(f"{source}: {where}: tenant name {tenant.name!r} is used twice")
        seen_names.add(tenant.name)
        for position, entry in enumerate(tenant.api_keys):
            _check_key(entry, f"{where}.api_keys[{position}]", config.allow_plaintext_keys, source)
            digest = stored_form(entry)[0]
            if digest in seen_keys:
                raise ConfigError(
                    f"{source}: {where}.api_keys[{position}] is also a key of tenant {seen_keys[digest]!r}"
                )
            seen_keys[digest] = tenant.name
        for model in tenant.models or ():
            if model not in served:
                raise ConfigError(f"{source}: {where}.models names {model!r}, which no backend serves")
    for position, entry in enumerate(config.admin.api_keys):
        _check_key(entry, f"`$.admin.api_keys[{position}]`", config.allow_plaintext_keys, source)
        if stored_form(entry)[0] in seen_keys:
            raise ConfigError(f"{source}: `$.admin.api_keys[{position}]` is also a tenant's key")


def _check_key(entry: str, where: str, allow_plaintext: bool, source: str) -> None:
    """A key entry is a well-formed digest, or plain text where the config opts in. An entry that looks
    like a digest but is not one (a placeholder, a truncated copy) is never taken as a plain key: its
    text would then be the key. Messages never quote the entry."""
    if is_digest(entry):
        return
    if entry.lower().startswith(DIGEST_PREFIX):
        raise ConfigError(
            f"{source}: {where} starts with {DIGEST_PREFIX!r} but is not a SHA-256 digest (64 lowercase hex "
            "digits after it, as `sloproxy hash-key` prints)"
        )
    if not allow_plaintext:
        raise ConfigError(
            f"{source}: {where} is a key in plain text: store its digest instead (`sloproxy hash-key` prints "
            "it), or set `allow_plaintext_keys: true`"
        )


def _check_limits(limits: Limits, source: str) -> None:
    """Limits that would refuse everything, or never fire, are configuration mistakes."""
    if limits.max_body_bytes < 1024:
        raise ConfigError(f"{source}: `$.limits.max_body_bytes` must be at least 1024")
    for name in ("connect_timeout_s", "read_timeout_s", "receive_timeout_s", "keepalive_timeout_s", "send_timeout_s"):
        if not getattr(limits, name) > 0:
            raise ConfigError(f"{source}: `$.limits.{name}` must be positive")
    minimums = {"max_headers": 8, "max_json_depth": 8, "max_prompt_chars": 1, "max_n": 1, "max_tokens": 1}
    for name, least in minimums.items():
        if getattr(limits, name) < least:
            raise ConfigError(f"{source}: `$.limits.{name}` must be at least {least}")
    if limits.max_json_depth > 512:  # deeper would meet Python's recursion limit inside the proxy: a 500
        raise ConfigError(f"{source}: `$.limits.max_json_depth` must be at most 512")
    if limits.retries_before_first_byte < 0:
        raise ConfigError(f"{source}: `$.limits.retries_before_first_byte` must not be negative")


def _check_resilience(config: ProxyConfig, source: str) -> None:
    """The first-byte timeout and the outlier breaker: values that would never fire or never let go."""
    if not config.limits.first_byte_timeout_s > 0:
        raise ConfigError(f"{source}: `$.limits.first_byte_timeout_s` must be positive")
    outlier = config.outlier
    if outlier.consecutive_failures < 1:
        raise ConfigError(f"{source}: `$.outlier.consecutive_failures` must be at least 1")
    if outlier.half_open_requests < 1:
        raise ConfigError(f"{source}: `$.outlier.half_open_requests` must be at least 1")
    if not outlier.base_ejection_s > 0:
        raise ConfigError(f"{source}: `$.outlier.base_ejection_s` must be positive")
    if not outlier.max_ejection_s >= outlier.base_ejection_s:
        raise ConfigError(f"{source}: `$.outlier.max_ejection_s` must be at least `base_ejection_s`")
    if not 0.0 <= outlier.max_ejected_fraction <= 1.0:
        raise ConfigError(f"{source}: `$.outlier.max_ejected_fraction` must be between 0 and 1")


def _check_swapping(config: ProxyConfig, source: str) -> None:
    """Grouped backends must be able to sleep and wake; swapping is one replica's decision."""
    grouped = [(i, b) for i, b in enumerate(config.backends) if b.gpu_group is not None]
    for index, backend in enumerate(config.backends):
        where = f"`$.backends[{index}]`"
        hooks = (backend.sleep_command, backend.wake_command)
        if backend.gpu_group is None:
            if any(h is not None for h in hooks):
                raise ConfigError(f"{source}: {where}.sleep_command / wake_command need a `gpu_group`")
            continue
        if not backend.gpu_group:
            raise ConfigError(f"{source}: {where}.gpu_group must not be empty")
        if any(h is not None and not h for h in hooks):
            raise ConfigError(f"{source}: {where}.sleep_command / wake_command must not be empty lists")
        if backend.engine in ("tgi", "openai") and not all(hooks):
            raise ConfigError(
                f"{source}: {where}.gpu_group: engine {backend.engine!r} has no sleep API; "
                "give both `sleep_command` and `wake_command` (a restart hook)"
            )
        if backend.engine == "sglang" and backend.sleep_level == 2:
            raise ConfigError(f"{source}: {where}.sleep_level: SGLang's memory release has one level (use 1)")
    if grouped and config.state.backend == "redis":
        raise ConfigError(
            f"{source}: `$.backends[{grouped[0][0]}].gpu_group`: model swapping needs one replica "
            "(`state.backend: embedded`)"
        )
    swapping = config.swapping
    if swapping.awake_per_group < 1:
        raise ConfigError(f"{source}: `$.swapping.awake_per_group` must be at least 1")
    for name in ("drain_timeout_s", "call_timeout_s"):
        if not getattr(swapping, name) > 0:
            raise ConfigError(f"{source}: `$.swapping.{name}` must be positive")
    if swapping.min_awake_s < 0:
        raise ConfigError(f"{source}: `$.swapping.min_awake_s` must not be negative")
    if not 0 < swapping.cost_smoothing <= 1:
        raise ConfigError(f"{source}: `$.swapping.cost_smoothing` must be in (0, 1]")
    _check_placement(swapping.placement, source)


def _check_placement(placement: PlacementConfig, source: str) -> None:
    where = "`$.swapping.placement"
    for name in ("window_s", "min_interval_s", "horizon_s", "default_swap_s"):
        if not getattr(placement, name) > 0:
            raise ConfigError(f"{source}: {where}.{name}` must be positive")
    if placement.max_interval_s < placement.min_interval_s:
        raise ConfigError(f"{source}: {where}.max_interval_s` must be at least `min_interval_s`")
    if not 0 < placement.shift <= 1 or placement.margin < 0:
        raise ConfigError(f"{source}: {where}.shift` must be in (0, 1] and `margin` not negative")
    for model, rps in placement.capacity_rps.items():
        if not rps > 0:
            raise ConfigError(f"{source}: {where}.capacity_rps.{model}` must be positive")
    for index, path in enumerate(placement.profiles):
        try:
            load_profile(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{source}: {where}.profiles[{index}]`: {exc}") from None


def _check_regions(config: ProxyConfig, source: str) -> None:
    """Region names in preferences exist; held classes exist; the release threshold is not above
    the interactive one (held work would then crowd out what it must leave room for)."""
    regions = {b.region for b in config.backends}
    for index, backend in enumerate(config.backends):
        if not backend.region:
            raise ConfigError(f"{source}: `$.backends[{index}].region` must not be empty")
    section = config.regions
    known = ", ".join(sorted(regions))
    listed = [(f"`$.regions.preference[{i}]`", r) for i, r in enumerate(section.preference)]
    for t, tenant in enumerate(config.tenants):
        listed += [(f"`$.tenants[{t}].regions[{i}]`", r) for i, r in enumerate(tenant.regions or ())]
    for where, region in listed:
        if region not in regions:
            raise ConfigError(f"{source}: {where} names region {region!r}, which no backend is in (known: {known})")
    classes = {c.name for c in (config.slo_classes or DEFAULT_CLASSES)}
    for i, name in enumerate(section.held_classes or ()):
        if name not in classes:
            raise ConfigError(
                f"{source}: `$.regions.held_classes[{i}]` names unknown SLO class {name!r} "
                f"(known: {', '.join(sorted(classes))})"
            )
    if section.release_kv_threshold > section.interactive_kv_threshold:
        raise ConfigError(
            f"{source}: `$.regions.release_kv_threshold` must not exceed `$.regions.interactive_kv_threshold`"
        )
