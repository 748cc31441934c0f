"""The engine core: continuous batching over a paged KV cache, timed by the roofline.

A pure state machine with no clock of its own: :meth:`Engine.plan_step` is handed the
current emulated time and decides the next iteration (which sequences, how many tokens
each, how long it takes); :meth:`Engine.complete_step` applies it when that time has
come. The asyncio driver in :mod:`.instance` calls these in real time, :mod:`.virtual` in virtual time.

Three scheduling styles, each following its engine's source:

* ``vllm`` — running sequences first, then waiting ones, in one mixed step under a token
  budget (chunked prefill); out of blocks -> preempt by recompute (FCFS: the last admitted;
  priority policy: the worst (priority, arrival), lower priority value runs first).
* ``sglang`` — prefill-first: a prefill (extend) batch whenever waiting work fits (keeping KV free
  for running requests' future tokens, max_new_tokens x a new-token ratio), else a
  decode batch; out of blocks while decoding -> retract the sequence with the fewest output
  tokens (longest prompt on ties); priority: higher value first, and a waiting request
  preempts a running one whose priority is at least 10 lower.
* ``tgi`` — FIFO; blocks for prompt + min(max_new_tokens, 1024) reserved up front; when the
  head does not fit it waits (head-of-line blocking); new requests are prefilled whole, in
  their own step; no preemption.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from .kvcache import KVCache
from .metrics_state import EngineStats
from .profiles import Profile
from .roofline import StepShape, step_time_ms

ENGINE_KINDS = ("vllm", "sglang", "tgi")
SGLANG_PRIORITY_PREEMPT_GAP = 10
# SGLang admits new prefills only while KV stays free for the running requests' future tokens,
# estimated as remaining max_new_tokens x new_token_ratio (it adapts between 0.7 and 0.1).
SGLANG_NEW_TOKEN_RATIO = 0.4
TGI_RESERVE_CAP = 1024


class SeqState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival_order = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the engine. Times are emulated seconds."""

    rid: str
    prompt_len: int
    block_hashes: list[int]
    target_tokens: int  # how many tokens the reply will have
    hit_limit: bool  # the reply ends because of max_new_tokens, not by itself
    max_new_tokens: int
    priority: int = 0
    arrival: float = 0.0
    on_progress: Callable[[Sequence], None] | None = None
    state: SeqState = SeqState.WAITING
    computed: int = 0  # tokens whose KV is in the cache
    output: int = 0  # generated tokens
    shared: list[int] = field(default_factory=list)  # prefix-cache blocks held (a contiguous prefix)
    private_blocks: int = 0
    reserved_blocks: int = 0  # TGI's up-front reservation not yet used
    can_register: bool = True
    cached_tokens: int = 0
    first_scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_at: float | None = None
    finish_reason: str | None = None  # stop | length | abort
    preemptions: int = 0
    order: int = field(default_factory=lambda: next(_arrival_order))

    @property
    def to_feed(self) -> int:
        """Known tokens whose KV is not computed yet (prompt + generated so far)."""
        return self.prompt_len + self.output - self.computed

    @property
    def finished(self) -> bool:
        return self.state is SeqState.FINISHED

    @property
    def first_token_at(self) -> float | None:
        return self.token_times[0] if self.token_times else None


@dataclass(slots=True)
class Step:
    start: float
    end: float
    work: list[tuple[Sequence, int]]
    shape: StepShape
    ends: list[float] | None = None  # a decode run (see Engine.plan_run): each iteration's end; ``end`` is the last


class _WaitingQueue:
    """FCFS deque or a priority heap; ``sign`` turns 'higher first' into a min-heap."""

    def __init__(self, priority: bool, higher_first: bool) -> None:
        self.priority = priority
        self.sign = -1 if higher_first else 1
        self._fifo: deque[Sequence] = deque()
        self._heap: list[tuple[int, float, int, Sequence]] = []

    def __len__(self) -> int:
        return len(self._heap) if self.priority else len(self._fifo)

    def __iter__(self):
        if self.priority:
            return (entry[3] for entry in sorted(self._heap))
        return iter(self._fifo)

    def push(self, seq: Sequence, *, front: bool = False) -> None:
        if self.priority:
            heapq.heappush(self._heap, (self.sign * seq.priority, seq.arrival, seq.order, seq))
        elif front:
            self._fifo.appendleft(seq)
        else:
            self._fifo.append(seq)

    def peek(self) -> Sequence:
        return self._heap[0][3] if self.priority else self._fifo[0]

    def pop(self) -> Sequence:
        return heapq.heappop(self._heap)[3] if self.priority else self._fifo.popleft()

    def remove(self, seq: Sequence) -> None:
        if self.priority:
            self._heap = [e for e in self._heap if e[3] is not seq]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(seq)


