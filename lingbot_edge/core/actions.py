"""Action (un)normalization and the robot <-> model action layouts (docs/design.md section 3).

Model space: [1, action_dim, F, apf, 1], quantile-normalized to [-1, 1], unused channels zero.
Robot space: [steps, n_used] in the robot's units, steps in execution order (frame-major).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lingbot_edge.core.config import PolicyConfig

# Upstream adds this to (q99 - q01) on both directions, so constant channels do not divide by 0.
QUANTILE_EPS = 1e-6


class ActionCodec:
    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self.used = list(cfg.used_action_channel_ids)
        self.q01 = torch.tensor(cfg.action_q01, dtype=torch.float32)
        self.q99 = torch.tensor(cfg.action_q99, dtype=torch.float32)
        self.action_dim = len(cfg.action_q01)

    def steps(self, first_chunk: bool) -> int:
        """Robot steps in a chunk; the first chunk's frame 0 is the observation, not an action."""
        f = self.cfg.frame_chunk_size - (1 if first_chunk else 0)
        return f * self.cfg.action_per_frame

    def unnormalize(self, a: Tensor) -> Tensor:
        """Per-channel over dim 0: (a + 1) / 2 * (q99 - q01) + q01."""
        shape = (-1,) + (1,) * (a.dim() - 1)
        q01, q99 = self.q01.view(shape).to(a.device), self.q99.view(shape).to(a.device)
        return (a.float() + 1) / 2 * (q99 - q01 + QUANTILE_EPS) + q01

    def normalize(self, x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        q01, q99 = self.q01.view(shape).to(x.device), self.q99.view(shape).to(x.device)
        return (x.float() - q01) / (q99 - q01 + QUANTILE_EPS) * 2 - 1

    def to_robot(self, actions: Tensor, first_chunk: bool) -> np.ndarray:
        """[1, A, F, apf, 1] normalized -> [steps, n_used] float32 robot actions."""
        a = self.unnormalize(actions[0, :, :, :, 0].float().cpu())[self.used]  # [n_used, F, apf]
        if first_chunk:
            a = a[:, 1:]
        return a.flatten(1).T.contiguous().numpy()

    def from_robot(self, executed: np.ndarray | Tensor, first_chunk: bool) -> Tensor:
        """Executed robot actions [steps, n_used] -> [1, A, F, apf, 1] normalized (HISTORY input).

        On the first chunk frame 0 was not executed: it gets the pinned value (zeros, normalized).
        """
        x = torch.as_tensor(np.asarray(executed, dtype=np.float32))
        want = (self.steps(first_chunk), len(self.used))
        if tuple(x.shape) != want:
            raise ValueError(f"executed_actions: expected shape {want} (steps x used channels), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("executed_actions: contains NaN or inf")
        f, apf = self.cfg.frame_chunk_size, self.cfg.action_per_frame
        frames = x.T.reshape(len(self.used), -1, apf)  # [n_used, F', apf]
        full = torch.zeros(self.action_dim, frames.shape[1], apf)
        full[self.used] = frames
        out = torch.zeros(self.action_dim, f, apf)
        out[self.used, f - frames.shape[1]:] = self.normalize(full)[self.used]
        return out[None, ..., None]


def action_error(reference: Sequence[Tensor], test: Sequence[Tensor], cfg: PolicyConfig) -> dict[str, float]:
    """The one action-error definition (bench, quantize metrics, calibration budgets, README).

    reference / test: an episode's chunks of model-space actions [1, A, F, apf, 1] (normalized units),
    chunk 0 being the episode's first. Counted: the used channels of the executed steps only (the first
    chunk's frame 0 is the pinned observation and unused channels are zeroed: neither is an action).
    Returns action_rms, action_rel_rms (/ the reference's RMS) and action_cos, over all counted values."""
    if len(reference) != len(test):
        raise ValueError(f"action_error: {len(reference)} reference chunks but {len(test)} test chunks")

    def executed(chunks: Sequence[Tensor]) -> Tensor:
        used = list(cfg.used_action_channel_ids)
        return torch.cat([a.detach().cpu()[0, used, 1 if i == 0 else 0:].double().flatten()
                          for i, a in enumerate(chunks)])

    ref, out = executed(reference), executed(test)
    rms = (out - ref).pow(2).mean().sqrt().item()
    return {
        "action_rms": rms,
        "action_rel_rms": rms / ref.pow(2).mean().sqrt().item(),
        "action_cos": torch.nn.functional.cosine_similarity(out, ref, dim=0).item(),
    }
