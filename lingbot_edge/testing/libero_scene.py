"""The scripted LIBERO-like scene of the synthesized regression episodes: a table, a bowl, a plate and a
gripper that picks the bowl and places it on the plate, drawn for two 128x128 cameras (agent view, wrist)
in upstream's orientation. Pure numpy; `testing.libero.synthesize_episode` turns it into an episode.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def scene_layout(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def near(row: float, col: float, s: float) -> np.ndarray:
        return np.array([row, col]) + rng.uniform(-s, s, size=2)

    return {
        "bowl": near(0.62, 0.30, 0.04), "plate": near(0.60, 0.68, 0.04), "box": near(0.80, 0.45, 0.03),
        "mug": near(0.72, 0.16, 0.03), "start": near(0.35, 0.22, 0.03),
        "box_color": rng.integers(150, 230, size=3) * np.array([1.0, 0.35, 0.3]),
        "mug_color": rng.integers(60, 200, size=3),
        "table": np.array([150, 105, 70]) + rng.integers(-15, 15, size=3),
    }


def _gripper_state(t: float, lay: dict[str, Any]) -> tuple[np.ndarray, float, float, bool]:
    """Scripted pick-and-place at phase t in [0, 1]: (table position (row, col), height, opening, holding)."""
    bowl, plate, start = lay["bowl"], lay["plate"], lay["start"]
    keys = [  # (phase, position, height, opening)
        (0.00, start, 0.6, 1.0), (0.30, bowl, 0.5, 1.0), (0.42, bowl, 0.05, 1.0), (0.50, bowl, 0.05, 0.0),
        (0.62, bowl, 0.55, 0.0), (0.85, plate, 0.55, 0.0), (0.93, plate, 0.15, 0.0), (1.00, plate, 0.15, 1.0),
    ]
    t = min(max(t, 0.0), 1.0)
    for (t0, p0, z0, o0), (t1, p1, z1, o1) in zip(keys, keys[1:], strict=False):
        if t <= t1:
            a = (t - t0) / (t1 - t0)
            return p0 + a * (p1 - p0), z0 + a * (z1 - z0), o0 + a * (o1 - o0), 0.46 <= t < 0.97
    raise AssertionError("unreachable")  # pragma: no cover


def _fill(img: np.ndarray, mask: np.ndarray, color) -> None:
    img[mask] = np.asarray(color, dtype=np.float64).clip(0, 255).astype(np.uint8)


def draw_frame(t: float, lay: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(agent view, wrist view) uint8 [size, size, 3] at phase t, upstream orientation (table below)."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    rows = np.linspace(0, 1, size)[:, None]
    pos, z, opening, holding = _gripper_state(t, lay)
    bowl = lay["plate"] if t >= 0.97 else lay["bowl"]  # where the bowl rests when not held

    def ellipse(c, ry, rx):
        return ((yy - c[0]) / ry) ** 2 + ((xx - c[1]) / rx) ** 2 < 1

    def rect(c, hy, hx):
        return (abs(yy - c[0]) < hy) & (abs(xx - c[1]) < hx)

    # Agent view: wall above the horizon, table below (both shaded by row), objects, arm, gripper.
    horizon = 0.3

    def to_img(p, h=0.0):
        return horizon + (1 - horizon) * p[0] - 0.3 * h, p[1]

    wall = (np.array([200, 200, 190]) - 60 * rows).clip(0, 255)
    table = (lay["table"] * (0.75 + 0.35 * rows)).clip(0, 255)
    agent = np.where(rows[..., None] < horizon, wall[:, None, :], table[:, None, :]).astype(np.uint8)
    agent = np.ascontiguousarray(np.broadcast_to(agent, (size, size, 3)))
    _fill(agent, ellipse(to_img(lay["plate"]), 0.05, 0.09), (235, 235, 225))
    _fill(agent, rect(to_img(lay["box"]), 0.06, 0.04), lay["box_color"])
    _fill(agent, ellipse(to_img(lay["mug"]), 0.04, 0.035), lay["mug_color"])
    _fill(agent, ellipse(to_img(pos), 0.025, 0.04), np.array(lay["table"]) * 0.55)  # gripper shadow
    bc = to_img(pos, z - 0.05) if holding else to_img(bowl)
    _fill(agent, ellipse(bc, 0.045, 0.07), (25, 25, 30))
    _fill(agent, ellipse((bc[0] - 0.01, bc[1]), 0.025, 0.045), (70, 70, 80))
    gc = np.array(to_img(pos, z + 0.12))
    base = np.array([0.0, 0.12])  # the arm comes in from the top left
    d = gc - base
    s = (((yy - base[0]) * d[0] + (xx - base[1]) * d[1]) / (d @ d)).clip(0, 1)
    _fill(agent, (yy - base[0] - s * d[0]) ** 2 + (xx - base[1] - s * d[1]) ** 2 < 0.03 ** 2, (235, 235, 240))
    _fill(agent, rect(gc, 0.025, 0.035), (60, 60, 65))
    for side in (-1, 1):
        _fill(agent, rect((gc[0] + 0.05, gc[1] + side * (0.015 + 0.025 * opening)), 0.03, 0.007), (90, 90, 95))

    # Wrist view: looking down from the gripper, the table zoomed by the height, fingers at the bottom.
    zoom = 3.0 / (0.3 + z)

    def to_wrist(p):
        return 0.45 + zoom * (p[0] - pos[0]) / 2.2, 0.5 + zoom * (p[1] - pos[1])

    wrist = np.ascontiguousarray(np.broadcast_to(
        (lay["table"] * (0.8 + 0.3 * rows))[:, None, :].clip(0, 255).astype(np.uint8), (size, size, 3)))
    _fill(wrist, ellipse(to_wrist(lay["plate"]), 0.05 * zoom, 0.09 * zoom), (235, 235, 225))
    _fill(wrist, rect(to_wrist(lay["box"]), 0.05 * zoom, 0.04 * zoom), lay["box_color"])
    _fill(wrist, ellipse(to_wrist(lay["mug"]), 0.035 * zoom, 0.035 * zoom), lay["mug_color"])
    if holding:
        _fill(wrist, ellipse((0.62, 0.5), 0.22, 0.3), (25, 25, 30))
    else:
        _fill(wrist, ellipse(to_wrist(bowl), 0.045 * zoom, 0.07 * zoom), (25, 25, 30))
    for side in (-1, 1):
        _fill(wrist, rect((0.9, 0.5 + side * (0.12 + 0.22 * opening)), 0.12, 0.05), (80, 80, 85))
    return agent, wrist

