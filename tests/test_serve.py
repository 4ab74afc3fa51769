"""`lingbot-edge serve`: msgpack-numpy, the websocket protocol, errors, API key, healthz, clients."""

import http.client
import math

import msgpack
import numpy as np
import pytest
import websockets
import websockets.sync.client

from lingbot_edge.robot.so100 import SO100_ACTION_KEYS, build_policy, so100_policy_config
from lingbot_edge.serve.msgpack_numpy import DecodeError, Packer, packb, unpackb
from lingbot_edge.serve.server import EpisodeServer, PolicyServer, ProtocolError, RemotePolicy

CAMS = ("observation.images.camera_top", "observation.images.camera_wrist_left",
        "observation.images.camera_wrist_right")
MAX_BYTES = 32 * 2**20


class SO100Client:
    """Written the way SO-100 / openpi users write their client: sync websockets + msgpack-numpy."""

    def __init__(self, port: int, api_key: str | None = None):
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self.ws = websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None,
                                                 additional_headers=headers).__enter__()
        self.packer = Packer()
        self.metadata = unpackb(self.ws.recv())

    def send_raw(self, data):
        self.ws.send(data)
        return self.ws.recv()

    def infer(self, obs: dict) -> dict:
        reply = self.send_raw(self.packer.pack(obs))
        if isinstance(reply, str):
            raise RuntimeError(reply)
        return unpackb(reply)

    def close(self):
        self.ws.close()


def _frames(rng, t=None, h=480, w=640):
    shape = (h, w, 3) if t is None else (t, h, w, 3)
    return {k: rng.integers(0, 256, size=shape, dtype=np.uint8) for k in CAMS}


def _obs(rng, t=None, prompt="pick up the red cube", **extra):
    return {**_frames(rng, t), "observation.state": rng.uniform(-50, 50, 6).astype(np.float32), "prompt": prompt,
            **extra}


@pytest.fixture(scope="module")
def policy():
    return build_policy(so100_policy_config("tiny"), seed=0)


@pytest.fixture(scope="module")
def server(policy):
    srv = PolicyServer(EpisodeServer(policy, action_keys=SO100_ACTION_KEYS), host="127.0.0.1", port=0,
                       max_message_bytes=MAX_BYTES).start()
    yield srv
    srv.stop()


# ----------------------------------------------------------------------------- msgpack-numpy


def test_msgpack_numpy_roundtrip_and_refusals():
    rng = np.random.default_rng(0)
    obj = {"a": rng.standard_normal((2, 3)).astype(np.float32), "b": np.arange(5, dtype=np.uint8),
           "c": np.float64(1.5), "d": [np.zeros((0, 4), np.int16)], "s": "text"}
    back = unpackb(packb(obj))
    for k in ("a", "b"):
        assert back[k].dtype == obj[k].dtype and np.array_equal(back[k], obj[k])
    assert back["c"] == 1.5 and back["d"][0].shape == (0, 4) and back["s"] == "text"
    # upstream's encoding, written by hand with msgpack (bytes keys)
    raw = msgpack.packb({b"__ndarray__": True, b"data": np.ones(4, "<f4").tobytes(), b"dtype": "<f4", b"shape": [2, 2]})
    assert np.array_equal(unpackb(raw), np.ones((2, 2), np.float32))
    for bad in (np.array([1 + 2j]), np.array([object()], dtype=object), np.zeros(2, dtype="V4")):
        with pytest.raises(ValueError, match="unsupported dtype"):
            packb({"x": bad})
    cases = {
        "unsupported dtype": {b"__ndarray__": True, b"data": b"\0" * 16, b"dtype": "<c16", b"shape": [1]},
        "object": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]},
        "do not match": {b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]},
        "non-negative": {b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [-1]},
        "not a numpy dtype": {b"__ndarray__": True, b"data": b"", b"dtype": "nope", b"shape": [0]},
    }
    for match, m in cases.items():
        with pytest.raises(DecodeError, match=match):
            unpackb(msgpack.packb(m))
    with pytest.raises(DecodeError, match="not a valid msgpack"):
        unpackb(b"\xc1\xff\x00")


# ----------------------------------------------------------------------------- the websocket protocol


