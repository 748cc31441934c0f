"""Example plugin: shortest expected job first, built from sloproxy's policy parts."""

from __future__ import annotations

import msgspec

from sloproxy.policies.base import Policy, PolicySpec
from sloproxy.policies.orderings import HeapOrdering
from sloproxy.policies.parts import BudgetAdmission, LeastLoad


class Params(msgspec.Struct, forbid_unknown_fields=True):
    kv_limit: float = 0.95


def build(params: Params) -> Policy:
    return Policy(
        "shortest-first",
        ordering=lambda: HeapOrdering(lambda r: (r.est_output_tokens, r.seq)),
        admission=BudgetAdmission(params.kv_limit),
        scorers=[(LeastLoad(), 1.0)],
    )


SPEC = PolicySpec("shortest-first", Params, build, "Shortest expected reply first.")
