"""Virtual time for the control loop: the same `AsyncController` run without wall time, reproducibly.

`VirtualClock` is the loop's clock and sleep: time moves only when the loop sleeps to its next tick, so a
policy call takes no loop time at all. `DelayedExecutor` is its worker: a job runs at once, when it is
submitted, and its result becomes usable `delay_ticks` control periods later, as on a machine where one
inference takes that long. With a delay under one chunk the lookahead loop never holds; the synchronous loop
holds at every chunk boundary until the delay has passed, as the real loop does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class VirtualClock:
    """A clock that advances only through `sleep` (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.now += seconds


class DelayedResult:
    """A finished job whose result the loop may take from `ready_at` (clock time) on."""

    def __init__(self, clock: VirtualClock, ready_at: float, result: Any = None, error: BaseException | None = None):
        self._clock, self.ready_at, self._result, self._error = clock, ready_at, result, error

    def done(self) -> bool:
        return self._clock() >= self.ready_at

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


class DelayedExecutor:
    """The loop's worker under a `VirtualClock`: `submit(fn, *args)` runs `fn` now; its result is usable
    `delay_ticks` periods of `fps` later (a job submitted during tick i is taken at tick i + max(1, delay))."""

    def __init__(self, clock: VirtualClock, delay_ticks: float, fps: float):
        if delay_ticks < 0:
            raise ValueError(f"delay_ticks: expected >= 0, got {delay_ticks}")
        self.clock, self.delay_s = clock, delay_ticks / fps
        # Jobs submitted during one tick share its clock time; a hair less than the delay keeps the
        # comparison with the later tick's time exact under float rounding.
        self._slack = 1e-9

    def submit(self, fn: Callable[..., Any], *args: Any) -> DelayedResult:
        ready = self.clock() + self.delay_s - self._slack
        try:
            return DelayedResult(self.clock, ready, result=fn(*args))
        except Exception as error:  # noqa: BLE001 - handed to the loop through result(), as a thread pool does
            return DelayedResult(self.clock, ready, error=error)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Nothing runs in the background."""
