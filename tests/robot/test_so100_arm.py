"""The real arm's side: the stand-in of LeRobot's SO-100 follower (`lingbot_edge.testing.so100`, which
tests/robot/test_so100_remote.py drives) checked against LeRobot itself in LeRobot's venv."""

import numpy as np
import pytest

from lingbot_edge.robot.so100 import SO100_ACTION_KEYS
from lingbot_edge.testing.so100 import FakeCamera, FakeFeetechBus, SO100FollowerStandIn


@pytest.mark.lerobot  # LeRobot's own venv: `.venv-lerobot/bin/python -m pytest -m lerobot tests/robot`
def test_the_stand_in_has_the_method_surface_of_lerobots_follower():
    import inspect

    from lingbot_edge.robot.arm import follower_classes, make_lerobot_so100
    from lingbot_edge.robot.so100 import CameraSpec

    follower, _, _ = follower_classes()
    for name in ("connect", "get_observation", "send_action", "disconnect"):
        assert inspect.signature(getattr(SO100FollowerStandIn, name)).parameters.keys() == \
            inspect.signature(getattr(follower, name)).parameters.keys(), name
    assert isinstance(inspect.getattr_static(follower, "is_connected"), property)
    arm = make_lerobot_so100("/dev/ttyACM0", [CameraSpec("camera_top", 0), CameraSpec("camera_wrist", 2, 320, 240)])
    assert tuple(arm.action_features) == SO100_ACTION_KEYS and not arm.is_connected  # built, not connected
    assert getattr(arm.config, "use_degrees", False) is False and arm.config.disable_torque_on_disconnect


@pytest.mark.lerobot
def test_run_so100_drives_the_releases_follower_class(monkeypatch, tmp_path, capsys):
    """`lingbot-edge run-so100 --robot lerobot` on the installed release's own SO-100 follower class (its connect,
    configure, get_observation, send_action and disconnect run; only the serial bus and the cameras are stand-ins)."""
    from lingbot_edge.cli.main import main
    from lingbot_edge.io import lerobot_compat as compat
    from lingbot_edge.robot import arm
    from lingbot_edge.robot.so100 import SO100_LOWER, SO100_MOTORS, SO100_UPPER

    real_follower, follower_config, camera_config = arm.follower_classes()
    assert real_follower is compat.follower_module().SO100Follower
    built = []

    class Follower(real_follower):
        def __init__(self, config):
            super().__init__(config)
            assert type(self.bus).__name__ == "FeetechMotorsBus"  # what the release builds on a real arm
            self.bus = FakeFeetechBus(self.bus.motors)
            self.cameras = {name: FakeCamera(cfg) for name, cfg in config.cameras.items()}
            built.append(self)

    monkeypatch.setattr(arm, "follower_classes", lambda: (Follower, follower_config, camera_config))
    code = main(["run-so100", "--robot", "lerobot", "--port", "/dev/ttyACM-test", "--robot-id", "lingbot_test",
                 "--camera", "camera_top=0:64x48", "--camera", "camera_wrist=2:64x48", "--seconds", "60",
                 "--max-chunks", "2", "--sync", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "run-so100: sync" in printed and "2 chunks" in printed
    (robot,) = built
    assert robot.config.port == "/dev/ttyACM-test" and getattr(robot.config, "use_degrees", False) is False
    assert {w[1] for w in robot.bus.writes if w[0] == "Operating_Mode"} == set(SO100_MOTORS)  # configure() ran
    assert len(robot.bus.goals) >= 4 and all(set(g) == set(SO100_MOTORS) for g in robot.bus.goals)
    for goal in robot.bus.goals:
        values = np.array([goal[m] for m in SO100_MOTORS])
        assert (values >= np.array(SO100_LOWER) - 1e-6).all() and (values <= np.array(SO100_UPPER) + 1e-6).all()
    assert not robot.is_connected and robot.bus.torque_off_on_disconnect is True
