"""The real SO-100 through LeRobot's follower (extra `robot`; LeRobot is imported only here, on demand).

Where the follower lives differs by release (`lingbot_edge.io.lerobot_compat.follower_module`: 0.4.3 moved it
from `lerobot.robots.so100_follower` to `lerobot.robots.so_follower`, same class names, and made
`use_degrees=True` the default). The policy speaks LeRobot's normalized units (joints -100..100, gripper
0..100), so `use_degrees` is always set to False where the config has it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Sequence

from lingbot_edge.io import lerobot_compat as compat
from lingbot_edge.io.torchvision_compat import ensure_torchvision_importable
from lingbot_edge.robot.so100 import CameraSpec

log = logging.getLogger(__name__)



def follower_classes():
    """(SO100Follower, SO100FollowerConfig, OpenCVCameraConfig) from whichever LeRobot release is installed."""
    try:
        ensure_torchvision_importable()  # LeRobot 0.3.2's CUDA torchvision next to CPU torch
        module = compat.follower_module()
        cameras = importlib.import_module("lerobot.cameras.opencv")
        return module.SO100Follower, module.SO100FollowerConfig, cameras.OpenCVCameraConfig
    except (ImportError, AttributeError) as e:
        raise ImportError("the real SO-100 needs LeRobot (tested: " + ", ".join(compat.TESTED) + "): pip install "
                          "'lingbot-edge[robot]' into a venv that has the LeRobot release you use, see "
                          f"docs/lerobot.md ({e})") from e


def make_lerobot_so100(port: str, cameras: Sequence[CameraSpec], robot_id: str | None = None,
                       max_relative_target: float | None = None, fps: int = 30):
    """LeRobot's SO-100 follower with OpenCV cameras (in the given order). LeRobot also clamps with
    `max_relative_target` when given; our SafetyFilter runs either way. Torque goes off on disconnect."""
    follower, follower_config, camera_config = follower_classes()
    cams = {c.name: camera_config(index_or_path=c.source, width=c.width, height=c.height, fps=fps) for c in cameras}
    kwargs = dict(port=port, id=robot_id, cameras=cams, max_relative_target=max_relative_target,
                  disable_torque_on_disconnect=True)
    if "use_degrees" in {f.name for f in dataclasses.fields(follower_config)}:
        kwargs["use_degrees"] = False  # normalized units, as the policy was trained on
    log.info("LeRobot SO-100 follower on %s (%s), cameras %s", port, follower.__module__, list(cams))
    return follower(follower_config(**kwargs))
