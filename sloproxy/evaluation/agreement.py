"""Live-vs-simulated comparisons: the proxy config a replay at speedup K needs, in one place.

A live replay at speedup K runs engines K times faster and measures in trace seconds; for the proxy
in front of them to behave as it would at K = 1, every duration it enforces or reacts to must be
divided by K: SLO classes, the queue timeout, the timer tick, shedding's seconds per token, and load
polling (interval and staleness). The simulator then runs the unscaled config in trace seconds.
"""

from __future__ import annotations

import msgspec

from ..config import ProxyConfig
from ..slo import DEFAULT_CLASSES


def base_config() -> ProxyConfig:
    """The proxy's defaults with the SLO classes written out (so that they can be scaled)."""
    return ProxyConfig(backends=[], slo_classes=list(DEFAULT_CLASSES), default_class=DEFAULT_CLASSES[0].name)


def scaled_config(config: ProxyConfig, speedup: float) -> ProxyConfig:
    """``config`` with every duration the proxy acts on divided by ``speedup``."""
    if speedup <= 0:
        raise ValueError("the speedup must be positive")
    k = speedup
    replace = msgspec.structs.replace

    def div(value: float | None) -> float | None:
        return None if value is None else value / k

    classes = [
        replace(c, ttft_s=div(c.ttft_s), tpot_s=div(c.tpot_s), deadline_s=div(c.deadline_s)) for c in config.slo_classes
    ]
    s, p, w = config.scheduling, config.load_polling, config.swapping
    placement = w.placement
    swapping = replace(
        w,
        drain_timeout_s=w.drain_timeout_s / k,
        call_timeout_s=w.call_timeout_s / k,
        min_awake_s=w.min_awake_s / k,
        placement=replace(
            placement,
            window_s=placement.window_s / k,
            min_interval_s=placement.min_interval_s / k,
            max_interval_s=placement.max_interval_s / k,
            horizon_s=placement.horizon_s / k,
            default_swap_s=placement.default_swap_s / k,
            capacity_rps={m: rps * k for m, rps in placement.capacity_rps.items()},  # a rate: K times faster
        ),
    )
    return replace(
        config,
        swapping=swapping,
        slo_classes=classes,
        scheduling=replace(
            s, queue_timeout_s=s.queue_timeout_s / k, tick_s=s.tick_s / k, shed_tpot_s=s.shed_tpot_s / k
        ),
        load_polling=replace(p, interval_s=p.interval_s / k, stale_after_s=p.stale_after_s / k),
    )
