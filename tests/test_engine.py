"""Engine core behaviour in virtual time: scheduling, KV accounting, preemption, timing.

Plain synchronous tests: each builds an :class:`Engine`, queues sequences made by
``virtual.make_sequence`` and steps it with ``plan_step`` / ``complete_step`` (directly or
through ``virtual.run_until_idle``). No servers, no wall clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from sloproxy.emulator.engine import TGI_RESERVE_CAP, Engine, SeqState, Sequence, Step
from sloproxy.emulator.profiles import get_profile
from sloproxy.emulator.roofline import StepShape, step_time_ms
from sloproxy.emulator.virtual import make_sequence, run_until_idle

A10 = get_profile("a10-llama2-7b")  # 729 KV blocks of 16 tokens, token budget 2048
H100 = get_profile("h100-llama3-8b")  # 25,720 KV blocks, token budget 8192
KINDS = ("vllm", "sglang", "tgi")


# ----- helpers ------------------------------------------------------------------------------
def submit(engine: Engine, count: int, prompt: int, output: int, at: float = 0.0, **kw: object) -> list[Sequence]:
    seqs = [make_sequence(engine, prompt, output, at, **kw) for _ in range(count)]
    for seq in seqs:
        engine.add(seq)
    return seqs


def drain(engine: Engine, now: float = 0.0) -> float:
    """Run until idle; fail loudly if the engine stops planning while work is still queued."""
    end = run_until_idle(engine, now)
    assert engine.idle, (
        f"engine stalled at t={end:.3f}s: plan_step returned None with {len(engine.running)} running, "
        f"{len(engine.waiting)} waiting, {engine.kv.used}/{engine.kv.num_blocks} KV blocks in use"
    )
    return end


def steps(engine: Engine, now: float = 0.0) -> Iterator[Step]:
    """Yield each planned step (state as planned), then apply it; ends when nothing is planned."""
    while (step := engine.plan_step(now)) is not None:
        yield step
        engine.complete_step()
        now = step.end


def advance(engine: Engine, now: float, until) -> float:
    """Step until ``until()`` holds; returns the emulated time reached."""
    for _ in range(100_000):
        if until():
            return now
        step = engine.plan_step(now)
        assert step is not None, "engine went idle before the condition held"
        engine.complete_step()
        now = step.end
    raise AssertionError("condition never held")


def blocks_held_by_running(engine: Engine) -> int:
    """KV blocks the running sequences account for (a shared prefix block counts once)."""
    shared = {h for seq in engine.running for h in seq.shared}
    return len(shared) + sum(seq.private_blocks + seq.reserved_blocks for seq in engine.running)


def assert_all_finished_exactly(seqs: list[Sequence], output: int) -> None:
    assert [s.output for s in seqs] == [output] * len(seqs)
    assert {s.finish_reason for s in seqs} == {"length"}
    assert all(len(s.token_times) == output for s in seqs)


# ----- 1, 2: preemption under KV pressure ---------------------------------------------------
# Regression: queued sequences once pinned prefix blocks and vLLM deadlocked under this load.
def test_vllm_preempts_by_recompute_under_kv_pressure() -> None:
    """vLLM out of blocks preempts (recompute) and still completes every request exactly.

    16 x (1000 prompt + 1000 output) need 2000 blocks at peak; the A10 profile has 729.
    """
    engine = Engine("vllm", A10)
    assert engine.kv.num_blocks == 729
    seqs = submit(engine, 16, 1000, 1000)
    drain(engine)
    assert engine.stats.preemptions > 0
    assert_all_finished_exactly(seqs, 1000)
    assert engine.stats.finished["length"] == 16
    assert engine.kv.used == 0


# Regression: a failed admission once kept the cached blocks its prefix lookup took.
@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_waiting_sequences_hold_no_kv_blocks(kind: str) -> None:
    """Only running sequences hold KV: a queued (or preempted) request pins no blocks.

    vLLM looks up the prefix cache for a waiting request but takes the blocks only when
    ``allocate_slots`` succeeds; SGLang locks radix nodes only for requests it adds to a batch.
    So after every scheduling decision, used blocks == blocks held by running sequences.
    """
    engine = Engine(kind, A10)
    submit(engine, 16, 1000, 1000)
    for step in steps(engine):
        pinned = {s.rid: len(s.shared) + s.private_blocks for s in engine.waiting if s.shared or s.private_blocks}
        assert not pinned, f"at t={step.start:.3f}s waiting sequences hold KV blocks: {pinned}"
        assert engine.kv.used == blocks_held_by_running(engine)


def test_sglang_retracts_fewest_output_under_kv_pressure() -> None:
    """SGLang out of blocks while decoding retracts the sequence with the fewest output tokens.

    Same load as the vLLM case: retractions happen, each retracted sequence had no more output
    than any sequence kept decoding, and every request still ends with exactly 1000 tokens.
    """
    engine = Engine("sglang", A10)
    seqs = submit(engine, 16, 1000, 1000)
    seen = {s.rid: 0 for s in seqs}
    for step in steps(engine):
        retracted = [s for s in seqs if s.preemptions > seen[s.rid]]  # in this step's planning
        if retracted:
            kept = [s.output for s, _ in step.work]
            assert max(s.output for s in retracted) <= min(kept, default=math.inf)
            seen.update((s.rid, s.preemptions) for s in retracted)
    assert engine.idle
    assert engine.stats.preemptions > 0
    assert sum(s.preemptions for s in seqs) == engine.stats.preemptions
    assert_all_finished_exactly(seqs, 1000)
    assert engine.kv.used == 0


# Regression: SGLang once recomputed a resumed sequence (output > 0) one token per step.
@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_preempted_sequence_recomputes_in_full_chunks(kind: str) -> None:
    """A preempted sequence longer than the token budget re-prefills in budget-sized chunks.

    Sleep preempts everything and resets the prefix cache; on resume a sequence with
    1500 prompt + 700 generated tokens (2200 > budget 2048) must recompute as 2048 + 152,
    i.e. its next token comes after two steps (vLLM running-queue chunking, SGLang chunked_req).
    """
    engine = Engine(kind, A10)
    (seq,) = submit(engine, 1, 1500, 1000)
    now = advance(engine, 0.0, lambda: seq.output == 700)
    engine.preempt_all()  # what sleep does, followed by a prefix-cache reset
    engine.reset_prefix_cache()
    assert seq.state is SeqState.WAITING and seq.computed == 0
    chunks: list[int] = []
    while seq.output == 700 and len(chunks) < 3:
        step = engine.plan_step(now)
        assert step is not None
        chunks += [chunk for s, chunk in step.work if s is seq]
        engine.complete_step()
        now = step.end
    assert chunks == [2048, 152]


# ----- 3, 4: TGI reservation and head-of-line blocking ---------------------------------------
def test_tgi_reserves_blocks_up_front_and_never_preempts() -> None:
    """TGI admits a request only if prompt + min(max_new_tokens, 1024) fits, so it never preempts.

    500 + 1000 tokens reserve ceil(1500 / 16) = 94 blocks: at most floor(729 / 94) = 7 run at
    once while the rest wait. vLLM, which allocates lazily, runs more than 7 on the same load.
    """
    per_request = math.ceil((500 + min(1000, TGI_RESERVE_CAP)) / 16)
    cap = A10.num_gpu_blocks // per_request
    assert (per_request, cap) == (94, 7)

    engine = Engine("tgi", A10)
    seqs = submit(engine, 20, 500, 1000)
    peak_while_waiting = 0
    for _ in steps(engine):
        assert len(engine.running) <= cap
        if len(engine.waiting):
            peak_while_waiting = max(peak_while_waiting, len(engine.running))
    assert engine.idle
    assert peak_while_waiting == cap
    assert engine.stats.preemptions == 0
    assert_all_finished_exactly(seqs, 1000)
    assert engine.kv.used == 0

    vllm = Engine("vllm", A10)
    submit(vllm, 20, 500, 1000)
    peak = 0
    for count, _ in enumerate(steps(vllm)):
        peak = max(peak, len(vllm.running))
        if peak > cap or count == 50:
            break
    assert peak > cap


def test_tgi_head_of_line_blocking() -> None:
    """TGI is strictly FIFO: a small request that would fit waits behind a head that does not."""
    engine = Engine("tgi", A10)
    fillers = submit(engine, 5, 1000, 1000)  # 5 x 125 reserved blocks -> 104 left
    now = advance(engine, 0.0, lambda: not len(engine.waiting))
    assert engine.kv.free == 729 - 5 * 125

    head = make_sequence(engine, 1000, 1000, now)  # needs 125 blocks
    small = make_sequence(engine, 100, 100, now)  # needs 13 blocks: it would fit
    engine.add(head)
    engine.add(small)
    assert engine.kv.blocks_for(100 + 100) <= engine.kv.free < engine.kv.blocks_for(1000 + 1000)

    for _ in range(20):
        step = engine.plan_step(now)
        assert step is not None
        assert {s.rid for s, _ in step.work} == {s.rid for s in fillers}
        assert head.state is SeqState.WAITING and small.state is SeqState.WAITING
        assert engine.stats.num_waiting == 2
        engine.complete_step()
        now = step.end

    drain(engine, now)
    assert head.first_scheduled is not None and small.first_scheduled is not None
    assert small.first_scheduled >= head.first_scheduled
    assert min(f.finished_at for f in fillers) <= head.first_scheduled
    assert engine.stats.preemptions == 0


# ----- 5: priority --------------------------------------------------------------------------
def _completion_order(kind: str, priorities: list[int]) -> list[int]:
    """One sequence starts; then sequences with ``priorities`` arrive together; max_num_seqs=1."""
    engine = Engine(kind, H100, priority_scheduling=True, max_num_seqs=1)
    (first,) = submit(engine, 1, 64, 20)
    step = engine.plan_step(0.0)
    assert step is not None and first.state is SeqState.RUNNING
    engine.complete_step()
    later = [make_sequence(engine, 64, 20, step.end, priority=p) for p in priorities]
    for seq in later:
        engine.add(seq)
    drain(engine, step.end)
    assert first.finished_at < min(s.finished_at for s in later)
    return [s.priority for s in sorted(later, key=lambda s: s.finished_at)]


# Regression: the victim could be a sequence already in this prefill batch.
def test_sglang_priority_preemption_never_schedules_a_sequence_twice() -> None:
    """A high-priority arrival that preempts a lower one never leaves it in the batch twice.

    Setup on A10 (729 blocks, budget 2048): D (priority 50, 8832-token prompt = 552 blocks) is
    decoding; L (priority 0, 2500 tokens) has had its first 2048-token chunk (128 blocks), so
    49 blocks are free. H (priority 100, 800 tokens = 50 blocks) arrives. The next prefill batch
    continues L (452 tokens), cannot fit H, preempts L (gap 100 >= 10), admits H and then
    re-admits L: L must appear at most once in that step and its KV must cover what it computed.
    """
    engine = Engine("sglang", A10, priority_scheduling=True)
    (d,) = submit(engine, 1, 8832, 50, priority=50)
    now = advance(engine, 0.0, lambda: d.output > 0)
    (low,) = submit(engine, 1, 2500, 50, at=now, priority=0)
    now = advance(engine, now, lambda: low.computed == 2048)
    submit(engine, 1, 800, 50, at=now, priority=100)  # H
    assert engine.kv.free == 729 - 552 - 128

    step = engine.plan_step(now)
    assert step is not None
    scheduled = [s.rid for s, _ in step.work]
    chunks = [(s.rid, chunk) for s, chunk in step.work]
    assert sorted(scheduled) == sorted(set(scheduled)), f"a sequence scheduled twice: {chunks} (L={low.rid})"
    engine.complete_step()
    assert engine.kv.blocks_for(low.computed) <= len(low.shared) + low.private_blocks
    assert engine.kv.used == blocks_held_by_running(engine)


def test_vllm_priority_runs_lower_values_first() -> None:
    """vLLM's priority policy: lower ``priority`` value is scheduled first."""
    assert _completion_order("vllm", [5, 1, 3, 0, 4]) == [0, 1, 3, 4, 5]


