"""`lingbot-edge serve`: msgpack-numpy, the websocket protocol, errors, API key, healthz, clients."""

import http.client
import math

import msgpack
import numpy as np
import pytest
import websockets
import websockets.sync.client

from lingbot_edge.core.config import get_policy_config, tiny_variant
from lingbot_edge.core.episode import Chunk
from lingbot_edge.io.loading import load_policy
from lingbot_edge.robot.so100 import SO100_ACTION_KEYS, SO100_LOWER, SO100_UPPER
from lingbot_edge.serve.msgpack_numpy import DecodeError, Packer, packb, unpackb
from lingbot_edge.serve.server import EpisodeServer, PolicyServer, ProtocolError

CAMS = ("observation.images.camera_top", "observation.images.camera_wrist_left",
        "observation.images.camera_wrist_right")
MAX_BYTES = 32 * 2**20
LIMITS = (SO100_LOWER, SO100_UPPER)


def tiny_so100_policy():
    return load_policy("tiny", preset="so100", device="cpu", compile=False, seed=0)


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
    return tiny_so100_policy()


@pytest.fixture(scope="module")
def server(policy):
    srv = PolicyServer(EpisodeServer(policy, action_keys=SO100_ACTION_KEYS, action_limits=LIMITS), host="127.0.0.1",
                       port=0, max_message_bytes=MAX_BYTES).start()
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


def test_float_images_in_0_1_are_refused_naming_the_field_and_the_episode_goes_on(server):
    """Floats in 0..1 (unscaled) would be read as a near-black 0..255 image: refused with the camera's name;
    floats in 0..255 (`255 * img`, the walkthrough client) and uint8 are served. The connection and the
    episode stay usable after every refusal."""
    rng = np.random.default_rng(7)
    client = SO100Client(server.port)

    def as_float(obs, scale, cams=CAMS, dtype=np.float32):
        return {k: (v.astype(dtype) * scale if k in cams else v) for k, v in obs.items()}

    def small(t=None):  # floats are 4-8x bigger on the wire: frames of the policy's size, not 480x640
        return {**_frames(rng, t, 96, 128), "observation.state": np.zeros(6, np.float32), "prompt": "floats"}

    first = small()
    for frame in (as_float(first, 1 / 255), as_float(first, 1 / 255, dtype=np.float64)):
        reply = client.send_raw(client.packer.pack(frame))  # an episode's first request
        assert isinstance(reply, str) and reply.startswith(
            "error: observation.images.camera_top: float image with values in 0..") and "looks scaled to 0..1" in reply
        assert "send uint8, or 255 * img" in reply, reply
    out = client.infer(as_float(first, 1.0))  # the same frames as floats in 0..255 start the episode
    assert out["chunk"] == 0 and np.isfinite(out["action"]).all()

    keyframes = small(t=out["keyframes_next"])
    bad = {
        "error: observation.images.camera_wrist_left: float image with values in 0..": as_float(  # one camera only
            keyframes, 1 / 255, cams=CAMS[1:2]),
        "error: observation.images.camera_top: expected an H x W x 3 uint8 image, or float in 0..255 (or T x H x W "
        "x 3 keyframes, sides <= 4096), got shape [4, 96, 128, 3] int64": {
            **keyframes, CAMS[0]: keyframes[CAMS[0]].astype(np.int64)},
        "error: observation.images.camera_top: float images must be finite and in 0..255": as_float(keyframes, 2.0),
        "error: observation.state: expected a numeric array of shape (6,) or (T, 6), got <U3 array": {
            **keyframes, "observation.state": np.array(["abc"] * 6)},
    }
    for match, request in bad.items():
        reply = client.send_raw(client.packer.pack(request))
        assert isinstance(reply, str) and reply.startswith(match), (match, reply)
    out = client.infer(as_float(keyframes, 1.0))  # nothing above touched the episode: its chunk 1 follows
    assert out["chunk"] == 1 and out["first"] is False
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

    # the reference: the same frames resized to the policy's size first (what the server does), fed directly
    from lingbot_edge.serve.frames import resize_frames

    h, w = meta["image_size"]
    local = tiny_so100_policy()
    local.reset("stack")
    want = [local.infer({k: resize_frames(requests[0][k], h, w) for k in CAMS})["actions"]]
    local.feedback({k: resize_frames(requests[1][k], h, w) for k in CAMS}, executed)
    want.append(local.infer({})["actions"])
    local.feedback({k: resize_frames(requests[2][k], h, w) for k in CAMS}, replies[1]["action"])
    want.append(local.infer({})["actions"])
    for got, ref in zip(replies, want, strict=True):
        np.testing.assert_array_equal(got["action"], np.clip(ref, *LIMITS))  # clamped to the arm's limits


