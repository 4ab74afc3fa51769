"""The grasp task, its expert and the LeRobot recording (no training): fast, no model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lingbot_edge.robot.grasp import CUBE_Z, GraspScene, grasp_joints, tip_position
from train.dataset import feature_stats, record_dataset, record_episode
from train.expert import ScriptedExpert, run_expert


def test_tip_position_is_the_simulators_kinematics():
    scene = GraspScene(3, cameras=())
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene.q = rng.uniform(-90, 90, 6)
        pan, pts = scene._chain()  # the simulator's own link model (what its cameras draw)
        r, z = pts[-1]
        np.testing.assert_allclose(tip_position(scene.q), [r * np.cos(pan), r * np.sin(pan), z], atol=1e-12)


@pytest.mark.parametrize("xyz", [(0.2, 0.0, CUBE_Z), (0.15, -0.08, 0.06), (0.14, 0.07, CUBE_Z)])
def test_ik_reaches_the_target_pointing_down(xyz):
    q = grasp_joints(*xyz, gripper=50.0)
    np.testing.assert_allclose(tip_position(q), xyz, atol=1e-9)
    assert np.abs(q[:4]).max() <= 100
    with pytest.raises(ValueError, match="out of the arm's reach"):
        grasp_joints(0.5, 0.0, 0.0, gripper=0.0)


def _run(scene, controller, steps=100):
    safety = run_expert(scene, controller, steps)
    return scene.success, safety.clipped


def test_expert_grasps_every_seed_without_tripping_the_safety_filter():
    for seed in range(12):
        scene = GraspScene(seed, cameras=())
        success, clipped = _run(scene, ScriptedExpert(scene.cube.copy()))
        assert success, seed
        assert clipped == 0, seed


def test_grasp_needs_the_cube_under_the_jaws():
    # The expert of another seed's cube (a different place) closes its jaws on nothing.
    scene = GraspScene(5, cameras=())
    other = GraspScene(6, cameras=()).cube
    assert np.linalg.norm(other - scene.cube) > 0.03
    assert not _run(scene, ScriptedExpert(other.copy()))[0]
    # Random targets never grasp.
    rng = np.random.default_rng(0)
    assert not any(_run(GraspScene(s, cameras=()), lambda q: rng.uniform(-100, 100, 6))[0] for s in range(5))


def test_recorded_dataset_is_lerobot_v21_and_reads_back(tmp_path):
    from lingbot_edge.io.episodes import read_parquet_columns, read_video

    root = record_dataset(tmp_path / "ds", [0, 1], steps=13, progress=False)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["total_episodes"] == 2 and info["total_frames"] == 26
    assert info["features"]["action"]["shape"] == [6]
    cols = read_parquet_columns(root / info["data_path"].format(episode_chunk=0, episode_index=1),
                                ["action", "observation.state", "frame_index", "index"])
    rec = record_episode(1, 13)
    np.testing.assert_array_equal(cols["action"], rec["action"])
    np.testing.assert_array_equal(cols["index"], np.arange(13, 26))
    video = read_video(root / info["video_path"].format(episode_chunk=0, video_key="observation.images.camera_top",
                                                        episode_index=1))
    assert video.shape == rec["frames"]["camera_top"].shape
    assert np.abs(video.astype(int) - rec["frames"]["camera_top"]).max() <= 2  # crf 0, yuv444p
    stats = json.loads((root / "meta" / "stats.json").read_text())
    both = np.concatenate([record_episode(0, 13)["action"], rec["action"]])
    np.testing.assert_allclose(stats["action"]["q01"], np.quantile(both, 0.01, axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(both, 0.99, axis=0), rtol=1e-6)
    assert feature_stats(both)["count"] == [26]
    with pytest.raises(FileExistsError):
        record_dataset(root, [2], steps=5, progress=False)


def test_the_cube_is_where_the_top_camera_draws_it():
    from lingbot_edge.robot.grasp import WORKSPACE_NEAR, WORKSPACE_WIDTH

    for seed in range(4):
        scene = GraspScene(seed, views={"top": "top", "wrist": "wrist"}, cameras=("top", "wrist"))
        scene.connect()
        obs = scene.get_observation()
        red = (obs["top"][..., 0] == 200) & (obs["top"][..., 1] == 30)
        rows, cols = np.nonzero(red)
        s = scene.width / WORKSPACE_WIDTH
        x = WORKSPACE_NEAR + (scene.height - rows.mean() - 0.5) / s
        y = (cols.mean() + 0.5 - scene.width / 2) / s
        np.testing.assert_allclose([x, y], scene.cube, atol=0.006)  # the arm may hide part of the cube
        assert ((obs["wrist"][..., 0] == 200) & (obs["wrist"][..., 1] == 30)).any()


def test_the_table_texture_says_where_a_pixel_is():
    """Top view: a pixel's colour is the table's at the point the camera framing puts there; wrist view: the
    centre of the image shows the table under the gripper tip (the simulator's link model)."""
    from lingbot_edge.robot.grasp import WORKSPACE_NEAR, WORKSPACE_WIDTH, table_color

    scene = GraspScene(3, views={"top": "top", "wrist": "wrist"}, cameras=("top", "wrist"))
    scene.connect()
    obs = scene.get_observation()
    s = scene.width / WORKSPACE_WIDTH
    row, col = 2, 3  # a corner pixel: neither the arm nor the cube
    x, y = WORKSPACE_NEAR + (scene.height - row - 0.5) / s, (col + 0.5 - scene.width / 2) / s
    np.testing.assert_array_equal(obs["top"][row, col], table_color(np.array(x), np.array(y)))
    tip = tip_position(scene.q)
    h, w = scene.height, scene.width
    np.testing.assert_allclose(obs["wrist"][h // 2 - 1, w // 2 - 1].astype(int),
                               table_color(np.array(tip[0]), np.array(tip[1])).astype(int), atol=2)
    # Different places, different colours: the texture varies over the whole workspace.
    corners = table_color(np.array([0.1, 0.1, 0.28, 0.28]), np.array([-0.12, 0.12, -0.12, 0.12]))
    assert len({tuple(c) for c in corners}) == 4


def test_cube_tracking_is_the_least_squares_slope():
    from lingbot_edge.eval.sim import cube_tracking

    rng = np.random.default_rng(0)
    cube = rng.uniform(0.1, 0.2, (12, 2))
    grasp = np.stack([0.7 * cube[:, 0] + 0.03, np.full(12, 0.05)], 1) + rng.normal(0, 0.002, (12, 2))
    episodes = [{"cube_xy": c.tolist(), "grasp_xy": g.tolist()} for c, g in zip(cube, grasp, strict=True)]
    sx, sy = cube_tracking(episodes)
    np.testing.assert_allclose([sx, sy], [np.polyfit(cube[:, 0], grasp[:, 0], 1)[0],
                                          np.polyfit(cube[:, 1], grasp[:, 1], 1)[0]], rtol=1e-9)
    assert 0.6 < sx < 0.8 and abs(sy) < 0.1


def test_cartesian_expert_closes_in_on_the_hover_point_and_grasps():
    """The straight-line approach: the tip of the targets closes in on the hover point above the cube (the
    simulator's link model; the joint rate limit lets it lag where the IK turns the wrist), the expert still
    grasps, and the safety filter never clips it."""
    scene = GraspScene(5, cameras=())
    expert = ScriptedExpert(scene.cube.copy(), cartesian_speed=0.004)
    hover = np.array([*scene.cube, 0.06])
    dist = []

    def on_tick(obs, q, sent):  # expert.target: the target it asked for this tick, before the filter
        if expert.phase == "approach":
            dist.append(float(np.linalg.norm(tip_position(expert.target) - hover)))

    safety = run_expert(scene, expert, 100, on_tick)
    assert scene.success and safety.clipped == 0
    closer = [b < a for a, b in zip(dist, dist[1:], strict=False)]
    assert sum(closer) >= 0.8 * len(closer) and max(b - a for a, b in zip(dist, dist[1:], strict=False)) < 0.006
    assert dist[-1] < 0.015


def test_detour_expert_passes_the_detour_point_then_grasps():
    """With a detour the straight-line approach first goes to the shifted hover point (the targets' tip comes
    within 1 cm of it, by the simulator's link model), then back over the cube, and still grasps unclipped;
    `episode_detour` stays inside its disk and is the seed's own (same seed, same detour)."""
    from train.expert import episode_detour

    detours = np.array([episode_detour(s, 0.04) for s in range(200)])
    assert np.linalg.norm(detours, axis=1).max() <= 0.04 and np.linalg.norm(detours, axis=1).mean() > 0.02
    assert episode_detour(7, 0.04) == episode_detour(7, 0.04) and episode_detour(7, 0.0) == (0.0, 0.0)
    scene = GraspScene(5, cameras=())
    detour = (0.03, -0.02)
    expert = ScriptedExpert(scene.cube.copy(), cartesian_speed=0.004, detour=detour)
    shifted = np.array([scene.cube[0] + detour[0], scene.cube[1] + detour[1], 0.06])
    near_shifted = []

    def on_tick(obs, q, sent):
        near_shifted.append(float(np.linalg.norm(tip_position(expert.target) - shifted)))

    safety = run_expert(scene, expert, 101, on_tick)
    assert min(near_shifted) < 0.01
    assert scene.success and safety.clipped == 0