def test_sglang_priority_runs_higher_values_first() -> None:
    """SGLang's priority scheduling: higher ``priority`` value is scheduled first."""
    assert _completion_order("sglang", [5, 1, 3, 0, 4]) == [5, 4, 3, 1, 0]


# ----- 6: abort ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_abort_running_sequence_frees_its_kv(kind: str) -> None:
    """Client disconnect mid-decode: the sequence's blocks (and TGI's reservation) come back.

    The abort lands while a step is in flight, as it does in the real-time runner: that step
    produces no token for the aborted sequence.
    """
    engine = Engine(kind, A10)
    used_before = engine.kv.used
    (seq,) = submit(engine, 1, 1000, 1000)
    now = advance(engine, 0.0, lambda: seq.output == 10)
    assert engine.kv.used > used_before
    step = engine.plan_step(now)
    assert step is not None and seq in [s for s, _ in step.work]
    engine.abort(seq, now)
    assert engine.kv.used == used_before
    assert engine.complete_step() == []
    assert seq.output == 10
    assert seq.state is SeqState.FINISHED and seq.finish_reason == "abort"
    assert engine.stats.finished["abort"] == 1
    assert engine.idle and engine.plan_step(step.end) is None


@pytest.mark.parametrize("kind", KINDS)
def test_abort_waiting_sequence_leaves_the_queue(kind: str) -> None:
    """Aborting a queued request removes it; it is never scheduled and the rest runs normally."""
    engine = Engine(kind, A10, max_num_seqs=1)
    running, queued = submit(engine, 2, 200, 50)
    step = engine.plan_step(0.0)
    assert step is not None
    engine.complete_step()
    assert running.state is SeqState.RUNNING and queued.state is SeqState.WAITING
    engine.abort(queued, step.end)
    assert len(engine.waiting) == 0
    assert queued.finish_reason == "abort" and engine.stats.finished["abort"] == 1
    drain(engine, step.end)
    assert queued.first_scheduled is None and queued.output == 0
    assert running.output == 50 and running.finish_reason == "length"
    assert engine.kv.used == 0


