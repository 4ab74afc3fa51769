"""A scripted place-in-box expert for `lingbot_edge.robot.place.PlaceScene`.

The grasp expert (`train.expert.ScriptedExpert`, straight-line approach) grasps the cube and lifts it; then
the tip carries it on a straight line at the hover height to above the box centre, and the jaws open
there. Like the grasp expert it rate-limits every joint target, so the safety filter never clips it.
"""

from __future__ import annotations

import numpy as np

from lingbot_edge.robot.grasp import grasp_joints, tip_position
from train.expert import GRIP_CLOSED_TARGET, GRIP_OPEN_TARGET, HOVER, RECORDING_CARTESIAN_SPEED, ScriptedExpert

CARRY_SPEED = 0.005  # m per tick along the carry line (the joint speed limit binds near its ends)
# Gripper units per tick while opening over the box: faster, the sim's lag exceeds the safety filter's 8-unit step.
RELEASE_SPEED = 2.5


class PlaceExpert:
    """Grasp (ScriptedExpert) -> carry above the box -> open; called with the joint readings each tick."""

    def __init__(self, cube_xy, box_xy, cartesian_speed: float = RECORDING_CARTESIAN_SPEED,
                 carry_speed: float = CARRY_SPEED, release_speed: float = RELEASE_SPEED):
        self.grasp = ScriptedExpert(np.asarray(cube_xy, dtype=np.float64).copy(), cartesian_speed=cartesian_speed)
        self.drop = np.array([float(box_xy[0]), float(box_xy[1]), HOVER])
        self.drop_joints = grasp_joints(*self.drop, gripper=GRIP_CLOSED_TARGET)  # raises when out of reach
        self.carry_speed, self.release_speed = carry_speed, release_speed
        self.phase = "grasp"
        self.target: np.ndarray | None = None
        self.path: np.ndarray | None = None  # the carry line's current tip point

    def __call__(self, q) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        if self.phase == "grasp":
            target = self.grasp(q)
            lifted = self.grasp.phase == "lift" and self.grasp._reached(q, self.grasp.waypoints["lift"])
            if not lifted:
                return target
            self.phase, self.target = "carry", target.copy()
            self.path = tip_position(self.target)
        if self.phase == "carry":
            left = self.drop - self.path
            dist = float(np.linalg.norm(left))
            self.path = self.drop.copy() if dist <= self.carry_speed else self.path + left * self.carry_speed / dist
            goal = grasp_joints(*self.path, gripper=GRIP_CLOSED_TARGET)
            self.target = self.target + np.clip(goal - self.target, -self.grasp.speed, self.grasp.speed)
            if dist <= self.carry_speed and np.abs(q - self.drop_joints).max() <= self.grasp.tolerance:
                self.phase = "release"
        if self.phase == "release":
            self.target[5] = min(GRIP_OPEN_TARGET, self.target[5] + self.release_speed)
        return self.target.copy()


def place_expert(scene, seed: int, cartesian_speed: float = RECORDING_CARTESIAN_SPEED, **_) -> PlaceExpert:
    """The expert `train record --scene place` records episode `seed` of `scene` with."""
    return PlaceExpert(scene.cube.copy(), scene.box.copy(), cartesian_speed=cartesian_speed)
