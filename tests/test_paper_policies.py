"""The paper presets (ecoserve, seallm, uellm, qlm, slo): decisions on hand-made snapshots, fewer
preemptions than least-load on a KV-bound instance (simulated), and a live smoke run."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from sloproxy.plugins import load_policy
from sloproxy.policies.base import Snapshot
from sloproxy.policies.ecoserve import KVReserveAdmission, LengthAffinity, footprint_first, length_bucket
from sloproxy.policies.qlm import GroupState, QLMOrdering, QLMPlanner, Throughput, plan_greedy, plan_milp
from sloproxy.policies.seallm import SeaLLMOrdering, ServiceProfile, level
from sloproxy.policies.uellm import WaveAffinity, slo_length_order
from sloproxy.request import ProxyRequest, kv_footprint
from sloproxy.slo import DEFAULT_CLASSES

INTERACTIVE, BATCH = DEFAULT_CLASSES
PRESETS = ("ecoserve", "seallm", "uellm", "qlm", "slo")


def req(
    index: int,
    *,
    band: int = 0,
    deadline: float | None = None,
    prompt: int = 100,
    p50: float = 100,
    p90: float | None = None,
    model: str = "m",
    arrival: float | None = None,
) -> ProxyRequest:
    request = ProxyRequest(
        id=f"r{index}",
        kind="chat",
        model=model,
        stream=True,
        include_usage=False,
        raw=b"{}",
        received_at=float(index if arrival is None else arrival),
    )
    request.band, request.slo = band, (INTERACTIVE if band == 0 else BATCH)
    request.urgent_deadline = deadline
    request.est_prompt_tokens, request.est_output_tokens = prompt, int(p50)
    request.pred_p50, request.pred_p90 = p50, (p90 if p90 is not None else 2 * p50)
    return request


def backend(
    name: str,
    *,
    in_flight: int = 0,
    budget: int = 8,
    reserved: int = 0,
    capacity: int | None = 10_000,
    kv: float | None = 0.1,
    model: str = "m",
    generation: int | None = None,
    read_at: float | None = None,
):
    load = SimpleNamespace(
        running=in_flight, waiting=0, kv_usage=kv, kv_capacity_tokens=capacity, generation_tokens=generation
    )
    return SimpleNamespace(
        name=name,
        models=frozenset({model}),
        healthy=True,
        in_flight=in_flight,
        budget=budget,
        urgent_budget=budget,
        priority_scheduling=False,
        load=load,
        load_is_stale=False,
        kv_reserved_tokens=reserved,
        kv_urgent_tokens=0,
        load_read_at=read_at,
    )


def drain(ordering, requests) -> list[str]:
    for request in requests:
        ordering.push(request)
    return [ordering.pop().id for _ in requests]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_by_name_and_read_predictions(name: str) -> None:
    policy = load_policy(name)
    assert policy.name == name and policy.queued and policy.uses_predictions


# ----- ecoserve ----------------------------------------------------------------------------------------
def test_kv_reservation_admits_only_what_fits_the_capacity() -> None:
    admission = KVReserveAdmission(headroom=1.0)
    snapshot = Snapshot(0.0, [])
    request = req(1, prompt=1000, p50=500, p90=2000)  # footprint 3000
    assert kv_footprint(request) == 3000
    assert admission.admit(request, backend("a", in_flight=2, reserved=7000), snapshot)  # 10,000: fits exactly
    assert not admission.admit(request, backend("b", in_flight=2, reserved=7001), snapshot)
    assert admission.admit(request, backend("c", in_flight=0, reserved=0, capacity=100), snapshot)  # empty: always
    assert not admission.admit(request, backend("d", in_flight=1, reserved=0, kv=0.97), snapshot)  # KV cross-check


def test_kv_reservation_remembers_capacity_when_a_reading_omits_it() -> None:
    admission = KVReserveAdmission(headroom=1.0)
    request = req(1, prompt=1000, p50=500, p90=2000)
    assert admission.admit(request, backend("a", in_flight=1, reserved=7000, capacity=10_000), Snapshot(0.0, []))
    idle_sglang = backend("a", in_flight=1, reserved=8000, capacity=None)  # SGLang reports none while idle
    assert not admission.admit(request, idle_sglang, Snapshot(0.0, []))
    assert admission.admit(request, backend("new", in_flight=1, reserved=10**6, capacity=None), Snapshot(0.0, []))


def test_client_limit_bounds_the_reservation() -> None:
    request = req(1, prompt=100, p50=500, p90=3000)
    request.max_tokens = 1024
    assert kv_footprint(request) == 1124


def test_length_affinity_prefers_the_backend_serving_the_same_bucket() -> None:
    scorer = LengthAffinity(edges=(64, 256, 1024))
    a, b = backend("a"), backend("b")
    for i in range(4):
        scorer.chosen(req(i, p50=30), a)  # short replies on a
        scorer.chosen(req(10 + i, p50=2000), b)  # very long on b
    short, long = req(20, p50=40), req(21, p50=1500)
    assert (length_bucket(short), length_bucket(long)) == (0, 3)
    assert (scorer.score(short, a, None), scorer.score(short, b, None)) == (1.0, 0.0)
    assert (scorer.score(long, a, None), scorer.score(long, b, None)) == (0.0, 1.0)


def test_kv_reservation_over_a_fleet_decides_as_one_backend_at_a_time() -> None:
    """``admitted`` (the dispatch path, inlined) admits exactly the backends ``admit`` does, and leaves
    the same decaying band-0 peaks behind, over random fleets, bands and times."""
    rng = random.Random(7)
    one_by_one, at_once = KVReserveAdmission(headroom=1.5), KVReserveAdmission(headroom=1.5)
    for step in range(300):
        fleet = [
            backend(
                f"b{i}",
                in_flight=rng.choice((0, 1, 3, 7, 8)),
                reserved=rng.randrange(0, 16_000),
                capacity=rng.choice((None, 6_000, 12_000)),
                kv=rng.choice((None, 0.2, 0.97)),
            )
            for i in range(12)
        ]
        for b in fleet:
            b.kv_urgent_tokens = rng.randrange(0, b.kv_reserved_tokens + 1)
        request = req(step, band=rng.randrange(2), prompt=rng.randrange(10, 4000), p50=rng.randrange(1, 900))
        snapshot = Snapshot(step * 0.7, fleet)
        expected = [b.name for b in fleet if one_by_one.admit(request, b, snapshot)]
        assert [b.name for b in at_once.admitted(request, fleet, snapshot)] == expected
    assert at_once._urgent_peak == one_by_one._urgent_peak and at_once.capacity == one_by_one.capacity


def test_length_affinity_scores_a_fleet_as_one_backend_at_a_time() -> None:
    rng = random.Random(3)
    scorer = LengthAffinity(edges=(64, 256, 1024), window=8)
    fleet = [backend(f"b{i}") for i in range(6)]
    for i in range(200):
        scorer.chosen(req(i, p50=rng.choice((10, 100, 500, 3000))), rng.choice(fleet[:5]))  # b5: no history
        request = req(1000 + i, p50=rng.choice((10, 100, 500, 3000)))
        assert scorer.scores(request, fleet, None) == [scorer.score(request, b, None) for b in fleet]


def test_footprint_ordering_serves_big_kv_first_with_deadline_tie_break() -> None:
    small = req(1, deadline=1.0, prompt=100, p50=100, p90=200)
    big_late = req(2, deadline=9.0, prompt=3000, p50=500, p90=1000)
    big_early = req(3, deadline=5.0, prompt=3000, p50=500, p90=1000)
    batch_big = req(4, band=1, deadline=2.0, prompt=4000, p50=900, p90=2000)
    assert drain(footprint_first(1024), [small, big_late, big_early, batch_big]) == ["r3", "r2", "r1", "r4"]


# ----- seallm ------------------------------------------------------------------------------------------
def test_seallm_levels_double_the_budget() -> None:
    assert [level(t, 100) for t in (50, 100, 101, 200, 201, 800, 801)] == [0, 0, 1, 1, 2, 3, 4]


def test_seallm_profile_learns_the_median_of_served_replies() -> None:
    profile = ServiceProfile(initial_tokens=128, min_samples=8)
    assert profile.budget("m") == 128
    for tokens in (10, 20, 30, 40, 50, 60, 70, 80):
        profile.record("m", tokens)
    assert profile.budget("m") == 50


def test_seallm_orders_by_level_then_normalised_deadline() -> None:
    ordering = SeaLLMOrdering(ServiceProfile(initial_tokens=100), stretch=4.0, prefill_s=0.0, tpot_s=0.01)
    long_early = req(1, p50=400, arrival=0.0)  # level 2
    short_late = req(2, p50=100, arrival=5.0)  # level 0, normalised deadline 5 + 4 x 1 = 9
    short_early = req(3, p50=90, arrival=1.0)  # level 0, 1 + 4 x 0.9 = 4.6
    mid = req(4, p50=150, arrival=0.0)  # level 1
    assert drain(ordering, [long_early, short_late, short_early, mid]) == ["r3", "r2", "r4", "r1"]


# ----- uellm -------------------------------------------------------------------------------------------
def test_uellm_orders_by_deadline_plus_half_the_predicted_decode_time() -> None:
    ordering = slo_length_order(length_weight=0.5, tpot_s=0.01)
    a = req(1, deadline=10.0, p50=1000)  # 10 + 5 = 15
    b = req(2, deadline=12.0, p50=100)  # 12 + 0.5 = 12.5
    c = req(3, deadline=11.0, p50=600)  # 11 + 3 = 14
    assert drain(ordering, [a, b, c]) == ["r2", "r3", "r1"]


def test_uellm_waves_stick_to_one_instance_until_full_or_a_new_bucket() -> None:
    waves = WaveAffinity(wave_size=3, edges=(64, 256, 1024))
    a, b = backend("a"), backend("b")
    waves.chosen(req(1, p50=100), a)  # opens a wave on a (bucket 1)
    assert (waves.score(req(2, p50=120), a, None), waves.score(req(2, p50=120), b, None)) == (1.0, 0.0)
    waves.chosen(req(2, p50=120), a)
    waves.chosen(req(3, p50=130), a)  # the wave is full (3)
    assert waves.score(req(4, p50=140), a, None) == 0.0
    waves.chosen(req(4, p50=140), b)  # a new wave on b
    assert waves.score(req(5, p50=2000), b, None) == 0.0  # another bucket does not join


# ----- qlm ---------------------------------------------------------------------------------------------
def test_qlm_throughput_and_wait_estimate_from_generation_counters() -> None:
    meter = Throughput(default_tokens_per_s=100.0, smoothing=1.0)
    b = backend("a", in_flight=2, reserved=3000, generation=1000, read_at=10.0)
    meter.observe(b)
    assert meter.wait_s(b) == pytest.approx(30.0)  # default rate until two readings
    b.load.generation_tokens, b.load_read_at = 2500, 11.0
    meter.observe(b)
    assert meter.rate(b) == pytest.approx(1500.0)
    assert meter.wait_s(b) == pytest.approx(2.0)


def test_qlm_groups_are_fcfs_until_a_miss_is_predicted_then_edf_over_groups() -> None:
    planner = QLMPlanner(Throughput(100.0))
    ordering = QLMOrdering(planner)
    early_loose = req(1, band=0, deadline=50.0, arrival=0.0)
    late_tight = req(2, band=0, deadline=3.0, arrival=1.0)
    late_tight.slo = SimpleNamespace(name="tight")  # another group, same band
    for request in (early_loose, late_tight):
        ordering.push(request)
    assert ordering.peek().id == "r1"  # no predicted miss: group heads in arrival order
    planner.edf_models = {"m"}
    assert ordering.peek().id == "r2"  # predicted miss: earliest head deadline first
    assert [ordering.pop().id, ordering.pop().id] == ["r2", "r1"] and len(ordering) == 0


def test_qlm_planner_replans_only_when_a_group_would_miss() -> None:
    planner = QLMPlanner(Throughput(100.0), time_limit_s=1.0)
    busy, idle = backend("busy", in_flight=5, reserved=5000), backend("idle", in_flight=0, reserved=0)
    relaxed = [req(1, deadline=500.0, p50=50, prompt=80)]
    planner.replan(Snapshot(0.0, [busy, idle]), relaxed)
    assert planner.edf_models == set() and planner.assignment == {}
    tight = [req(1, deadline=1.0, p50=50, prompt=80), req(2, deadline=2.0, p50=50, prompt=80)]
    planner.replan(Snapshot(0.0, [busy, idle]), tight)  # 50 s of backlog on busy, none on idle
    assert planner.edf_models == {"m"}
    assert planner.assignment == {("m", "interactive"): "idle"}
    assert planner.plans["milp"] == 1


def test_milp_and_greedy_spread_groups_to_minimise_lateness() -> None:
    groups = [GroupState(("m", "a"), 1.0, 100.0), GroupState(("m", "b"), 1.2, 100.0)]
    wait, rate = {"x": 0.0, "y": 0.0}, {"x": 100.0, "y": 100.0}
    plan = plan_milp(groups, ["x", "y"], {"x": "m", "y": "m"}, wait, rate, 0.0, swap_s=30.0, time_limit_s=1.0)
    assert plan is not None and set(plan.values()) == {"x", "y"}  # together both would be late
    assert set(plan_greedy(groups, {"m": ["x", "y"]}, wait, rate).values()) == {"x", "y"}
    swap = plan_milp(groups[:1], ["x", "y"], {"x": "m", "y": "other"}, {"x": 0.5, "y": 0.0}, rate, 0.0, 30.0, 1.0)
    assert swap == {("m", "a"): "x"}  # late on x beats a 30 s model swap on y


# ----- slo ---------------------------------------------------------------------------------------------
def test_slo_preset_is_edf_with_kv_reservation() -> None:
    policy = load_policy("slo", {"kv_headroom": 1.0})
    ordering = policy.ordering()
    ordering.clock = lambda: 0.0  # every deadline ahead
    ordered = drain(ordering, [req(1, deadline=9.0), req(2, deadline=3.0), req(3, band=1, deadline=1.0)])
    assert ordered == ["r3", "r2", "r1"]  # deadlines alone: a batch deadline is its end-to-end one
    request = req(4, prompt=2000, p50=500, p90=1000)
    full, roomy = backend("full", in_flight=3, reserved=8000), backend("roomy", in_flight=3, reserved=2000)
    assert policy.admitting(request, [full, roomy], Snapshot(0.0, [])) == [roomy]


# ----- simulated: preemptions on a KV-bound instance ---------------------------------------------------
def test_ecoserve_preempts_less_than_least_load_on_a_kv_bound_instance(shared_data: Path) -> None:
    from sloproxy.emulator.fleet import FleetSpec, InstanceSpec
    from sloproxy.evaluation.build import BuildOptions, build_workload, parse_models
    from sloproxy.evaluation.simprep import prepare
    from sloproxy.evaluation.simulate import simulate

    requests = prepare(
        build_workload(
            BuildOptions(
                trace=str(shared_data / "traces" / "azure_conv_2023.csv"),
                lengths_dir=str(shared_data / "lengths"),
                models=parse_models("llama-3-8b=Meta-Llama-3-8B-Instruct"),
                duration_s=60.0,
                max_context=4096,
                max_tokens_caps=(1024, 2048),
                seed=5,
            )
        )
    )
    fleet = FleetSpec(
        instances=[InstanceSpec(name="a10", engine="vllm", model="llama-3-8b", port=0, profile="a10-llama2-7b")]
    )
    preemptions = {
        name: simulate(fleet, requests, name, scale=0.1)[0].extra["preemptions"] for name in ("least-load", "ecoserve")
    }
    assert preemptions["least-load"] >= 5, preemptions  # the instance is KV-bound at this load
    assert preemptions["ecoserve"] < preemptions["least-load"], preemptions


# ----- live smoke --------------------------------------------------------------------------------------
async def test_live_proxy_serves_with_each_paper_preset() -> None:
    from sloproxy.processes import EmulatorProcess, ProxyProcess

    instances = [
        {"name": "a", "engine": "vllm", "model": "m", "profile": "a10-llama2-7b"},
        {"name": "b", "engine": "tgi", "model": "m", "profile": "a10-llama2-7b"},
    ]
    with EmulatorProcess(instances, speedup=20.0) as fleet:
        for name in PRESETS:
            config = {
                "backends": [
                    {"name": n, "engine": e, "url": fleet.url(n), "models": ["m"]}
                    for n, e in (("a", "vllm"), ("b", "tgi"))
                ],
                "policy": {"name": name},
                "load_polling": {"interval_s": 0.05},
                "predictor": {"online": False},
            }
            with ProxyProcess(config) as proxy:
                async with aiohttp.ClientSession() as session:

                    async def one(index: int, session=session, proxy=proxy) -> tuple[int, bytes]:
                        body = {
                            "model": "m",
                            "messages": [{"role": "user", "content": f"Say hi #{index}"}],
                            "max_tokens": 16,
                            "stream": True,
                        }
                        headers = {"x-slo-class": "interactive" if index % 2 else "batch"}
                        async with session.post(
                            proxy.url + "/v1/chat/completions", json=body, headers=headers
                        ) as response:
                            return response.status, await response.read()

                    results = await asyncio.gather(*(one(i) for i in range(8)))
            assert [status for status, _ in results] == [200] * 8, (name, results)
            assert all(text.rstrip().endswith(b"data: [DONE]") for _, text in results), name
