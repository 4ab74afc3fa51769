"""The real arm's side: a stand-in with the exact method surface of LeRobot's SO-100 follower (used by
test_so100_remote.py), checked against LeRobot itself in LeRobot's venv."""

import contextlib

import numpy as np
import pytest

from lingbot_edge.robot.sim import KinematicSO100
from lingbot_edge.robot.so100 import SO100_ACTION_KEYS


class SO100FollowerStandIn:
    """The exact method surface of LeRobot's `SO100Follower` (`connect(calibrate=True)`, `is_connected`,
    `get_observation()`, `send_action(action) -> action`, `disconnect()`), with LeRobot's errors when
    used unconnected and 480x640 camera frames, over the kinematic sim's joints."""

    def __init__(self, cameras, height=480, width=640):
        self._sim = KinematicSO100(cameras=cameras, height=height, width=width)
        self._connected = False
        self.sent: list[dict] = []

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self, calibrate: bool = True) -> None:
        if self._connected:
            raise RuntimeError("SO100Follower is already connected")  # LeRobot: DeviceAlreadyConnectedError
        self._sim.connect()
        self._connected = True

    def get_observation(self) -> dict:
        if not self._connected:
            raise RuntimeError("SO100Follower is not connected")  # LeRobot: DeviceNotConnectedError
        return self._sim.get_observation()

    def send_action(self, action: dict) -> dict:
        if not self._connected:
            raise RuntimeError("SO100Follower is not connected")
        if set(action) != set(SO100_ACTION_KEYS):
            raise KeyError(f"expected {SO100_ACTION_KEYS}, got {sorted(action)}")
        self.sent.append(dict(action))
        return self._sim.send_action(action)

    def disconnect(self) -> None:
        if not self._connected:
            raise RuntimeError("SO100Follower is not connected")
        self._sim.disconnect()  # disable_torque_on_disconnect=True
        self._connected = False

    @property
    def torque_enabled(self) -> bool:
        return self._sim.torque_enabled


@pytest.mark.lerobot  # LeRobot's own venv: `.venv-lerobot/bin/python -m pytest -m lerobot tests/test_so100_remote.py`
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


class FakeFeetechBus:
    """The calls LeRobot's SO-100 follower makes on its `FeetechMotorsBus` (connect, configure, sync_read of
    Present_Position, sync_write of Goal_Position, disconnect), answered in normalized units without a serial port:
    the goal positions become the present ones."""

    def __init__(self, motors):
        self.motors = motors
        self.is_connected, self.is_calibrated = False, True
        self.positions = {m: 0.0 for m in motors}
        self.goals: list[dict] = []
        self.writes: list[tuple] = []
        self.torque_off_on_disconnect = None

    def connect(self, handshake: bool = True) -> None:
        self.is_connected = True

    def disconnect(self, disable_torque: bool = True) -> None:
        self.is_connected, self.torque_off_on_disconnect = False, disable_torque

    @contextlib.contextmanager
    def torque_disabled(self, motors=None):
        yield

    def configure_motors(self, *args, **kwargs) -> None:
        self.writes.append(("configure_motors",))

    def write(self, name, motor, value, **kwargs) -> None:
        self.writes.append((name, motor, value))

    def sync_read(self, name, motors=None, **kwargs) -> dict:
        assert name == "Present_Position", name
        return dict(self.positions)

    def sync_write(self, name, values, **kwargs) -> None:
        assert name == "Goal_Position", name
        self.goals.append(dict(values))
        self.positions.update(values)


class FakeCamera:
    """An OpenCV camera of the follower's config that returns random frames of its configured size."""

    def __init__(self, config):
        self.config, self.is_connected = config, False
        self.rng = np.random.default_rng(0)

    def connect(self, warmup: bool = True) -> None:
        self.is_connected = True

    def read(self, *args, **kwargs) -> np.ndarray:
        return self.rng.integers(0, 256, (self.config.height, self.config.width, 3), dtype=np.uint8)

    async_read = read_latest = read

    def disconnect(self) -> None:
        self.is_connected = False


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
