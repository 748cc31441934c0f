"""Placement (sloproxy/fleet/placement.py) on hand-made demand: the two stages, stability,
hysteresis and the adaptive re-evaluation interval."""

from __future__ import annotations

from sloproxy.fleet.placement import GroupView, IntervalController, allocate, mix_distance, place

CAP = {"a": 100.0, "b": 100.0, "c": 100.0, "d": 100.0}


def group(name: str, models: str, awake: str = "") -> GroupView:
    return GroupView(name, frozenset(models), frozenset(awake))


def test_allocation_is_proportional_and_models_without_demand_get_nothing():
    limit = dict.fromkeys("abcd", 4)
    assert allocate({"a": 300.0, "b": 100.0, "c": 0.0}, CAP, limit, 4) == {"a": 3, "b": 1}
    # fewer instances than models with demand: the most needed first
    two = allocate({"a": 50.0, "b": 300.0, "c": 10.0}, CAP, limit, 2)
    assert set(two) == {"a", "b"} and sum(two.values()) == 2
    # capacity matters: a model twice as expensive per token needs twice the instances
    assert allocate({"a": 100.0, "b": 100.0}, {"a": 50.0, "b": 100.0}, limit, 3) == {"a": 2, "b": 1}
    # no more than the groups that can hold it
    assert allocate({"a": 1000.0, "b": 10.0}, CAP, {"a": 1, "b": 4}, 4) == {"a": 1, "b": 1}


def test_a_group_only_holds_models_it_has_backends_for():
    groups = [group("g0", "ab", "a"), group("g1", "cd", "c")]
    result = place(groups, {"b": 200.0, "d": 200.0}, CAP, horizon_s=600.0)
    assert result.groups == {"g0": frozenset("b"), "g1": frozenset("d")}
    assert result.adopt and sorted(result.swaps) == [("g0", "a", "b"), ("g1", "c", "d")]
    # demand only for models of g1: g0 keeps what it holds (no pointless sleep)
    result = place(groups, {"d": 500.0}, CAP, horizon_s=600.0)
    assert result.groups == {"g0": frozenset("a"), "g1": frozenset("d")}


def test_same_demand_same_placement_no_swaps():
    groups = [group("g0", "ab", "a"), group("g1", "ab", "b"), group("g2", "cd", "c")]
    demand = {"a": 100.0, "b": 100.0, "c": 50.0, "d": 10.0}
    result = place(groups, demand, CAP)
    assert result.swaps == () and not result.adopt and result.reason == "no change"
    assert result.groups == {"g0": frozenset("a"), "g1": frozenset("b"), "g2": frozenset("c")}


def test_hysteresis_small_gains_do_not_pay_for_a_swap():
    groups = [group("g0", "ab", "a")]
    # b has slightly more demand, but each serves all of its own; the gain is 10 tok/s
    small = place(groups, {"a": 90.0, "b": 100.0}, CAP, default_swap_s=30.0, horizon_s=60.0)
    assert small.swaps == (("g0", "a", "b"),) and not small.adopt
    # a real shift: a idle, b heavy
    big = place(groups, {"a": 0.0, "b": 100.0}, CAP, default_swap_s=5.0, horizon_s=60.0)
    assert big.adopt
    # measured swap cost counts: a slow swap is not worth the same gain
    slow = place(groups, {"a": 0.0, "b": 100.0}, CAP, swap_s={("g0", "b"): 120.0}, horizon_s=60.0)
    assert not slow.adopt


def test_swaps_prefer_the_cheapest_group():
    groups = [group("g0", "ab", "a"), group("g1", "ab", "a")]
    result = place(groups, {"a": 50.0, "b": 50.0}, CAP, swap_s={("g0", "b"): 20.0, ("g1", "b"): 2.0}, horizon_s=600)
    assert result.swaps == (("g1", "a", "b"),) and result.adopt


def test_interval_shrinks_on_a_shift_and_grows_while_stable():
    controller = IntervalController(min_s=5.0, max_s=60.0)
    controller.placed({"a": 100.0, "b": 0.0})
    assert controller.interval_s == 5.0
    stable = [controller.next_interval({"a": 100.0, "b": 1.0}) for _ in range(10)]
    assert stable == sorted(stable) and stable[-1] == 60.0
    assert controller.next_interval({"a": 0.0, "b": 100.0}) == 30.0  # shifted: sooner
    assert controller.next_interval({"a": 0.0, "b": 100.0}) == 15.0
    controller.placed({"a": 0.0, "b": 100.0})
    assert controller.next_interval({"a": 0.0, "b": 100.0}) == 22.5
    assert mix_distance({"a": 1.0}, {"b": 1.0}) == 1.0 and mix_distance({"a": 2.0}, {"a": 1.0}) == 0.0
