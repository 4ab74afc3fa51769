"""Every target the arm receives passes here: finite, inside the joint limits, at most `max_step` per tick."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from lingbot_edge.robot.so100 import SO100_LOWER, SO100_UPPER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SafetyLimits:
    """Joint / gripper limits in robot units and the largest move per tick (None: unlimited)."""

    lower: tuple[float, ...] = SO100_LOWER
    upper: tuple[float, ...] = SO100_UPPER
    max_step: float | tuple[float, ...] | None = 8.0

    def __post_init__(self):
        lo, hi = np.asarray(self.lower, float), np.asarray(self.upper, float)
        if lo.shape != hi.shape or lo.ndim != 1 or not (lo <= hi).all():
            raise ValueError(f"SafetyLimits: lower/upper must be equal-length with lower <= upper, got {lo} / {hi}")
        if self.max_step is not None:
            step = np.broadcast_to(np.asarray(self.max_step, float), lo.shape)
            if not (np.isfinite(step).all() and (step > 0).all()):
                raise ValueError(f"SafetyLimits: max_step must be positive, got {self.max_step}")


class SafetyFilter:
    """Target -> safe target: finite, inside the limits, at most `max_step` from the reference (the present
    position when known, else the last safe target) like LeRobot's `max_relative_target`.

    Counts (targets, not channels): `clipped_limits` (outside the joint / gripper range), `clipped_step`
    (inside the range but too far from the reference), `refused` (not finite: the last safe target kept)."""

    def __init__(self, limits: SafetyLimits | None = None):
        self.limits = limits or SafetyLimits()
        self.lower = np.asarray(self.limits.lower, dtype=np.float64)
        self.upper = np.asarray(self.limits.upper, dtype=np.float64)
        self.max_step = None if self.limits.max_step is None else np.broadcast_to(
            np.asarray(self.limits.max_step, dtype=np.float64), self.lower.shape)
        self.clipped_limits = 0
        self.clipped_step = 0
        self.refused = 0

    @property
    def clipped(self) -> int:
        """Targets changed by either rule."""
        return self.clipped_limits + self.clipped_step

    def stats(self) -> dict[str, int]:
        return {"clipped_limits": self.clipped_limits, "clipped_step": self.clipped_step, "refused": self.refused}

    def __call__(self, target: np.ndarray, reference: np.ndarray | None, last_safe: np.ndarray | None) -> np.ndarray:
        t = np.asarray(target, dtype=np.float64).reshape(-1)
        if t.shape != self.lower.shape:
            raise ValueError(f"target: expected {self.lower.size} values, got shape {np.shape(target)}")
        ref = reference if reference is not None else last_safe
        if not np.isfinite(t).all():
            self.refused += 1
            fallback = last_safe if last_safe is not None else ref
            if fallback is None:
                raise ValueError("target: not finite and no previous safe target to hold")
            log.error("non-finite target %s refused; holding %s", t, fallback)
            return np.asarray(fallback, dtype=np.float64).copy()
        in_range = np.clip(t, self.lower, self.upper)
        safe = in_range
        if self.max_step is not None and ref is not None:
            ref = np.clip(np.asarray(ref, dtype=np.float64), self.lower, self.upper)
            safe = np.clip(in_range, ref - self.max_step, ref + self.max_step)
        if not np.array_equal(in_range, t):
            self.clipped_limits += 1
        elif not np.array_equal(safe, t):
            self.clipped_step += 1
        return safe
