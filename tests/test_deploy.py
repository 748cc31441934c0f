"""Deployment artifacts under deploy/: what can be proven without a Docker engine, GPUs or a cluster.

* every sloproxy config under deploy/ (compose configs, the Kubernetes ConfigMap) loads with the real loader;
* both compose files validate against the Compose Specification's JSON schema after compose's interpolation, with
  the references ``docker compose config`` resolves (depends_on, named volumes, repository files), and describe the
  same topology;
* the Dockerfile's build context holds what it copies, and the wheel built from it carries every module, the
  compiled extensions and the predictor model;
* every Kubernetes manifest validates strictly against the Kubernetes JSON schemas (kubernetes-validate), the
  kustomizations cover them, and the objects are wired to each other (Services, probes, ConfigMap, HPA);
* the image's entrypoint, run outside Docker with compose.emulated.yaml's own commands, starts the emulated
  engines and the proxy, which answers the official ``openai`` client and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from sloproxy.config import ConfigError, load_config, parse_config
from sloproxy.processes import free_port
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
COMPOSE_FILES = ("compose.yaml", "compose.emulated.yaml")
ENGINES = {"vllm", "sglang", "tgi"}
SERVICES = ENGINES | {"sloproxy", "redis", "prometheus", "grafana", "otel-collector", "jaeger"}
# Oldest Kubernetes the manifests target (autoscaling/v2, policy/v1 PDB) and the newest schemas bundled.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# Top-level kustomizations (what `kubectl apply -k` is pointed at) and manifests they leave out on purpose.
KUSTOMIZATIONS = (K8S, K8S / "emulated")
OUTSIDE_KUSTOMIZE = {K8S / "prometheus-adapter" / "adapter-config.yaml"}  # lives where the adapter runs


# ---------------------------------------------------------------------------------------------- helpers


def raw_compose(name: str) -> dict[str, Any]:
    """The file as written (PyYAML resolves the anchors and `<<` merges the same way)."""
    return yaml.safe_load((DEPLOY / name).read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def config_file_of(service: dict[str, Any]) -> Path:
    """The repository file a compose service's SLOPROXY_CONFIG names, through its bind mounts."""
    target = environment(service)["SLOPROXY_CONFIG"]
    for volume in service["volumes"]:
        source, mount = volume.split(":")[:2]
        if target.startswith(mount.rstrip("/") + "/"):
            return (DEPLOY / source / target[len(mount.rstrip("/")) + 1 :]).resolve()
    raise AssertionError(f"SLOPROXY_CONFIG={target} is not under any of {service['volumes']}")


