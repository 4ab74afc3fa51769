"""A scripted reach-and-grasp expert for `lingbot_edge.robot.grasp.GraspScene`.

Closed loop on the joint readings: the phase follows from where the arm is (approach above the cube
with the jaws open, descend, close, lift), and each tick's target moves at most `speed` units toward
the phase's waypoint, so the motion is smooth and the safety filter's 8-unit step limit never bites.
Waypoints come from `scene.grasp_joints` (IK, gripper pointing down).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lingbot_edge.robot.grasp import CUBE_Z, grasp_joints, tip_position
from lingbot_edge.robot.safety import SafetyFilter
from lingbot_edge.robot.so100 import action_dict, joints_of

GRIP_OPEN_TARGET = 60.0
GRIP_CLOSED_TARGET = 0.0
HOVER = 0.06  # m above the table: the pre-grasp and lift height of the tip
# The demonstrations' approach: the tip on a straight line to the hover point at this speed (m per tick).
# Joint-space moves at constant speed let a policy copy its past actions and ignore the cube (bench/results/
# task_success/so100_grasp.md); `train record` / `train fit` default to this.
RECORDING_CARTESIAN_SPEED = 0.004
# m: the largest approach detour of a recorded episode (`ScriptedExpert.detour`; bench/results/train_recipes.md)
RECORDING_DETOUR = 0.0


def episode_detour(seed: int, largest: float) -> tuple[float, float]:
    """The approach detour of episode `seed`: uniform in the disk of radius `largest` m (its own RNG stream,
    so the cube and start pose of a seed do not change)."""
    rng = np.random.default_rng([seed, 1])
    r, a = largest * np.sqrt(rng.uniform()), rng.uniform(0.0, 2 * np.pi)
    return float(r * np.cos(a)), float(r * np.sin(a))


def recording_expert(scene, seed: int, gain: float = 0.0, cartesian_speed: float = RECORDING_CARTESIAN_SPEED,
                     detour: float = RECORDING_DETOUR) -> ScriptedExpert:
    """The expert `train record` records episode `seed` of `scene` with (and `train eval`'s expert row runs)."""
    return ScriptedExpert(scene.cube.copy(), gain=gain, cartesian_speed=cartesian_speed,
                          detour=episode_detour(seed, detour))


def run_expert(scene, expert, steps: int, on_tick=None):
    """`steps` ticks of `expert` on `scene` through a fresh `SafetyFilter` (connect .. disconnect); `on_tick(obs,
    q, sent)` sees each tick's observation, joint readings and the target sent. Returns the filter."""
    safety = SafetyFilter()
    scene.connect()
    obs = scene.get_observation()
    last = joints_of(obs)
    try:
        for _ in range(steps):
            q = joints_of(obs)
            last = safety(expert(q), q, last)
            if on_tick is not None:
                on_tick(obs, q, last)
            scene.send_action(action_dict(last))
            obs = scene.get_observation()
    finally:
        scene.disconnect()
    return safety


@dataclass
class ScriptedExpert:
    cube_xy: np.ndarray
    speed: float = 2.5  # units per tick (75 units/s at 30 Hz): the sim lags speed / 0.34 < 8
    grip_speed: float = 2.5  # units per tick on the gripper
    tolerance: float = 1.5  # units: a waypoint counts as reached
    # Proportional approach: each tick covers `gain` of what is left to the waypoint (then the speed limit).
    # 0 = constant speed. With a gain, every step's size says how far the cube still is, so the cube's position
    # is in every action a policy learns from, not only in where the motion stops.
    gain: float = 0.0
    # Straight-line approach: the tip moves toward the hover point at this many metres per tick (0 = joint space),
    # so every approach step's joint motion depends on where the cube is, not only where the motion ends.
    cartesian_speed: float = 0.0
    # Straight-line approach only: first to the hover point shifted by this (x, y) in m, then to the hover point.
    # Recorded with a random detour per episode, the demonstrations show the tip off the cube and the move that
    # corrects it (what a policy a few cm off needs to have seen), not only the one perfect path.
    detour: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        x, y = (float(v) for v in self.cube_xy)
        self.waypoints = {
            "approach": grasp_joints(x, y, HOVER, GRIP_OPEN_TARGET),
            "descend": grasp_joints(x, y, CUBE_Z, GRIP_OPEN_TARGET),
            "close": grasp_joints(x, y, CUBE_Z, GRIP_CLOSED_TARGET),
            "lift": grasp_joints(x, y, HOVER, GRIP_CLOSED_TARGET),
        }
        self.hover = np.array([x, y, HOVER])
        self.aims = [self.hover + np.array([*self.detour, 0.0])] if any(self.detour) else []
        self.aims.append(self.hover)  # the straight-line approach's points, in order
        self.phase = "approach"
        self.target: np.ndarray | None = None
        self.path: np.ndarray | None = None  # the straight-line approach's current tip point

    def _reached(self, q: np.ndarray, goal: np.ndarray) -> bool:
        return bool(np.abs(q - goal).max() <= self.tolerance + (2.0 if self.phase == "close" else 0.0))

    def __call__(self, q: np.ndarray) -> np.ndarray:
        """Next joint target (robot units) from the joint readings q."""
        q = np.asarray(q, dtype=np.float64)
        order = ("approach", "descend", "close", "lift", "lift")
        goal = self.waypoints[self.phase]
        if self._reached(q, goal) and self.phase != "lift":
            self.phase = order[order.index(self.phase) + 1]
            goal = self.waypoints[self.phase]
        if self.target is None:
            self.target = q.copy()
        step = np.full(6, self.speed)
        step[5] = self.grip_speed
        if self.cartesian_speed and self.phase == "approach":
            goal = self._along_line(goal)
        move = goal - self.target
        if self.gain:
            move = self.gain * move + np.clip(move, -0.3, 0.3)  # + a small constant part: it gets there
        self.target = self.target + np.clip(move, -step, step)
        return self.target.copy()

    def _along_line(self, waypoint: np.ndarray) -> np.ndarray:
        """Joints of the next point on the straight line(s) from the start tip to the hover point (via the detour;
        gripper and roll of the waypoint); the waypoint itself once the line is done or a point is out of reach."""
        if self.path is None:
            self.path = tip_position(self.target)
        left = self.aims[0] - self.path
        dist = float(np.linalg.norm(left))
        step = self.cartesian_speed
        if dist <= step:
            self.path = self.aims[0].copy()
            if len(self.aims) > 1:
                self.aims.pop(0)
        else:
            self.path = self.path + left * step / dist
        try:
            return grasp_joints(*self.path, gripper=float(waypoint[5]), roll=float(waypoint[4]))
        except ValueError:
            return waypoint
