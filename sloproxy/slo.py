"""SLO classes and how a request gets one (and a tenant).

A class says what "on time" means for a request: a time-to-first-token target and a mean
time-per-output-token target (interactive work), an end-to-end deadline (batch work), a
priority band (0 is the most important) and whether the proxy may shed it early.

Resolution, first match wins: the ``x-slo-class`` header, the tenant's default (tenants come
from API keys — see auth.py — or the ``x-tenant`` header when no keys are configured), the
model's default, the configured default. A tenant may also fix its priority band.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec

from .errors import ProxyError


class SLOClass(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    ttft_s: float | None = None
    tpot_s: float | None = None
    deadline_s: float | None = None  # end to end
    band: int = 0  # 0 first
    sheddable: bool = False

    def budget_s(self, output_tokens: float) -> float | None:
        """The time this class allows for a reply of ``output_tokens`` tokens, if it bounds it."""
        if self.deadline_s is not None:
            return self.deadline_s
        if self.ttft_s is not None:
            return self.ttft_s + (self.tpot_s or 0.0) * max(output_tokens - 1.0, 0.0)
        return None


DEFAULT_CLASSES = (
    SLOClass("interactive", ttft_s=1.5, tpot_s=0.10, band=0, sheddable=False),
    SLOClass("batch", deadline_s=60.0, band=1, sheddable=True),
)


class TenantConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    api_keys: list[str] = msgspec.field(default_factory=list)  # "sha256:<hex>" digests (`sloproxy hash-key`)
    default_class: str | None = None
    band: Annotated[int, msgspec.Meta(ge=0)] | None = None  # priority band for all its requests (None: the class's)
    weight: Annotated[float, msgspec.Meta(gt=0)] = 1.0  # fair-share weight (priority-fair)
    models: list[str] | None = None  # the models it may use (None: all)
    rpm: Annotated[int, msgspec.Meta(gt=0)] | None = None  # requests per minute, fleet-wide
    tpm: Annotated[int, msgspec.Meta(gt=0)] | None = None  # prompt + completion tokens per minute, fleet-wide
    regions: list[str] | None = None  # preferred regions, first first (regions.py); None: the fleet's order

    @property
    def rate_limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None


def tenant_named(tenants: Mapping[str, TenantConfig], headers: Mapping[str, str]) -> TenantConfig | None:
    """Open mode: the ``x-tenant`` header names the tenant (a configured one, or an ad-hoc one)."""
    name = headers.get("x-tenant")
    if name is None:
        return None
    return tenants.get(name) or TenantConfig(name=name)


class ModelDefaults(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    default_class: str | None = None


class Classifier:
    """Maps a tenant, request headers and model to (tenant name, SLO class). Pure, built once from config."""

    def __init__(
        self,
        classes: list[SLOClass],
        default_class: str | None,
        tenants: list[TenantConfig],
        models: Mapping[str, ModelDefaults],
    ) -> None:
        self.classes = {c.name: c for c in classes} if classes else {c.name: c for c in DEFAULT_CLASSES}
        self.default = self.classes[default_class] if default_class else next(iter(self.classes.values()))
        self.tenants = {t.name: t for t in tenants}
        self.models = dict(models)

    def classify(self, tenant: TenantConfig | None, headers: Mapping[str, str], model: str) -> tuple[str, SLOClass]:
        explicit = headers.get("x-slo-class")
        if explicit is not None:
            slo = self.classes.get(explicit)
            if slo is None:
                raise ProxyError(
                    400, f"Unknown SLO class `{explicit}` (known: {', '.join(self.classes)}).", param="x-slo-class"
                )
        elif tenant is not None and tenant.default_class:
            slo = self.classes[tenant.default_class]
        elif model in self.models and self.models[model].default_class:
            slo = self.classes[self.models[model].default_class]  # type: ignore[index]
        else:
            slo = self.default
        return (tenant.name if tenant else "default"), slo
