"""The episode protocol: what `LingBotPolicy.infer` returns and every loop follows.

One chunk of an episode, as the robot side sees it:

    chunk = policy.infer(obs)                 # first chunk: obs has one frame per camera
    for step, action in enumerate(chunk.actions):
        executed = robot.send(action)         # what really went to the motors (after safety)
        chunk.record(step, executed, images=camera_frames() if chunk.is_keyframe(step) else None)
    policy.feedback(chunk)                    # keyframes + executed actions into the KV cache

The cadence lives here and nowhere else: one keyframe per camera every `keyframe_stride` executed steps
(4 keyframes per latent frame, the VAE's temporal compression), `steps // keyframe_stride` keyframes in
all (4 (F - 1) after the first chunk, 4 F after the others). A chunk is a dict as well (openpi's
`infer(obs) -> dict`: `actions`, `chunk`, `frame_start`, `timing`), so a server can send it as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def chunk_steps(cfg, index: int) -> int:
    """Executed steps of chunk `index`: F * apf, minus frame 0's apf in the first chunk (its frame 0 is
    the observation)."""
    return cfg.action_per_frame * (cfg.frame_chunk_size - (1 if index == 0 else 0))


def chunk_keyframes(cfg, index: int) -> int:
    """Keyframes per camera recorded while chunk `index` executes."""
    return chunk_steps(cfg, index) // cfg.keyframe_stride


def frame_boundaries(cfg, index: int) -> list[int]:
    """The executed steps of chunk `index` after which whole latent frames of its keyframes are recorded (0,
    apf, 2 apf, ...): where a lookahead request can take the executing chunk's keyframes so far."""
    return list(range(0, chunk_steps(cfg, index), cfg.action_per_frame))


def episode_steps(cfg, chunks: int) -> int:
    """Executed steps of the first `chunks` chunks of an episode."""
    return sum(chunk_steps(cfg, i) for i in range(chunks))


def episode_frames(cfg, chunks: int) -> int:
    """Frames per camera of the first `chunks` chunks: the first observation, then every keyframe
    (0 for no chunk). Sizes recordings before any Chunk exists; a loop asks its Chunk instead."""
    return 1 + sum(chunk_keyframes(cfg, i) for i in range(chunks)) if chunks > 0 else 0


