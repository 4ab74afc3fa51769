"""Stand-ins for LeRobot's SO-100 follower and its hardware (the Feetech bus, an OpenCV camera), over the kinematic
simulator: what the driver and LeRobot-side tests drive instead of a real arm."""

from __future__ import annotations

import contextlib

import numpy as np

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
