"""Every simulated SO-100 task the commands select with `--scene`: its scene class, its prompt and the actions an
evaluation episode runs."""

from __future__ import annotations

from dataclasses import dataclass

from lingbot_edge.robot import grasp
from lingbot_edge.robot.grasp import GraspScene
from lingbot_edge.robot.place import TASK, PlaceScene


@dataclass(frozen=True)
class Scene:
    """A simulated task the commands select with `--scene`."""

    cls: type  # the scene: cls(seed, cameras=, height=, width=, **kwargs)
    task: str  # the prompt its demonstrations are recorded with and its episodes run with
    eval_steps: int  # actions per evaluation episode (whole chunks of the tiny so100 policy)


# grasp: 124 = 4 + 8 * 15 actions, twice what its expert needs; place: 164 = 4 + 8 * 20, its expert needs ~125
SCENES = {"grasp": Scene(GraspScene, grasp.TASK, 124), "place": Scene(PlaceScene, TASK, 164)}


def get_scene(name: str) -> Scene:
    if name not in SCENES:
        raise ValueError(f"scene: expected one of {sorted(SCENES)}, got {name!r}")
    return SCENES[name]
