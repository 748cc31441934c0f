"""Model swapping: instances sharing a GPU group take turns, through a real proxy in front of emulated
vLLM and SGLang engines, driven by the official openai client; plus the swap rule and QLM's swaps.

The emulator models the costs (emulated seconds, real time = emulated / speedup) for llama-3-8b
weights (16.06 GB): sleep level 1 copies them to host memory at 25 GB/s (0.64 s) and waking reads
them back (0.64 s); level 2 drops them (0.1 s) and waking reads them from disk at 2 GB/s (8.0 s).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from sloproxy.backends import BackendPool
from sloproxy.config import ConfigError, HealthConfig, LoadPolling, parse_config
from sloproxy.emulator.profiles import get_profile
from sloproxy.policies.base import FleetPolicy, Policy, Swap
from sloproxy.policies.qlm import GroupState, QLMPlanner, Throughput
from sloproxy.processes import EmulatorProcess, ProxyProcess
from sloproxy.scheduler import Scheduler
from sloproxy.swapping import Demand, VictimView, choose_victim
from tests.helpers import get, metric_samples, stream_to_end

SPEEDUP = 8.0
PROFILE = get_profile("h100-llama3-8b")
WEIGHTS = PROFILE.model.weight_bytes
MODEL_COST = {  # emulated seconds, as sloproxy/emulator/instance.py models them
    ("sleep", 1): WEIGHTS / PROFILE.host_to_device_bytes_per_s,
    ("sleep", 2): 0.1,
    ("wake", 1): WEIGHTS / PROFILE.host_to_device_bytes_per_s,
    ("wake", 2): WEIGHTS / PROFILE.disk_bytes_per_s,
}
MESSAGES = [{"role": "user", "content": "Tell me about GPUs."}]


# ----- the swap rule ------------------------------------------------------------------------------
def view(
    name: str, in_flight: int = 0, waiting: int = 0, urgency=(1, math.inf), elsewhere=False, awake_for=100.0, rps=0.0
):
    return VictimView(name, in_flight, Demand(waiting, urgency), elsewhere, awake_for, rps)


def test_rule_prefers_an_idle_member_then_one_served_elsewhere():
    wanted = Demand(3, (0, 10.0))
    members = [view("busy", in_flight=4), view("elsewhere", in_flight=2, elsewhere=True), view("idle")]
    assert choose_victim(wanted, members, min_awake_s=10.0) == ("idle", "idle")
    assert choose_victim(wanted, members[:2], min_awake_s=10.0) == ("elsewhere", "its models are served elsewhere")


def test_rule_swaps_a_busy_member_only_for_more_urgent_work_after_min_awake():
    wanted = Demand(1, (0, 10.0))  # interactive, due in 10 s
    calmer = view("calm", in_flight=3, waiting=2, urgency=(1, 50.0))
    assert choose_victim(wanted, [calmer], min_awake_s=10.0) == ("calm", "less urgent demand")
    # just woken: not swapped out again (no ping-pong), however urgent the wanted model
    assert choose_victim(wanted, [view("calm", 3, 2, (1, 50.0), awake_for=2.0)], min_awake_s=10.0) is None
    # its own waiting work is at least as urgent: it stays
    assert choose_victim(wanted, [view("hot", 3, 2, (0, 5.0))], min_awake_s=10.0) is None
    # nothing waits for it (only in-flight work, which finishes during the drain): it may go
    assert choose_victim(wanted, [view("draining", 3)], min_awake_s=10.0) == ("draining", "less urgent demand")


def test_rule_takes_a_policys_victim_unless_it_just_woke():
    wanted = Demand(1, (1, 100.0))
    members = [view("a", 2, 1, (0, 5.0)), view("b")]
    assert choose_victim(wanted, members, 10.0, forced="a") == ("a", "planned by the policy")
    assert choose_victim(wanted, [view("a", 2, 1, (0, 5.0), awake_for=1.0)], 10.0, forced="a") is None
    assert choose_victim(wanted, members, 10.0, forced="b") == ("b", "idle")


def test_with_measured_demand_a_busy_popular_model_is_not_drained_for_a_rare_one():
    wanted = Demand(1, (0, 10.0))
    hot_busy = view("hot", in_flight=3, rps=0.5)
    assert choose_victim(wanted, [hot_busy], 10.0) == ("hot", "less urgent demand")  # without demand: taken
    assert choose_victim(wanted, [hot_busy], 10.0, wanted_rps=0.05) is None  # the rare request waits
    assert choose_victim(wanted, [hot_busy], 10.0, wanted_rps=0.6) == ("hot", "less urgent demand")
    # the least asked-for eligible member goes first, even busy, before an idle popular one
    members = [view("hot-idle", rps=0.5), view("cold-busy", in_flight=1, rps=0.01)]
    assert choose_victim(wanted, members, 10.0, wanted_rps=0.05) == ("cold-busy", "less urgent demand")
    assert choose_victim(wanted, members, 10.0) == ("hot-idle", "idle")  # without demand: idle first
    # a policy's named victim is still honoured
    assert choose_victim(wanted, [hot_busy], 10.0, forced="hot", wanted_rps=0.05) == ("hot", "planned by the policy")


# ----- configuration ------------------------------------------------------------------------------
def backend(name: str, engine: str = "vllm", **extra) -> dict:
    return {"name": name, "engine": engine, "url": "http://127.0.0.1:1", "models": [name], **extra}


@pytest.mark.parametrize(
    ("backends", "extra", "message"),
    [
        ([backend("t", "tgi", gpu_group="g")], {}, "`$.backends[0]`.gpu_group: engine 'tgi' has no sleep API"),
        ([backend("s", "sglang", gpu_group="g", sleep_level=2)], {}, "`$.backends[0]`.sleep_level"),
        ([backend("v", sleep_command=["true"])], {}, "`$.backends[0]`.sleep_command / wake_command need a `gpu_group`"),
        ([backend("v", gpu_group="g")], {"swapping": {"awake_per_group": 0}}, "`$.swapping.awake_per_group`"),
        (
            [backend("v", gpu_group="g")],
            {"state": {"backend": "redis", "url": "redis://127.0.0.1:6379"}},
            "model swapping needs one replica",
        ),
    ],
)
def test_config_errors_name_the_field(backends, extra, message):
    with pytest.raises(ConfigError) as caught:
        parse_config({"backends": backends, **extra})
    assert message in str(caught.value)


def test_config_accepts_restart_hooks_for_engines_without_sleep():
    config = parse_config(
        {"backends": [backend("t", "tgi", gpu_group="g", sleep_command=["true"], wake_command=["true"])]}
    )
    assert config.backends[0].gpu_group == "g"


# ----- QLM asks for swaps -------------------------------------------------------------------------
def fake(name: str, model: str, *, asleep=False, group="g", swap_s=None):
    return SimpleNamespace(
        name=name, models=frozenset({model}), asleep=asleep, gpu_group=group, swap_s=swap_s, healthy=not asleep
    )


def test_qlm_swaps_in_a_model_loaded_nowhere_on_its_cheapest_instance():
    planner = QLMPlanner(Throughput(100.0), swap_s=30.0)
    awake = fake("a", "model-a")
    warm = fake("b1", "model-b", asleep=True, swap_s=1.0)  # measured: weights in host memory
    cold = fake("b2", "model-b", asleep=True, group="h")  # unmeasured: model_swap_s
    planner.groups = [GroupState(("model-b", "interactive"), 20.0, 50.0), GroupState(("model-a", "batch"), 90.0, 10.0)]
    snapshot = SimpleNamespace(now=0.0, backends=[awake, warm, cold])
    [swap] = planner.swaps(snapshot)  # type: ignore[arg-type]
    assert (swap.model, swap.backend, swap.victim) == ("model-b", "b1", "a")
    assert "loaded nowhere" in swap.reason
    # the awake instance's own waiting work is due first: EDF keeps the GPUs where they are
    planner.groups = [GroupState(("model-b", "batch"), 90.0, 50.0), GroupState(("model-a", "interactive"), 5.0, 10.0)]
    assert planner.swaps(snapshot) == []  # type: ignore[arg-type]
    # the model is loaded somewhere: no swap
    planner.groups = [GroupState(("model-a", "interactive"), 5.0, 10.0)]
    assert planner.swaps(snapshot) == []  # type: ignore[arg-type]


class _OneSwap(FleetPolicy):
    def actions(self, snapshot, waiting, running):
        return [Swap("model-b", "b", None, "test")]


async def test_scheduler_hands_a_policys_swap_to_the_swapper():
    config = parse_config({"backends": [backend("a", gpu_group="g"), backend("b", gpu_group="g")]})
    pool = BackendPool(config.backends, HealthConfig(), LoadPolling())
    policy = Policy("t", ordering=lambda: None, fleet=_OneSwap())  # type: ignore[arg-type,return-value]
    scheduler = Scheduler(policy, pool)
    asked: list[Swap] = []
    scheduler.swapper = SimpleNamespace(request=asked.append)  # type: ignore[assignment]
    scheduler.queues["model-b"] = [object()]  # type: ignore[assignment]  # something waits: the planner runs
    scheduler.fleet_actions()
    assert asked == [Swap("model-b", "b", None, "test")]


# ----- through a real proxy -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    instances = [
        {"name": "vllm-a", "engine": "vllm", "model": "model-a", "max_model_len": 4096},
        {"name": "vllm-b", "engine": "vllm", "model": "model-b", "max_model_len": 4096, "start_asleep": 1},
        {"name": "sglang-c", "engine": "sglang", "model": "model-c", "max_model_len": 4096},
        {"name": "sglang-d", "engine": "sglang", "model": "model-d", "max_model_len": 4096, "start_asleep": 1},
    ]
    with EmulatorProcess(instances, speedup=SPEEDUP) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(fleet: EmulatorProcess) -> Iterator[ProxyProcess]:
    def grouped(name: str, engine: str, model: str, group: str, **extra) -> dict:
        return {"name": name, "engine": engine, "url": fleet.url(name), "models": [model], "gpu_group": group, **extra}

    config = {
        "backends": [
            grouped("vllm-a", "vllm", "model-a", "gpu0", sleep_level=2),
            grouped("vllm-b", "vllm", "model-b", "gpu0"),
            grouped("sglang-c", "sglang", "model-c", "gpu1"),
            # SGLang cannot say it sleeps: the proxy takes it as awake and puts it to sleep at start
            grouped("sglang-d", "sglang", "model-d", "gpu1"),
        ],
        "health": {"interval_s": 0.2, "timeout_s": 0.5},
        "swapping": {"min_awake_s": 0.0},
        "predictor": {"mode": "off"},
    }
    with ProxyProcess(config) as running:
        yield running


async def stream_all(proxy: ProxyProcess, model: str, max_tokens: int) -> tuple[int, str | None]:
    return await stream_to_end(proxy.url, model, max_tokens, MESSAGES)


async def swap_metrics(proxy: ProxyProcess) -> dict[str, dict[str, float]]:
    """The proxy's swap metrics: name -> {backend or outcome: value}."""
    _, text, _ = await get(proxy.url + "/metrics")
    samples = metric_samples(text.decode())
    names = (
        "sloproxy_swap_sleep_seconds",
        "sloproxy_swap_wake_seconds",
        "sloproxy_backend_asleep",
        "sloproxy_swaps_total",
    )
    return {
        name: {(lb.get("backend") or lb["outcome"]): value for lb, value in samples.get(name, [])} for name in names
    }


