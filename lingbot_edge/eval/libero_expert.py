"""A scripted LIBERO expert: "pick up the X and place it in the basket" from privileged simulator state.

It reads what hf-libero's observations carry (the end effector's pose, every object's position) and the
object's size from its model (`top_offset`), and answers LIBERO's 7-dim OSC_POSE actions: 3 position deltas,
3 rotation deltas (axis-angle) in [-1, 1] (robosuite scales them by 0.05 m and 0.5 rad), and the gripper (-1
open, +1 closed). No image is used: it is the reference a policy is measured against and the source of the
demonstrations `train record --env libero` writes.

Phases, each a proportional move of the end effector towards a goal with the start orientation held:
above (hover over the object) -> down (fingers around its top) -> close -> lift -> carry (over the basket)
-> release (open and stay). LIBERO's own `check_success()` says whether the object is in the basket.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

ACTION_DIM = 7
OPEN, CLOSED = -1.0, 1.0
ROTATION_SCALE = 0.5  # rad per unit of a rotation action (robosuite's OSC_POSE output_max)


@dataclass(frozen=True)
class ExpertConfig:
    hover: float = 0.08  # m above the object's top before descending
    grasp_depth: float = 0.03  # m below the object's top where the fingers close
    carry_height: float = 0.25  # m above the basket's origin while carrying and releasing
    position_gain: float = 10.0  # action units per m of position error (10: full speed beyond 10 cm)
    rotation_gain: float = 2.0  # action units per rotation unit of orientation error
    reach_tolerance: float = 0.01  # m: a hover goal counts as reached
    grasp_tolerance: float = 0.008  # m: the grasp goal counts as reached
    max_descend_steps: int = 40  # close anyway after this many steps of descending
    close_steps: int = 10  # steps with the gripper closing before lifting
    lift_tolerance: float = 0.02  # m: the carry height counts as reached
    release_tolerance: float = 0.015  # m (horizontal): over the basket, open


def quat_to_matrix(quat: np.ndarray) -> np.ndarray:
    """Rotation matrix of a unit quaternion in robosuite's (x, y, z, w) order."""
    x, y, z, w = (float(v) for v in quat)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def matrix_to_axis_angle(rot: np.ndarray) -> np.ndarray:
    """Axis-angle vector (axis times angle, rad) of a rotation matrix."""
    angle = float(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0)))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    norm = float(np.linalg.norm(axis))
    if norm < 1e-9:  # angle near pi: the axis is the eigenvector of eigenvalue 1
        _, vectors = np.linalg.eigh((rot + np.eye(3)) / 2)
        return vectors[:, -1] * angle
    return axis / norm * angle


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """LeRobot's LIBERO state convention for the end effector's orientation."""
    return matrix_to_axis_angle(quat_to_matrix(quat))


class PickPlaceExpert:
    """Picks `obj` and drops it over `target` (observation names without `_pos`, e.g. "bbq_sauce_1",
    "basket_1"); `object_top`: m from the object's origin to its top (LIBERO's `top_offset`)."""

    def __init__(self, obj: str, target: str, object_top: float, config: ExpertConfig | None = None):
        self.obj, self.target, self.object_top = obj, target, float(object_top)
        self.config = config or ExpertConfig()
        self.phase, self.phase_steps = "above", 0
        self._start_rotation: np.ndarray | None = None

    @classmethod
    def for_task(cls, problem, config: ExpertConfig | None = None) -> PickPlaceExpert:
        """The expert of a LIBERO pick-and-place problem (the env inside OffScreenRenderEnv): its two objects of
        interest are the one to pick and the container."""
        names = list(getattr(problem, "obj_of_interest", []))
        if len(names) != 2:
            raise ValueError(f"obj_of_interest: expected [object, container], got {names}: the expert knows "
                             f"pick-and-place tasks only")
        obj, target = names
        return cls(obj, target, float(problem.objects_dict[obj].top_offset[2]), config)

    def _goal(self, eef: np.ndarray, obj: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
        """This step's position goal and gripper command; advances the phase."""
        c, self.phase_steps = self.config, self.phase_steps + 1
        carry = np.array([target[0], target[1], target[2] + c.carry_height])
        if self.phase == "above":
            goal = np.array([obj[0], obj[1], obj[2] + self.object_top + c.hover])
            if np.linalg.norm(goal - eef) < c.reach_tolerance:
                self._advance("down")
            return goal, OPEN
        if self.phase == "down":
            goal = np.array([obj[0], obj[1], obj[2] + self.object_top - c.grasp_depth])
            if np.linalg.norm(goal - eef) < c.grasp_tolerance or self.phase_steps > c.max_descend_steps:
                self._advance("close")
            return goal, OPEN
        if self.phase == "close":
            if self.phase_steps >= c.close_steps:
                self._advance("lift")
            return eef.copy(), CLOSED
        if self.phase == "lift":
            goal = np.array([eef[0], eef[1], carry[2]])
            if abs(goal[2] - eef[2]) < c.lift_tolerance:
                self._advance("carry")
            return goal, CLOSED
        if self.phase == "carry":
            if np.linalg.norm(carry[:2] - eef[:2]) < c.release_tolerance:
                self._advance("release")
            return carry, CLOSED
        return carry, OPEN

    def _advance(self, phase: str) -> None:
        self.phase, self.phase_steps = phase, 0

    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """One action from a raw LIBERO observation (`robot0_eef_pos`, `robot0_eef_quat`, `<obj>_pos`)."""
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        rotation = quat_to_matrix(obs["robot0_eef_quat"])
        if self._start_rotation is None:
            self._start_rotation = rotation
        goal, gripper = self._goal(eef, np.asarray(obs[f"{self.obj}_pos"]), np.asarray(obs[f"{self.target}_pos"]))
        c = self.config
        action = np.empty(ACTION_DIM)
        action[:3] = np.clip((goal - eef) * c.position_gain, -1.0, 1.0)
        error = matrix_to_axis_angle(self._start_rotation @ rotation.T)
        action[3:6] = np.clip(error / ROTATION_SCALE * c.rotation_gain, -1.0, 1.0)
        action[6] = gripper
        return action
