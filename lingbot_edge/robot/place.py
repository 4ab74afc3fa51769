"""The place-in-box task on the kinematic SO-100: grasp a green cube and release it over a paper box.

The walkthrough's new task, post-trained from the grasp checkpoint on a few dozen demonstrations
(docs/posttrain.md). `PlaceScene` is `GraspScene` (joint dynamics, grasp rule, textured table, cameras)
with another layout per seed and another success test:

- the cube is green and lies on the right half of the workspace (bearing -30..-3 degrees, 0.14-0.21 m
  from the base), so it never starts in the box;
- an open paper box (8 cm inside, `BOX_INNER`) stands on the left half, its centre jittered by up to
  `BOX_JITTER` m per seed around `BOX_CENTRE`; the top camera draws its floor and walls under the arm;
- success: at the end of the episode the cube is released (not held) with its centre inside the box's
  inner footprint. A released cube falls where the tip let it go (the simulator is kinematic: the box's
  walls do not stop a cube carried low through them).

The wrist camera draws the cube green as well; it does not draw the box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lingbot_edge.robot import grasp
from lingbot_edge.robot.grasp import HOME, HOME_JITTER, GraspScene
from lingbot_edge.robot.so100 import SO100_CAMERAS

TASK = "put the green cube in the paper box"  # the prompt of the task's demonstrations
CUBE_RADIUS = (0.14, 0.21)  # m from the arm base
CUBE_BEARING = (-30.0, -3.0)  # degrees: the right half of the workspace (y < 0), away from the box
BOX_CENTRE = (0.15, 0.075)  # m (x forward, y left): the box's mean position
BOX_JITTER = 0.008  # m: the box centre moves up to this much along each axis per seed (it stays in the top view)
BOX_INNER = 0.08  # m: inner side of the square box; the cube's centre must end inside it
BOX_WALL = 0.006  # m: wall thickness as drawn
CUBE_COLOR = (40, 180, 60)
BOX_FLOOR_COLOR = (214, 184, 140)  # the paper box's inside
BOX_WALL_COLOR = (150, 110, 70)
GRASP_CUBE_COLOR = (200, 30, 30)  # how GraspScene draws its cube: recoloured here


def layout_for_seed(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cube xy, box centre xy, initial joints) of an episode seed: the only randomness of the task."""
    rng = np.random.default_rng([seed, 7])  # its own stream: not the grasp task's cube of the same seed
    radius = rng.uniform(*CUBE_RADIUS)
    bearing = math.radians(rng.uniform(*CUBE_BEARING))
    initial = np.array(HOME, dtype=np.float64)
    initial[:4] += rng.uniform(-HOME_JITTER, HOME_JITTER, 4)
    box = np.array(BOX_CENTRE) + rng.uniform(-BOX_JITTER, BOX_JITTER, 2)
    return np.array([radius * math.cos(bearing), radius * math.sin(bearing)]), box, initial


class PlaceScene(GraspScene):
    """GraspScene with the green cube and the box of `seed`; success = the cube released inside the box."""

    task = TASK

    def __init__(self, seed: int, cameras: Sequence[str] = SO100_CAMERAS, height: int = 96, width: int = 128,
                 tolerance: float = 0.02, **kwargs):
        super().__init__(seed, cameras=cameras, height=height, width=width, tolerance=tolerance, **kwargs)
        cube, self.box, initial = layout_for_seed(seed)
        self.cube = cube
        self.initial = np.clip(initial, self.lower, self.upper)
        self.q = self.initial.copy()
        self.target = self.q.copy()

    def cube_in_box(self) -> bool:
        return bool(np.abs(self.cube - self.box).max() <= BOX_INNER / 2)

    @property
    def success(self) -> bool:
        return not self.held and self.cube_in_box()

    def render(self, view: str) -> np.ndarray:
        img = super().render(view)
        if view == "top":  # the box where the table shows (under the cube and the arm)
            h, w = img.shape[:2]
            s = w / grasp.WORKSPACE_WIDTH
            rows, cols = np.mgrid[:h, :w].astype(np.float64) + 0.5
            x, y = grasp.WORKSPACE_NEAR + (h - rows) / s, (cols - w / 2) / s
            table = np.all(img == grasp.table_color(x, y), axis=-1)
            off = np.maximum(np.abs(x - self.box[0]), np.abs(y - self.box[1]))
            img[table & (off <= BOX_INNER / 2)] = BOX_FLOOR_COLOR
            img[table & (off > BOX_INNER / 2) & (off <= BOX_INNER / 2 + BOX_WALL)] = BOX_WALL_COLOR
        if view != "side":
            img[np.all(img == GRASP_CUBE_COLOR, axis=-1)] = CUBE_COLOR
        return img