async def is_sleeping(fleet: EmulatorProcess, name: str) -> bool:
    _, raw, _ = await get(fleet.url(name) + "/_emulator/state")
    return json.loads(raw)["sleeping"]


def near(measured: float, kind: str, level: int) -> bool:
    """A measured real duration against the emulator's model: within 35% and 60 ms (HTTP, loop)."""
    expected = MODEL_COST[(kind, level)] / SPEEDUP
    return abs(measured - expected) <= 0.35 * expected + 0.06


async def swap_sequence(proxy: ProxyProcess, fleet: EmulatorProcess, awake: str, asleep: str, models: tuple[str, str]):
    """Requests in flight on ``awake`` when a request for ``asleep``'s model arrives: they all complete,
    then the sleeping model is served."""
    model_awake, model_asleep = models
    assert not await is_sleeping(fleet, awake) and await is_sleeping(fleet, asleep)
    busy = [asyncio.create_task(stream_all(proxy, model_awake, 2000)) for _ in range(4)]
    await asyncio.sleep(0.2)  # under way on the awake instance (2000 tokens: ~1.5 s at this speedup)
    started = asyncio.get_running_loop().time()
    chunks, finish = await stream_all(proxy, model_asleep, 16)  # waits for the swap, then succeeds
    waited = asyncio.get_running_loop().time() - started
    assert (chunks, finish) == (16, "length")
    for chunks, finish in await asyncio.gather(*busy):  # nothing in flight was lost or cut
        assert (chunks, finish) == (2000, "length")
    assert await is_sleeping(fleet, awake) and not await is_sleeping(fleet, asleep)
    return waited


