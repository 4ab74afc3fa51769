"""A camera-only toy world for closed-loop tests of the policy (no physics, no robot)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ToyScene:
    """A camera-only stand-in world for the tiny demo: a disk per camera that the first two
    action channels push around. It only has to produce plausible frames for the loop."""

    def __init__(self, cameras: tuple[str, ...], size: int = 96, seed: int = 0):
        self.cameras = cameras
        self.size = size
        rng = np.random.default_rng(seed)
        self.pos = rng.uniform(0.3, 0.7, size=2)
        self.colors = rng.integers(64, 255, size=(len(cameras), 3))

    def step(self, action: np.ndarray) -> None:
        self.pos = np.clip(self.pos + 0.01 * np.tanh(action[:2]), 0.05, 0.95)

    def render(self) -> dict[str, np.ndarray]:
        yy, xx = np.mgrid[0 : self.size, 0 : self.size] / self.size
        out = {}
        for i, cam in enumerate(self.cameras):
            # Each camera sees the disk from a slightly shifted viewpoint.
            cy, cx = self.pos + 0.05 * i
            disk = ((yy - cy) ** 2 + (xx - cx) ** 2) < 0.02
            img = np.full((self.size, self.size, 3), 30, dtype=np.uint8)
            img[disk] = self.colors[i]
            out[cam] = img
        return out


def toy_episode(policy, chunks: int, prompt: str, seed: int = 0) -> Iterator[dict]:
    """Closed loop on a ToyScene through the episode protocol: infer, execute the chunk while recording
    its keyframes, feed it back; yields each chunk (+ "feedback_timing")."""
    scene = ToyScene(policy.cfg.obs_cam_keys, seed=seed)
    policy.reset(prompt=prompt)
    for i in range(chunks):
        chunk = policy.infer(scene.render() if i == 0 else {})
        for step, action in enumerate(chunk.actions):
            scene.step(action)
            chunk.record(step, images=scene.render() if chunk.is_keyframe(step) else None)
        chunk["feedback_timing"] = policy.feedback(chunk)
        yield chunk
