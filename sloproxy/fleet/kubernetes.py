"""A plan's replica counts as Kubernetes sees them: a kustomize ``replicas:`` patch per interval.

Deployment names come from the profiles (``deployment``, else engine-model-gpu, suffixed by the region), the
way ``deploy/kubernetes/engines`` names one Deployment per engine kind; a CronJob or an operator applying the
interval's patch at its start time is left to the deployment (sloproxy does not call the Kubernetes API).
"""

from __future__ import annotations

from collections.abc import Mapping

import yaml


def kustomize_replicas(counts: Mapping[str, int]) -> str:
    """``replicas:`` entries for a kustomization.yaml (kustomize sets each Deployment's spec.replicas)."""
    entries = [{"name": name, "count": int(count)} for name, count in sorted(counts.items())]
    return yaml.safe_dump({"replicas": entries}, sort_keys=False)