async def test_vllm_swap_both_ways_with_measured_costs(proxy, fleet):
    # model-b sleeps (level 1, from the emulator's start): its request waits while vllm-a drains,
    # sleeps at level 2 and vllm-b wakes
    await swap_sequence(proxy, fleet, "vllm-a", "vllm-b", ("model-a", "model-b"))
    costs = await swap_metrics(proxy)
    assert near(costs["sloproxy_swap_sleep_seconds"]["vllm-a"], "sleep", 2)
    assert near(costs["sloproxy_swap_wake_seconds"]["vllm-b"], "wake", 1)
    assert costs["sloproxy_backend_asleep"] == {"vllm-a": 1.0, "vllm-b": 0.0, "sglang-c": 0.0, "sglang-d": 1.0}
    # and back: vllm-b sleeps at level 1, vllm-a wakes from level 2 (weights from disk: the slow one)
    waited = await swap_sequence(proxy, fleet, "vllm-b", "vllm-a", ("model-b", "model-a"))
    costs = await swap_metrics(proxy)
    wake_a = costs["sloproxy_swap_wake_seconds"]["vllm-a"]
    assert near(costs["sloproxy_swap_sleep_seconds"]["vllm-b"], "sleep", 1)
    assert near(wake_a, "wake", 2)
    assert waited >= wake_a  # the request waited for the wake
    assert costs["sloproxy_swap_wake_seconds"]["vllm-a"] > 5 * costs["sloproxy_swap_wake_seconds"]["vllm-b"]