def option(args: list[str], flag: str) -> str:
    """The value of ``--flag V`` or ``--flag=V`` in an argument list."""
    for index, arg in enumerate(args):
        if arg == flag:
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise KeyError(flag)


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize_files(directory: Path) -> list[Path]:
    """The manifest files a kustomization pulls in, following directory resources."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    files: list[Path] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory / 'kustomization.yaml'}: resource {resource} does not exist"
        files += kustomize_files(path) if path.is_dir() else [path]
    return files


def objects(directory: Path) -> list[dict[str, Any]]:
    return [doc for path in kustomize_files(directory) for doc in documents(path)]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def all_images() -> list[tuple[str, str]]:
    images = []
    for name in COMPOSE_FILES:
        for service_name, service in raw_compose(name)["services"].items():
            images.append((f"{name}:{service_name}", service["image"]))
    for path in manifest_files():
        for doc in documents(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                images.append((f"{path.relative_to(ROOT)}:{container['name']}", container["image"]))
    return images


# ------------------------------------------------------------------------------------------------ configs


def sloproxy_configs() -> Iterator[tuple[str, str]]:
    for path in sorted((DEPLOY / "config").glob("*.yaml")):
        yield str(path.relative_to(ROOT)), path.read_text()
    for path in manifest_files():
        for doc in documents(path):
            if doc["kind"] == "ConfigMap" and "sloproxy.yaml" in doc.get("data", {}):
                yield f"{path.relative_to(ROOT)}:{doc['metadata']['name']}", doc["data"]["sloproxy.yaml"]


@pytest.mark.parametrize(("source", "text"), list(sloproxy_configs()), ids=[s for s, _ in sloproxy_configs()])
def test_every_sloproxy_config_loads(tmp_path: Path, source: str, text: str):
    path = tmp_path / "sloproxy.yaml"
    path.write_text(text)
    config = load_config(path)  # the loader `sloproxy serve` uses: unknown fields refused
    assert config.listen.host == "0.0.0.0" and config.listen.port == 8000, source
    assert {b.engine for b in config.backends} == ENGINES, source
    # Several replicas everywhere: the state lives in Redis.
    assert config.state.backend == "redis" and config.state.url == "redis://redis:6379/0", source


def test_config_loader_refuses_unknown_fields():
    """The check above has teeth: a misspelt field in a deploy config would be refused at start."""
    raw = yaml.safe_load((DEPLOY / "config" / "sloproxy.yaml").read_text())
    raw["state"]["replicas"] = 2
    with pytest.raises(ConfigError, match="replicas"):
        parse_config(raw)


def test_images_are_pinned():
    images = all_images()
    assert len(images) >= 20
    for where, image in images:
        assert re.search(r":[\w][\w.-]*(@sha256:[0-9a-f]{64})?$", image.rsplit("/", 1)[-1]), f"{where}: {image}"
        assert not image.endswith(":latest"), f"{where}: {image}"


# ------------------------------------------------------------------------------------------------ compose


# Compose without Docker: what `docker compose config` resolves and refuses, done in-process. The file is
# interpolated, validated against the Compose Specification's JSON schema (the copy check-jsonschema ships
# for its `--builtin-schema vendor.compose-spec`, taken from the compose-spec/compose-spec repository),
# and the references compose resolves are checked: depends_on (no undefined service, no cycle), named
# volumes, networks, secrets and configs declared, and the repository files it uses present (build
# context and Dockerfile, bind-mount sources, env files). deploy/.env is not read: the defaults are tested.

COMPOSE_VARIABLES = ("HF_TOKEN", "GRAFANA_ADMIN_PASSWORD", "SLOPROXY_MODELS_DIR", "VLLM_GPU", "SGLANG_GPU", "TGI_GPU")
# Bind-mount sources that are the user's to provide (deploy/.gitignore'd; compose creates them if missing).
USER_PROVIDED = {DEPLOY / "models"}
VARIABLE_NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")


class ComposeError(Exception):
    """A compose file docker compose refuses, accepts with a warning (an unset variable) or only fails on at
    `up` or `build` (a missing repository file)."""


def compose_env() -> dict[str, str]:
    """The environment compose interpolates from, without the caller's own overrides of our variables."""
    return {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}


def interpolate(text: str, env: Mapping[str, str], unset: set[str]) -> str:
    """Compose's substitution: ``$$``, ``$VAR``, ``${VAR}``, and ``${VAR<op>argument}`` for the operators
    ``:-`` ``-`` (default), ``:?`` ``?`` (required) and ``:+`` ``+`` (alternative); the argument is itself
    interpolated. With a colon an empty variable counts as unset. Unset variables without a default go
    into ``unset`` (compose substitutes "" with a warning). Checked against docker compose 2.40's output."""
    out, i = [], 0
    while (j := text.find("$", i)) >= 0:
        out.append(text[i:j])
        if text.startswith("$$", j):
            out.append("$")
            i = j + 2
        elif text.startswith("${", j):
            end = _closing_brace(text, j)
            out.append(_substitute(text[j + 2 : end], text, env, unset))
            i = end + 1
        elif name := VARIABLE_NAME.match(text, j + 1):
            out.append(_lookup(name.group(), env, unset))
            i = name.end()
        else:  # a '$' before neither a name nor '{' is kept, as compose v2 does
            out.append("$")
            i = j + 1
    out.append(text[i:])
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    """Where the ``}`` closing the ``${`` at ``start`` is, past any ``${...}`` nested in its argument."""
    depth, i = 0, start
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ComposeError(f"invalid interpolation format in {text!r}: '${{' is not closed")


