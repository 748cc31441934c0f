"""Every YAML example in README.md and docs/ loads with the real loaders, so the docs cannot drift from the code.

A block with ``backends`` is a whole proxy config (``load_config``); with ``instances``, an emulator
fleet (``load_fleet``); with ``version`` and ``cells``, a backend profile (``load_profile``). A block of
other proxy-config sections is a fragment: it is loaded into a config whose one backend serves the
models it names. Anything else (Prometheus scrape jobs, ...) must be named in ``NOT_OURS``, so a new
kind of example is a decision, not an oversight.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sloproxy.config import ProxyConfig, load_config
from sloproxy.emulator.fleet import load_fleet
from sloproxy.fleet.profile import load_profile, save_profile
from tests.test_planner import make_profile

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_OURS = {("docs/deploy.md", "kubernetes-pods")}  # a Prometheus scrape job, not a sloproxy file
# Format descriptions: field names with their meaning where values would be (a profile's `cells` rows).
SKETCHES = {("docs/fleet.md", "profile")}


def yaml_blocks() -> list[tuple[str, int, str]]:
    blocks = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for found in re.finditer(r"```ya?ml\n(.*?)```", text, re.S):
            line = text[: found.start()].count("\n") + 1
            blocks.append((str(path.relative_to(ROOT)), line, found.group(1)))
    return blocks


BLOCKS = yaml_blocks()


def _models_named(fragment: dict) -> set[str]:
    """The model names a config fragment refers to (so the base config's backend can serve them)."""
    named = set(fragment.get("models") or {})
    for tenant in fragment.get("tenants") or []:
        named.update(tenant.get("models") or [])
    return named or {"llama-3-8b"}


def test_the_docs_have_examples_of_every_kind():
    kinds = {kind_of(yaml.safe_load(text)) for _, _, text in BLOCKS}
    assert {"config", "fleet", "fragment"} <= kinds


def kind_of(loaded: object) -> str:
    if isinstance(loaded, dict) and "backends" in loaded:
        return "config"
    if isinstance(loaded, dict) and "instances" in loaded:
        return "fleet"
    if isinstance(loaded, dict) and "cells" in loaded and "version" in loaded:
        return "profile"
    if isinstance(loaded, dict) and set(loaded) <= set(ProxyConfig.__struct_fields__):
        return "fragment"
    return "other"


@pytest.mark.parametrize(("doc", "line", "text"), BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS])
def test_yaml_example_loads(doc: str, line: int, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    loaded = yaml.safe_load(text)
    kind = kind_of(loaded)
    if (doc, kind) in SKETCHES:
        assert kind == "profile" and "cells" in loaded
        return
    monkeypatch.chdir(tmp_path)  # files an example names (profiles) are made here
    placement = ((loaded.get("swapping") or {}).get("placement") or {}) if isinstance(loaded, dict) else {}
    for name in placement.get("profiles", []):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        save_profile(Path(name), make_profile("llama-3-8b", "a10", 1.0, 100.0))
    path = tmp_path / "example.yaml"
    if kind == "fragment":
        assert isinstance(loaded, dict)
        backends = [
            {"name": "b", "engine": "vllm", "url": "http://127.0.0.1:9", "models": sorted(_models_named(loaded))}
        ]
        loaded = {"backends": backends, **loaded}
        kind = "config"
    path.write_text(yaml.safe_dump(loaded), encoding="utf-8")
    if kind == "config":
        load_config(path)
    elif kind == "fleet":
        assert load_fleet(path).instances
    elif kind == "profile":
        assert load_profile(path).cells
    else:
        first = next(iter(loaded[0].values())) if isinstance(loaded, list) and loaded else None
        assert (doc, first) in NOT_OURS, f"{doc}:{line}: a YAML example of no known kind (add it to NOT_OURS?)"