async def test_sglang_release_and_resume_swap(proxy, fleet):
    await swap_sequence(proxy, fleet, "sglang-c", "sglang-d", ("model-c", "model-d"))
    costs = await swap_metrics(proxy)
    assert near(costs["sloproxy_swap_sleep_seconds"]["sglang-c"], "sleep", 1)
    assert near(costs["sloproxy_swap_wake_seconds"]["sglang-d"], "wake", 1)


async def test_many_requests_for_a_sleeping_model_all_wait_and_succeed(proxy, fleet):
    """A burst for the sleeping model while the other one's requests run: no 503, nothing lost."""
    sleeping = "model-c" if await is_sleeping(fleet, "sglang-c") else "model-d"
    other = "model-d" if sleeping == "model-c" else "model-c"
    replies = await asyncio.gather(
        *(stream_all(proxy, other, 100) for _ in range(3)), *(stream_all(proxy, sleeping, 8) for _ in range(6))
    )
    assert replies == [(100, "length")] * 3 + [(8, "length")] * 6
    swaps = (await swap_metrics(proxy))["sloproxy_swaps_total"]
    assert swaps["failed"] == 0 and swaps["abandoned"] == 0 and swaps["done"] >= 2


async def test_unqueued_policy_waits_too_and_a_victim_past_the_drain_bound_keeps_its_requests(fleet):
    """round-robin has no queue: the request still waits for the wake. With a drain bound shorter than
    the victim's stream, the swap is called off (the stream runs on, whole) and retried until it drains."""
    awake, asleep = ("vllm-a", "vllm-b") if not await is_sleeping(fleet, "vllm-a") else ("vllm-b", "vllm-a")
    model = {"vllm-a": "model-a", "vllm-b": "model-b"}
    config = {
        "backends": [
            {"name": n, "engine": "vllm", "url": fleet.url(n), "models": [model[n]], "gpu_group": "gpu0"}
            for n in ("vllm-a", "vllm-b")
        ],
        "policy": {"name": "round-robin"},
        "swapping": {"min_awake_s": 0.0, "drain_timeout_s": 0.3},
        "predictor": {"mode": "off"},
    }
    with ProxyProcess(config) as second:
        long = asyncio.create_task(stream_all(second, model[awake], 2000))  # ~1.5 s: past the drain bound
        await asyncio.sleep(0.2)
        assert await stream_all(second, model[asleep], 8) == (8, "length")
        assert await long == (2000, "length")
        swaps = (await swap_metrics(second))["sloproxy_swaps_total"]
        assert swaps["abandoned"] >= 1 and swaps["done"] == 1 and swaps["failed"] == 0
        assert await is_sleeping(fleet, awake) and not await is_sleeping(fleet, asleep)