def test_so100_user_client_gets_actions_and_survives_bad_requests(server):
    rng = np.random.default_rng(1)
    client = SO100Client(server.port)
    meta = client.metadata
    assert meta["protocol"] == "lingbot-edge/1" and meta["camera_keys"] == list(CAMS)
    assert meta["state_dim"] == 6 and meta["action_dim"] == 6 and meta["action_keys"] == list(SO100_ACTION_KEYS)
    out = client.infer(_obs(rng))  # three 480x640 cameras, state, prompt: the first chunk
    assert out["action"].shape == (meta["first_chunk_steps"], 6) and out["action"].dtype == np.float32
    assert np.isfinite(out["action"]).all() and out["chunk"] == 0
    assert {"infer_ms", "total_ms"} <= set(out["server_timing"])
    out = client.infer(_obs(rng))  # the current frame only (no keyframes): accepted, repeated T times
    assert out["action"].shape == (meta["chunk_steps"], 6) and out["chunk"] == 1

    errors = {
        "not a valid msgpack": b"\xc1\x00garbage",
        "camera_top: expected an H x W x 3 uint8": client.packer.pack(
            {**_obs(rng), CAMS[0]: np.zeros((480, 640, 4), np.uint8)}),
        "observation.state: contains NaN": client.packer.pack(
            {**_obs(rng), "observation.state": np.full(6, np.nan, np.float32)}),
        "observation.state: expected shape": client.packer.pack(
            {**_obs(rng), "observation.state": np.zeros(7, np.float32)}),
        "unknown camera": client.packer.pack({**_obs(rng), "observation.images.cam_x": np.zeros((4, 4, 3), np.uint8)}),
        "missing camera": client.packer.pack({k: v for k, v in _obs(rng).items() if k != CAMS[1]}),
        "binary msgpack frame": "hello",
        "expected a map": packb([1, 2, 3]),
    }
    for match, frame in errors.items():
        reply = client.send_raw(frame)
        assert isinstance(reply, str) and reply.startswith("error: ") and match in reply, (match, reply)
    out = client.infer(_obs(rng))  # nothing above touched the episode: chunk 2 follows chunk 1
    assert out["chunk"] == 2 and out["action"].shape == (meta["chunk_steps"], 6)

    # over the size cap: the server closes with 1009; a new connection works and the server still serves
    client.ws.send(b"\x00" * (MAX_BYTES + 1))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        client.ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    client = SO100Client(server.port)
    out = client.infer(_obs(rng))
    assert out["chunk"] == 0 and np.isfinite(out["action"]).all()
    client.close()


def test_keyframe_protocol_equals_driving_the_policy_directly(server):
    """Server-side feedback: what a client gets equals reset / infer / feedback on a local policy."""
    rng = np.random.default_rng(2)
    client = SO100Client(server.port)
    meta = client.metadata
    requests = [_obs(rng, prompt="stack")]
    replies = [client.infer(requests[0])]
    assert replies[0]["keyframes_next"] == meta["first_feedback_keyframes"]
    bad = _obs(rng, t=meta["first_feedback_keyframes"] + 1, prompt="stack")
    assert "expected 4 keyframes" in client.send_raw(client.packer.pack(bad))
    executed = replies[0]["action"] + 0.5  # the client clamped / changed what it ran
    requests.append({**_obs(rng, t=meta["first_feedback_keyframes"], prompt="stack"), "executed_actions": executed})
    replies.append(client.infer(requests[1]))
    assert replies[1]["keyframes_next"] == meta["feedback_keyframes"]
    assert replies[1]["action"].shape == (meta["chunk_steps"], 6) and "feedback_ms" in replies[1]["server_timing"]
    requests.append(_obs(rng, t=meta["feedback_keyframes"], prompt="stack", task="ignored"))
    replies.append(client.infer(requests[2]))
    client.close()

    local = build_policy(so100_policy_config("tiny"), seed=0)
    local.reset("stack")
    want = [local.infer({k: requests[0][k] for k in CAMS})["actions"]]
    local.feedback({k: requests[1][k] for k in CAMS}, executed)
    want.append(local.infer({})["actions"])
    local.feedback({k: requests[2][k] for k in CAMS}, replies[1]["action"])
    want.append(local.infer({})["actions"])
    for got, ref in zip(replies, want, strict=True):
        np.testing.assert_array_equal(got["action"], ref)