def test_reset_new_prompt_and_one_owner_at_a_time(server):
    rng = np.random.default_rng(3)
    a, b = SO100Client(server.port), SO100Client(server.port)
    reply = a.infer({"reset": True, "prompt": "wave"})
    assert reply["reset"] is True and "action" not in reply
    assert a.infer(_obs(rng, prompt="wave"))["chunk"] == 0
    assert a.infer(_obs(rng, prompt="wave"))["chunk"] == 1  # the same task again: the episode goes on
    assert a.infer(_obs(rng, prompt="point"))["chunk"] == 0  # a new task from the owner starts a new episode
    reply = b.send_raw(b.packer.pack(_obs(rng, prompt="point")))  # b sends its task like a's: refused
    assert isinstance(reply, str) and "another client's episode (connection" in reply and "reset: true" in reply
    assert a.infer(_obs(rng, prompt="point"))["chunk"] == 1  # a was not disturbed
    assert b.infer({**_obs(rng, prompt="wave"), "reset": True})["chunk"] == 0  # an explicit reset takes over
    reply = a.send_raw(a.packer.pack(_obs(rng, prompt="point")))
    assert isinstance(reply, str) and "taken over by connection" in reply
    assert b.infer(_obs(rng, prompt="wave"))["chunk"] == 1  # b's episode goes on
    assert a.infer({**_obs(rng, prompt="point"), "reset": True})["chunk"] == 0  # a takes it back the same way
    a.close()
    b.close()


def test_two_walkthrough_clients_sending_their_task_every_time_do_not_restart_each_other(server):
    rng = np.random.default_rng(5)
    a, b = SO100Client(server.port), SO100Client(server.port)
    chunks, refusals = [], 0
    for _ in range(4):
        chunks.append(a.infer(_obs(rng, prompt="stack the cubes"))["chunk"])
        reply = b.send_raw(b.packer.pack(_obs(rng, prompt="sort the cubes")))
        refusals += isinstance(reply, str) and "another client's episode" in reply
    assert chunks == [0, 1, 2, 3] and refusals == 4
    a.close()  # the owner leaves: its episode ends, b may start one
    assert b.infer(_obs(rng, prompt="sort the cubes"))["chunk"] == 0
    b.close()


def test_walkthrough_reset_without_prompt_and_bad_reset(server):
    rng = np.random.default_rng(6)
    c = SO100Client(server.port)
    reply = c.infer({"reset": True, "robo_name": "so100"})  # before any episode: nothing to end, no error
    assert reply["reset"] is True and reply["episode_ended"] is False
    assert c.infer(_obs(rng, prompt="pick"))["chunk"] == 0
    assert c.infer(_obs(rng, prompt="pick"))["chunk"] == 1
    reply = c.send_raw(c.packer.pack({**_obs(rng, prompt="pick"), "reset": np.array([True])}))
    assert reply == "error: reset: expected true or false, got ndarray (1,)"
    assert c.infer(_obs(rng, prompt="pick"))["chunk"] == 2  # the bad reset changed nothing
    reply = c.infer({"reset": True, "robo_name": "so100"})  # mid-episode: ends it
    assert reply["reset"] is True and reply["episode_ended"] is True and server.episodes.episode is None
    assert c.infer(_obs(rng, prompt="pick"))["chunk"] == 0  # the next task request starts a new episode
    c.close()


