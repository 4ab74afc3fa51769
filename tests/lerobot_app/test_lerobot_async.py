"""LeRobot 0.4.4's asynchronous robot client driving an SO-100 from a lingbot-edge policy, through our gRPC policy
server (lingbot_edge.lerobot.async_server); `make test-lerobot` only (0.3.2 has no `lerobot.async_inference`).

LeRobot's own `RobotClient` (its threads, its gRPC stubs, its pickled messages) runs against the server on
127.0.0.1 with the release's SO-100 follower class (serial bus and cameras are the stand-ins of test_so100_arm.py).
"""

import pickle
import threading
import time

import numpy as np
import pytest

from lingbot_edge.testing.so100 import FakeCamera, FakeFeetechBus

pytestmark = [pytest.mark.lerobot]

TASK = "put the cube in the bowl"


class Boom:
    def __reduce__(self):
        return (print, ("unpickled an arbitrary call",))


def test_safe_loads_admits_lerobots_messages_and_refuses_everything_else():
    from lerobot.async_inference.helpers import RemotePolicyConfig, TimedObservation

    from lingbot_edge.lerobot.async_server import safe_loads

    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    obs = TimedObservation(timestamp=time.time(), timestep=3, must_go=True,
                           observation={"shoulder_pan.pos": np.float32(1.5), "gripper.pos": 20.0, "camera_top": image,
                                        "task": TASK})
    back = safe_loads(pickle.dumps(obs), TimedObservation)
    assert back.timestep == 3 and np.array_equal(back.observation["camera_top"], image)
    spec = RemotePolicyConfig("lingbot_edge", "served", {"observation.state": {"dtype": "float32", "shape": (6,),
                                                                             "names": ["a"] * 6}}, 50, "cpu")
    assert safe_loads(pickle.dumps(spec), RemotePolicyConfig).lerobot_features["observation.state"]["shape"] == (6,)

    refused = [pickle.dumps(Boom()),  # a call of anything
               pickle.dumps(TimedObservation(0.0, 0, {"x": Boom()})),  # ... inside a message
               pickle.dumps(TimedObservation(0.0, 0, {"x": np.array([Boom()], dtype=object)})),
               pickle.dumps(TimedObservation(0.0, 0, {"x": np.array(["a"], dtype=object)})),  # object arrays
               pickle.dumps(spec)]  # the wrong message class
    for data in refused:
        with pytest.raises(pickle.UnpicklingError):
            safe_loads(data, TimedObservation)


def test_lerobots_robot_client_drives_an_so100_from_a_lingbot_edge_policy(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # LeRobot's client logs to ./logs/, from its import on
    from lerobot.async_inference import robot_client
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.cameras.opencv import OpenCVCameraConfig

    from lingbot_edge.io import lerobot_compat as compat
    from lingbot_edge.io.loading import load_policy
    from lingbot_edge.lerobot.async_server import serve
    from lingbot_edge.robot.so100 import SO100_LOWER, SO100_MOTORS, SO100_UPPER

    policy = load_policy("tiny", preset="so100", device="cpu", compile=False,
                         obs_cam_keys=("observation.images.camera_top",))
    server, servicer, port = serve(policy, {"observation.images.camera_top": "camera_top"}, port=0,
                                   limits=(SO100_LOWER, SO100_UPPER), obs_timeout=0.5)
    module = compat.follower_module()
    built = []

    class Follower(module.SO100Follower):
        def __init__(self, config):
            super().__init__(config)
            self.bus = FakeFeetechBus(self.bus.motors)
            self.cameras = {name: FakeCamera(cfg) for name, cfg in config.cameras.items()}
            built.append(self)

    monkeypatch.setattr(robot_client, "make_robot_from_config", lambda cfg: Follower(cfg))
    robot_cfg = module.SO100FollowerConfig(
        port="/dev/ttyACM-test", id="lingbot_test", use_degrees=False,
        cameras={"camera_top": OpenCVCameraConfig(index_or_path=0, width=64, height=48, fps=30)})
    cfg = RobotClientConfig(policy_type="lingbot_edge", pretrained_name_or_path="served", robot=robot_cfg,
                            actions_per_chunk=50, chunk_size_threshold=1.0, server_address=f"127.0.0.1:{port}",
                            fps=30, task=TASK)
    client = robot_client.RobotClient(cfg)
    threads = []
    try:
        assert client.start()
        threads = [threading.Thread(target=client.receive_actions, daemon=True),
                   threading.Thread(target=client.control_loop, args=(TASK,), daemon=True)]
        for t in threads:
            t.start()
        (robot,) = built
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and servicer.episode.chunks < 3:
            time.sleep(0.05)
        sent = list(servicer.episode.sent)
        want = sum(len(c) for c in sent[:2])
        while time.monotonic() < deadline and len(robot.bus.goals) < want:
            time.sleep(0.05)
    finally:
        client.stop()
        for t in threads:
            t.join(timeout=10)
        server.stop(None)
    assert servicer.episode.chunks >= 3 and servicer.refused == 0
    assert policy.chunk_index >= 2 and policy.prompt == TASK  # two feedbacks through the episode protocol
    # The arm executed the first two chunks exactly as sent, in order.
    goals = np.array([[g[m] for m in SO100_MOTORS] for g in robot.bus.goals[:want]])
    np.testing.assert_allclose(goals, np.concatenate(sent[:2]), rtol=0, atol=1e-5)
    assert not robot.is_connected
