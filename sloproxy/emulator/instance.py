"""One emulated engine instance: the engine core, its real-time driver, and what requests need.

The driver maps emulated time to wall-clock time with a speedup ``K``: an iteration that
takes ``t`` emulated seconds takes ``t / K`` real seconds. Every timing the instance reports
(metrics, headers, ``e2e_latency``) is in emulated seconds, so numbers stay consistent
whatever ``K`` is. Steps run back to back in emulated time; if the event loop falls behind,
the driver catches up without sleeping (yielding between steps) instead of drifting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .engine import Engine, Sequence
from .lengths import LengthTable, prompt_key, reply_length
from .profiles import Profile
from .tokens import block_hashes, piece_for, token_ids
from .versions import parse_version, version_string

if TYPE_CHECKING:
    from .faults import Fault


@dataclass(slots=True)
class InstanceConfig:
    name: str
    engine: str
    model: str
    profile: Profile
    port: int
    host: str = "127.0.0.1"
    speedup: float = 1.0
    max_model_len: int | None = None
    priority_scheduling: bool = False
    max_num_seqs: int | None = None
    max_concurrent_requests: int = 128  # TGI: in flight past this -> 429 (in-stream error when streaming)
    # vLLM --max-num-queued-reqs (running + waiting past this -> 503); SGLang --max-queued-requests
    # (waiting queue past this -> 503). TGI has no such limit.
    max_queued_requests: int | None = None
    lengths: LengthTable | None = None
    prefix_caching: bool = True
    legacy_errors: bool = False  # vLLM: flat {"object": "error", ...} bodies as older releases send
    sse_space: bool | None = None  # TGI: "data: " or "data:"; None: as engine_version (space since 2.1)
    start_asleep: int = 0  # 0 awake; 1 as after sleep level 1; 2 cold: weights not loaded (wake reads disk)
    engine_version: str | None = None  # None: the newest release modelled (versions.DEFAULT_VERSIONS)
    disable_log_stats: bool = False  # vLLM --disable-log-stats: /metrics without the engine families
    request_header_overrides: bool = False  # SGLang SGLANG_ENABLE_REQUEST_HEADER_OVERRIDES=1


@dataclass(slots=True)
class Generation:
    """A submitted request as the HTTP layer sees it."""

    seq: Sequence
    seed: int
    prompt_tokens: int
    cached_tokens: int = 0
    error: tuple[int, str] | None = None  # aborted by the engine with an HTTP status (SGLang queue eviction)
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def piece(self, index: int) -> str:
        return piece_for(self.seed, index)

    async def updates(self) -> AsyncIterator[int]:
        """Yield the number of tokens generated so far each time it grows; ends when finished."""
        sent = 0
        seq = self.seq
        while True:
            if seq.output > sent:
                sent = seq.output
                yield sent
            if seq.finished:
                return
            self._event.clear()
            await self._event.wait()


class Instance:
    _rid_counter = itertools.count(1)

    def __init__(self, config: InstanceConfig) -> None:
        self.config = config
        self.version_string = version_string(config.engine, config.engine_version)
        self.version = parse_version(self.version_string)
        profile = config.profile
        self.max_model_len = min(config.max_model_len or profile.model.max_position, profile.kv_capacity_tokens)
        self.engine = Engine(
            config.engine,
            profile,
            priority_scheduling=config.priority_scheduling,
            max_num_seqs=config.max_num_seqs,
            prefix_caching=config.prefix_caching,
        )
        self.speedup = config.speedup
        self.lora_adapters: dict[str, str] = {}  # name -> path
        self.healthy = True
        self.fault: Fault | None = None  # injected misbehaviour (faults.py); None on the normal path
        self.started_at = time.time()
        self._t0 = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._generations: dict[str, Generation] = {}
        self._held: list[Sequence] | None = None  # vLLM sleep mode "wait": new requests wait outside
        self.asleep_tags: set[str] = set()  # memory still released: "weights", "kv_cache"
        self.seen_priorities: set[int] = set()  # SGLang metrics keep exporting a priority once seen
        if config.start_asleep:  # started with sleep mode on and nothing loaded yet (or put to sleep before)
            self.engine.sleeping = True
            self.engine.sleep_level = config.start_asleep
            self.asleep_tags = {"weights", "kv_cache"}

    # ----- clock -------------------------------------------------------------------------------
    def now(self) -> float:
        """Emulated seconds since the instance started."""
        return (asyncio.get_running_loop().time() - self._t0) * self.speedup

    def real_seconds(self, emulated: float) -> float:
        return emulated / self.speedup

    async def sleep_emulated(self, seconds: float) -> None:
        await asyncio.sleep(seconds / self.speedup)

    # ----- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._drive(), name=f"engine-{self.config.name}")

    async def stop(self) -> None:
        if self.fault is not None:
            self.fault.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        self._wake.set()

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        step_start: float | None = None  # emulated time the next step starts, when back to back
        while True:
            now = self.now()
            start = now if step_start is None else max(step_start, 0.0)
            step = engine.plan_step(start)
            if step is None:
                # Idle, asleep, or nothing fits: only an arrival, abort or wake-up changes that.
                step_start = None
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._t0 + step.end / self.speedup - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # behind schedule: catch up, but let handlers run
            engine.complete_step()
            step_start = step.end

    # ----- requests ----------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"{next(self._rid_counter):x}{int(time.time() * 1000) % 100000:05d}"

    def submit(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        rid: str | None = None,
        ignore_eos: bool = False,
        priority: int = 0,
        min_tokens: int = 0,
        prompt_ids: list[int] | None = None,
    ) -> Generation:
        """Queue one request in the engine; the caller has already validated lengths."""
        ids = prompt_ids if prompt_ids is not None else token_ids(prompt)
        key = prompt_key(prompt) if prompt_ids is None else prompt_key(" ".join(map(str, prompt_ids)))
        target, hit_limit = reply_length(
            key, max_new_tokens, ignore_eos=ignore_eos, table=self.config.lengths, min_tokens=min_tokens
        )
        generation: Generation
        rid = rid or self.new_request_id()

        def on_progress(_: Sequence) -> None:
            generation._event.set()

        seq = Sequence(
            rid=rid,
            prompt_len=len(ids),
            block_hashes=block_hashes(ids, self.engine.kv.block_size),
            target_tokens=target,
            hit_limit=hit_limit,
            max_new_tokens=max_new_tokens,
            priority=priority,
            arrival=self.now(),
            on_progress=on_progress,
        )
        generation = Generation(seq=seq, seed=int(key, 16), prompt_tokens=len(ids))
        self.engine.stats.requests_received += 1
        if self._held is not None:
            self._held.append(seq)
        else:
            self.engine.add(seq)
        self._generations[rid] = generation
        self.wake()
        return generation

    def release(self, generation: Generation) -> None:
        """The HTTP side is done with it: abort if unfinished (client gone), forget it."""
        if not generation.seq.finished:
            self._abort_seq(generation.seq)
        self._generations.pop(generation.seq.rid, None)

    def abort(self, rid: str, error: tuple[int, str] | None = None) -> bool:
        """Abort a request; ``error`` (status, message) makes its reply an error instead of a short reply."""
        generation = self._generations.get(rid)
        if generation is None or generation.seq.finished:
            return False
        generation.error = error
        self._abort_seq(generation.seq)
        return True

    def _abort_seq(self, seq: Sequence) -> None:
        if self._held is not None and seq in self._held:
            self._held.remove(seq)
            self.engine._finish(seq, "abort", self.now())
        else:
            self.engine.abort(seq, self.now())
        self.wake()

    def abort_all(self) -> int:
        count = 0
        for rid in list(self._generations):
            count += self.abort(rid)
        return count

    def count_tokens_of(self, text: str) -> int:
        return len(token_ids(text))

    # ----- sleep / wake (vLLM sleep mode, SGLang memory release) ----------------------------------
    def sleep_cost(self, level: int) -> float:
        """Emulated seconds to go to sleep: level 1 copies weights to host memory, level 2 drops them."""
        profile = self.config.profile
        return profile.model.weight_bytes / profile.host_to_device_bytes_per_s if level == 1 else 0.1

    def wake_cost(self) -> float:
        """Emulated seconds to wake: weights back over PCIe (level 1) or from disk (level 2)."""
        profile = self.config.profile
        if self.engine.sleep_level == 1:
            return profile.model.weight_bytes / profile.host_to_device_bytes_per_s
        if self.engine.sleep_level == 2:
            return profile.model.weight_bytes / profile.disk_bytes_per_s
        return 0.0

    async def sleep(self, level: int, mode: str = "keep") -> None:
        """Pause scheduling, then (level >= 1) release GPU memory, as vLLM's sleep mode does.

        ``mode`` says what happens to requests already inside (vLLM's pause modes): ``abort`` ends
        them, ``wait`` lets them finish first (new ones wait outside meanwhile), ``keep`` keeps them
        (from level 1 their KV is dropped, so they are recomputed after waking). New requests are
        accepted while asleep and wait. Level 0 only pauses scheduling: no memory moves, the prefix
        cache stays.
        """
        engine = self.engine
        if engine.sleeping and level <= engine.sleep_level:
            return
        if mode == "abort":
            self.abort_all()
        elif mode == "wait" and not engine.sleeping:
            self._held = self._held if self._held is not None else []
            while not engine.idle:
                await asyncio.sleep(0.002)
        engine.sleeping = True  # stops new steps
        if self._held is not None:
            held, self._held = self._held, None
            for seq in held:
                engine.add(seq)
        if level >= 1:
            engine.preempt_all()  # the KV cache is discarded: kept work is recomputed after waking
            engine.reset_prefix_cache()
            await self.sleep_emulated(self.sleep_cost(level))
            self.asleep_tags = {"weights", "kv_cache"}
        engine.sleep_level = max(engine.sleep_level, level)

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        """Bring back released memory (all, or only ``tags``); scheduling resumes once nothing is
        released any more. Returns whether the instance is fully awake."""
        engine = self.engine
        if not engine.sleeping:
            return True
        waking = set(self.asleep_tags) if tags is None else self.asleep_tags & set(tags)
        if "weights" in waking:
            await self.sleep_emulated(self.wake_cost())
        self.asleep_tags -= waking
        if self.asleep_tags:
            return False
        engine.sleeping = False
        engine.sleep_level = 0
        self.wake()
        return True
