"""The real peer routers against sloproxy's policies, in front of one emulated fleet: SLO attainment per load.

Peers, each installed from PyPI into its own virtualenv under ``build/peers/<name>/`` (kept and reused):
vLLM's router ``vllm-router`` (round_robin, power_of_two, cache_aware), SGLang's router ``sglang-router``
(cache_aware, power_of_two) and the LiteLLM proxy ``litellm[proxy]`` (simple-shuffle, least-busy); against
them sloproxy (``sloproxy serve``) with its round-robin, least-load and slo policies.

The fleet: one model (llama-3-8b) on vLLM H100, vLLM A100-40G, SGLang A100-80G and SGLang A100-40G, every
context window 8,192 tokens, the workload as its lengths file, started fresh for every (router, load) so no
prefix cache, queue or counter carries from one run to the next. The workload: a long-prompt conversation
trace built with the project's builder from the Azure conversation trace, its input sizes scaled x5 and
clipped to the 8,192 window (mean prompt ~4.0 k tokens), replies the Llama-3-8B-Instruct's own lengths,
capped at 256 / 512 / 1024 for the half of the requests that send ``max_tokens`` (mean ~370), 60% interactive
/ 40% batch. Each load replays the same requests with arrivals divided by the load (``sweep``'s scales), open
loop, at speedup K; attainment is ``sloproxy report``'s (``summarize``), the same SLO rule for every router;
capacity is ``sweep.capacity`` (the highest load up to which attainment stays >= 90%), with the crossing
interpolated linearly between that load and the next.

Fairness: all routers see the same fleet, workload and speedup. Durations a router acts on are divided by K
as ``agreement.scaled_config`` does for sloproxy: the two Rust routers' load-polling interval (their
``--worker-startup-check-interval``, 30 s by default) becomes 30/K s. Every run records each router's CPU
(user + system, its child processes included) as a share of one core over the replay, and the replayer's
send lag, so a router that ran out of CPU shows in the JSON (``router_cpu``; the machine has 2 cores).

With ``--fleet eight`` the fleet is instead bench/mixed_fleet.py's eight instances of the model over vLLM,
SGLang and TGI with windows of 4,096 and 8,192, and requests are not clipped to a window (as policy_spread.py
does for fleets with unlike windows): some fit only the 8,192 engines. A router that sends one to a smaller
window gets that engine's refusal, judged as ``summarize`` judges it (a 4xx is a client error, not judged; a
refusal inside an HTTP 200 stream, as TGI and SGLang's scheduler send, is a failure, a miss); each run also
records the requests refused for length and its attainment with every such refusal a miss
(``attainment_length_misses``).

    .venv/bin/python bench/peers_slo.py [--loads 1,1.5,2] [--only ROUTER,...] [--seconds 45] [--start 30]
        [--speedup 1] [--workload conv|mooncake|code|conv-plain] [--fleet four|eight]
        [--out bench/out/peers_slo[_WORKLOAD][_FLEET].json] [--png docs/figures/peers_slo[_WORKLOAD][_FLEET].png]

``--only`` takes router labels (``vllm-router/cache_aware``, ``sloproxy/slo``, ...) or a family
(``litellm``); results merge into an existing ``--out`` made with the same setup.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mixed_fleet
import msgspec

from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
from sloproxy.emulator.tokens import count_tokens, render_chat
from sloproxy.evaluation.agreement import base_config, scaled_config
from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
from sloproxy.evaluation.records import outcome, write_run
from sloproxy.evaluation.replay import replay_run
from sloproxy.evaluation.report import summarize
from sloproxy.evaluation.simulate import proxy_config
from sloproxy.evaluation.sweep import TARGET, capacity
from sloproxy.evaluation.workload import WorkloadRequest, write_workload
from sloproxy.processes import EmulatorProcess, ProxyProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
PEERS_DIR = ROOT / "build" / "peers"
MODEL = "llama-3-8b"
WINDOW = 8192
FLEET = [  # name, engine, profile
    ("vllm-h100", "vllm", "h100-llama3-8b"),
    ("vllm-a100-40g", "vllm", "a100-40g-llama3-8b"),
    ("sglang-a100-80g", "sglang", "a100-80g-llama3-8b"),
    ("sglang-a100-40g", "sglang", "a100-40g-llama3-8b"),
]
# name: [(instance, engine, profile, window)]
FLEETS = {
    "four": [(name, engine, profile, WINDOW) for name, engine, profile in FLEET],
    # bench/mixed_fleet.py's eight instances over vLLM, SGLang and TGI, windows of 4,096 and 8,192: requests are
    # not clipped to a window, so the longest fit only the 8,192 engines
    "eight": [(name, engine, profile, window) for name, engine, profile, window in mixed_fleet.INSTANCES],
}
GENERATOR = "Meta-Llama-3-8B-Instruct"


@dataclass(frozen=True)
class Shape:
    """A workload the bench can replay: a trace and the builder options that give it its shape."""

    trace: str
    title: str  # for the figure
    input_scale: float = 1.0
    output_lengths: str = "match"
    max_tokens_caps: tuple[int, ...] = (256, 512, 1024)
    seed: int = 7


SHAPES = {
    # the default (see the module docstring): what makes Azure conv a long-prompt, long-reply trace
    "conv": Shape("azure_conv_2023.csv", "Azure conv (prompts x5", input_scale=5.0, output_lengths="dataset"),
    # Mooncake's rows clipped to the window: ~7-8k-token prompts whose hash ids share 512-token prefixes (the
    # emulators cache them, so cache-aware routing has hits to find), short replies
    "mooncake": Shape("mooncake_synthetic.jsonl", "Mooncake (clipped to 8k, shared prefixes", seed=8),
    # Azure code as it is (clipped to the window): bursty arrivals, ~2k-token prompts, short replies
    "code": Shape("azure_code_2023.csv", "Azure code (bursty, clipped to 8k", seed=7),
    # Azure conv as it is, for --fleet eight (never clipped there): ~1k-token prompts, a tail longer than 4k
    "conv-plain": Shape("azure_conv_2023.csv", "Azure conv (unclipped", seed=13),
}
DEFAULT_LOADS = (1.0, 1.5, 2.0)
TIMEOUT_S = 120.0  # trace seconds; past the batch deadline (60 s) a request has missed its SLO anyway
PEER_POLL_S = 30  # both Rust routers' default load-polling interval (--worker-startup-check-interval)


@dataclass(frozen=True)
class Peer:
    """A peer's virtualenv: what to install and which distributions' versions to record."""

    name: str
    requirements: tuple[str, ...]
    dists: tuple[str, ...]


PEERS = {
    "vllm-router": Peer("vllm-router", ("vllm-router==0.1.17",), ("vllm-router",)),
    "sglang-router": Peer("sglang-router", ("sglang-router==0.3.2",), ("sglang-router",)),
    "litellm": Peer("litellm", ("litellm[proxy]==1.110.2",), ("litellm", "litellm-proxy-extras", "litellm-enterprise")),
}


@dataclass(frozen=True)
class Router:
    label: str  # family/policy
    family: str  # a PEERS key or "sloproxy"
    policy: str


ROUTERS = [
    Router("vllm-router/round_robin", "vllm-router", "round_robin"),
    Router("vllm-router/power_of_two", "vllm-router", "power_of_two"),
    Router("vllm-router/cache_aware", "vllm-router", "cache_aware"),
    Router("sglang-router/cache_aware", "sglang-router", "cache_aware"),
    Router("sglang-router/power_of_two", "sglang-router", "power_of_two"),
    Router("litellm/simple-shuffle", "litellm", "simple-shuffle"),
    Router("litellm/least-busy", "litellm", "least-busy"),
    Router("sloproxy/round-robin", "sloproxy", "round-robin"),
    Router("sloproxy/least-load", "sloproxy", "least-load"),
    Router("sloproxy/slo", "sloproxy", "slo"),
]


# ---------------------------------------------------------------------------------------------- peers


def pip(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
    )


def install_litellm_without_companion_pins(venv: Path, requirement: str) -> None:
    """``litellm[proxy]`` pins companion distributions to the exact release (``litellm-proxy``,
    ``litellm-proxy-extras``, ``litellm-enterprise``); where the index lacks those releases the extra cannot
    resolve. Then: litellm itself, the proxy extra's other requirements as its own metadata lists them,
    and the newest companions the index has (the proxy runs without ``litellm-proxy``: no database here)."""
    version = requirement.split("==", 1)[1]
    done = pip(venv, f"litellm=={version}")
    if done.returncode:
        raise RuntimeError(f"pip install litellm=={version} failed:\n{done.stderr[-2000:]}")
    script = (
        "import importlib.metadata as m, re\n"
        "for r in m.requires('litellm') or []:\n"
        "    if \"extra == 'proxy'\" in r and not r.startswith('litellm-'):\n"
        "        print(re.split(r'\\s*;', r)[0])\n"
    )
    listed = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, check=True)
    done = pip(venv, *listed.stdout.splitlines(), "litellm-proxy-extras", "litellm-enterprise")
    if done.returncode:
        raise RuntimeError(f"installing litellm's proxy requirements failed:\n{done.stderr[-2000:]}")


def ensure_peer(peer: Peer) -> Path:
    """The peer's virtualenv, created and installed on first use; a stamp file names what it holds, so a
    changed pin reinstalls and an unchanged one costs nothing."""
    venv = PEERS_DIR / peer.name
    stamp = venv / ".installed"
    wanted = "\n".join(peer.requirements)
    if stamp.exists() and stamp.read_text() == wanted:
        return venv
    print(f"installing {' '.join(peer.requirements)} into {venv} ...", file=sys.stderr, flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = pip(venv, *peer.requirements)
    if done.returncode:
        if peer.name != "litellm":
            raise RuntimeError(f"pip install {' '.join(peer.requirements)} failed:\n{done.stderr[-2000:]}")
        install_litellm_without_companion_pins(venv, peer.requirements[0])
    stamp.write_text(wanted)
    return venv


def peer_versions(peer: Peer, venv: Path) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json, sys\n"
        f"print(json.dumps({{d: m.version(d) for d in {list(peer.dists)!r}}}))\n"
    )
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


# ---------------------------------------------------------------------------------------------- processes


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (a router may fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its living descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


class Command:
    """One router in a child process (its own session, so stopping it stops what it forked), ready once
    ``ready()`` holds; logs to ``log``."""

    def __init__(self, argv: list[str], ready: Callable[[], bool], log: Path, env: dict[str, str] | None = None):
        self.argv, self.ready, self.log, self.env = argv, ready, log, env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Command:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "wb")  # closed in __exit__
        self.process = subprocess.Popen(
            self.argv, stdout=self._out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"{self.argv[0]} did not start (see {self.log}):\n{tail(self.log)}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the group this process created, nothing else
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._out.close()


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def rust_router(router: Router, venv: Path, urls: list[str], port: int, speedup: float, log: Path) -> Command:
    """vllm-router or sglang-router with the policy; metrics on a free port, the load-polling interval
    divided by the speedup (an integer number of seconds: these CLIs take whole seconds)."""
    poll = str(max(1, round(PEER_POLL_S / speedup)))
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls, "--policy", router.policy]
    common += ["--worker-startup-check-interval", poll, "--prometheus-port", str(free_port())]
    common += [
        "--prometheus-host",
        "127.0.0.1",
        "--log-level",
        "warn" if router.family == "sglang-router" else "warning",
    ]
    base = f"http://127.0.0.1:{port}"
    if router.family == "vllm-router":
        # Serves only once a worker answers /health; /health is then "All servers healthy".
        return Command([str(venv / "bin" / "vllm-router"), *common], lambda: answers(base + "/health"), log)

    def registered() -> bool:
        # sglang-router serves at once and registers workers in the background: wait for all of them.
        try:
            workers = get_json(base + "/workers")["workers"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return len(workers) == len(urls) and all(w.get("is_healthy") for w in workers)

    argv = [str(venv / "bin" / "python"), "-m", "sglang_router.launch_router", *common]
    return Command(argv, registered, log)


def litellm_proxy(router: Router, venv: Path, urls: list[str], port: int, workdir: Path, log: Path) -> Command:
    """LiteLLM's proxy: one deployment per engine under the one model name, the routing strategy; no master
    key (the replayer sends none, as against sloproxy in open mode) via LiteLLM's explicit local-development
    opt-in, and offline mode, which keeps it from fetching a Hugging Face tokenizer for "llama-3" names and
    its remote cost map (no internet here; it falls back to tiktoken / the bundled map)."""
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{url}/v1", "api_key": "none"},
            }
            for url in urls
        ],
        "router_settings": {"routing_strategy": router.policy},
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
    }
    path = workdir / f"litellm-{router.policy}.json"
    path.write_text(json.dumps(config, indent=1))  # YAML is a superset of JSON
    env = {
        **os.environ,
        "LITELLM_OFFLINE_MODE": "true",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
    }
    env.pop("LITELLM_MASTER_KEY", None)
    argv = [str(venv / "bin" / "litellm"), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    base = f"http://127.0.0.1:{port}"
    return Command(argv, lambda: answers(base + "/health/readiness"), log, env=env)


class SloproxyRouter:
    """``sloproxy serve`` (ProxyProcess) with a policy, every duration divided by the speedup; ready once
    every backend is healthy and its context window known (``/admin/fleet``; open mode), so that no early
    request is placed before the proxy has learned the windows it routes by."""

    def __init__(self, router: Router, specs: list[InstanceSpec], speedup: float) -> None:
        config = scaled_config(proxy_config(FleetSpec(instances=specs), router.policy, base=base_config()), speedup)
        self.proxy = ProxyProcess(msgspec.to_builtins(config))

    @property
    def pid(self) -> int:
        assert self.proxy.process is not None
        return self.proxy.process.pid

    def __enter__(self) -> SloproxyRouter:
        self.proxy.start()
        deadline = time.monotonic() + 30
        while not (answers(self.proxy.url + "/ready") and self.windows_known()):
            if time.monotonic() > deadline:
                self.proxy.stop()
                raise RuntimeError("sloproxy never became ready:\n" + self.proxy.output()[-2000:])
            time.sleep(0.1)
        return self

    def windows_known(self) -> bool:
        try:
            backends = get_json(self.proxy.url + "/admin/fleet")["backends"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return all(b["healthy"] and b["context_window"] is not None for b in backends)

    def __exit__(self, *exc: object) -> None:
        self.proxy.__exit__()


# ---------------------------------------------------------------------------------------------- workload


def build(shape: Shape, seconds: float, start: float, max_context: int | None = WINDOW) -> list[WorkloadRequest]:
    """The shape's requests in the trace window, clipped to ``max_context`` (None: as long as the trace says)."""
    return build_workload(
        BuildOptions(
            trace=str(DATA / "traces" / shape.trace),
            lengths_dir=str(DATA / "lengths"),
            models=parse_models(f"{MODEL}={GENERATOR}"),
            start_s=start,
            duration_s=seconds,
            seed=shape.seed,
            output_lengths=shape.output_lengths,
            max_tokens_caps=shape.max_tokens_caps,
            max_context=max_context,
            input_scale=shape.input_scale,
        )
    )


