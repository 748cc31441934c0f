"""Scheduler settings (the `scheduling:` block of the proxy config)."""

from __future__ import annotations

import msgspec


class SchedulingConfig(msgspec.Struct, forbid_unknown_fields=True):
    max_queue: int = 10_000  # waiting requests, all models
    max_queue_bytes: int = 256 * 1024 * 1024  # their bodies
    queue_timeout_s: float = 120.0  # the longest any request waits in the proxy queue
    tick_s: float = 0.05  # expiry / shedding timer
    budget_initial: int = 8  # per-backend dispatch budget, adapted from engine metrics
    budget_min: int = 2
    budget_max: int = 256
    shed_tpot_s: float = 0.02  # assumed seconds per output token when judging whether a deadline can be met
    # Metrics readings at the learned ceiling, engine keeping up, before probing above it (each probe
    # that holds doubles the next). At 20 readings and +1 per probe (one probe per 20 s at the default
    # 1 s polling) an A100 whose budget one early drop had set to 8 stayed there for 40 s at 8% KV
    # use while its batch queue went unserved (Azure conv, bench/policy_capacity.py, one polling
    # phase in four: 82% attainment where the others got 91%).
    probe_after_updates: int = 10
    retry_after_s: int = 1
    # The memory of each queue's drain rate, which refuses sheddable work at arrival when the queue ahead
    # of it outlasts its deadline (sloproxy/drain.py): long enough to smooth engine bursts, short enough
    # to follow capacity changes. A class with a deadline keeps at least that deadline's memory.
    drain_half_life_s: float = 20.0
    # Sheddable work whose queue's drain rate says it would wait out its deadline is refused at arrival
    # and shed from the queue. Off: it waits, and only work that cannot finish even if dispatched now is
    # shed.
    shed_outwaited: bool = True
    # Work that is not sheddable but has a first-token target is refused at arrival (429, Retry-After)
    # when the on-time requests ahead of it, at its queue's drain rate, outlast that target: past
    # capacity, the share the fleet can carry is served on time and the rest hears at once, instead of
    # everyone waiting out queue_timeout_s (bench/overload.py, scenario B).
    refuse_overrun: bool = True
