"""Clocks for control-loop tests (the loop takes `clock=` / `sleep=`)."""

from __future__ import annotations

import time


class SlowClock:
    """Real time, slowed down `factor` times: a generous clock for real policies on a shared CPU (30 Hz of
    loop time is 30 / factor Hz of wall time), so a count of holds does not depend on the machine's load."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self) -> float:
        return time.perf_counter() / self.factor

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds * self.factor)
