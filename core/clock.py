"""Injected time: pure code takes ``now`` arguments, adapters read it from a :class:`Clock`."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "LoopClock", "MonotonicClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch."""
        ...


class MonotonicClock:
    """The real clock."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class _HasTime(Protocol):
    def time(self) -> float: ...


class LoopClock:
    """An event loop's clock (``loop.time()``), so pure code and the loop's timers agree on ``now``."""

    __slots__ = ("_loop",)

    def __init__(self, loop: _HasTime) -> None:
        self._loop = loop

    def now(self) -> float:
        return self._loop.time()

    def wall(self) -> float:
        return time.time()


class FakeClock:
    """A clock that moves only when told to; for tests."""

    __slots__ = ("_now", "_wall_offset")

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        self._now += seconds