def fits(request: WorkloadRequest, window: int) -> bool:
    """The prompt and its reply limit (``max_tokens``, else the true reply) fit ``window`` whole."""
    return count_tokens(render_chat(request.messages)) + (request.max_tokens or request.output_tokens) < window


def fits_no_window(request: WorkloadRequest, windows: Sequence[int]) -> bool:
    """The prompt alone fills the largest window: every engine refuses it, whatever the reply limit."""
    return count_tokens(render_chat(request.messages)) >= max(windows)


def describe(requests: Sequence[WorkloadRequest], windows: Sequence[int] = (WINDOW,)) -> dict[str, Any]:
    prompts = sorted(count_tokens(render_chat(r.messages)) for r in requests)
    replies = sorted(r.output_tokens for r in requests)
    span = requests[-1].arrival_s
    described: dict[str, Any] = {
        "requests": len(requests),
        "span_s": span,
        "rate_rps_at_load_1": len(requests) / span if span else None,
        "prompt_tokens_mean": round(sum(prompts) / len(prompts)),
        "prompt_tokens_median": prompts[len(prompts) // 2],
        "reply_tokens_mean": round(sum(replies) / len(replies)),
        "reply_tokens_median": replies[len(replies) // 2],
        "interactive_share": round(sum(r.slo_class == "interactive" for r in requests) / len(requests), 3),
        "fit_window": sum(fits(r, WINDOW) for r in requests),
    }
    if len(set(windows)) > 1:  # unlike windows: who fits where
        described["prompt_tokens_p99"] = prompts[min(len(prompts) - 1, round(0.99 * len(prompts)))]
        described["prompt_tokens_max"] = prompts[-1]
        described["fit_window"] = sum(fits(r, max(windows)) for r in requests)  # the largest
        described["fit_smallest_window"] = sum(fits(r, min(windows)) for r in requests)
        described["fit_no_window"] = sum(fits_no_window(r, windows) for r in requests)
    return described


def at_load(requests: Sequence[WorkloadRequest], load: float) -> list[WorkloadRequest]:
    return [msgspec.structs.replace(r, arrival_s=round(r.arrival_s / load, 6)) for r in requests]


# ---------------------------------------------------------------------------------------------- runs


def fleet_instances(fleet: str = "four") -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "engine": engine,
            "model": MODEL,
            "profile": profile,
            "port": free_port(),
            "max_model_len": window,
        }
        for name, engine, profile, window in FLEETS[fleet]
    ]


