"""Loading plugins by name from the entry-point groups (built-ins register there too)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from .adapters.base import EngineAdapter
from .policies.base import Policy, PolicySpec


def _load(group: str, name: str) -> Any:
    found = [e for e in entry_points(group=group) if e.name == name]
    if not found:
        known = ", ".join(sorted(e.name for e in entry_points(group=group)))
        raise ValueError(f"nothing named {name!r} in the {group} entry-point group (known: {known})")
    return found[0].load()


def load_adapter_class(engine: str) -> type[EngineAdapter]:
    return _load("sloproxy.adapters", engine)


def load_policy_spec(name: str) -> PolicySpec:
    spec = _load("sloproxy.policies", name)
    if not isinstance(spec, PolicySpec):
        raise ValueError(f"the {name!r} entry point is a {type(spec).__name__}, not a PolicySpec")
    return spec


def load_policy(name: str, params: dict[str, Any] | None = None) -> Policy:
    return load_policy_spec(name).create(params)
