"""Tenants' rate limits: requests and tokens per minute, for the whole fleet of proxies.

Both limits are sliding-window counters (this minute's count plus the previous minute's, weighted
by how much of it the window still covers): O(1) memory per tenant and smooth at the minute's
edge. With one replica they live here in the process; with several they live in Redis (the same
algorithm, one Lua script per check: see ``state/redis_scripts.py``), so a tenant's limit holds
across replicas. Losing Redis lets requests through rather than refusing them.

Tokens are not known until the engine reports them, so admission charges an estimate (the prompt
estimate plus the expected reply) and :meth:`TenantLimits.settle` corrects it by the difference
once the reply ended: a tenant that overran its tokens waits for the window to catch up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ProxyError
from .request import ProxyRequest
from .slo import TenantConfig

if TYPE_CHECKING:
    from .state.redis_state import RedisCoordinator

WINDOW_S = 60.0


class SlidingWindows:
    """In-process sliding-window counters by key (what Redis's RATE script does, for one replica)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._windows: dict[str, tuple[int, float, float]] = {}  # key -> (window index, current, previous)

    def _read(self, key: str, window_s: float) -> tuple[int, float, float, float]:
        now = self.clock()
        index = math.floor(now / window_s)
        elapsed = now / window_s - index
        start, current, previous = self._windows.get(key, (index, 0.0, 0.0))
        if start == index - 1:
            current, previous = 0.0, current
        elif start != index:
            current, previous = 0.0, 0.0
        return index, elapsed, current, previous

    def take(self, key: str, limit: int, window_s: float, cost: int = 1) -> tuple[bool, float]:
        """Count ``cost`` if it fits under ``limit``: (allowed, seconds until it would fit)."""
        index, elapsed, current, previous = self._read(key, window_s)
        if previous * (1 - elapsed) + current + cost <= limit:
            self._windows[key] = (index, current + cost, previous)
            return True, 0.0
        self._windows[key] = (index, current, previous)
        if cost > limit:
            return False, window_s
        if current + cost <= limit:  # later in this window, once the previous one weighs little enough
            wait = (1 - (limit - current - cost) / previous - elapsed) * window_s
        else:  # in the next window, once this one (then the previous) weighs little enough
            wait = (1 - elapsed) * window_s + (1 - (limit - cost) / current) * window_s
        return False, max(wait, 0.001)

    def charge(self, key: str, window_s: float, cost: int) -> None:
        """Count ``cost`` whatever the limit (corrections; negative refunds)."""
        index, _, current, previous = self._read(key, window_s)
        self._windows[key] = (index, current + cost, previous)


class TenantLimits:
    """Admission by tenants' ``rpm`` and ``tpm``; one instance per proxy replica."""

    def __init__(self, shared: RedisCoordinator | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.shared = shared
        self.local = SlidingWindows(clock)
        self._background: set[asyncio.Task] = set()

    async def _take(self, key: str, limit: int, cost: int) -> tuple[bool, float]:
        if self.shared is not None:
            return await self.shared.take_rate(key, limit, WINDOW_S, cost)
        return self.local.take(key, limit, WINDOW_S, cost)

    def _charge(self, key: str, cost: int) -> None:
        if cost == 0:
            return
        if self.shared is None:
            self.local.charge(key, WINDOW_S, cost)
            return
        task = asyncio.get_running_loop().create_task(self.shared.charge_rate(key, WINDOW_S, cost))
        self._background.add(task)  # off the request's path; kept referenced until done
        task.add_done_callback(self._background.discard)

    async def admit(self, tenant: TenantConfig, request: ProxyRequest) -> None:
        """Count ``request`` against its tenant's limits, or raise 429 with ``Retry-After``."""
        if tenant.rpm is not None:
            allowed, wait = await self._take(f"tenant:{tenant.name}:rpm", tenant.rpm, 1)
            if not allowed:
                raise _limited(tenant, f"{tenant.rpm} requests per minute", wait)
        if tenant.tpm is not None:
            cost = request.est_prompt_tokens + request.est_output_tokens
            allowed, wait = await self._take(f"tenant:{tenant.name}:tpm", tenant.tpm, cost)
            if not allowed:
                if tenant.rpm is not None:
                    self._charge(f"tenant:{tenant.name}:rpm", -1)  # it was not served after all
                if cost > tenant.tpm:
                    raise ProxyError(
                        429,
                        f"Request too large for tenant `{tenant.name}`: about {cost} tokens against a limit "
                        f"of {tenant.tpm} tokens per minute; lower max_tokens or the prompt.",
                        code="rate_limit_exceeded",
                    )
                raise _limited(tenant, f"{tenant.tpm} tokens per minute", wait)
            request.tokens_charged = cost

    def settle(self, tenant: TenantConfig, request: ProxyRequest) -> None:
        """The request ended: replace its estimated token charge with what it really used (nothing,
        if it never reached an engine; the estimate, if the engine never said)."""
        if tenant.tpm is None or not request.tokens_charged:
            return
        used = request.tokens_used
        if used is None:
            used = request.tokens_charged if request.first_byte_sent or request.disconnected else 0
        self._charge(f"tenant:{tenant.name}:tpm", used - request.tokens_charged)
        request.tokens_charged = 0

    async def stop(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _limited(tenant: TenantConfig, limit: str, wait_s: float) -> ProxyError:
    retry_after = max(1, math.ceil(wait_s))
    return ProxyError(
        429,
        f"Rate limit reached for tenant `{tenant.name}`: {limit}. Retry after {retry_after} s.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after)},
    )