def test_actions_are_clamped_to_the_robot_limits_and_named_in_the_metadata(server):
    rng = np.random.default_rng(7)
    c = SO100Client(server.port)
    meta = c.metadata
    assert meta["action_limits"] == {"lower": list(SO100_LOWER), "upper": list(SO100_UPPER)}
    obs = _obs(rng, prompt="clamp")
    got = c.infer(obs)["action"]
    c.close()
    from lingbot_edge.serve.frames import resize_frames

    local = tiny_so100_policy()
    local.reset("clamp")
    raw = local.infer({k: resize_frames(obs[k], *meta["image_size"]) for k in CAMS})["actions"]
    assert np.abs(raw).max() > 100  # random tiny weights: far outside the arm's range
    np.testing.assert_array_equal(got, np.clip(raw, SO100_LOWER, SO100_UPPER))


def test_server_memory_per_request_is_bounded_by_the_message_size(policy):
    """A ~60 MiB request of three single 2048x3072 frames (repeated T times for feedback): resized first,
    so the server's peak memory grows by less than 2x the message (3x with the message itself)."""
    import gc

    eps = EpisodeServer(policy, action_limits=LIMITS)
    rng = np.random.default_rng(8)
    eps.handle(1, {**_frames(rng, h=96, w=128), "task": "big"})
    msg = packb({**_frames(rng, h=2048, w=3072), "task": "big"})
    gc.collect()

    from pathlib import Path

    def rss(field):  # kB -> bytes
        line = next(v for v in Path("/proc/self/status").read_text().splitlines() if v.startswith(field))
        return int(line.split()[1]) * 1024

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pytest.fail("/proc/self/clear_refs is not writable: cannot measure the peak resident memory")
    before = rss("VmRSS:")
    out = eps.handle(1, unpackb(msg))
    growth = rss("VmHWM:") - before
    print(f"peak RSS growth {growth / 2**20:.1f} MiB for a {len(msg) / 2**20:.1f} MiB request")
    assert out["chunk"] == 1 and len(msg) > 50 * 2**20
    assert growth < 2 * len(msg), f"peak grew by {growth / 2**20:.0f} MiB for a {len(msg) / 2**20:.0f} MiB message"


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
    """A `core.protocols.Policy` without a model; its feedback fails once."""

    supports_lookahead = False
    takes_executing_keyframes = False

    def __init__(self, cfg):
        self.cfg, self.fail = cfg, True

    def reset(self, prompt):
        self.n = 0

    def infer(self, obs, ahead=False):
        steps = (self.cfg.frame_chunk_size - (self.n == 0)) * self.cfg.action_per_frame
        self.n += 1
        return Chunk(np.zeros((steps, 6), np.float32), index=self.n - 1, first=self.n == 1,
                     keyframe_stride=self.cfg.keyframe_stride, cameras=self.cfg.obs_cam_keys)

    def feedback(self, chunk):
        chunk.feedback_inputs()
        if self.fail:
            self.fail = False
            raise RuntimeError("boom")
        return {}

    def cancel(self):
        pass


def test_policy_failure_ends_episode_keeps_connection():
    srv = PolicyServer(EpisodeServer(_FailingPolicy(tiny_variant(get_policy_config("so100")))), port=0).start()
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
    assert eps.episode.next_index == 1 and out["chunk"] == 0 and out["first"] is True
    # float frames already scaled to 0..255 (clients that send 255 * img) are accepted; unscaled ones are not
    out = eps.handle(1, {k: np.full((4, 8, 8, 3), 200.0, np.float32) for k in CAMS})
    assert out["chunk"] == 1 and out["first"] is False
    with pytest.raises(ProtocolError, match=r"float images must be finite and in 0\.\.255"):
        eps.handle(1, {k: np.full((8, 8, 8, 3), 300.0, np.float32) for k in CAMS})
    with pytest.raises(ProtocolError, match="ahead: this policy has no lookahead|chunk"):
        eps.handle(1, {"ahead": True, **{k: np.zeros((8, 8, 8, 3), np.uint8) for k in CAMS}})
    eps.disconnect(1)
    assert eps.episode is None
    assert math.isclose(eps.metadata()["image_size"][0], policy.cfg.height)


