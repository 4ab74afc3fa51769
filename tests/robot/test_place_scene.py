"""The place-in-box task (`lingbot_edge.robot.place`): layouts, drawing, the success rule, the scripted expert
and its recording in LeRobot's layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lingbot_edge.robot import grasp
from lingbot_edge.robot.place import BOX_INNER, BOX_WALL, CUBE_COLOR, TASK, PlaceScene, layout_for_seed
from lingbot_edge.robot.scenes import get_scene
from train.expert import run_expert
from train.expert_place import PlaceExpert, place_expert


def test_the_cube_never_starts_in_or_against_the_box():
    for seed in range(2000):
        cube, box, initial = layout_for_seed(seed)
        # the cube's 4 cm footprint stays clear of the box's outer walls
        assert np.abs(cube - box).max() > BOX_INNER / 2 + BOX_WALL + 0.02, seed
        assert 0.14 <= np.hypot(*cube) <= 0.21 and cube[1] < 0
        assert np.abs(initial - np.array(grasp.HOME)).max() <= grasp.HOME_JITTER


@pytest.mark.parametrize("seeds", [range(100_000, 100_020), range(200_000, 200_020)], ids=["held-out", "validation"])
def test_expert_puts_the_cube_in_the_box(seeds):
    steps = get_scene("place").eval_steps
    for seed in seeds:
        scene = PlaceScene(seed, cameras=())
        safety = run_expert(scene, place_expert(scene, seed), steps)
        assert scene.success and not scene.held, seed
        assert safety.clipped == 0, seed  # rate-limited: the safety filter never changes a target
        # independent of the success rule: released within a cm of the box centre, where the expert aims
        assert np.abs(scene.cube - scene.box).max() < 0.01, (seed, scene.cube, scene.box)


def test_a_cube_released_beside_the_box_fails():
    seed = 100_003
    scene = PlaceScene(seed, cameras=())
    beside = scene.box + np.array([0.0, -BOX_INNER])  # one box width toward the cube
    run_expert(scene, PlaceExpert(scene.cube, beside), get_scene("place").eval_steps)
    assert not scene.held and np.abs(scene.cube - beside).max() < 0.01
    assert not scene.success


def test_a_held_cube_over_the_box_is_not_a_success():
    scene = PlaceScene(100_000, cameras=())
    scene.connect()
    scene.held, scene.cube = True, scene.box.copy()
    assert scene.cube_in_box() and not scene.success


def test_top_view_draws_the_box_and_a_green_cube():
    h, w = 128, 256
    scene = PlaceScene(100_001, cameras=("camera_top",), height=h, width=w)
    scene.connect()
    img = scene.get_observation()["camera_top"]
    px_per_m = w / grasp.WORKSPACE_WIDTH
    green = np.all(img == CUBE_COLOR, axis=-1).sum()
    assert green == pytest.approx((0.04 * px_per_m) ** 2, rel=0.15)  # the whole 4 cm cube, nothing else
    assert not np.all(img == (200, 30, 30), axis=-1).any()  # no red cube left
    floor = np.all(img == (214, 184, 140), axis=-1).sum()
    assert floor == pytest.approx((BOX_INNER * px_per_m) ** 2, rel=0.15)  # the arm starts away from the box
    # the box sits where its seed puts it: its floor's centroid, in table metres
    rows, cols = np.nonzero(np.all(img == (214, 184, 140), axis=-1))
    x = grasp.WORKSPACE_NEAR + (h - rows.mean() - 0.5) / px_per_m
    y = (cols.mean() + 0.5 - w / 2) / px_per_m
    assert np.hypot(x - scene.box[0], y - scene.box[1]) < 0.005


def test_record_place_dataset(tmp_path):
    from train.dataset import record_dataset

    root = record_dataset(tmp_path / "place", [0, 1], 21, height=32, width=64, cameras=("camera_top",),
                          progress=False, scene="place")
    assert json.loads((root / "meta" / "tasks.jsonl").read_text()) == {"task_index": 0, "task": TASK}
    episodes = [json.loads(line) for line in (root / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert [e["seed"] for e in episodes] == [0, 1] and all(e["tasks"] == [TASK] for e in episodes)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["total_frames"] == 42 and "observation.images.camera_top" in info["features"]