def _substitute(expression: str, text: str, env: Mapping[str, str], unset: set[str]) -> str:
    name = VARIABLE_NAME.match(expression)
    if name is None:
        raise ComposeError(f"invalid interpolation format in {text!r}: '${{{expression}}}'")
    variable, rest = name.group(), expression[name.end() :]
    if not rest:
        return _lookup(variable, env, unset)
    operator = next((op for op in (":-", ":?", ":+", "-", "?", "+") if rest.startswith(op)), None)
    if operator is None:
        raise ComposeError(f"invalid interpolation format in {text!r}: '${{{expression}}}'")
    argument, value = rest[len(operator) :], env.get(variable)
    is_set = value is not None and (value != "" or ":" not in operator)
    if operator.endswith("-"):
        return value if is_set and value is not None else interpolate(argument, env, unset)
    if operator.endswith("+"):
        return interpolate(argument, env, unset) if is_set else ""
    if not is_set or value is None:
        raise ComposeError(f"required variable {variable} is missing a value: {interpolate(argument, env, unset)}")
    return value


def _lookup(variable: str, env: Mapping[str, str], unset: set[str]) -> str:
    if variable not in env:
        unset.add(variable)
    return env.get(variable, "")


def _interpolated(node: Any, env: Mapping[str, str], unset: set[str]) -> Any:
    """Every string value interpolated (keys are not, as in compose)."""
    if isinstance(node, str):
        return interpolate(node, env, unset)
    if isinstance(node, dict):
        return {key: _interpolated(value, env, unset) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(value, env, unset) for value in node]
    return node


@functools.cache
def compose_schema_validator() -> jsonschema.protocols.Validator:
    schema = get_builtin_schema("vendor.compose-spec")
    assert schema["title"] == "Compose Specification", schema.get("title")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _host_path(source: str, base: Path) -> Path:
    return Path(os.path.normpath(base / Path(source).expanduser()))


def _volume(volume: str | dict[str, Any], base: Path) -> dict[str, Any]:
    """A service's volume in the long syntax, a bind mount's source made absolute (``src:dst[:mode]``:
    a source starting with '.', '/' or '~' is a host path, any other a named volume)."""
    if isinstance(volume, str):
        parts = volume.split(":")
        if len(parts) == 1:
            volume = {"type": "volume", "target": parts[0]}
        else:
            kind = "bind" if parts[0].startswith((".", "/", "~")) else "volume"
            volume = {"type": kind, "source": parts[0], "target": parts[1], "read_only": "ro" in parts[2:]}
    if volume.get("type") == "bind":
        volume = {**volume, "source": str(_host_path(volume["source"], base))}
    return volume


