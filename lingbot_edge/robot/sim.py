"""`KinematicSO100`: the default SO-100 simulator, and `VideoRecorder` for any robot's cameras.

6 joints with limits, first-order joint dynamics and a velocity limit, cameras rendered with numpy (top /
side / wrist views of the arm and a cube). Deterministic, no dependency, a few ms per tick: the one tests
and `make demo` use. Same API as LeRobot's SO-100 follower (see `robot.so100`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lingbot_edge.robot.so100 import SO100_CAMERAS, SO100_LOWER, SO100_UPPER, action_dict, joints_of


class _Canvas:
    """Tiny numpy rasterizer: filled disks and thick segments, each touching only its bounding box."""

    def __init__(self, h: int, w: int, color):
        self.img = np.empty((h, w, 3), dtype=np.uint8)
        self.img[:] = color
        self.h, self.w = h, w

    def segment(self, p0, p1, radius: float, color) -> None:
        (x0, y0), (x1, y1) = p0, p1
        xa, xb = int(max(0, min(x0, x1) - radius - 1)), int(min(self.w, max(x0, x1) + radius + 2))
        ya, yb = int(max(0, min(y0, y1) - radius - 1)), int(min(self.h, max(y0, y1) + radius + 2))
        if xa >= xb or ya >= yb:
            return
        yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
        dx, dy = x1 - x0, y1 - y0
        denom = dx * dx + dy * dy
        s = np.zeros_like(xx) if denom == 0 else np.clip(((xx - x0) * dx + (yy - y0) * dy) / denom, 0, 1)
        mask = (xx - x0 - s * dx) ** 2 + (yy - y0 - s * dy) ** 2 <= radius * radius
        self.img[ya:yb, xa:xb][mask] = color

    def disk(self, p, radius: float, color) -> None:
        self.segment(p, p, radius, color)

    def rect(self, x0, y0, x1, y1, color) -> None:
        xa, xb = int(max(0, min(x0, x1))), int(min(self.w, max(x0, x1)))
        ya, yb = int(max(0, min(y0, y1))), int(min(self.h, max(y0, y1)))
        if xa < xb and ya < yb:
            self.img[ya:yb, xa:xb] = color


class KinematicSO100:
    """A kinematic SO-100 stand-in with LeRobot's observation/action dicts (see the module docstring).

    Joint angles: `value / 100 * 90` degrees (pan 110 degrees); links 0.05 (base) / 0.12 / 0.13 / 0.10 m
    in the arm's vertical plane, rotated by the pan; zero pose: upper arm up, forearm forward. Each
    `send_action` advances `1 / fps` s of sim time: the joints follow the target with time constant `tau` s,
    at most `max_speed` units/s. Views: "top" (from above), "side" and "wrist" (the cube as the gripper
    sees it, the jaws opening with the gripper)."""

    VIEWS = ("top", "wrist", "side")

    def __init__(self, cameras: Sequence[str] = SO100_CAMERAS, height: int = 96, width: int = 128, fps: float = 30.0,
                 tau: float = 0.08, max_speed: float = 400.0, views: Mapping[str, str] | None = None,
                 initial: Sequence[float] = (0.0, 0.0, 0.0, 30.0, 0.0, 30.0), cube_xy=(0.2, 0.08)):
        self.cameras = tuple(cameras)
        self.views = dict(views) if views else {c: self.VIEWS[i % 3] for i, c in enumerate(self.cameras)}
        bad = {c: v for c, v in self.views.items() if v not in self.VIEWS}
        if bad:
            raise ValueError(f"views: unknown {bad}; expected one of {self.VIEWS}")
        self.height, self.width, self.dt = int(height), int(width), 1.0 / fps
        self.tau, self.max_speed = tau, max_speed
        self.lower, self.upper = np.array(SO100_LOWER), np.array(SO100_UPPER)
        self.initial = np.clip(np.asarray(initial, dtype=np.float64), self.lower, self.upper)
        self.cube = np.asarray(cube_xy, dtype=np.float64)
        self.q = self.initial.copy()
        self.target = self.q.copy()
        self.is_connected = False
        self.torque_enabled = False
        self.sim_time = 0.0

    # -- LeRobot Robot API
    def connect(self) -> None:
        self.is_connected = True
        self.torque_enabled = True

    def disconnect(self) -> None:
        self.is_connected = False
        self.torque_enabled = False  # LeRobot's disconnect(disable_torque=True)

    def send_action(self, action: Mapping[str, Any]) -> dict[str, float]:
        if not self.is_connected:
            raise RuntimeError("KinematicSO100 is not connected")
        self.target = np.clip(joints_of(action), self.lower, self.upper)
        alpha = 1.0 - math.exp(-self.dt / self.tau)
        dq = np.clip(alpha * (self.target - self.q), -self.max_speed * self.dt, self.max_speed * self.dt)
        self.q = np.clip(self.q + dq, self.lower, self.upper)
        self.sim_time += self.dt
        return action_dict(self.target)

    def get_observation(self) -> dict[str, Any]:
        if not self.is_connected:
            raise RuntimeError("KinematicSO100 is not connected")
        obs: dict[str, Any] = action_dict(self.q)
        for cam in self.cameras:
            obs[cam] = self.render(self.views[cam])
        return obs

    # -- kinematics and views
    def _chain(self) -> tuple[float, list[tuple[float, float]]]:
        """(pan angle, [(r, z)] of base, shoulder, elbow, wrist, tip) in metres. Link angles from the
        horizontal: upper arm 90 - lift, forearm (upper arm - 90 - elbow), gripper (forearm - wrist flex)."""
        pan = math.radians(self.q[0] * 1.1)
        phi = math.radians(90.0 - self.q[1] * 0.9)
        pts = [(0.0, 0.0), (0.0, 0.05)]
        for length, bend in ((0.12, 0.0), (0.13, 90.0 + self.q[2] * 0.9), (0.10, self.q[3] * 0.9)):
            phi -= math.radians(bend)
            r, z = pts[-1]
            pts.append((r + length * math.cos(phi), z + length * math.sin(phi)))
        return pan, pts

    def render(self, view: str) -> np.ndarray:
        h, w = self.height, self.width
        c = _Canvas(h, w, (200, 190, 170) if view != "side" else (150, 170, 200))
        pan, pts = self._chain()
        s = min(h, w) / 0.5  # pixels per metre
        grip = self.q[5] / 100.0
        link_colors = [(60, 60, 60), (230, 140, 30), (230, 140, 30), (40, 120, 220), (40, 120, 220)]
        if view == "top":
            ox, oy = w / 2, h * 0.9
            cx, cy = ox + self.cube[1] * s, oy - self.cube[0] * s
            c.rect(cx - 0.02 * s, cy - 0.02 * s, cx + 0.02 * s, cy + 0.02 * s, (200, 30, 30))
            xy = [(ox + r * math.sin(pan) * s, oy - r * math.cos(pan) * s) for r, _ in pts]
            for i in range(1, len(xy)):
                c.segment(xy[i - 1], xy[i], max(1.0, 0.012 * s), link_colors[i])
            c.disk(xy[-1], max(1.5, (0.01 + 0.015 * grip) * s), (20, 20, 20))
        elif view == "side":
            ox, oy = w * 0.3, h * 0.85
            c.rect(0, oy, w, h, (120, 100, 80))  # table
            xy = [(ox + r * s, oy - z * s) for r, z in pts]
            for i in range(1, len(xy)):
                c.segment(xy[i - 1], xy[i], max(1.0, 0.012 * s), link_colors[i])
                c.disk(xy[i], max(1.0, 0.015 * s), (30, 30, 30))
        else:  # wrist: the cube relative to the gripper tip, rotated by wrist roll
            r_tip, z_tip = pts[-1]
            tip = np.array([r_tip * math.cos(pan), r_tip * math.sin(pan)])
            rel = (self.cube - tip) * s * 2
            roll = math.radians(self.q[4] * 0.9)
            rx = rel[1] * math.cos(roll) - rel[0] * math.sin(roll)
            ry = rel[1] * math.sin(roll) + rel[0] * math.cos(roll)
            size = 0.02 * s * 2 / max(0.3, 1.0 + 4 * z_tip)
            cx, cy = w / 2 + rx, h / 2 - ry
            c.rect(cx - size, cy - size, cx + size, cy + size, (200, 30, 30))
            gap = (0.1 + 0.35 * grip) * w
            c.rect(w / 2 - gap / 2 - 0.08 * w, h * 0.7, w / 2 - gap / 2, h, (50, 50, 50))
            c.rect(w / 2 + gap / 2, h * 0.7, w / 2 + gap / 2 + 0.08 * w, h, (50, 50, 50))
        return c.img



class VideoRecorder:
    """Collects the cameras side by side every `every` ticks; `write(path)` saves an mp4 via imageio.
    Use as the loop's `on_tick(obs, tick)`."""

    def __init__(self, cameras: Sequence[str], every: int = 1):
        self.cameras, self.every, self.frames = tuple(cameras), every, []

    def __call__(self, obs: Mapping[str, Any], tick) -> None:
        if tick.index % self.every == 0:
            self.frames.append(np.concatenate([np.asarray(obs[c]) for c in self.cameras], axis=1))

    def write(self, path: str | Path, fps: float) -> Path:
        import imageio.v2 as imageio

        if not self.frames:
            raise ValueError("VideoRecorder: no frames recorded")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = np.stack(self.frames)
        h, w = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, -h % 16), (0, -w % 16), (0, 0)))  # codec-friendly size
        imageio.mimwrite(path, list(frames), fps=fps / self.every, codec="libx264", macro_block_size=1)
        return path
