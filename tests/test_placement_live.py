"""Placement in the proxy: measured demand → a placement → swaps through the swapper, drain first.

Unit tests drive :class:`PlacementLoop` over a stand-in swapper; the end-to-end test runs a real
proxy with placement on in front of emulated vLLM and SGLang groups, driven by the openai client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from sloproxy.config import ConfigError, PlacementConfig, parse_config
from sloproxy.fleet.profile import InstanceProfile, SloCapacity, save_profile
from sloproxy.placement_loop import DecayingRate, PlacementLoop
from sloproxy.policies.base import Swap
from sloproxy.processes import EmulatorProcess, ProxyProcess
from tests.helpers import get, metric_samples, stream_to_end


# ----- the loop over a stand-in swapper --------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def member(name: str, model: str, asleep: bool, swap_s: float | None = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, models=frozenset({model}), asleep=asleep, swap_s=swap_s)


def stand_in(groups: dict[str, list[SimpleNamespace]], accept: bool = True) -> SimpleNamespace:
    asked: list[Swap] = []

    def request(action: Swap) -> bool:
        asked.append(action)
        return accept

    return SimpleNamespace(
        groups=groups, busy=set(), enabled=True, config=SimpleNamespace(awake_per_group=1), request=request, asked=asked
    )


def two_groups() -> dict[str, list[SimpleNamespace]]:
    return {
        "g0": [member("a0", "a", asleep=False), member("b0", "b", asleep=True)],
        "g1": [member("a1", "a", asleep=True, swap_s=2.0), member("b1", "b", asleep=False)],
    }


def test_decaying_rate_measures_arrivals_per_second():
    rate = DecayingRate(window_s=10.0)
    for step in range(200):  # 4 per second for 50 s: well past the window
        rate.add(step * 0.25)
    assert rate.rate(49.75) == pytest.approx(4.0, rel=0.05)
    assert rate.rate(49.75 + 10.0) == pytest.approx(4.0 / 2.718, rel=0.05)  # one window later: 1/e of it


def test_a_model_outgrowing_one_instance_takes_the_idle_group():
    clock = FakeClock()
    swapper = stand_in(two_groups())
    config = PlacementConfig(enabled=True, window_s=10.0, default_swap_s=5.0, capacity_rps={"a": 2.0, "b": 2.0})
    loop = PlacementLoop(swapper, config, clock)  # type: ignore[arg-type]
    for _ in range(60):  # 6 requests/s for model a, none for b (and unknown models are ignored)
        clock.now += 1 / 6
        loop.observe("a")
        loop.observe("not-grouped")
    assert set(loop.demand()) == {"a"} and loop.demand()["a"] == pytest.approx(6.0 * (1 - 2.718**-1), rel=0.1)
    decision = loop.evaluate()
    assert decision is not None and decision.adopt
    assert decision.groups == {"g0": frozenset({"a"}), "g1": frozenset({"a"})}
    # the measured swap cost of a1 (2 s) was used, and the swap went to the swapper naming the victim
    assert swapper.asked == [Swap("a", "a1", "b1", f"placement: {decision.reason}")]
    assert loop.outcomes["adopted"] == 1 and loop.outcomes["swap_started"] == 1


def test_no_swap_when_the_placement_holds_and_none_while_a_swap_is_under_way():
    clock = FakeClock()
    swapper = stand_in(two_groups())
    loop = PlacementLoop(swapper, PlacementConfig(enabled=True, window_s=10.0), clock)  # type: ignore[arg-type]
    for _ in range(30):  # both models asked for equally: each group keeps its own
        clock.now += 0.2
        loop.observe("a")
        loop.observe("b")
    decision = loop.evaluate()
    assert decision is not None and not decision.swaps and swapper.asked == []
    swapper.busy.add("g1")
    assert loop.evaluate() is None and loop.outcomes["postponed"] == 1


def test_a_small_gain_does_not_pay_for_a_slow_swap():
    clock = FakeClock()
    groups = two_groups()
    groups["g1"][0].swap_s = 600.0  # ten minutes to bring a into g1
    swapper = stand_in(groups)
    config = PlacementConfig(enabled=True, window_s=10.0, horizon_s=60.0, capacity_rps={"a": 2.0})
    loop = PlacementLoop(swapper, config, clock)  # type: ignore[arg-type]
    for _ in range(90):
        clock.now += 1 / 3  # 3/s: a second instance gains 1/s over the horizon, far less than the swap costs
        loop.observe("a")
    decision = loop.evaluate()
    assert decision is not None and decision.swaps and not decision.adopt
    assert swapper.asked == [] and loop.outcomes["not_worth_it"] == 1


def test_a_declined_swap_is_counted():
    clock = FakeClock()
    swapper = stand_in(two_groups(), accept=False)
    config = PlacementConfig(enabled=True, window_s=10.0, default_swap_s=1.0, capacity_rps={"a": 1.0})
    loop = PlacementLoop(swapper, config, clock)  # type: ignore[arg-type]
    for _ in range(50):
        clock.now += 0.2
        loop.observe("a")
    loop.evaluate()
    assert len(swapper.asked) == 1 and loop.outcomes["swap_declined"] == 1


def profile_file(tmp_path, model: str, gpu: str, rps_at: dict[int, float], time_scale: float = 1.0) -> str:
    capacity = [
        SloCapacity(
            prompt_tokens=p,
            concurrency=8,
            throughput_rps=r,
            output_tokens_per_s=100 * r,
            ttft_mean_s=0.2,
            tpot_mean_s=0.03,
        )
        for p, r in rps_at.items()
    ]
    profile = InstanceProfile(model=model, engine="vllm", gpu_type=gpu, capacity=capacity, time_scale=time_scale)
    path = tmp_path / f"{model}-{gpu}.yaml"
    save_profile(path, profile)
    return str(path)


def test_capacity_comes_from_config_then_profiles_at_the_measured_prompt_size_then_one(tmp_path):
    groups = two_groups()
    groups["g0"].append(member("c0", "c", asleep=True))
    swapper = stand_in(groups)
    paths = [
        profile_file(tmp_path, "a", "a10", {256: 4.0, 1024: 2.0}),
        profile_file(tmp_path, "a", "h100", {256: 8.0, 1024: 4.0}, time_scale=2.0),  # emulated at speedup 2
        profile_file(tmp_path, "b", "a10", {256: 3.0}),
    ]
    config = PlacementConfig(enabled=True, capacity_rps={"b": 5.0}, profiles=paths)
    loop = PlacementLoop(swapper, config, FakeClock())  # type: ignore[arg-type]
    for _ in range(200):
        loop.observe("a", prompt_tokens=1024)
    capacity = loop.capacity()
    # a: the mean of 2.0 (a10) and 4.0 x 2 (h100, in the proxy's seconds) at 1,024 prompt tokens
    assert capacity["a"] == pytest.approx((2.0 + 8.0) / 2)
    assert capacity["b"] == 5.0 and capacity["c"] == 1.0  # config wins; no profile: 1
    for _ in range(400):
        loop.observe("a", prompt_tokens=256)  # the mean prompt moves: so does the capacity
    assert loop.capacity()["a"] == pytest.approx((4.0 + 16.0) / 2, rel=0.02)


def test_a_profile_that_does_not_load_is_refused_naming_the_field(tmp_path):
    backends = [{"name": "a", "engine": "vllm", "url": "http://127.0.0.1:1", "models": ["a"], "gpu_group": "g"}]
    (tmp_path / "bad.yaml").write_text("version: 999\n")
    for path, reason in ((tmp_path / "missing.yaml", "No such file"), (tmp_path / "bad.yaml", "profile version")):
        with pytest.raises(ConfigError) as caught:
            parse_config({"backends": backends, "swapping": {"placement": {"profiles": [str(path)]}}})
        assert "`$.swapping.placement.profiles[0]`" in str(caught.value) and reason in str(caught.value)


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ({"window_s": 0}, "`$.swapping.placement.window_s` must be positive"),
        ({"min_interval_s": 10, "max_interval_s": 5}, "`$.swapping.placement.max_interval_s`"),
        ({"capacity_rps": {"a": 0}}, "`$.swapping.placement.capacity_rps.a` must be positive"),
        ({"every": 3}, "every"),
    ],
)
def test_placement_config_errors_name_the_field(placement, message):
    backends = [{"name": "a", "engine": "vllm", "url": "http://127.0.0.1:1", "models": ["a"], "gpu_group": "g"}]
    with pytest.raises(ConfigError) as caught:
        parse_config({"backends": backends, "swapping": {"placement": placement}})
    assert message in str(caught.value)


# ----- through a real proxy -------------------------------------------------------------------------
SPEEDUP = 8.0
MESSAGES = [{"role": "user", "content": "Tell me about GPUs."}]


@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    instances = [
        {"name": "vllm-a0", "engine": "vllm", "model": "model-a", "max_model_len": 4096},
        {"name": "vllm-b0", "engine": "vllm", "model": "model-b", "max_model_len": 4096, "start_asleep": 1},
        {"name": "sglang-b1", "engine": "sglang", "model": "model-b", "max_model_len": 4096},
        {"name": "sglang-a1", "engine": "sglang", "model": "model-a", "max_model_len": 4096},
    ]
    with EmulatorProcess(instances, speedup=SPEEDUP) as running:
        yield running


@pytest.fixture(scope="module")
def proxy(fleet: EmulatorProcess) -> Iterator[ProxyProcess]:
    def grouped(name: str, engine: str, model: str, group: str) -> dict:
        return {"name": name, "engine": engine, "url": fleet.url(name), "models": [model], "gpu_group": group}

    config = {
        "backends": [
            grouped("vllm-a0", "vllm", "model-a", "gpu0"),
            grouped("vllm-b0", "vllm", "model-b", "gpu0"),
            # SGLang cannot say it sleeps: the proxy keeps the first listed awake and puts the other to sleep
            grouped("sglang-b1", "sglang", "model-b", "gpu1"),
            grouped("sglang-a1", "sglang", "model-a", "gpu1"),
        ],
        "health": {"interval_s": 0.2, "timeout_s": 0.5},
        "swapping": {
            "min_awake_s": 0.0,
            "placement": {
                "enabled": True,
                "window_s": 1.5,
                "min_interval_s": 0.25,
                "max_interval_s": 1.0,
                "horizon_s": 30.0,
                "default_swap_s": 0.5,
                "capacity_rps": {"model-a": 2.0, "model-b": 2.0},
            },
        },
        "predictor": {"mode": "off"},
    }
    with ProxyProcess(config) as running:
        yield running


async def stream_all(proxy: ProxyProcess, model: str, max_tokens: int) -> tuple[int, str | None]:
    return await stream_to_end(proxy.url, model, max_tokens, MESSAGES)


async def asleep(fleet: EmulatorProcess) -> dict[str, bool]:
    states = {}
    for name in ("vllm-a0", "vllm-b0", "sglang-b1", "sglang-a1"):
        _, raw, _ = await get(fleet.url(name) + "/_emulator/state")
        states[name] = json.loads(raw)["sleeping"]
    return states


async def settles_to(fleet: EmulatorProcess, expected: dict[str, bool], within_s: float = 5.0) -> dict[str, bool]:
    """Who sleeps, once it equals ``expected`` or ``within_s`` has passed: placement acts on its interval,
    and a swap it started may still be under way when the traffic ends."""
    deadline = asyncio.get_running_loop().time() + within_s
    while (states := await asleep(fleet)) != expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    return states


async def steady(proxy: ProxyProcess, model: str, seconds: float, per_second: float, tokens: int) -> list:
    """Open-loop arrivals for ``model``: ``per_second`` requests a second for ``seconds``."""
    tasks = []
    for _ in range(round(seconds * per_second)):
        tasks.append(asyncio.create_task(stream_all(proxy, model, tokens)))
        await asyncio.sleep(1 / per_second)
    return await asyncio.gather(*tasks)


async def test_demand_shifts_are_followed_by_placement_without_stranding_anything(proxy, fleet):
    assert await asleep(fleet) == {"vllm-a0": False, "vllm-b0": True, "sglang-b1": False, "sglang-a1": True}
    # A long stream on model-b's only awake instance (~1 s at this speedup), then only model-a is asked
    # for, at twice one instance's capacity: placement moves gpu1 to model-a, but only once b1 drained.
    long_b = asyncio.create_task(stream_all(proxy, "model-b", 300))
    await asyncio.sleep(0.1)
    replies = await steady(proxy, "model-a", seconds=3.0, per_second=8.0, tokens=8)
    assert replies == [(8, "length")] * 24
    assert await long_b == (300, "length")  # it ran to its end: the drain waited for it
    moved = {"vllm-a0": False, "vllm-b0": True, "sglang-b1": True, "sglang-a1": False}
    assert await settles_to(fleet, moved) == moved
    # The demand moves to model-b: the reactive rule brings it back at once (model-a is served
    # elsewhere), and placement gives it the second group too as model-a's demand decays.
    replies = await steady(proxy, "model-b", seconds=4.0, per_second=8.0, tokens=8)
    assert replies == [(8, "length")] * 32
    back = {"vllm-a0": True, "vllm-b0": False, "sglang-b1": False, "sglang-a1": True}
    assert await settles_to(fleet, back) == back
    _, text, _ = await get(proxy.url + "/metrics")
    samples = metric_samples(text.decode())
    outcomes = {labels["outcome"]: value for labels, value in samples["sloproxy_placement_outcomes_total"]}
    swaps = {labels["outcome"]: value for labels, value in samples["sloproxy_swaps_total"]}
    assert outcomes["adopted"] >= 2 and outcomes["swap_started"] >= 2
    assert swaps["failed"] == 0 and swaps["abandoned"] == 0
    demand = {labels["model"]: value for labels, value in samples["sloproxy_placement_demand_rps"]}
    assert demand["model-b"] > demand["model-a"]
    capacity = {labels["model"]: value for labels, value in samples["sloproxy_placement_capacity_rps"]}
    assert capacity == {"model-a": 2.0, "model-b": 2.0}
    _, raw, _ = await get(proxy.url + "/admin/fleet")
    placement = json.loads(raw)["placement"]
    assert placement["last"]["groups"] == {"gpu0": ["model-b"], "gpu1": ["model-b"]}