def _dependency_cycle(services: dict[str, Any]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> list[str] | None:
        if name in visiting:
            return [*visiting[visiting.index(name) :], name]
        if name in done or name not in services:
            return None
        visiting.append(name)
        for dependency in services[name].get("depends_on", {}):
            if cycle := visit(dependency):
                return cycle
        visiting.pop()
        done.add(name)
        return None

    return next((cycle for name in services if (cycle := visit(name))), None)


def compose_config(name: str, text: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """deploy/NAME (or ``text`` in its place) as compose resolves it: anchors and ``<<`` merges, interpolation,
    depends_on and volumes in the long syntax, relative paths made absolute. ComposeError lists every problem."""
    base = DEPLOY
    raw = yaml.safe_load((base / name).read_text() if text is None else text)
    unset: set[str] = set()
    config = _interpolated(raw, compose_env() if env is None else env, unset)
    problems = [f"variable {v} is not set and has no default (compose would use '')" for v in sorted(unset)]
    for error in sorted(compose_schema_validator().iter_errors(config), key=lambda e: list(map(str, e.path))):
        problems.append(f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}")
    if problems:  # the checks below rely on the schema's shapes
        raise ComposeError(f"{name}:\n" + "\n".join(problems))

    services: dict[str, Any] = config["services"]
    declared = {kind: set(config.get(kind) or {}) for kind in ("volumes", "networks", "secrets", "configs")}
    declared["networks"].add("default")
    files: list[tuple[str, Path]] = []
    for kind in ("secrets", "configs"):
        for key, item in (config.get(kind) or {}).items():
            if item and "file" in item:
                files.append((f"{kind}.{key}.file", _host_path(item["file"], base)))
    for service_name, service in services.items():
        where = f"services.{service_name}"
        if "image" not in service and "build" not in service:
            problems.append(f"{where}: neither an image nor a build context")
        if "build" in service:
            build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
            service["build"] = build = {**build, "context": str(_host_path(build.get("context", "."), base))}
            files.append((f"{where}.build.context", Path(build["context"])))
            if "dockerfile_inline" not in build:
                dockerfile = Path(build["context"]) / build.get("dockerfile", "Dockerfile")
                files.append((f"{where}.build.dockerfile", dockerfile))
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            depends_on = {d: {"condition": "service_started", "required": True} for d in depends_on}
        service["depends_on"] = depends_on
        for dependency in depends_on:
            if dependency not in services:
                problems.append(f"{where}.depends_on: undefined service {dependency!r}")
        mode = service.get("network_mode", "")
        if mode.startswith("service:") and mode.split(":", 1)[1] not in services:
            problems.append(f"{where}.network_mode: undefined service {mode.split(':', 1)[1]!r}")
        for kind in ("networks", "secrets", "configs"):
            for reference in service.get(kind) or []:
                reference = reference["source"] if isinstance(reference, dict) else reference
                if reference not in declared[kind]:
                    problems.append(f"{where}.{kind}: {reference!r} is not declared under top-level {kind}")
        service["volumes"] = [_volume(v, base) for v in service.get("volumes", [])]
        for volume in service["volumes"]:
            if volume["type"] == "volume" and volume.get("source") and volume["source"] not in declared["volumes"]:
                problems.append(f"{where}.volumes: named volume {volume['source']!r} is not declared under volumes")
            if volume["type"] == "bind" and Path(volume["source"]) not in USER_PROVIDED:
                files.append((f"{where}.volumes", Path(volume["source"])))
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            entry = {"path": env_file} if isinstance(env_file, str) else env_file
            if entry.get("required", True):
                files.append((f"{where}.env_file", _host_path(entry["path"], base)))
    if cycle := _dependency_cycle(services):
        problems.append(f"depends_on cycle: {' -> '.join(cycle)}")
    problems += [f"{where}: {path} does not exist" for where, path in files if not path.exists()]
    if problems:
        raise ComposeError(f"{name}:\n" + "\n".join(problems))
    return config


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_validates(name: str):
    try:
        compose_config(name)
    except ComposeError as error:
        pytest.fail(str(error), pytrace=False)


# (what is broken, text replaced in compose.yaml, its replacement, what the refusal says)
BROKEN_COMPOSE = [
    ("a misspelt field", "    depends_on:\n      redis:", "    depend_on:\n      redis:", "'depend_on' was unexpected"),
    ("a wrong type", "      replicas: 2\n", "      replicas: [2]\n", r"deploy\.replicas: \[2\] is not of type"),
    ("an undefined service", "depends_on: [prometheus, jaeger]", "depends_on: [prometheus, tempo]", "service 'tempo'"),
    ("a dependency cycle", "  prometheus:\n", "  prometheus:\n    depends_on: [grafana]\n", "cycle: "),
    ("an undeclared named volume", "  hf-cache:\n", "", "volume 'hf-cache' is not declared"),
    ("a missing repository file", "/sloproxy_rules.yml:/", "/rules.yml:/", "rules.yml does not exist"),
    ("a missing build context", "    context: ..\n", "    context: ../no-such-dir\n", "no-such-dir does not exist"),
    ("an unset variable", "${HF_TOKEN:-}", "${HF_TOKEN}", "variable HF_TOKEN is not set"),
    ("a required variable", "${GRAFANA_ADMIN_PASSWORD:-admin}", "${GRAFANA_ADMIN_PASSWORD:?unset}", "value: unset"),
    ("an unclosed variable", '"${VLLM_GPU:-0}"', '"${VLLM_GPU:-0"', "is not closed"),
]


@pytest.mark.parametrize(("broken", "old", "new", "message"), BROKEN_COMPOSE, ids=[c[0] for c in BROKEN_COMPOSE])
def test_compose_validation_refuses_a_broken_file(broken: str, old: str, new: str, message: str):
    """The validation above has teeth: each of these fails it, while the same text unbroken passes. docker compose
    2.40's `config` refuses them too, except the unset variable (it warns and uses "") and the missing files (it
    creates a missing bind-mount source as an empty directory; the build fails without its context)."""
    text = (DEPLOY / "compose.yaml").read_text()
    assert text.count(old) == 1, f"{broken}: {old!r} is not in compose.yaml once"
    compose_config("compose.yaml", text)
    with pytest.raises(ComposeError, match=message):
        compose_config("compose.yaml", text.replace(old, new))


def test_compose_interpolation():
    env = {"SET": "x", "EMPTY": ""}
    cases = {
        "$$SET ${SET} $SET-": "$SET x x-",
        "${SET:-d} ${EMPTY:-d} ${UNSET:-d} ${EMPTY-d} ${UNSET-d}": "x d d  d",
        "${SET:+a} ${EMPTY:+a} ${EMPTY+a} ${UNSET+a}": "a  a ",
        "${UNSET:-${SET}} ${UNSET:-a${UNSET2:-b}c}": "x abc",
        "${SET:?no} ${EMPTY?no}": "x ",
        "$ x $- a$ $1 ${SET:-x}y}": "$ x $- a$ $1 xy}",  # a '$' starting no variable, a '}' closing none: kept
    }
    for text, expected in cases.items():
        unset: set[str] = set()
        assert interpolate(text, env, unset) == expected and not unset, text
    unset = set()
    assert interpolate("a${UNSET}b$UNSET2", env, unset) == "ab" and unset == {"UNSET", "UNSET2"}
    for text, message in (("${EMPTY:?needed}", "EMPTY is missing a value: needed"), ("${UNSET?}", "UNSET is missing")):
        with pytest.raises(ComposeError, match=message):
            interpolate(text, env, set())
    for text in ("${}", "${1A}", "${SET:x}", "${SET", "a${UNSET:-${SET}"):
        with pytest.raises(ComposeError, match="invalid interpolation format"):
            interpolate(text, env, set())


def test_compose_files_run_the_same_topology():
    real, emulated = compose_config("compose.yaml"), compose_config("compose.emulated.yaml")
    for config in (real, emulated):
        services = config["services"]
        assert set(services) == SERVICES
        proxy = services["sloproxy"]
        assert proxy["deploy"]["replicas"] == 2
        assert Path(proxy["build"]["context"]) == ROOT and proxy["build"]["dockerfile"] == "deploy/Dockerfile"
        assert {"redis", *ENGINES} <= set(proxy["depends_on"])
        assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
        env = environment(proxy)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
        # Every file a service mounts from the repository exists (compose_config checks it).
        mounted = {Path(v["source"]) for s in services.values() for v in s["volumes"] if v["type"] == "bind"}
        assert DEPLOY / "config" in mounted and DEPLOY / "prometheus" / "sloproxy_rules.yml" in mounted

    # Real engines: pinned engine images, one GPU each, the shared model cache, the token from the environment.
    gpus = set()
    for engine in ENGINES:
        service = real["services"][engine]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        gpus.update(devices[0]["device_ids"])
        assert any(v["type"] == "volume" and v["source"] == "hf-cache" for v in service["volumes"])
        assert "HF_TOKEN" in environment(service)
    assert gpus == {"0", "1", "2"}
    assert real["services"]["vllm"]["image"].startswith("vllm/vllm-openai:")
    assert real["services"]["sglang"]["image"].startswith("lmsysorg/sglang:")
    assert real["services"]["tgi"]["image"].startswith("ghcr.io/huggingface/text-generation-inference:")

    # Emulated: the sloproxy image running `emulate`, and nothing asks for a GPU.
    assert "devices" not in json.dumps(emulated)
    for engine in ENGINES:
        service = emulated["services"][engine]
        assert service["image"] == emulated["services"]["sloproxy"]["image"]
        assert service["command"][:3] == ["emulate", "--engine", engine]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_proxy_config_matches_the_engines(name: str):
    """The proxy's config (found through SLOPROXY_CONFIG and the bind mount) names each engine by its
    service name and the port that engine listens on; Prometheus scrapes the same addresses."""
    services = raw_compose(name)["services"]
    config = load_config(config_file_of(services["sloproxy"]))
    listening = {engine: int(option(services[engine]["command"], "--port")) for engine in ENGINES}
    assert {urlsplit(b.url).hostname: urlsplit(b.url).port for b in config.backends} == listening
    # The served model names are the ones the config routes.
    for backend in config.backends:
        command = services[backend.name]["command"]
        served = {"vllm": "--served-model-name", "sglang": "--served-model-name"}.get(backend.engine)
        if name == "compose.emulated.yaml":
            assert backend.models == [option(command, "--model")]
        elif served:
            assert backend.models == [option(command, served)]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.compose.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    scraped = {t for group in jobs["engines"]["static_configs"] for t in group["targets"]}
    assert scraped == {f"{engine}:{port}" for engine, port in listening.items()}
    assert jobs["sloproxy"]["dns_sd_configs"][0]["names"] == ["sloproxy"]
    assert (DEPLOY / "prometheus" / prometheus["rule_files"][0]).is_file()


# ------------------------------------------------------------------------------------------------- docker


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    instructions, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, rest = current.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_docker_context(relative: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negated
    return not excluded


def docker_context(patterns: list[str]) -> list[str]:
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        rel_dir = os.path.relpath(directory, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Skip trees no negated pattern can bring back (.git, .venv, ...).
        subdirs[:] = [
            d
            for d in subdirs
            if in_docker_context(rel_dir + d, patterns)
            or any(p.startswith("!") and p[1:].startswith(rel_dir + d + "/") for p in patterns)
        ]
        files += [rel_dir + n for n in names if in_docker_context(rel_dir + n, patterns)]
    return sorted(files)


def test_dockerfile_is_small_pinned_non_root_with_a_health_check():
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for kind, a in instructions if kind == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    stages = [a for kind, a in instructions if kind == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]  # multi-stage, both on the pinned base
    final = instructions[max(i for i, (kind, _) in enumerate(instructions) if kind == "FROM") :]
    users = [a for kind, a in final if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # The final stage takes only the built virtualenv from the build stage (no compilers, no sources).
    copies_from = [a for kind, a in final if kind == "COPY" and "--from=" in a]
    assert copies_from == ["--from=build /opt/sloproxy /opt/sloproxy"]
    healthchecks = [a for kind, a in final if kind == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "urllib.request" in healthchecks[0] and "curl" not in healthchecks[0]
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["sloproxy-entrypoint"]
    assert json.loads(dict(final)["CMD"]) == ["serve"]


def test_dockerfile_copies_only_what_the_build_context_holds():
    patterns = dockerignore_patterns()
    context = docker_context(patterns)
    assert "pyproject.toml" in context and "deploy/entrypoint.sh" in context
    assert not any(f.startswith((".git/", ".venv/", "tests/", "bench/")) or f.endswith(".pyc") for f in context)
    for kind, args in dockerfile_instructions():
        if kind != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), source
            assert any(f == source or f.startswith(source + "/") for f in context), f"{source} is .dockerignore'd"
    assert os.access(ENTRYPOINT, os.X_OK)


def test_wheel_built_from_the_docker_context_carries_every_module_the_extensions_and_the_model(tmp_path: Path):
    """The build stage's `pip wheel --no-deps .`, run on exactly the files the Docker context holds.

    Every module of the checkout must be in it: an editable install (the tests', the demo's) imports
    from the checkout and never notices a package missing from pyproject's list (sloproxy.fleet was:
    the image's `sloproxy serve` failed importing the config loader)."""
    context = tmp_path / "context"
    context_files = docker_context(dockerignore_patterns())
    for relative in context_files:
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, context / relative)
    run = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path / "dist")]
    result = subprocess.run([*run, str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("sloproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        f"sloproxy/predictor/default_model/{p.name}" for p in (ROOT / "sloproxy/predictor/default_model").iterdir()
    }
    assert shipped and shipped <= names
    installed_as = {"sloproxy": "sloproxy", "adapters": "sloproxy/adapters", "policies": "sloproxy/policies"}
    modules = {  # where each source file lands once installed (package-dir maps adapters/, policies/)
        f"{installed}/{path.relative_to(ROOT / source)}"
        for source, installed in installed_as.items()
        for path in (ROOT / source).rglob("*.py")
    }
    assert "sloproxy/adapters/vllm.py" in modules and "sloproxy/fleet/profile.py" in modules
    assert sorted(modules - names) == []
    # The extensions are compiled from the context's setup.py (the build stage has gcc), never copied
    # from the host's in-place builds, which may be for another platform.
    assert not any(name.endswith(".so") for name in context_files)
    if shutil.which("cc") or shutil.which("gcc"):
        built = {name.split("/")[-1].split(".")[0] for name in names if name.endswith(".so")}
        assert built == {"_ngrams", "_trees"}, names


# --------------------------------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_kubernetes_manifest_validates_strictly(path: Path):
    docs = documents(path)
    assert docs, path
    for doc in docs:
        assert doc["metadata"].get("namespace", "sloproxy") in ("sloproxy", "monitoring")
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path_in_doc = "/".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{path}: {doc['kind']}/{doc['metadata']['name']} at {path_in_doc} ({version}): {exc.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as exc:
                pytest.fail(f"{path}: {exc.message} (only built-in kinds are expected)")


def test_kubernetes_validator_rejects_mistakes():
    """The strict validation above has teeth: a misspelt field and a wrong type are both refused."""
    (deployment,) = [d for d in documents(K8S / "base" / "sloproxy-deployment.yaml")]
    misspelt = json.loads(json.dumps(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for doc in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_kustomizations_cover_every_manifest():
    covered = {p for directory in KUSTOMIZATIONS for p in kustomize_files(directory)}
    assert covered | OUTSIDE_KUSTOMIZE == set(manifest_files())
    for directory in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert kustomization["namespace"] == "sloproxy"
        assert [i["name"] for i in kustomization["images"]] == ["sloproxy"]


@pytest.mark.parametrize("variant", KUSTOMIZATIONS, ids=("gpu", "emulated"))
def test_kubernetes_objects_are_wired_together(variant: Path):
    objs = objects(variant)
    config_map = find(objs, "ConfigMap", "sloproxy-config")
    config = parse_config(yaml.safe_load(config_map["data"]["sloproxy.yaml"]))

    def deployment_behind(service: dict[str, Any]) -> dict[str, Any]:
        selector = service["spec"]["selector"]
        matches = [
            o
            for o in objs
            if o["kind"] == "Deployment"
            and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
            and o["spec"]["selector"]["matchLabels"].items() <= o["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, service["metadata"]["name"]
        return matches[0]

    def container_port(deployment: dict[str, Any], target: int | str) -> int:
        ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        for port in ports:
            if target in (port["containerPort"], port.get("name")):
                return port["containerPort"]
        raise AssertionError(f"{deployment['metadata']['name']} has no port {target}")

    # Engines: discovered by Service DNS; one engine instance behind each Service, listening where it points.
    for backend in config.backends:
        url = urlsplit(backend.url)
        name, namespace, *_ = url.hostname.split(".")
        assert namespace == "sloproxy"
        service = find(objs, "Service", name)
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        engine = deployment_behind(service)
        assert engine["spec"]["replicas"] == 1
        container = engine["spec"]["template"]["spec"]["containers"][0]
        args = container.get("command", [])[3:] + container["args"]
        assert container_port(engine, port["targetPort"]) == int(option(args, "--port"))
        if "nvidia.com/gpu" in container["resources"].get("limits", {}):
            assert variant == K8S
        else:
            assert variant != K8S and args[0] == "emulate"

    # Redis, where the state section points.
    redis = find(objs, "Service", urlsplit(config.state.url).hostname)
    assert redis["spec"]["ports"][0]["port"] == (urlsplit(config.state.url).port or 6379)
    deployment_behind(redis)

    # The proxy: the ConfigMap mounted where SLOPROXY_CONFIG points, probes on /health and /ready.
    proxy = find(objs, "Deployment", "sloproxy")
    assert deployment_behind(find(objs, "Service", "sloproxy")) is proxy
    pod = proxy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == "sloproxy-config"
    assert env["SLOPROXY_CONFIG"] == f"{mount['mountPath']}/sloproxy.yaml"
    assert container_port(proxy, "http") == config.listen.port
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True and container["args"] == ["serve"]
    assert proxy["spec"]["replicas"] >= 2

    pdb = find(objs, "PodDisruptionBudget", "sloproxy")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(proxy).items()

    # The HPA scales the proxy on a pods metric that the prometheus-adapter rule provides.
    hpa = find(objs, "HorizontalPodAutoscaler", "sloproxy")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sloproxy"}
    assert hpa["spec"]["minReplicas"] >= 2
    (pods_metric,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metric in {rule["name"]["as"] for rule in adapter_rules()}


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def adapter_rules() -> list[dict[str, Any]]:
    (config_map,) = documents(K8S / "prometheus-adapter" / "adapter-config.yaml")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def test_emulated_engines_run_the_same_commands_in_compose_and_kubernetes():
    compose = raw_compose("compose.emulated.yaml")["services"]
    for engine in ENGINES:
        (deployment,) = [
            d for d in documents(K8S / "engines" / "emulated" / f"{engine}.yaml") if d["kind"] == "Deployment"
        ]
        assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == compose[engine]["command"]


# ----------------------------------------------------------------------- the entrypoint, outside Docker


def wait_for(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not 200 after {timeout}s:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def dockerfile_healthcheck() -> list[str]:
    (healthcheck,) = [a for kind, a in dockerfile_instructions() if kind == "HEALTHCHECK"]
    return json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())


def test_entrypoint_serves_the_emulated_compose_config(tmp_path: Path, redis_server: RedisServer):
    """compose.emulated.yaml's commands, run through deploy/entrypoint.sh on free local ports."""
    from openai import OpenAI

    services = raw_compose("compose.emulated.yaml")["services"]
    base_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    base_env.pop("SLOPROXY_CONFIG", None)
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(["sh", str(ENTRYPOINT), *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        processes.append((process, log))
        return process, log

    try:
        # The engines: the compose command with --host and --port moved to free local ones.
        local_port: dict[tuple[str, int], int] = {}
        health: dict[str, str] = {}
        for engine in sorted(ENGINES):
            args = list(services[engine]["command"])
            container_port, port = int(option(args, "--port")), free_port()
            args[args.index("--port") + 1] = str(port)
            args[args.index("--host") + 1] = "127.0.0.1"
            local_port[(engine, container_port)] = port
            env = {**base_env, **environment(services[engine])}
            assert env["SLOPROXY_HEALTH_URL"] == f"http://127.0.0.1:{container_port}/health"
            health[engine] = env["SLOPROXY_HEALTH_URL"] = f"http://127.0.0.1:{port}/health"
            process, log = start(engine, args, env)
        for (process, log), url in zip(processes, [health[e] for e in sorted(ENGINES)], strict=True):
            wait_for(url, process, log)

        # The proxy: a copy of the compose config with the engines' and its own addresses rewritten.
        proxy_service = services["sloproxy"]
        raw = yaml.safe_load(config_file_of(proxy_service).read_text())
        for backend in raw["backends"]:
            url = urlsplit(backend["url"])
            backend["url"] = f"http://127.0.0.1:{local_port[(url.hostname, url.port)]}"
        port = free_port()
        raw["listen"] = {"host": "127.0.0.1", "port": port}
        raw["state"].update(url=redis_server.url)  # a private redis-server stands in for the compose one
        config_copy = tmp_path / "sloproxy.yaml"
        config_copy.write_text(yaml.safe_dump(raw))
        env = {**base_env, **environment(proxy_service), "SLOPROXY_CONFIG": str(config_copy)}
        env["OTEL_TRACES_EXPORTER"] = "none"  # no collector here
        proxy, proxy_log = start("sloproxy", list(proxy_service["command"]), env)
        wait_for(f"http://127.0.0.1:{port}/ready", proxy, proxy_log)

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed", max_retries=0, timeout=30)
        for model in sorted({m for b in raw["backends"] for m in b["models"]}):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
            )
            assert reply.model == model and reply.choices[0].message.content.strip()
            assert reply.usage is not None and reply.usage.completion_tokens > 0
        assert {m.id for m in client.models.list()} >= {"llama-3.1-8b-instruct", "qwen2.5-7b-instruct"}

        # What the HPA's prometheus-adapter rules read is on /metrics.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        for rule in adapter_rules():
            series = rule["seriesQuery"].split("{")[0].strip("'\"")
            assert re.search(rf"^{series}[{{ ]", metrics, re.M), series

        # The image's HEALTHCHECK command, against the proxy and against an engine.
        check = dockerfile_healthcheck()
        assert check[0] == "python"
        for url in (f"http://127.0.0.1:{port}/health", health["sglang"]):
            result = subprocess.run(
                [sys.executable, *check[1:]], env={**env, "SLOPROXY_HEALTH_URL": url}, capture_output=True, timeout=10
            )
            assert result.returncode == 0, (shlex.join(check), result.stderr)
        result = subprocess.run(
            [sys.executable, *check[1:]],
            env={**env, "SLOPROXY_HEALTH_URL": f"http://127.0.0.1:{free_port()}/health"},
            capture_output=True,
            timeout=10,
        )
        assert result.returncode != 0  # and it fails when nothing answers

        # SIGTERM (docker stop, a pod's termination) reaches sloproxy through the exec and it exits 0.
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=20) == 0, proxy_log.read_text(errors="replace")
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
