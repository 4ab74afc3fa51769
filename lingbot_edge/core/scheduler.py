"""Flow-matching schedule (docs/design.md section 3), the same for the video and action streams.

sigmas = linspace(1, 0, N + 1)[:-1], shifted s*sigma / (1 + (s - 1)*sigma); timesteps = 1000*sigma;
Euler: x += v * (sigma_next - sigma) with sigma_next = 0 after the last step. A final timestep 0
is appended: that forward only writes the KV cache (PREDICTED) and its output is unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class FlowMatchSchedule:
    num_steps: int
    shift: float

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps: expected >= 1, got {self.num_steps}")
        if self.shift <= 0:
            raise ValueError(f"shift: expected > 0, got {self.shift}")

    def sigmas(self) -> Tensor:
        """[N] shifted sigmas, float32 (computed like upstream: linspace in fp32, then shift)."""
        s = torch.linspace(1.0, 0.0, self.num_steps + 1)[:-1]
        return self.shift * s / (1 + (self.shift - 1) * s)

    def timesteps(self) -> Tensor:
        """[N + 1] model timesteps; the last (0) is the cache-write-only forward."""
        return torch.cat([self.sigmas() * NUM_TRAIN_TIMESTEPS, torch.zeros(1)])

    def sigma_deltas(self) -> Tensor:
        """[N + 1] Euler factors sigma_next - sigma; the last is 0 (that forward's output is unused)."""
        s = self.sigmas()
        nxt = torch.cat([s[1:], torch.zeros(1)])
        return torch.cat([nxt - s, torch.zeros(1)])