def test_serve_help_documents_healthz_protocol_and_size_cap(capsys):
    from lingbot_edge.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for needle in ("/healthz", "lingbot-edge/1", "reset: true", "One episode owner at a time", "default 64",
                   "--checkpoint", "--transformer", "--camera", "--stats"):
        assert needle in text, needle


def test_resize_frames_matches_torch_bilinear_to_rounding():
    import torch
    import torch.nn.functional as F

    from lingbot_edge.serve.frames import resize_frames

    rng = np.random.default_rng(9)
    for shape, (h, w) in (((8, 480, 640, 3), (64, 64)), ((2, 480, 640, 3), (96, 128)), ((50, 70, 3), (96, 128)),
                          ((3, 97, 31, 3), (48, 40))):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        got = resize_frames(x, h, w)
        xt = torch.from_numpy(x.reshape(-1, *x.shape[-3:])).permute(0, 3, 1, 2).float()
        ref = F.interpolate(xt, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        assert got.shape == (*shape[:-3], h, w, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(np.float32) - ref.reshape(got.shape)).max() <= 0.5 + 1e-3  # rounding only
        np.testing.assert_array_equal(resize_frames(x.astype(np.float32), h, w), got)  # float 0..255 the same
    same = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    assert resize_frames(same, 64, 64) is same


@pytest.mark.parametrize("async_mode", ["grounded", "naive"])
def test_ahead_round_trip_equals_the_local_lookahead(async_mode):
    """`ahead: true` over the wire: chunk 0 from the first frames, chunk 1 ahead without images, then each request
    carries the oldest pending chunk's keyframes and asks for the chunk after the executing one. The replies equal
    the same lookahead episode driven on a local policy in the server's `async_mode`."""
    from lingbot_edge.serve.frames import resize_frames

    served = load_policy("tiny", preset="so100", device="cpu", compile=False, seed=0, async_mode=async_mode)
    srv = PolicyServer(EpisodeServer(served, action_keys=SO100_ACTION_KEYS, action_limits=LIMITS), host="127.0.0.1",
                       port=0, max_message_bytes=MAX_BYTES).start()
    try:
        rng = np.random.default_rng(5)
        client = SO100Client(srv.port)
        meta = client.metadata
        assert meta["supports_lookahead"]
        first = _obs(rng, prompt="stack")
        replies = [client.infer(first), client.infer({"ahead": True})]
        feedback = [_obs(rng, t=meta["first_feedback_keyframes"], prompt="stack"),
                    _obs(rng, t=meta["feedback_keyframes"], prompt="stack")]
        for i, request in enumerate(feedback):
            replies.append(client.infer({**request, "executed_actions": replies[i]["action"], "ahead": True}))
        client.close()
    finally:
        srv.stop()
    h, w = meta["image_size"]
    local = load_policy("tiny", preset="so100", device="cpu", compile=False, seed=0, async_mode=async_mode)
    local.reset("stack")
    want = [local.infer({k: resize_frames(first[k], h, w) for k in CAMS})["actions"],
            local.infer({}, ahead=True)["actions"]]
    for i, request in enumerate(feedback):
        local.feedback({k: resize_frames(request[k], h, w) for k in CAMS}, replies[i]["action"])
        want.append(local.infer({}, ahead=True)["actions"])
    assert [r["chunk"] for r in replies] == [0, 1, 2, 3]
    for got, ref in zip(replies, want, strict=True):
        np.testing.assert_array_equal(got["action"], np.clip(ref, *LIMITS))
