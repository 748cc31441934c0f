"""``slo``: the project's combined preset — what measured best of the paper policies, for mixed fleets.

Earliest deadline first (TTFT deadline for interactive work, end-to-end for batch), EcoServe's KV
reservation admission (prompt + predicted p90 reply against each instance's KV capacity, so KV-bound
instances are not driven into preemption or into their own FIFO queues where the proxy can no
longer reorder), least-load routing with a light length-bucket affinity, and eviction of silent
batch work for interactive work about to miss its first deadline.
"""

from __future__ import annotations

import msgspec

from .base import Policy, PolicySpec
from .ecoserve import KVReserveParams, kv_reserving
from .orderings import edf


class SLOParams(KVReserveParams, forbid_unknown_fields=True):
    kv_headroom: float = 1.5  # replies mostly end before p90 and engines admit by blocks used: overcommit KV
    length_edges: list[int] = msgspec.field(default_factory=lambda: [64, 256, 1024])
    length_affinity_weight: float = 0.1


def build(params: SLOParams) -> Policy:
    return kv_reserving("slo", edf, params)


SLO = PolicySpec(
    "slo",
    SLOParams,
    build,
    "EDF + KV reservation admission (prompt + p90 reply) + least-load with length affinity + eviction.",
)
