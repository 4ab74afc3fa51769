"""The reach-and-grasp task on the kinematic SO-100: a red cube at a seeded random position.

The task the embedded trained checkpoint (`lingbot_edge/assets/so100-grasp-tiny`, trained by
`lingbot-edge train`) does, and what `lingbot-edge demo` measures its success on.

`GraspScene` subclasses `KinematicSO100` (rendering, joint dynamics and the LeRobot API are the
simulator's own) and adds what a task needs: the cube's position drawn from the episode seed (it is
drawn by the simulator's top and wrist cameras), a grasp rule, the cube following the gripper once
held, and `success`. Forward kinematics and IK use the simulator's own link model (`_chain`).

The "top" camera is a workspace camera: looking straight down at the table in front of the arm (0.09 to
~0.29 m forward, +-0.13 m sideways), the framing a real SO-100 setup gives its overhead camera. The
simulator's own top view shows the whole 0.5 m around the base, where the cube's range of positions is
a few pixels wide once resized to the policy's 64x64 input; the wrist and side views are the simulator's.

The table is textured: its colour changes smoothly with the table position (`table_color`), as markings on
a real workspace do. The DiT knows where a token is only through RoPE, i.e. relative to other tokens; on a
uniform table a patch showing the cube looks the same wherever it is, and the tiny model cannot tell
where the cube is (a trained policy went to the average grasp spot). With the texture a patch's own
content says where on the table it is, in the top view and behind the cube in the wrist views.

Grasp rule: the jaws must be open (gripper > GRIP_OPEN) and then close (< GRIP_CLOSED) while the
tip is within `tolerance` m of the cube centre horizontally and below GRASP_HEIGHT. Success: the
cube is held when the episode ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lingbot_edge.robot.sim import KinematicSO100
from lingbot_edge.robot.so100 import SO100_CAMERAS

TASK = "pick up the red cube"  # the prompt of the task's demonstrations
GRIP_OPEN = 40.0
GRIP_CLOSED = 15.0
GRASP_HEIGHT = 0.045  # m: tip height below which a closing gripper grasps
CUBE_Z = 0.02  # m: cube centre height (a 4 cm cube on the table)
HOME = (0.0, 0.0, 0.0, 30.0, 0.0, 30.0)  # the simulator's default initial pose
# Cube placement (polar, around the arm base): radius in m, bearing in degrees.
CUBE_RADIUS = (0.14, 0.21)
CUBE_BEARING = (-30.0, 30.0)
HOME_JITTER = 6.0  # +- units on pan, lift, elbow and wrist flex of the initial pose


def tip_position(q: Sequence[float]) -> np.ndarray:
    """(x, y, z) of the gripper tip in metres for joint values q (the simulator's link model)."""
    pan = math.radians(q[0] * 1.1)
    phi = math.radians(90.0 - q[1] * 0.9)
    r, z = 0.0, 0.05
    for length, bend in ((0.12, 0.0), (0.13, 90.0 + q[2] * 0.9), (0.10, q[3] * 0.9)):
        phi -= math.radians(bend)
        r, z = r + length * math.cos(phi), z + length * math.sin(phi)
    return np.array([r * math.cos(pan), r * math.sin(pan), z])


MAX_WRIST_FLEX = 95.0  # units: IK tilts the gripper rather than flex the wrist past this


def grasp_joints(x: float, y: float, z: float, gripper: float, roll: float = 0.0) -> np.ndarray:
    """Joint values that put the tip at (x, y, z) with the gripper pointing down as steeply as the wrist
    allows (straight down when it can, tilted back in 2 degree steps otherwise; elbow up). Raises
    ValueError when the point is out of reach."""
    for tilt in range(0, 62, 2):
        q = _ik(x, y, z, math.radians(-90.0 + tilt), gripper, roll)
        if q is not None and abs(q[3]) <= MAX_WRIST_FLEX and np.abs(q[:3]).max() <= 100.0:
            return q
    raise ValueError(f"target ({x:.3f}, {y:.3f}, {z:.3f}) m is out of the arm's reach")


def _ik(x: float, y: float, z: float, pitch: float, gripper: float, roll: float) -> np.ndarray | None:
    """Joints for the tip at (x, y, z) with the gripper link at `pitch` rad from the horizontal."""
    r = math.hypot(x, y)
    l1, l2, l3 = 0.12, 0.13, 0.10
    dr, dz = r - l3 * math.cos(pitch), z - l3 * math.sin(pitch) - 0.05  # wrist relative to the shoulder
    d2 = dr * dr + dz * dz
    cos_bend = (d2 - l1 * l1 - l2 * l2) / (2 * l1 * l2)
    if not -1.0 <= cos_bend <= 1.0:
        return None
    bend = math.acos(cos_bend)
    phi1 = math.atan2(dz, dr) + math.atan2(l2 * math.sin(bend), l1 + l2 * math.cos(bend))
    phi2 = phi1 - bend
    deg = math.degrees
    return np.array([
        deg(math.atan2(y, x)) / 1.1,
        (90.0 - deg(phi1)) / 0.9,
        (deg(bend) - 90.0) / 0.9,
        (deg(phi2) - deg(pitch)) / 0.9,
        roll,
        gripper,
    ])


def cube_for_seed(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cube xy, initial joints) of an episode seed: the only randomness of the task."""
    rng = np.random.default_rng(seed)
    radius = rng.uniform(*CUBE_RADIUS)
    bearing = math.radians(rng.uniform(*CUBE_BEARING))
    initial = np.array(HOME, dtype=np.float64)
    initial[:4] += rng.uniform(-HOME_JITTER, HOME_JITTER, 4)  # not the wrist roll: it stays 0
    return np.array([radius * math.cos(bearing), radius * math.sin(bearing)]), initial


class GraspScene(KinematicSO100):
    """KinematicSO100 with the cube of `seed`, the grasp rule and a success test."""

    def __init__(self, seed: int, cameras: Sequence[str] = SO100_CAMERAS, height: int = 96, width: int = 128,
                 tolerance: float = 0.02, **kwargs):
        cube, initial = cube_for_seed(seed)
        super().__init__(cameras=cameras, height=height, width=width, initial=initial, cube_xy=cube, **kwargs)
        self.seed = seed
        self.tolerance = tolerance
        self.held = False
        self._armed = False  # the jaws were open near the cube: a closing now grasps

    def tip(self) -> np.ndarray:
        return tip_position(self.q)

    def near_cube(self) -> bool:
        x, y, z = self.tip()
        return math.hypot(x - self.cube[0], y - self.cube[1]) <= self.tolerance and z <= GRASP_HEIGHT

    def send_action(self, action):
        sent = super().send_action(action)
        gripper = self.q[5]
        if not self.held:
            near = self.near_cube()
            self._armed = near and (self._armed or gripper > GRIP_OPEN)
            if self._armed and gripper < GRIP_CLOSED:
                self.held = True
        elif gripper > GRIP_OPEN:  # opened again: the cube drops where it is
            self.held = False
        if self.held:
            self.cube = self.tip()[:2].copy()
        return sent

    @property
    def success(self) -> bool:
        return self.held

    def render(self, view: str) -> np.ndarray:
        if view == "side":
            return super().render(view)
        if view != "top":  # wrist: the simulator's drawing over the table texture under the gripper
            img = super().render(view)
            table = np.all(img == TABLE_BACKGROUND, axis=-1)
            img[table] = self._wrist_table(img.shape[0], img.shape[1])[table]
            return img
        h, w = self.height, self.width
        s = w / WORKSPACE_WIDTH  # pixels per metre
        rows, cols = np.mgrid[:h, :w].astype(np.float64) + 0.5
        img = table_color(WORKSPACE_NEAR + (h - rows) / s, (cols - w / 2) / s)

        def px(x: float, y: float) -> tuple[float, float]:
            return w / 2 + y * s, h - (x - WORKSPACE_NEAR) * s

        cx, cy = px(*self.cube)
        half = 0.02 * s
        _fill(img, lambda xx, yy: (abs(xx - cx) <= half) & (abs(yy - cy) <= half), (200, 30, 30))
        pan, pts = self._chain()
        xy = [px(r * math.cos(pan), r * math.sin(pan)) for r, _ in pts]
        colors = [(60, 60, 60), (230, 140, 30), (230, 140, 30), (40, 120, 220), (40, 120, 220)]
        for i in range(1, len(xy)):
            _fill(img, _segment(xy[i - 1], xy[i], max(1.0, 0.012 * s)), colors[i])
        grip = self.q[5] / 100.0
        _fill(img, _segment(xy[-1], xy[-1], max(1.5, (0.006 + 0.01 * grip) * s)), (20, 20, 20))
        return img


    def _wrist_table(self, h: int, w: int) -> np.ndarray:
        """The table texture as the simulator's wrist view maps table points to pixels (the inverse of its
        cube placement: offset from the tip, x2 scale, rotated by the wrist roll)."""
        pan, pts = self._chain()
        r_tip = pts[-1][0]
        tip = np.array([r_tip * math.cos(pan), r_tip * math.sin(pan)])
        s = min(h, w) / 0.5 * 2
        rows, cols = np.mgrid[:h, :w].astype(np.float64) + 0.5
        rx, ry = cols - w / 2, h / 2 - rows
        roll = math.radians(self.q[4] * 0.9)
        dy = rx * math.cos(roll) + ry * math.sin(roll)
        dx = -rx * math.sin(roll) + ry * math.cos(roll)
        return table_color(tip[0] + dx / s, tip[1] + dy / s)


WORKSPACE_WIDTH = 0.26  # m across the top camera's image
WORKSPACE_NEAR = 0.09  # m: the forward distance at the image's bottom edge
TABLE_BACKGROUND = (200, 190, 170)  # the simulator's plain background, replaced by the texture


def table_color(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """uint8 RGB of the table at (x, y) m: green grows with the forward distance, blue to the left, over the
    workspace (red stays low: the cube is the only red thing)."""
    g = np.clip(60 + 700 * (x - WORKSPACE_NEAR), 0, 255)
    b = np.clip(150 + 700 * y, 0, 255)
    return np.stack([np.full_like(g, 110), g, b], axis=-1).astype(np.uint8)


def _segment(p0, p1, radius: float):
    """Inside-test of a thick segment (a disk when p0 == p1), for `_fill`."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    denom = dx * dx + dy * dy

    def inside(xx, yy):
        t = np.zeros_like(xx) if denom == 0 else np.clip(((xx - x0) * dx + (yy - y0) * dy) / denom, 0, 1)
        return (xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2 <= radius * radius

    return inside


def _fill(img: np.ndarray, inside, color) -> None:
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]].astype(np.float32) + 0.5
    img[inside(xx, yy)] = color
