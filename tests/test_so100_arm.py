"""The real arm's side: a stand-in with the exact method surface of LeRobot's SO-100 follower (used by
test_so100_remote.py), checked against LeRobot itself in LeRobot's venv."""

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
