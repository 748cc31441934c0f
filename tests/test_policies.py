"""Pure policy tests: queue disciplines and admission, with property-based checks (hypothesis)."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from sloproxy.policies.base import Snapshot
from sloproxy.policies.orderings import PriorityFair, edf, fifo
from sloproxy.policies.parts import BudgetAdmission, LeastLoad
from sloproxy.policies.presets import EDF, FCFS, LEAST_LOAD, PRIORITY_FAIR, ROUND_ROBIN
from sloproxy.request import ProxyRequest
from sloproxy.slo import DEFAULT_CLASSES

INTERACTIVE, BATCH = DEFAULT_CLASSES


def make_request(
    index: int, band: int = 0, tenant: str = "t", priority: int = 0, deadline: float | None = None, tokens: int = 100
) -> ProxyRequest:
    request = ProxyRequest(
        id=f"r{index}",
        kind="chat",
        model="m",
        stream=False,
        include_usage=False,
        body={},
        raw=b"x" * 10,
        received_at=float(index),
        priority=priority,
    )
    request.tenant, request.band = tenant, band
    request.urgent_deadline = deadline
    request.est_prompt_tokens, request.est_output_tokens = tokens // 2, tokens - tokens // 2
    return request


request_specs = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from("abc"),
        st.integers(-3, 3),
        st.one_of(st.none(), st.floats(0, 100)),
        st.integers(1, 3000),
    ),
    min_size=1,
    max_size=60,
)
# Operations after all pushes: pop, or remove the k-th pushed request.
operations = st.lists(st.one_of(st.just(("pop", 0)), st.tuples(st.just("remove"), st.integers(0, 59))), max_size=80)


def _run(ordering, specs, ops):
    requests = [make_request(i, *spec) for i, spec in enumerate(specs)]
    for request in requests:
        ordering.push(request)
    popped, removed = [], []
    for op, index in ops:
        if op == "pop" and len(ordering):
            head = ordering.peek()
            got = ordering.pop()
            assert got is head  # peek tells the truth
            popped.append(got)
        elif op == "remove" and index < len(requests) and ordering.remove(requests[index]):
            removed.append(requests[index])
        assert len(ordering) == len(requests) - len(popped) - len(removed)
    rest = []
    while len(ordering):
        rest.append(ordering.pop())
    assert ordering.peek() is None
    served = popped + rest
    # Nothing lost, nothing duplicated.
    assert sorted(map(id, served + removed)) == sorted(map(id, requests))
    return popped, rest


@settings(max_examples=150, deadline=None)
@given(request_specs, operations)
def test_fifo_serves_in_arrival_order(specs, ops):
    popped, rest = _run(fifo(), specs, ops)
    assert [r.seq for r in rest] == sorted(r.seq for r in rest)
    assert [r.seq for r in popped] == sorted(r.seq for r in popped)


@settings(max_examples=150, deadline=None)
@given(request_specs, operations)
def test_edf_serves_earliest_deadline_first(specs, ops):
    ordering = edf()
    ordering.clock = lambda: -1.0  # every deadline (0..100) still ahead
    _, rest = _run(ordering, specs, ops)
    keys = [(r.urgent_deadline if r.urgent_deadline is not None else float("inf"), r.seq) for r in rest]
    assert keys == sorted(keys)


@settings(max_examples=150, deadline=None)
@given(request_specs, operations, st.floats(0, 100))
def test_edf_serves_overdue_work_after_on_time_work_of_its_band_and_more_important_bands(specs, ops, now):
    ordering = edf()
    ordering.clock = lambda: now
    _, rest = _run(ordering, specs, ops)

    def overdue(r) -> bool:
        return r.urgent_deadline is not None and r.urgent_deadline < now

    for i, earlier in enumerate(rest):
        for later in rest[i + 1 :]:
            if overdue(earlier) and not overdue(later):  # overdue ahead of on-time: only of a more important band
                assert earlier.band < later.band
            if overdue(earlier) and overdue(later) and earlier.band == later.band:
                assert (earlier.urgent_deadline, earlier.seq) <= (later.urgent_deadline, later.seq)
    on_time = [r for r in rest if not overdue(r)]
    keys = [(r.urgent_deadline if r.urgent_deadline is not None else float("inf"), r.seq) for r in on_time]
    assert keys == sorted(keys)
    # Overdue work does go once nothing on time of its band or a more important one waits.
    overdue_band_zero = [i for i, r in enumerate(rest) if overdue(r) and r.band == 0]
    on_time_band_zero = [i for i, r in enumerate(rest) if not overdue(r) and r.band == 0]
    if overdue_band_zero:
        assert min(overdue_band_zero) == (max(on_time_band_zero) + 1 if on_time_band_zero else 0) or any(
            not overdue(r) and r.band > 0 for r in rest[: min(overdue_band_zero)]
        )


@settings(max_examples=150, deadline=None)
@given(request_specs, operations)
def test_priority_fair_bands_are_strict_and_tenants_keep_their_order(specs, ops):
    _, rest = _run(PriorityFair(quantum_tokens=500), specs, ops)
    bands = [r.band for r in rest]
    assert bands == sorted(bands)  # never a higher band while a lower one waits
    for tenant in "abc":
        for band in range(3):
            mine = [(r.priority, r.seq) for r in rest if r.tenant == tenant and r.band == band]
            assert mine == sorted(mine)


@settings(max_examples=60, deadline=None)
@given(st.integers(50, 2000), st.integers(50, 2000), st.floats(0.5, 4.0))
def test_priority_fair_shares_tokens_by_weight(cost_a, cost_b, weight_b):
    """Two always-backlogged tenants: tokens served track their weights within one round."""
    quantum = 1000
    ordering = PriorityFair(quantum_tokens=quantum, weights={"a": 1.0, "b": weight_b})
    served = {"a": 0, "b": 0}
    for i in range(400):
        ordering.push(make_request(2 * i, tenant="a", tokens=cost_a))
        ordering.push(make_request(2 * i + 1, tenant="b", tokens=cost_b))
    for _ in range(300):
        request = ordering.pop()
        served[request.tenant] += cost_a if request.tenant == "a" else cost_b
    share_b = served["b"] / (served["a"] + served["b"])
    expected = weight_b / (1.0 + weight_b)
    slack = (quantum * max(1.0, weight_b) + max(cost_a, cost_b)) / (served["a"] + served["b"])
    assert abs(share_b - expected) <= slack + 0.02


def _backend(name: str, in_flight: int = 0, budget: int = 8, kv: float | None = None, waiting: int = 0):
    load = SimpleNamespace(running=in_flight, waiting=waiting, kv_usage=kv)
    return SimpleNamespace(
        name=name,
        models=frozenset({"m"}),
        healthy=True,
        in_flight=in_flight,
        budget=budget,
        urgent_budget=budget,
        priority_scheduling=False,
        load=load,
        load_is_stale=False,
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(1, 12)), min_size=1, max_size=8),
    st.lists(st.integers(0, 2), min_size=1, max_size=200),
)
def test_dispatch_never_exceeds_a_budget(backends_spec, bands):
    """Dispatching greedily with the policy, no backend ever holds more than its budget."""
    policy = PRIORITY_FAIR.create({})
    backends = [_backend(f"b{i}", budget=budget) for i, (_, budget) in enumerate(backends_spec)]
    snapshot = Snapshot(0.0, backends)
    queue = policy.ordering()
    for i, band in enumerate(bands):
        queue.push(make_request(i, band=band, tenant="ab"[i % 2]))
    while (head := queue.peek()) is not None:
        admitting = [b for b in backends if policy.admits(head, b, snapshot)]
        if not admitting:
            break
        chosen = policy.route(head, admitting, snapshot)
        queue.pop()
        chosen.in_flight += 1
        assert chosen.in_flight <= chosen.budget
    assert all(b.in_flight <= b.budget for b in backends)


def test_budget_admission_keeps_a_reserve_for_band_zero():
    admission = BudgetAdmission(reserve=0.25)
    backend = _backend("b", in_flight=6, budget=8)
    snapshot = Snapshot(0.0, [backend])
    assert not admission.admit(make_request(1, band=1), backend, snapshot)  # batch: 6 of 8 is its cap
    assert admission.admit(make_request(2, band=0), backend, snapshot)  # urgent work may use the rest
    assert not admission.admit(make_request(3), _backend("b", in_flight=2, kv=0.97), snapshot)


def test_least_load_prefers_idle_backends_and_round_robin_rotates():
    busy, idle = _backend("busy", in_flight=5), _backend("idle", in_flight=0)
    snapshot = Snapshot(0.0, [busy, idle])
    assert LeastLoad().score(make_request(1), idle, snapshot) > LeastLoad().score(make_request(1), busy, snapshot)
    assert LEAST_LOAD.create({}).route(make_request(1), [busy, idle], snapshot) is idle
    rr = ROUND_ROBIN.create({})
    assert [rr.route(make_request(i), [busy, idle], snapshot).name for i in range(4)] == [
        "busy",
        "idle",
        "busy",
        "idle",
    ]


def test_policy_params_are_validated_strictly():
    import pytest

    assert FCFS.create({"kv_limit": 0.9}).admission.kv_limit == 0.9
    with pytest.raises(ValueError, match="kv_limt"):
        EDF.create({"kv_limt": 0.9})
    with pytest.raises(ValueError, match="quantum_tokens"):
        PRIORITY_FAIR.create({"quantum_tokens": "lots"})


def test_evict_for_urgent_picks_the_youngest_silent_lower_band_request():
    from sloproxy.policies.parts import EvictForUrgent

    full = SimpleNamespace(
        name="b",
        models=frozenset({"m"}),
        healthy=True,
        in_flight=2,
        budget=2,
        urgent_budget=2,
        priority_scheduling=False,
        load=None,
        load_is_stale=True,
    )
    snapshot = Snapshot(10.0, [full])
    urgent = make_request(9, band=0, deadline=10.3)
    old, young, streaming = make_request(1, band=1), make_request(2, band=1), make_request(3, band=1)
    streaming.first_byte_sent = True
    for running in (old, young, streaming):
        running.backend = "b"
    policy = EvictForUrgent(margin_s=0.5)
    assert [e.request_id for e in policy.actions(snapshot, [urgent], [old, young, streaming])] == ["r2"]
    assert policy.actions(snapshot, [make_request(8, band=0, deadline=20.0)], [old, young]) == []  # not yet
    full.in_flight = 1  # room on the backend: nobody needs to leave
    assert policy.actions(snapshot, [urgent], [old, young]) == []


def test_prefix_affinity_follows_the_prefix_but_not_into_overload():
    from sloproxy.policies.parts import PrefixAffinity
    from sloproxy.request import prefix_hashes

    shared = "You are a helpful assistant. " * 40  # > 1 KiB of common system prompt
    first = make_request(1)
    first.prefix_hashes = prefix_hashes(
        {"messages": [{"role": "system", "content": shared}, {"role": "user", "content": "one"}]}
    )
    second = make_request(2)
    second.prefix_hashes = prefix_hashes(
        {"messages": [{"role": "system", "content": shared}, {"role": "user", "content": "two"}]}
    )
    assert len(first.prefix_hashes) == 4 and first.prefix_hashes[:3] == second.prefix_hashes[:3]
    a, b = _backend("a", in_flight=1), _backend("b", in_flight=1)
    snapshot = Snapshot(0.0, [a, b])
    policy = LEAST_LOAD.create({"prefix_affinity_weight": 2.0})
    owner = policy.route(first, [a, b], snapshot)
    other = b if owner is a else a
    assert policy.route(second, [a, b], snapshot) is owner  # the prefix cache is there
    owner.in_flight = 9  # but not onto an overloaded backend
    assert policy.route(second, [a, b], snapshot) is other
    assert PrefixAffinity().scores(make_request(3), [a, b], snapshot) == [0.0, 0.0]  # no prefix known


@settings(max_examples=150, deadline=None)
@given(request_specs, st.lists(st.floats(0, 30), min_size=1, max_size=60))
def test_edf_pops_what_it_peeked_even_when_deadlines_pass_in_between(specs, steps):
    """The scheduler peeks, places the head, then pops it: time moves in between (a slow admission,
    a loaded machine), and a head whose deadline passed meanwhile must still be the one popped. An
    EDF that re-judged overdue work at pop handed back another request, which then left the queue
    undispatched and its client waited forever (seen under valgrind, where every deadline passes)."""
    now = [0.0]
    ordering = edf()
    ordering.clock = lambda: now[0]
    requests = [make_request(i, *spec) for i, spec in enumerate(specs)]
    for request in requests:
        ordering.push(request)
    served = []
    for step in steps * 2:
        if not len(ordering):
            break
        head = ordering.peek()
        now[0] += step  # the head may be overdue by now
        assert ordering.pop() is head
        served.append(head)
        assert len(ordering) == len(requests) - len(served)
    while len(ordering):
        served.append(ordering.pop())
    assert ordering.peek() is None and sorted(map(id, served)) == sorted(map(id, requests))


def test_relative_least_load_keeps_its_scale_at_high_load():
    # 20 vs 30 in flight: absolutely 0.048 vs 0.032 (a 0.1-weight scorer outweighs it); relatively 1 vs 0.68.
    light, heavy = _backend("light", in_flight=20), _backend("heavy", in_flight=30)
    snapshot = Snapshot(0.0, [light, heavy])
    absolute = LeastLoad().scores(make_request(1), [light, heavy], snapshot)
    relative = LeastLoad(relative=True).scores(make_request(1), [light, heavy], snapshot)
    assert absolute[0] - absolute[1] < 0.02
    assert relative[0] == 1.0 and relative[1] < 0.7