class Chunk(dict):
    """One inferred chunk: its actions, the keyframe rule, and what was recorded while it executed."""

    def __init__(self, actions: np.ndarray, *, index: int, first: bool, keyframe_stride: int,
                 cameras: Sequence[str], frame_start: int = 0, timing: Mapping[str, float] | None = None):
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2:
            raise ValueError(f"actions: expected [steps, channels], got shape {actions.shape}")
        if keyframe_stride < 1 or actions.shape[0] % keyframe_stride:
            raise ValueError(f"keyframe_stride: {keyframe_stride} must divide the chunk's {actions.shape[0]} steps")
        super().__init__(actions=actions, chunk=index, frame_start=frame_start, timing=dict(timing or {}))
        self.index, self.first, self.keyframe_stride = index, first, keyframe_stride
        self.cameras = tuple(cameras)
        self._executed: list[np.ndarray | None] = [None] * actions.shape[0]
        self._frames: dict[str, list[np.ndarray]] = {k: [] for k in self.cameras}

    # ------------------------------------------------------------------ the plan
    @property
    def actions(self) -> np.ndarray:
        """[steps, used channels] float32, robot units."""
        return self["actions"]

    @property
    def timing(self) -> dict[str, float]:
        return self["timing"]

    @property
    def frame_start(self) -> int:
        """The episode's latent frame index of the chunk's first frame."""
        return self["frame_start"]

    @property
    def steps(self) -> int:
        return self.actions.shape[0]

    @property
    def num_keyframes(self) -> int:
        return self.steps // self.keyframe_stride

    def is_keyframe(self, step: int) -> bool:
        """Whether the camera frames seen after executing `step` (0-based) are a keyframe."""
        return (step + 1) % self.keyframe_stride == 0

    @property
    def keyframe_steps(self) -> list[int]:
        return [s for s in range(self.steps) if self.is_keyframe(s)]

    # ------------------------------------------------------------------ what happened
    def record(self, step: int, executed: np.ndarray | None = None,
               images: Mapping[str, np.ndarray] | None = None) -> None:
        """Step `step` was executed (`executed`: the action really sent, default the planned one); at a
        keyframe step, `images` are the cameras' frames after it ({camera: HxWx3 uint8})."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step: {step} is outside the chunk's {self.steps} steps")
        action = self.actions[step] if executed is None else np.asarray(executed, dtype=np.float32).reshape(-1)
        if action.shape != self.actions[step].shape:
            raise ValueError(f"executed: expected {self.actions[step].shape[0]} values, got {action.shape}")
        self._executed[step] = action
        if self.is_keyframe(step):
            if images is None:
                raise ValueError(f"images: step {step} is a keyframe; expected one frame per camera "
                                 f"{list(self.cameras)}")
            missing = [k for k in self.cameras if k not in images]
            if missing:
                raise ValueError(f"images: missing cameras {missing} at keyframe step {step}")
            for k in self.cameras:
                self._frames[k].append(np.asarray(images[k]))

    @property
    def executed_steps(self) -> int:
        return sum(a is not None for a in self._executed)

    @property
    def complete(self) -> bool:
        return self.executed_steps == self.steps

    def executed_actions(self) -> np.ndarray:
        """[steps, channels] of what was executed (raises until every step was recorded)."""
        missing = [i for i, a in enumerate(self._executed) if a is None]
        if missing:
            raise RuntimeError(f"chunk {self.index}: steps {missing[:8]}{'...' if len(missing) > 8 else ''} "
                               "were not recorded (record every executed step before feedback)")
        return np.stack(self._executed)

    def recorded_keyframes(self) -> dict[str, np.ndarray]:
        """{camera: [T, H, W, 3]}: the keyframes recorded so far (T = 0 gives empty arrays of no frames)."""
        return {k: np.stack(v) if v else np.zeros((0, 0, 0, 3), np.uint8) for k, v in self._frames.items()}

    def keyframes(self) -> dict[str, np.ndarray]:
        """{camera: [num_keyframes, H, W, 3]} recorded while the chunk executed."""
        got = {k: len(v) for k, v in self._frames.items()}
        if any(n != self.num_keyframes for n in got.values()):
            raise RuntimeError(f"chunk {self.index}: expected {self.num_keyframes} keyframes per camera, got {got}")
        return {k: np.stack(v) for k, v in self._frames.items()}

    def set_keyframes(self, frames: Mapping[str, Any], executed: np.ndarray | None = None) -> Chunk:
        """Replay form: keyframes recorded elsewhere ({camera: [T, H, W, 3]}, T = num_keyframes) and the
        executed actions (default: the plan). Checks the counts the way `record` would."""
        executed = self.actions if executed is None else np.asarray(executed, dtype=np.float32)
        if executed.shape != self.actions.shape:
            raise ValueError(f"executed: expected shape {self.actions.shape}, got {executed.shape}")
        for k in self.cameras:
            if k not in frames:
                raise ValueError(f"frames: missing camera {k!r}; expected {list(self.cameras)}")
            t = np.shape(frames[k])[0] if np.ndim(frames[k]) == 4 else 1
            if t != self.num_keyframes:
                raise ValueError(f"frames[{k!r}]: expected {self.num_keyframes} keyframes [T, H, W, 3], got {t}")
        self._executed = list(executed)
        self._frames = {k: list(np.asarray(frames[k])) for k in self.cameras}
        return self

    def feedback_inputs(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(keyframes, executed actions): what `LingBotPolicy.feedback` writes into the cache."""
        return self.keyframes(), self.executed_actions()
