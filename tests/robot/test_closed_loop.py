"""The tiny policy in the closed loop with real threads, and `run-so100` on the simulator."""


import numpy as np
import pytest

from lingbot_edge.core.config import get_policy_config, tiny_variant
from lingbot_edge.io.loading import load_policy
from lingbot_edge.robot.control import AsyncController, supports_lookahead
from lingbot_edge.robot.sim import KinematicSO100, VideoRecorder
from lingbot_edge.robot.so100 import (
    parse_camera,
)
from lingbot_edge.testing.clocks import SlowClock

CFG = tiny_variant(get_policy_config("so100"))  # F = 2, apf = 4: chunks of 4 then 8 steps (133 / 267 ms at 30 Hz)


def tiny_so100_policy(**overrides):
    return load_policy("tiny", preset="so100", device="cpu", compile=False, seed=0, **overrides)


def test_tiny_policy_closed_loop_in_the_sim_with_video(tmp_path):
    policy = tiny_so100_policy()
    cams = [k.removeprefix("observation.images.") for k in policy.cfg.obs_cam_keys]
    recorder = VideoRecorder(cams)
    robot = KinematicSO100(cameras=cams, height=48, width=64)
    clock = SlowClock(4.0)
    result = AsyncController(robot, policy, "pick up the red cube", on_tick=recorder, clock=clock,
                             sleep=clock.sleep).run(max_chunks=3)
    s = result.summary()
    assert s["chunks_executed"] == 3 and s["exec_ticks"] == 4 + 8 + 8
    # Speed-independent facts only (holds depend on the machine; the fake-clock tests above count them exactly).
    assert result.mode == "lookahead" and supports_lookahead(policy)
    path = recorder.write(tmp_path / "sim.mp4", fps=30)
    import imageio.v2 as imageio

    frames = imageio.mimread(path)
    assert len(frames) == s["ticks"] and frames[0].shape == (48, 192, 3)


def test_cli_run_so100_sim_two_cameras_and_video(tmp_path, capsys):
    from lingbot_edge.cli.main import main

    out = tmp_path / "demo.mp4"
    # --seconds counts the policy's first chunk too (slow on a loaded CPU): the run ends after chunk 0 instead
    assert main(["run-so100", "--robot", "sim", "--seconds", "60", "--max-chunks", "1", "--video", str(out),
                 "--sim-size", "48x64", "--camera", "top", "--camera", "wrist", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "run-so100: lookahead" in printed and "joint-limit" in printed and "step clips" in printed
    import imageio.v2 as imageio

    assert imageio.mimread(out)[0].shape == (48, 128, 3)  # two cameras side by side


def test_cli_run_so100_grasp_scene_places_the_seeds_cube_and_reports_the_task(capsys, monkeypatch):
    """--scene grasp: the robot is the task's scene for --scene-seed, and the run ends with whether the cube is held
    (the scene's own success)."""
    from lingbot_edge.cli import robot as robot_cli
    from lingbot_edge.cli.main import main
    from lingbot_edge.robot.grasp import GraspScene, cube_for_seed

    built = []
    original = robot_cli._robot
    monkeypatch.setattr(robot_cli, "_robot", lambda *a: built.append(original(*a)) or built[-1])
    assert main(["run-so100", "--robot", "sim", "--scene", "grasp", "--scene-seed", "100003", "--checkpoint",
                 "so100-grasp", "--max-chunks", "2", "--sync", "--device", "cpu"]) == 0
    scene = built[0]
    assert isinstance(scene, GraspScene) and scene.seed == 100003
    assert scene.success or np.allclose(scene.cube, cube_for_seed(100003)[0])  # a cube not held stays put
    held = "held" if scene.success else "not held"
    assert f"run-so100: grasp scene seed 100003: cube {held} at the end" in capsys.readouterr().out


def test_camera_set_must_match_a_checkpoint_that_names_its_cameras(tmp_path):
    import argparse
    import json

    from lingbot_edge.flags import add_policy_args, robot_overrides
    from lingbot_edge.testing.checkpoints import save_tiny_checkpoint

    root = save_tiny_checkpoint(tmp_path / "ckpt")
    keys = ["observation.images.image", "observation.images.image2"]
    (root / "policy_config.json").write_text(json.dumps({"obs_cam_keys": keys}))
    p = argparse.ArgumentParser()
    add_policy_args(p)
    p.add_argument("--stats")
    args = p.parse_args(["--checkpoint", str(root), "--preset", "tiny"])
    with pytest.raises(SystemExit, match=r"do not match the checkpoint's obs_cam_keys") as e:
        robot_overrides(args, [parse_camera("camera_top=0"), parse_camera("camera_wrist=1")])
    assert "camera_top" in str(e.value) and "observation.images.image2" in str(e.value)
    same = robot_overrides(args, [parse_camera("image2=1"), parse_camera("image=0")])
    assert same == {"obs_cam_keys": tuple(keys)}  # the checkpoint's order wins
    # --stats on a checkpoint: the quantiles land on its used channels, in its action width
    meta = tmp_path / "ds" / "meta"
    meta.mkdir(parents=True)
    (meta / "stats.json").write_text(json.dumps({"action": {"q01": [-9.0] * 6, "q99": [9.0] * 6}}))
    args = p.parse_args(["--checkpoint", str(root), "--preset", "so100", "--stats", str(meta.parent)])
    cfg = load_policy(str(root), preset="so100", device="cpu", compile=False, **robot_overrides(args, [])).cfg
    assert cfg.action_q01[:6] == (-9.0,) * 6 and len(cfg.action_q01) == cfg.model_config.action_dim
