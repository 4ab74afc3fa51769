"""The scenes `train record` and `train fit` record and train on: one registry entry per `--scene`.

A new scene is one `TrainScene` in `TRAIN_SCENES`: how its demonstrations are recorded (with the scene's own
recording options), how many frames an episode has, the dataset's action names in the policy's channel order (whose
quantiles the trained checkpoint takes), the trained checkpoint's policy settings and the preset it loads with.
How the episode lengths were chosen: bench/results/train_recipes.md (SO-100) and
bench/results/task_success/libero.md (LIBERO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lingbot_edge.core.config import SO100_MOTORS, PolicyConfig
from lingbot_edge.robot.so100 import SO100_CAMERAS
from train.dataset import record_dataset
from train.expert import RECORDING_CARTESIAN_SPEED, RECORDING_DETOUR
from train.libero_data import LIBERO_ACTION_NAMES, LIBERO_EPISODE_FRAMES, LiberoTasks, record_libero_dataset
from train.skeleton import base_policy_config, libero_policy_config


@dataclass(frozen=True)
class ExpertSettings:
    """The recorded scripted expert of the SO-100 scenes (train/expert.py)."""

    gain: float = 0.0  # proportional gain (0: constant speed)
    cartesian_speed: float = RECORDING_CARTESIAN_SPEED  # straight-line approach speed in m per tick (0: joint space)
    detour: float = RECORDING_DETOUR  # largest detour (m) of the approach, drawn per episode (0: the straight path)


# record(root, seeds, frames, cameras, progress, options) -> the new LeRobot dataset folder at root; cameras None:
# the scene's own; options: the scene's recording options (an instance of its `options` type)
Recorder = Callable[[Path, Sequence[int], int, Sequence[str] | None, bool, Any], Path]


@dataclass(frozen=True)
class TrainScene:
    """What training needs to know of a scene."""

    name: str  # the --scene name
    record: Recorder  # writes one demonstration per seed as a LeRobot dataset
    episode_frames: int  # recorded frames per episode: whole chunks of the policy trained on it
    action_names: tuple[str, ...]  # the dataset's action names, in the policy's channel order
    options: type = ExpertSettings  # the type of its recording options (the default instance when none is given)
    # policy_config(model, cameras, **settings): the trained checkpoint's policy settings (`cameras`: robot camera
    # names, None for the scene's own)
    policy_config: Callable[..., PolicyConfig] = base_policy_config
    preset: str = "so100"  # the preset the run's checkpoint loads with (encoding the dataset)
    post_training: bool = True  # whether a run may start from a --base checkpoint


def libero_recorder(root: Path, seeds: Sequence[int], frames: int, cameras: Sequence[str] | None, progress: bool,
                    tasks: LiberoTasks) -> Path:
    """The scripted pick-and-place expert in LIBERO's simulator, the seeds split evenly over `tasks`' task ids; it
    records LIBERO's own two cameras, the ones the LIBERO policy reads (`cameras` is not used)."""
    if len(seeds) % len(tasks.task_ids):
        raise ValueError(f"episodes: {len(seeds)} do not split evenly over the tasks {list(tasks.task_ids)}")
    return record_libero_dataset(root, tasks, len(seeds) // len(tasks.task_ids), frames,
                                 first_seed=seeds[0] if seeds else 0, progress=progress)


def libero_settings(model: str = "tiny", cameras: Sequence[str] | None = None, **settings) -> PolicyConfig:
    """`libero_policy_config` (the LIBERO cameras are the scene's own: `cameras` must be None)."""
    if cameras:
        raise ValueError(f"cameras: the LIBERO policy reads LIBERO's own two cameras; got {list(cameras)}")
    return libero_policy_config(model, **settings)


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
    # LIBERO's simulator (the libero extra): the libero-tiny policy, trained from nothing.
    "libero": TrainScene("libero", libero_recorder, LIBERO_EPISODE_FRAMES, LIBERO_ACTION_NAMES, LiberoTasks,
                         libero_settings, "libero", post_training=False),
}


def get_train_scene(name: str) -> TrainScene:
    if name not in TRAIN_SCENES:
        raise ValueError(f"scene: expected one of {sorted(TRAIN_SCENES)}, got {name!r}")
    return TRAIN_SCENES[name]