LENGTH_REFUSAL = re.compile(  # each engine's refusal of a request over its window, and sloproxy's
    r"context length|context_length|max_model_len|maximum allowed length|`inputs`|max_total_tokens", re.IGNORECASE
)


def failures(records: Sequence[Any], no_window: set[str]) -> dict[str, Any]:
    """What went wrong in a run: failed requests by (outcome, HTTP status, cause with numbers taken out), the
    requests refused for their length (by any engine's or sloproxy's message, in a 4xx or inside a stream),
    and of those the ones some window of the fleet holds (a router that knew the windows could have placed them)."""
    failed: collections.Counter[str] = collections.Counter()
    length, placeable = 0, 0
    for r in records:
        if r.status == "ok":
            continue
        failed[f"{outcome(r)} {r.http_status}: {re.sub(r'[0-9]+', 'N', (r.error or '')[:70])}"] += 1
        if LENGTH_REFUSAL.search(r.error or ""):
            length += 1
            placeable += r.id not in no_window
    return {
        "refused_for_length": length,
        "refused_for_length_placeable": placeable,
        "failures": dict(failed.most_common()),
    }


async def one_run(
    router: Router, load: float, requests: list[WorkloadRequest], workload_path: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """A fresh fleet, a fresh router, one open-loop replay; the run's summary and conditions."""
    instances = fleet_instances(args.fleet)
    key = f"{router.label.replace('/', '_')}@{load:g}"
    logs = args.workdir / "logs"
    with EmulatorProcess(instances, speedup=args.speedup, extra={"lengths": str(workload_path)}) as fleet:
        urls = [fleet.url(i["name"]) for i in instances]
        port = free_port()
        if router.family == "sloproxy":
            specs = [msgspec.convert(i, InstanceSpec) for i in instances]
            handle: Any = SloproxyRouter(router, specs, args.speedup)
        elif router.family == "litellm":
            venv = PEERS_DIR / "litellm"
            handle = litellm_proxy(router, venv, urls, port, args.workdir, logs / f"{key}.log")
        else:
            handle = rust_router(router, PEERS_DIR / router.family, urls, port, args.speedup, logs / f"{key}.log")
        with handle as running:
            target = running.proxy.url if router.family == "sloproxy" else f"http://127.0.0.1:{port}"
            assert fleet.process is not None
            cpu_router, cpu_fleet = cpu_seconds(running.pid), cpu_seconds(fleet.process.pid)
            wall = time.monotonic()
            meta, records = await replay_run(
                at_load(requests, load),
                target,
                workload=str(workload_path),
                label=router.label,
                speedup=args.speedup,
                timeout_s=TIMEOUT_S,
            )
            wall = time.monotonic() - wall
            cpu_router = cpu_seconds(running.pid) - cpu_router
            cpu_fleet = cpu_seconds(fleet.process.pid) - cpu_fleet
            served = {}
            for i in instances:
                state = get_json(fleet.url(i["name"]) + "/_emulator/state")
                served[i["name"]] = sum(state["finished"].values())
    meta = msgspec.structs.replace(
        meta,
        trace=SHAPES[args.workload].trace,
        window_s=[args.start, args.start + args.seconds],
        fleet=[{"name": n, "engine": e, "model": MODEL, "profile": p} for n, e, p, _ in FLEETS[args.fleet]],
    )
    write_run(args.workdir / "runs" / f"{key}.jsonl", meta, records)
    summary = summarize(meta, records)
    overall = summary["overall"]
    extra: dict[str, Any] = {}
    if args.fleet != "four":  # unlike windows: refusals for length, and attainment with each one a miss
        extra = failures(records, args.no_window)
        judged = len(records) - len(args.no_window)
        extra["attainment_length_misses"] = overall["slo_met"] / judged if judged else None
    return {
        "attainment": overall["slo_attainment"],
        "classes": {name: block["slo_attainment"] for name, block in summary["classes"].items()},
        "outcomes": {k: overall[k] for k in ("requests", "ok", "rejected", "errors", "timeouts", "client_errors")},
        "ttft_s": overall["ttft_s"],
        "e2e_s": overall["e2e_s"],
        "served_per_instance": served,
        "wall_s": round(wall, 1),
        "router_cpu": round(cpu_router / wall, 3),  # share of one core over the replay
        "fleet_cpu": round(cpu_fleet / wall, 3),
        "send_lag_p99_ms": round(1e3 * meta.extra.get("send_lag_s", {}).get("p99", 0.0), 1),
        "loadavg_after": os.getloadavg()[0],
        **extra,
    }


def interpolated(attainment: dict[float, float], target: float = TARGET) -> float | None:
    """Where attainment crosses ``target``, linearly between ``sweep.capacity``'s load and the next one
    (that load itself when nothing above it was measured; None when the lowest load already misses)."""
    best = capacity(attainment, target)
    if best is None:
        return None
    above = sorted(load for load in attainment if load > best)
    if not above:
        return best
    a0, a1 = attainment[best], attainment[above[0]]
    return best + (a0 - target) / (a0 - a1) * (above[0] - best) if a0 != a1 else best


def capacities(result: dict[str, Any]) -> None:
    values = {float(k): v["attainment"] for k, v in result["runs"].items() if v.get("attainment") is not None}
    result["attainment"] = {f"{k:g}": v for k, v in sorted(values.items())}
    result["capacity"] = capacity(values)
    result["capacity_interpolated"] = interpolated(values)
    result["capacity_at_least"] = bool(values) and all(v >= TARGET for v in values.values())


# ---------------------------------------------------------------------------------------------- output


def render_table(results: dict[str, Any], loads: list[float]) -> str:
    rate = results["setup"]["workload"]["rate_rps_at_load_1"]
    head = ["router"] + [f"x{load:g} ({load * rate:.1f} req/s)" for load in loads]
    head += ["capacity", "interpolated", "router CPU (max)"]
    windows = any("refused_for_length" in run for r in results["routers"].values() for run in r["runs"].values())
    if windows:
        head += ["refused for length (per load)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, result in results["routers"].items():
        runs = result["runs"]
        cells = [label]
        for load in loads:
            run = runs.get(f"{load:g}")
            cells.append("—" if run is None or run["attainment"] is None else f"{run['attainment']:.1%}")
        cap, interp = result["capacity"], result["capacity_interpolated"]
        if cap is None:
            cells += [f"< x{min(loads):g}", "—"]
        else:
            at_least = ">= " if result["capacity_at_least"] else ""
            cells += [f"{at_least}x{cap:g}", f"{at_least}x{interp:.2f}"]
        cpu = max((run["router_cpu"] for run in runs.values()), default=None)
        cells.append("—" if cpu is None else f"{cpu:.0%} of a core")
        if windows:
            counts = [runs[f"{load:g}"].get("refused_for_length") for load in loads if f"{load:g}" in runs]
            cells.append(" / ".join("—" if c is None else str(c) for c in counts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


STYLES = {"sloproxy": "-", "vllm-router": "--", "sglang-router": "-.", "litellm": ":"}
MARKERS = {"sloproxy": "o", "vllm-router": "s", "sglang-router": "^", "litellm": "D"}
COLOURS = {  # sloproxy's in strong colours, each peer family in its own hue
    "sloproxy/slo": "#d62728",
    "sloproxy/least-load": "#ff7f0e",
    "sloproxy/round-robin": "#7f7f7f",
    "vllm-router/round_robin": "#9ecae1",
    "vllm-router/power_of_two": "#3182bd",
    "vllm-router/cache_aware": "#08306b",
    "sglang-router/cache_aware": "#31a354",
    "sglang-router/power_of_two": "#a1d99b",
    "litellm/simple-shuffle": "#c994c7",
    "litellm/least-busy": "#7a0177",
}
CPU_BOUND = 0.5  # a router using half a core or more on this shared 2-core machine is marked as CPU-bound


def figure(results: dict[str, Any], path: Path) -> None:
    """Attainment vs offered load, one line per router; hollow markers where the router was CPU-bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    rate = setup["workload"]["rate_rps_at_load_1"]
    fig, ax = plt.subplots(figsize=(12, 6.4), dpi=110)
    strict_drawn = False
    for label, result in results["routers"].items():
        family = label.split("/", 1)[0]
        points = sorted((float(k), run) for k, run in result["runs"].items() if run["attainment"] is not None)
        if not points:
            continue
        xs, ys = [load * rate for load, _ in points], [100 * run["attainment"] for _, run in points]
        cap = result["capacity"]
        if cap is None:
            name = f"{label}  (capacity: none)"
        else:
            name = f"{label}  (capacity {'>= ' if result['capacity_at_least'] else ''}x{cap:g})"
        if any(run["router_cpu"] >= CPU_BOUND for _, run in points):
            name += ", CPU-bound"
        refused = max((run.get("refused_for_length", 0) for _, run in points), default=0)
        if "refused_for_length" in points[0][1]:
            name += f", up to {refused} refused for length" if refused else ", none refused for length"
        colour = COLOURS.get(label, "black")
        ax.plot(xs, ys, STYLES.get(family, "-"), color=colour, linewidth=2.6 if family == "sloproxy" else 1.6)
        for x, y, (_, run) in zip(xs, ys, points, strict=True):
            hollow = run["router_cpu"] >= CPU_BOUND
            ax.plot(
                x,
                y,
                MARKERS.get(family, "o"),
                color=colour,
                markersize=8,
                markerfacecolor="white" if hollow else colour,
            )
        ax.plot([], [], STYLES.get(family, "-"), marker=MARKERS.get(family, "o"), color=colour, label=name)
        if refused:  # the same runs with every request refused for its length counted as a miss
            strict = [100 * run["attainment_length_misses"] for _, run in points]
            ax.plot(xs, strict, ":", marker="x", color=colour, linewidth=1, markersize=6, alpha=0.8)
            strict_drawn = True
    if strict_drawn:
        ax.plot(
            [],
            [],
            ":",
            marker="x",
            color="grey",
            linewidth=1,
            label="dotted, x: the same runs, refusals for length as misses",
        )
    ax.axhline(100 * TARGET, color="black", linewidth=1, linestyle=(0, (4, 4)))
    ax.text(ax.get_xlim()[0], 100 * TARGET + 0.6, " 90% target", va="bottom", fontsize=9)
    ax.set_xlabel("offered load, requests/s (the trace window's rate x load)", fontsize=11)
    ax.set_ylabel("overall SLO attainment, %", fontsize=11)
    ax.grid(alpha=0.3)
    ax.set_ylim(min(40.0, ax.get_ylim()[0]), 101)
    loads = sorted({float(k) for r in results["routers"].values() for k in r["runs"]})
    top = ax.secondary_xaxis("top", functions=(lambda x: x / rate, lambda x: x * rate))
    top.set_xticks(loads)
    top.set_xticklabels([f"x{load:g}" for load in loads])
    top.set_xlabel("load (rate scale)", fontsize=10)
    w = setup["workload"]
    if setup.get("fleet_name", "four") == "four":
        fleet = "vLLM H100, vLLM A100-40G, SGLang A100-80G, SGLang A100-40G (llama-3-8b, 8k windows), "
    else:
        engines = collections.Counter(i["engine"] for i in setup["fleet"])
        windows = sorted({i["max_model_len"] for i in setup["fleet"]})
        fleet = (
            f"{len(setup['fleet'])} instances of llama-3-8b ("
            + ", ".join(f"{n} {e}" for e, n in engines.items())
            + f"), windows {' and '.join(f'{x:,}' for x in windows)} (not clipped: "
            f"{w['requests'] - w['fit_smallest_window']} requests do not fit the smallest window, "
            f"{w['fit_no_window']} fit none);\n"
        )
    fig.suptitle(
        f"Peer routers vs sloproxy, same fleet and workload: {w['requests']} requests of {setup['title']}, mean"
        f" {w['prompt_tokens_mean']} tokens; replies mean {w['reply_tokens_mean']}), "
        f"{round(100 * w['interactive_share'])}% interactive\nfleet: {fleet}speedup {setup['speedup']:g}; hollow"
        f" markers: router used >= {CPU_BOUND:.0%} of a core",
        x=0.01,
        ha="left",
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def selected(only: str | None) -> list[Router]:
    if not only:
        return list(ROUTERS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {r.label for r in ROUTERS} | {r.family for r in ROUTERS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; known: {', '.join(r.label for r in ROUTERS)}")
    return [r for r in ROUTERS if r.label in wanted or r.family in wanted]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default=",".join(f"{x:g}" for x in DEFAULT_LOADS), help="rate scales")
    parser.add_argument("--only", help="routers or families, comma-separated (default: all)")
    parser.add_argument("--seconds", type=float, default=45.0, help="trace seconds of the window (before scaling)")
    parser.add_argument("--start", type=float, default=30.0, help="trace second the window starts at")
    parser.add_argument("--speedup", type=float, default=1.0, help="emulated fleet's speedup K (all routers)")
    parser.add_argument("--workload", choices=sorted(SHAPES), default="conv", help="the trace replayed (SHAPES)")
    parser.add_argument("--fleet", choices=sorted(FLEETS), default="four", help="the emulated fleet (FLEETS)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/out/peers_slo[_WORKLOAD][_FLEET].json)")
    parser.add_argument("--png", type=Path, help="figure (default docs/figures/peers_slo[_WORKLOAD][_FLEET].png)")
    args = parser.parse_args()
    suffix = "" if args.workload == "conv" else f"_{args.workload}"
    suffix += "" if args.fleet == "four" else f"_{args.fleet}"
    args.out = args.out or ROOT / "bench" / "out" / f"peers_slo{suffix}.json"
    args.png = args.png or ROOT / "docs" / "figures" / f"peers_slo{suffix}.png"
    loads = sorted(float(x) for x in args.loads.split(",") if x.strip())
    routers = selected(args.only)
    args.workdir = args.out.with_suffix("")  # bench/out/peers_slo/: workload, run files, router logs
    (args.workdir / "runs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    versions = {}
    for family in sorted({r.family for r in routers} - {"sloproxy"}):
        venv = ensure_peer(PEERS[family])
        versions[family] = peer_versions(PEERS[family], venv)
    shape = SHAPES[args.workload]
    windows = [window for *_, window in FLEETS[args.fleet]]
    # one window: clipped to it; unlike windows: as long as the trace says (policy_spread.py's rule)
    requests = build(shape, args.seconds, args.start, WINDOW if len(set(windows)) == 1 else None)
    args.no_window = {r.id for r in requests if fits_no_window(r, windows)}
    workload_path = args.workdir / "workload.jsonl"
    write_workload(workload_path, requests)
    setup = {
        "trace": shape.trace,
        "title": shape.title,
        "window_s": [args.start, args.start + args.seconds],
        "input_scale": shape.input_scale,
        "output_lengths": shape.output_lengths,
        "max_tokens_caps": list(shape.max_tokens_caps),
        "seed": shape.seed,
        "speedup": args.speedup,
        "timeout_s": TIMEOUT_S,
        "fleet": [{"name": n, "engine": e, "profile": p, "max_model_len": w} for n, e, p, w in FLEETS[args.fleet]],
        "workload": describe(requests, windows),
    }
    if args.fleet != "four":
        setup |= {"fleet_name": args.fleet, "max_context": None}
    results: dict[str, Any] = {"setup": setup, "versions": {}, "routers": {}}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous.get("setup") == setup:  # same experiment: keep the routers this run does not redo
            results = previous
    results["versions"].update(versions)
    print(
        f"workload: {setup['workload']['requests']} requests, {setup['workload']['rate_rps_at_load_1']:.2f} req/s at"
        f" x1; {len(routers)} routers x {len(loads)} loads at speedup {args.speedup:g}",
        file=sys.stderr,
        flush=True,
    )
    for router in routers:
        result = results["routers"].setdefault(router.label, {"runs": {}})
        for load in loads:
            run = await one_run(router, load, requests, workload_path, args)
            result["runs"][f"{load:g}"] = run
            print(
                f"{router.label:28s} x{load:<4g} attainment {run['attainment']:.1%}  router CPU {run['router_cpu']:.0%}"
                f"  fleet CPU {run['fleet_cpu']:.0%}  send lag p99 {run['send_lag_p99_ms']:.0f} ms"
                f"  served {list(run['served_per_instance'].values())}  ({run['wall_s']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        capacities(result)
    order = [r.label for r in ROUTERS if r.label in results["routers"]]
    results["routers"] = {label: results["routers"][label] for label in order}
    all_loads = sorted({float(k) for r in results["routers"].values() for k in r["runs"]})
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["last_run_wall_s"] = round(time.monotonic() - started)
    table = render_table(results, all_loads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    figure(results, args.png)
    print(table)
    print(f"\n{args.out}, {args.out.with_suffix('.md')}, {args.png}; {results['last_run_wall_s']} s", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