class Engine:
    """One emulated engine instance (one model on one GPU group)."""

    def __init__(
        self,
        kind: str,
        profile: Profile,
        *,
        priority_scheduling: bool = False,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        prefix_caching: bool = True,
        max_batch_prefill_tokens: int = 4096,
    ) -> None:
        if kind not in ENGINE_KINDS:
            raise ValueError(f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINE_KINDS)}")
        self.kind = kind
        self.profile = profile
        self.priority_scheduling = priority_scheduling and kind != "tgi"
        self.max_num_seqs = max_num_seqs or profile.max_num_seqs
        self.token_budget = max_num_batched_tokens or profile.max_num_batched_tokens
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.kv = KVCache(profile.num_gpu_blocks, profile.block_size, prefix_caching=prefix_caching)
        self.waiting = _WaitingQueue(self.priority_scheduling, higher_first=(kind == "sglang"))
        self.running: list[Sequence] = []
        self.current: Step | None = None
        self.stats = EngineStats()
        self.sleeping = False
        self.sleep_level = 0

    # ----- requests -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.state = SeqState.WAITING
        self.waiting.push(seq)
        self.stats.waiting_changed(len(self.waiting))
        inside = len(self.waiting) + len(self.running)
        if inside > self.stats.peak_in_engine:
            self.stats.peak_in_engine = inside

    def abort(self, seq: Sequence, now: float) -> None:
        """Client went away: free its KV now and count it as ``finished_reason="abort"``."""
        if seq.finished:
            return
        if seq.state is SeqState.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._free(seq)
        self._finish(seq, "abort", now)

    @property
    def num_in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def idle(self) -> bool:
        return not self.running and not len(self.waiting)

    # ----- iteration --------------------------------------------------------------------------
    def plan_step(self, now: float) -> Step | None:
        """Decide the iteration starting at ``now``; None when there is nothing to run."""
        if self.current is not None:
            raise RuntimeError("a step is already in flight")
        if self.sleeping or self.idle:
            return None
        if self.kind == "vllm":
            work = self._schedule_vllm()
        elif self.kind == "sglang":
            work = self._schedule_sglang()
        else:
            work = self._schedule_tgi()
        if not work:
            return None
        shape = StepShape()
        for seq, chunk in work:
            if seq.first_scheduled is None:
                seq.first_scheduled = now
                self.stats.observe_queue_time(now - seq.arrival)
            if seq.to_feed == 1 and seq.output > 0:
                shape.add_decode(seq.computed + 1)
            else:
                shape.add_prefill(chunk, seq.computed)
        duration = step_time_ms(self.profile, shape) / 1e3
        self.current = Step(now, now + duration, work, shape)
        return self.current

    def complete_step(self) -> list[Sequence]:
        """Apply the in-flight step at its end time; returns the sequences that produced a token."""
        step = self.current
        if step is None:
            return []
        self.current = None
        if step.ends is not None:
            return self._apply_run(step, len(step.ends))
        now = step.end
        progressed: list[Sequence] = []
        block_size = self.kv.block_size
        for seq, chunk in step.work:
            if seq.state is not SeqState.RUNNING:
                continue  # aborted or preempted while the step ran
            seq.computed += chunk
            self._register_full_blocks(seq, block_size)
            if seq.computed < seq.prompt_len + seq.output:
                continue  # a prefill chunk that did not reach the end
            seq.output += 1
            seq.token_times.append(now)
            self.stats.generation_tokens += 1
            if seq.output == 1:
                self.stats.prompt_tokens += seq.prompt_len
            if seq.output >= seq.target_tokens:
                self.running.remove(seq)
                self._free(seq)
                self._finish(seq, "length" if seq.hit_limit else "stop", now)
            progressed.append(seq)
            if seq.on_progress is not None:
                seq.on_progress(seq)
        self.stats.steps += 1
        self.stats.busy_seconds += step.end - step.start
        return progressed

    # ----- decode runs (the trace-driven simulator's fast path) ---------------------------------
    def plan_run(self, now: float, until: float, max_iterations: int = 4096) -> Step | None:
        """:meth:`plan_step`, or several identical decode iterations planned as one :class:`Step`.

        When nothing waits and every running sequence is decoding, consecutive iterations differ
        only in context lengths, so a run covers them up to the first finish, the iteration in
        flight at ``until``, or where the KV cache would run out. Applying it (:meth:`complete_step`)
        leaves exactly the state, times and counters that per-iteration planning would; anything
        that touches the engine before the run ends must call :meth:`cut_run` first. KV blocks are
        taken when iterations are applied, so cached blocks are evicted in the same order.
        """
        if self.current is not None:
            raise RuntimeError("a step is already in flight")
        work = self._decode_run_work()
        if work is None:
            return self.plan_step(now)
        kv = self.kv
        limit = min(max_iterations, min(seq.target_tokens - seq.output for seq in self.running))
        if limit < 2:
            return self.plan_step(now)
        if self._run_blocks(limit) > kv.free:  # the largest run that fits (the cache only fills)
            low, high = 1, limit
            while low < high:
                middle = (low + high + 1) // 2
                if self._run_blocks(middle) <= kv.free:
                    low = middle
                else:
                    high = middle - 1
            limit = low
            if limit < 2:
                return self.plan_step(now)
        shape = StepShape()
        for seq in self.running:
            shape.add_decode(seq.computed + 1)
        profile = self.profile
        count = len(self.running)
        ends: list[float] = []
        end = now
        while True:
            end = end + step_time_ms(profile, shape) / 1e3
            ends.append(end)
            if len(ends) >= limit or end >= until:
                break
            shape.decode_context_tokens += count
            shape.max_decode_context += 1
        if len(ends) < 2:
            return self.plan_step(now)
        self.current = Step(now, end, work, shape, ends)
        return self.current

    def _decode_run_work(self) -> list[tuple[Sequence, int]] | None:
        """The iteration's work in the engine's own order when a run applies, else None."""
        if self.sleeping or len(self.waiting) or not self.running:
            return None
        if self.kind == "vllm" and len(self.running) > self.token_budget:
            return None
        for seq in self.running:
            if seq.output == 0 or seq.computed != seq.prompt_len + seq.output - 1:
                return None  # prefilling (or recomputing after a preemption)
            if seq.can_register and len(seq.shared) < len(seq.block_hashes):
                return None
        ordered = self.running
        if self.kind == "sglang":  # its decode batch order (_schedule_sglang)
            ordered = sorted(self.running, key=lambda s: (s.output, -s.prompt_len), reverse=True)
        return [(seq, 1) for seq in ordered]

    def _run_blocks(self, iterations: int) -> int:
        """KV blocks to allocate so every running sequence can decode ``iterations`` more tokens."""
        blocks_for = self.kv.blocks_for
        total = 0
        for seq in self.running:
            need = blocks_for(seq.computed + iterations) - len(seq.shared) - seq.private_blocks - seq.reserved_blocks
            if need > 0:
                total += need
        return total

    def cut_run(self, now: float) -> Step | None:
        """Something touches the engine at ``now``: a run in flight keeps only the iterations done
        by then, and the one in flight becomes an ordinary step. Returns the step now in flight."""
        step = self.current
        if step is None or step.ends is None or now >= step.end:
            return step
        done = bisect_right(step.ends, now)
        self.current = None
        self._apply_run(step, done)
        start = step.ends[done - 1] if done else step.start
        single = self.plan_step(start)
        if single is None or single.end != step.ends[done]:
            raise RuntimeError("a cut decode run does not replan to the same iteration")
        return single

    def _apply_run(self, step: Step, iterations: int) -> list[Sequence]:
        """Apply the first ``iterations`` of a decode run (allocation, progress, counters)."""
        if iterations == 0:
            return []
        ends = step.ends
        assert ends is not None
        kv = self.kv
        times = ends[:iterations]
        now = times[-1]
        progressed: list[Sequence] = []
        for seq, _ in step.work:
            if seq.state is not SeqState.RUNNING:
                continue
            need = kv.blocks_for(seq.computed + iterations) - len(seq.shared) - seq.private_blocks
            if need > 0:
                from_reserve = min(need, seq.reserved_blocks)
                if not kv.allocate(need - from_reserve):
                    raise RuntimeError("a decode run ran out of KV blocks")
                seq.reserved_blocks -= from_reserve
                seq.private_blocks += need
            seq.computed += iterations
            seq.output += iterations
            seq.token_times.extend(times)
            if seq.output >= seq.target_tokens:
                self.running.remove(seq)
                self._free(seq)
                self._finish(seq, "length" if seq.hit_limit else "stop", now)
            progressed.append(seq)
            if seq.on_progress is not None:
                seq.on_progress(seq)
        stats = self.stats
        stats.generation_tokens += len(progressed) * iterations
        stats.steps += iterations
        start = step.start
        for end in times:
            stats.busy_seconds += end - start
            start = end
        return progressed

    # ----- scheduling styles -----------------------------------------------------------------
    def _schedule_vllm(self) -> list[tuple[Sequence, int]]:
        budget = self.token_budget
        work: list[tuple[Sequence, int]] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            chunk = min(seq.to_feed, budget)
            scheduled = True
            while not self.kv.allocate(self._blocks_needed(seq, chunk)):
                victim = self._vllm_victim()
                victim_index = self.running.index(victim)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    scheduled = False
                    break
                if victim_index < index:  # already scheduled this step: take it back out
                    index -= 1
                    for position, (scheduled_seq, scheduled_chunk) in enumerate(work):
                        if scheduled_seq is victim:
                            del work[position]
                            budget += scheduled_chunk
                            break
            if not scheduled:
                continue  # seq left self.running; same index now holds the next one
            work.append((seq, chunk))
            self._hold(seq, chunk)
            budget -= chunk
            index += 1
        if not preempted or not work:
            while len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting.peek()
                self._lookup_prefix(seq)
                chunk = min(seq.to_feed, budget)
                if not self.kv.allocate(self._blocks_needed(seq, chunk)):
                    self._undo_lookup(seq)
                    break
                self.waiting.pop()
                self._start(seq)
                work.append((seq, chunk))
                self._hold(seq, chunk)
                budget -= chunk
        self.stats.waiting_changed(len(self.waiting))
        return work

    def _vllm_victim(self) -> Sequence:
        if self.priority_scheduling:
            return max(self.running, key=lambda s: (s.priority, s.arrival, s.order))
        return self.running[-1]

    def _schedule_sglang(self) -> list[tuple[Sequence, int]]:
        work = self._sglang_prefill_batch()
        if work:
            return work
        # Decode batch: every running sequence that has finished its (re)prefill.
        decoding = [s for s in self.running if s.output > 0 and s.to_feed == 1]
        decoding.sort(key=lambda s: (s.output, -s.prompt_len), reverse=True)
        while decoding and self.kv.free < sum(self._blocks_needed(s, 1) for s in decoding):
            victim = decoding.pop()  # fewest output tokens, longest prompt
            self._preempt(victim)
        for seq in decoding:
            self.kv.allocate(self._blocks_needed(seq, 1))
            self._hold(seq, 1)
            work.append((seq, 1))
        return work

    def _sglang_prefill_batch(self) -> list[tuple[Sequence, int]]:
        budget = self.token_budget
        work: list[tuple[Sequence, int]] = []
        # A chunked prefill (or the recompute of a retracted sequence) in progress continues first.
        for seq in self.running:
            if (seq.output == 0 or seq.to_feed > 1) and budget > 0:
                chunk = min(seq.to_feed, budget)
                if not self.kv.allocate(self._blocks_needed(seq, chunk)):
                    return work
                self._hold(seq, chunk)
                work.append((seq, chunk))
                budget -= chunk
        reserve = self._sglang_decode_reserve()
        while len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            self._lookup_prefix(seq)
            chunk = min(seq.to_feed, budget)
            need = self._blocks_needed(seq, chunk)
            if (self.running and self.kv.free - need < reserve) or not self.kv.allocate(need):
                self._undo_lookup(seq)
                if not self._sglang_priority_preempt(seq, scheduled={id(s) for s, _ in work}):
                    break
                reserve = self._sglang_decode_reserve()
                continue
            self.waiting.pop()
            self._start(seq)
            self._hold(seq, chunk)
            work.append((seq, chunk))
            budget -= chunk
        self.stats.waiting_changed(len(self.waiting))
        return work

    def _sglang_decode_reserve(self) -> int:
        """Blocks kept free for the running sequences' estimated future tokens."""
        future = sum(s.max_new_tokens - s.output for s in self.running)  # the engine cannot know true lengths
        return self.kv.blocks_for(int(max(future, 0) * SGLANG_NEW_TOKEN_RATIO))

    def _sglang_priority_preempt(self, incoming: Sequence, scheduled: set[int]) -> bool:
        """Retract the lowest-priority running sequence not already in this step, if the gap allows."""
        candidates = [s for s in self.running if id(s) not in scheduled]
        if not self.priority_scheduling or not candidates:
            return False
        victim = min(candidates, key=lambda s: (s.priority, -s.arrival))
        if incoming.priority - victim.priority < SGLANG_PRIORITY_PREEMPT_GAP:
            return False
        self._preempt(victim)
        return True

    def _schedule_tgi(self) -> list[tuple[Sequence, int]]:
        work: list[tuple[Sequence, int]] = []
        prefill_tokens = 0
        while len(self.waiting) and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            if work and prefill_tokens + seq.to_feed > self.max_batch_prefill_tokens:
                break
            self._lookup_prefix(seq)
            reserve = self.kv.blocks_for(seq.prompt_len + min(seq.max_new_tokens, TGI_RESERVE_CAP))
            reserve -= len(seq.shared)
            if not self.kv.allocate(reserve):
                self._undo_lookup(seq)
                break  # head-of-line blocking: nothing behind the head may pass it
            self.waiting.pop()
            self._start(seq)
            seq.reserved_blocks = reserve
            chunk = seq.to_feed
            self._hold(seq, chunk)
            work.append((seq, chunk))
            prefill_tokens += chunk
        self.stats.waiting_changed(len(self.waiting))
        if work:
            return work  # new requests are prefilled in a step of their own
        for seq in self.running:
            need = self._blocks_needed(seq, 1)
            if need and not self.kv.allocate(need):
                continue  # past its reservation and out of blocks: it waits (no preemption)
            self._hold(seq, 1)
            work.append((seq, 1))
        return work

    # ----- block bookkeeping -----------------------------------------------------------------
    def _held_blocks(self, seq: Sequence) -> int:
        return len(seq.shared) + seq.private_blocks

    def _blocks_needed(self, seq: Sequence, chunk: int) -> int:
        """New blocks to allocate so ``chunk`` more tokens fit (TGI draws on its reservation first)."""
        need = self.kv.blocks_for(seq.computed + chunk) - self._held_blocks(seq)
        if seq.reserved_blocks:
            return max(0, need - seq.reserved_blocks)
        return max(0, need)

    def _hold(self, seq: Sequence, chunk: int) -> None:
        need = self.kv.blocks_for(seq.computed + chunk) - self._held_blocks(seq)
        if need <= 0:
            return
        from_reserve = min(need, seq.reserved_blocks)
        seq.reserved_blocks -= from_reserve
        seq.private_blocks += need

    def _register_full_blocks(self, seq: Sequence, block_size: int) -> None:
        while seq.can_register and len(seq.shared) < len(seq.block_hashes):
            if seq.computed < (len(seq.shared) + 1) * block_size:
                return
            if self.kv.register(seq.block_hashes[len(seq.shared)]):
                seq.shared.append(seq.block_hashes[len(seq.shared)])
                seq.private_blocks -= 1
            else:
                seq.can_register = False

    def _lookup_prefix(self, seq: Sequence) -> None:
        """Take the cached prefix of a sequence about to be admitted (again, after a preemption).

        The last known token is always recomputed to produce logits. vLLM only reuses whole
        blocks below that token; SGLang's radix cache (page size 1) reuses up to it.
        """
        known = seq.prompt_len + seq.output
        limit = (known - 1) // self.kv.block_size if self.kind == "vllm" else None
        seq.shared = self.kv.match_prefix(seq.block_hashes, limit)
        seq.computed = min(len(seq.shared) * self.kv.block_size, known - 1)

    def _undo_lookup(self, seq: Sequence) -> None:
        """Admission did not go ahead: a waiting sequence holds no blocks."""
        self.kv.release_shared(seq.shared)
        seq.shared = []
        seq.computed = 0

    def _start(self, seq: Sequence) -> None:
        if seq.output == 0:
            seq.cached_tokens = seq.computed
        self.kv.record_lookup(seq.prompt_len, seq.computed)
        self.stats.prefix_hit_tokens = self.kv.hits_tokens
        self.stats.prefix_query_tokens = self.kv.queries_tokens
        seq.state = SeqState.RUNNING
        self.running.append(seq)

    def _free(self, seq: Sequence) -> None:
        self.kv.release_shared(seq.shared)
        self.kv.release(seq.private_blocks + seq.reserved_blocks)
        seq.shared = []
        seq.private_blocks = 0
        seq.reserved_blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute (vLLM) / retraction (SGLang): drop KV, back to the queue head."""
        self.running.remove(seq)
        self._free(seq)
        seq.computed = 0
        seq.can_register = True
        seq.preemptions += 1
        seq.state = SeqState.WAITING
        self.waiting.push(seq, front=True)
        self.stats.preemptions += 1

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        seq.state = SeqState.FINISHED
        seq.finish_reason = reason
        seq.finished_at = now
        self.stats.record_finish(seq, now)
        if reason == "abort" and seq.on_progress is not None:
            seq.on_progress(seq)

    # ----- admin ------------------------------------------------------------------------------
    def preempt_all(self) -> None:
        for seq in list(reversed(self.running)):
            self._preempt(seq)

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset()
