"""Run the proxy's own coroutines in virtual time, without an event loop that waits.

The scheduler's ``acquire`` is a coroutine that awaits an :class:`asyncio.Future` until a policy
dispatches the request. The simulator runs that exact code: :class:`VirtualLoop` stands in as the
running loop (it creates the futures and collects their done-callbacks), and :class:`Task` steps a
coroutine by hand, resuming it when the future it awaits completes. Nothing ever sleeps: the
simulator's event heap decides what happens next, and after each event it calls
:meth:`VirtualLoop.run_ready` so every coroutine that can move does, before time advances.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any


class VirtualLoop:
    """Just enough of an event loop for futures: ``call_soon`` queues, :meth:`run_ready` runs."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.time = clock
        self._ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()

    def get_debug(self) -> bool:
        return False

    def call_soon(self, callback: Callable[..., Any], *args: Any, context: Any = None) -> None:
        self._ready.append((callback, args))

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        raise RuntimeError(context.get("message", "unhandled exception in a simulated coroutine"))

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)  # type: ignore[arg-type]

    def run_ready(self) -> None:
        """Run callbacks until none are left (callbacks may queue more)."""
        ready = self._ready
        while ready:
            callback, args = ready.popleft()
            callback(*args)

    @contextmanager
    def running(self) -> Iterator[VirtualLoop]:
        """Be the thread's running loop (what ``asyncio.get_running_loop()`` returns) meanwhile."""
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)  # type: ignore[arg-type]
        try:
            yield self
        finally:
            asyncio.events._set_running_loop(previous)


class Task:
    """A coroutine stepped by hand: started at once, resumed when the future it awaits is done.

    ``on_done(task)`` is called once the coroutine returns or raises (``result`` / ``error``).
    """

    __slots__ = ("_coro", "_waiting_on", "done", "error", "on_done", "result")

    def __init__(self, coro: Coroutine[Any, Any, Any], on_done: Callable[[Task], None]) -> None:
        self._coro = coro
        self._waiting_on: asyncio.Future[Any] | None = None
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.on_done = on_done
        self._step(None)

    def _step(self, error: BaseException | None) -> None:
        try:
            future = self._coro.send(None) if error is None else self._coro.throw(error)
        except StopIteration as stop:
            self._finish(stop.value, None)
        except BaseException as exc:  # the coroutine's outcome, handed to on_done
            self._finish(None, exc)
        else:
            if not isinstance(future, asyncio.Future):
                raise RuntimeError(f"a simulated coroutine awaited {future!r}, not a future")
            self._waiting_on = future
            future.add_done_callback(self._wakeup)

    def _wakeup(self, future: asyncio.Future[Any]) -> None:
        if future is self._waiting_on and not self.done:
            self._waiting_on = None
            self._step(None)

    def cancel(self) -> None:
        """Like :meth:`asyncio.Task.cancel`: the awaited future is cancelled, the coroutine gets CancelledError."""
        if self.done:
            return
        future = self._waiting_on
        self._waiting_on = None
        if future is not None:
            future.remove_done_callback(self._wakeup)
            future.cancel()
        self._step(asyncio.CancelledError())

    def _finish(self, result: Any, error: BaseException | None) -> None:
        self.done = True
        self.result, self.error = result, error
        self.on_done(self)