def test_reset_new_prompt_and_takeover(server):
    rng = np.random.default_rng(3)
    a, b = SO100Client(server.port), SO100Client(server.port)
    reply = a.infer({"reset": True, "prompt": "wave"})
    assert reply["reset"] is True and "action" not in reply
    assert a.infer(_obs(rng, prompt="wave"))["chunk"] == 0
    assert a.infer(_obs(rng, prompt="wave"))["chunk"] == 1
    assert a.infer(_obs(rng, prompt="point"))["chunk"] == 0  # a new prompt starts a new episode
    assert b.infer(_obs(rng, prompt="wave"))["chunk"] == 0  # b takes the policy over
    obs = {k: v for k, v in _obs(rng).items() if k != "prompt"}
    reply = a.send_raw(a.packer.pack(obs))
    assert isinstance(reply, str) and "taken over" in reply
    assert b.infer(obs)["chunk"] == 1  # b's episode goes on
    assert a.infer(_obs(rng, prompt="wave"))["chunk"] == 0  # a starts again with a prompt
    a.close()
    b.close()


def test_api_key_and_healthz(policy):
    srv = PolicyServer(EpisodeServer(policy), port=0, api_key="s3cret").start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"OK\n"
        for key in (None, "wrong"):
            with pytest.raises(websockets.InvalidStatus) as e:
                SO100Client(srv.port, api_key=key)
            assert e.value.response.status_code == 401
        client = SO100Client(srv.port, api_key="s3cret")
        assert client.metadata["camera_keys"] == list(CAMS)
        client.close()
    finally:
        srv.stop()


class _FailingPolicy:
    """Shaped like LingBotPolicy; its feedback fails once."""

    def __init__(self, cfg):
        self.cfg, self.fail = cfg, True

    def reset(self, prompt):
        self.n = 0

    def infer(self, obs):
        steps = (self.cfg.frame_chunk_size - (self.n == 0)) * self.cfg.action_per_frame
        self.n += 1
        return {"actions": np.zeros((steps, 6), np.float32), "timing": {}, "chunk": self.n - 1, "frame_start": 0}

    def feedback(self, frames, executed):
        if self.fail:
            self.fail = False
            raise RuntimeError("boom")
        return {}


def test_policy_failure_ends_episode_keeps_connection():
    srv = PolicyServer(EpisodeServer(_FailingPolicy(so100_policy_config("tiny"))), port=0).start()
    rng = np.random.default_rng(4)
    try:
        client = SO100Client(srv.port)
        client.infer({**_frames(rng, h=32, w=32), "prompt": "p"})
        reply = client.send_raw(client.packer.pack({**_frames(rng, h=32, w=32), "prompt": "p"}))
        assert isinstance(reply, str) and reply.startswith("internal error: RuntimeError: boom")
        assert client.infer({**_frames(rng, h=32, w=32), "prompt": "p"})["chunk"] == 0  # a fresh episode
        client.close()
    finally:
        srv.stop()


def test_episode_server_without_transport(policy):
    eps = EpisodeServer(policy)
    with pytest.raises(ProtocolError, match="needs `prompt`"):
        eps.handle(1, {k: np.zeros((8, 8, 3), np.uint8) for k in CAMS})
    with pytest.raises(ProtocolError, match="one frame per camera"):
        eps.handle(1, {**{k: np.zeros((2, 8, 8, 3), np.uint8) for k in CAMS}, "prompt": "p"})
    out = eps.handle(1, {**{k: np.zeros((8, 8, 3), np.uint8) for k in CAMS}, "task": np.array("p")})
    with pytest.raises(ProtocolError, match="executed_actions: expected shape"):
        eps.handle(1, {**{k: np.zeros((4, 8, 8, 3), np.uint8) for k in CAMS}, "executed_actions": np.zeros((3, 6))})
    with pytest.raises(ProtocolError, match="different frame counts"):
        eps.handle(1, {CAMS[0]: np.zeros((4, 8, 8, 3), np.uint8), CAMS[1]: np.zeros((8, 8, 3), np.uint8),
                       CAMS[2]: np.zeros((8, 8, 3), np.uint8)})
    assert eps.episode.chunks == 1 and out["chunk"] == 0
    eps.disconnect(1)
    assert eps.episode is None
    assert math.isclose(eps.metadata()["image_size"][0], policy.cfg.height)


def test_remote_policy_drives_the_sim(server):
    from lingbot_edge.robot.so100 import AsyncController, KinematicSO100

    remote = RemotePolicy(f"127.0.0.1:{server.port}")
    robot = KinematicSO100(cameras=[k.removeprefix("observation.images.") for k in remote.cfg.obs_cam_keys])
    result = AsyncController(robot, remote, "reach", fps=30).run(max_chunks=3)
    remote.close()
    s = result.summary()
    assert result.mode == "sync" and s["chunks_executed"] == 3 and s["missed"] == 0
    assert not robot.is_connected and not robot.torque_enabled