# ----- 7: prefix caching -------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_cache_reuses_full_blocks(kind: str) -> None:
    """A repeated prompt reuses the cached full blocks of the first: fewer tokens to prefill."""
    engine = Engine(kind, H100)
    (first,) = submit(engine, 1, 1000, 10, unique=False)
    end = drain(engine)
    hits_before = engine.kv.hits_tokens
    (second,) = submit(engine, 1, 1000, 10, at=end, unique=False)
    drain(engine, end)
    assert first.cached_tokens == 0
    assert second.cached_tokens == (1000 // 16) * 16 == 992
    assert engine.kv.hits_tokens - hits_before == 992
    assert engine.stats.prefix_hit_tokens == engine.kv.hits_tokens
    assert second.token_times[0] - second.arrival < first.token_times[0] - first.arrival
    assert engine.kv.used == 0


def test_prefix_cache_disabled_never_hits() -> None:
    """With prefix caching off, an identical prompt is prefilled from scratch."""
    engine = Engine("vllm", H100, prefix_caching=False)
    submit(engine, 1, 1000, 10, unique=False)
    end = drain(engine)
    (second,) = submit(engine, 1, 1000, 10, at=end, unique=False)
    drain(engine, end)
    assert second.cached_tokens == 0
    assert engine.kv.hits_tokens == 0


# Regression: vLLM once reported 1023 cached tokens (and counted 1024 hit tokens).
def test_vllm_full_prefix_hit_is_block_aligned() -> None:
    """vLLM caps a full hit at prompt - 1 tokens, rounded down to a block: a repeated
    1024-token prompt reports 1008 cached tokens (the last block is recomputed), not 1023.
    """
    engine = Engine("vllm", H100)
    submit(engine, 1, 1024, 10, unique=False)
    end = drain(engine)
    hits_before = engine.kv.hits_tokens
    (second,) = submit(engine, 1, 1024, 10, at=end, unique=False)
    drain(engine, end)
    cached, hit = second.cached_tokens, engine.kv.hits_tokens - hits_before
    assert (cached, hit) == (1008, 1008)


# ----- 8, 9: step timing and chunked prefill ------------------------------------------------
def _first_decode_step(batch: int, prompt: int) -> Step:
    engine = Engine("vllm", H100)
    submit(engine, batch, prompt, 100)  # long enough that nobody finishes before the first pure decode
    for step in steps(engine):
        if step.shape.prefill_tokens == 0:
            return step
    raise AssertionError("no decode step")


def test_decode_step_time_grows_with_batch_and_context() -> None:
    """A decode iteration costs more with more sequences and with longer contexts (KV reads)."""
    by_batch = [_first_decode_step(batch, 1000) for batch in (1, 16, 128)]
    for step, batch in zip(by_batch, (1, 16, 128), strict=True):
        assert step.shape.decode_seqs == batch
        expected = StepShape()
        for seq, chunk in step.work:
            assert chunk == 1  # early sequences already decoded during the later prefills (mixed steps)
            expected.add_decode(seq.computed + 1)
        assert step.end - step.start == pytest.approx(step_time_ms(H100, expected) / 1e3)
    durations = [s.end - s.start for s in by_batch]
    assert durations == sorted(durations) and len(set(durations)) == 3

    short, long = _first_decode_step(1, 500), _first_decode_step(1, 6000)
    assert short.shape.max_decode_context == 501 and long.shape.max_decode_context == 6001
    assert long.end - long.start > short.end - short.start


def test_prefill_step_takes_at_least_the_floor() -> None:
    """Any step that runs prefill costs at least ``prefill_floor_ms``; pure decode does not."""
    floor_s = H100.efficiency.prefill_floor_ms / 1e3
    engine = Engine("vllm", H100)
    submit(engine, 1, 10, 3)
    taken = list(steps(engine))
    assert [s.shape.prefill_tokens for s in taken] == [10, 0, 0]
    assert taken[0].end - taken[0].start == pytest.approx(floor_s)
    assert all(s.end - s.start < floor_s for s in taken[1:])


def test_ttft_of_single_request_is_one_prefill_step() -> None:
    """An idle H100 answers a 1024-token prompt's first token after exactly one prefill step."""
    engine = Engine("vllm", H100)
    (seq,) = submit(engine, 1, 1024, 5)
    drain(engine)
    shape = StepShape()
    shape.add_prefill(1024, 0)
    assert seq.first_token_at - seq.arrival == pytest.approx(step_time_ms(H100, shape) / 1e3)
    assert seq.first_scheduled == seq.arrival == 0.0


def test_vllm_chunked_prefill_of_a_long_prompt() -> None:
    """A 20,000-token prompt under an 8192-token budget takes 3 prefill chunks before token one."""
    engine = Engine("vllm", H100)
    (seq,) = submit(engine, 1, 20_000, 2)
    before_first_token: list[Step] = []
    for step in steps(engine):
        if seq.output == 0:
            before_first_token.append(step)
    assert [s.work[0][1] for s in before_first_token] == [8192, 8192, 20_000 - 2 * 8192]
    assert seq.first_token_at == before_first_token[-1].end
    assert seq.output == 2 and seq.finish_reason == "length"


# ----- 10: sleep -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_sleeping_engine_plans_nothing(kind: str) -> None:
    """A sleeping engine (vLLM sleep mode, SGLang memory release) runs no step with work queued."""
    engine = Engine(kind, H100)
    (seq,) = submit(engine, 1, 100, 5)
    engine.sleeping = True
    assert engine.plan_step(0.0) is None
    assert seq.state is SeqState.WAITING and engine.stats.steps == 0
    engine.sleeping = False
    assert engine.plan_step(1.0) is not None
