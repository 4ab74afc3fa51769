"""The scenes `train record` and `train fit` record and train on: one registry entry per `--scene`.

A new scene is one `TrainScene` in `TRAIN_SCENES`: how its demonstrations are recorded, how many frames an episode
has, and the dataset's action names in the policy's channel order (whose quantiles the trained checkpoint takes).
How the episode lengths were chosen: bench/results/train_recipes.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lingbot_edge.core.config import SO100_MOTORS
from lingbot_edge.robot.so100 import SO100_CAMERAS
from train.dataset import record_dataset
from train.expert import RECORDING_CARTESIAN_SPEED, RECORDING_DETOUR


@dataclass(frozen=True)
class ExpertSettings:
    """The recorded scripted expert of the SO-100 scenes (train/expert.py)."""

    gain: float = 0.0  # proportional gain (0: constant speed)
    cartesian_speed: float = RECORDING_CARTESIAN_SPEED  # straight-line approach speed in m per tick (0: joint space)
    detour: float = RECORDING_DETOUR  # largest detour (m) of the approach, drawn per episode (0: the straight path)


# record(root, seeds, frames, cameras, progress, expert) -> the new LeRobot dataset folder at root; cameras None:
# the scene's own
Recorder = Callable[[Path, Sequence[int], int, Sequence[str] | None, bool, ExpertSettings], Path]


@dataclass(frozen=True)
class TrainScene:
    """What training needs to know of a scene."""

    name: str  # the --scene name
    record: Recorder  # writes one demonstration per seed as a LeRobot dataset
    episode_frames: int  # recorded frames per episode: whole chunks of the tiny policy (8 k - 3)
    action_names: tuple[str, ...]  # the dataset's action names, in the policy's channel order


def so100_recorder(scene: str) -> Recorder:
    """The scripted expert of an SO-100 simulator scene (`robot.scenes.SCENES`), recorded by `record_dataset`."""

    def record(root: Path, seeds: Sequence[int], frames: int, cameras: Sequence[str] | None, progress: bool,
               expert: ExpertSettings) -> Path:
        return record_dataset(root, seeds, frames, cameras=cameras or SO100_CAMERAS, progress=progress,
                              expert_gain=expert.gain, expert_cartesian_speed=expert.cartesian_speed,
                              expert_detour=expert.detour, scene=scene)

    return record


TRAIN_SCENES = {
    # 13 chunks: every episode ends with the cube held for a few chunks.
    "grasp": TrainScene("grasp", so100_recorder("grasp"), 101, SO100_MOTORS),
    # 18 chunks: the expert has the cube in the box before the episode ends.
    "place": TrainScene("place", so100_recorder("place"), 141, SO100_MOTORS),
}


def get_train_scene(name: str) -> TrainScene:
    if name not in TRAIN_SCENES:
        raise ValueError(f"scene: expected one of {sorted(TRAIN_SCENES)}, got {name!r}")
    return TRAIN_SCENES[name]
