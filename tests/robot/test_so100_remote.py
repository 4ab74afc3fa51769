"""The arm on one side, the policy behind the real websocket server on the other: lookahead, bytes per chunk,
and a server that dies, is absent or freezes (the arm holds, the run ends on time, torque off)."""

import socket
import threading
import time

import numpy as np
import pytest

from lingbot_edge.core.episode import Chunk
from lingbot_edge.io.loading import load_policy
from lingbot_edge.robot.control import AsyncController, PolicyUnavailableError
from lingbot_edge.robot.so100 import SO100_ACTION_KEYS, SO100_LOWER, SO100_UPPER, camera_name
from lingbot_edge.serve.client import RemotePolicy
from lingbot_edge.serve.server import EpisodeServer, PolicyServer
from lingbot_edge.testing.clocks import SlowClock
from lingbot_edge.testing.so100 import SO100FollowerStandIn


class FreezablePolicy:
    """A real tiny policy behind a server that freezes from infer call `freeze_at` on (0: chunk 0; None: at the
    reset, the episode's very first request) until `thaw` is set. `whole`: the server's event loop freezes too
    (a stopped process: no closing handshake, no pong), not only its policy; needs `server`. `first_delay`:
    seconds chunk 0 takes (a server still compiling)."""

    def __init__(self, policy, freeze_at: int | None, whole: bool = False, first_delay: float = 0.0):
        self.policy, self.freeze_at, self.thaw, self.n = policy, freeze_at, threading.Event(), 0
        self.whole, self.first_delay, self.server = whole, first_delay, None
        self.cfg, self.supports_lookahead = policy.cfg, True
        self.takes_executing_keyframes = False

    def _freeze(self):
        if self.whole:
            self.server._loop.call_soon_threadsafe(self.thaw.wait, 60)
        self.thaw.wait(60)

    def reset(self, prompt):
        self.n = 0
        if self.freeze_at is None:
            self._freeze()
        self.policy.reset(prompt)

    def infer(self, obs, ahead=False):
        self.n += 1
        if self.freeze_at is not None and self.n > self.freeze_at:
            self._freeze()
        elif self.n == 1:
            time.sleep(self.first_delay)
        return self.policy.infer(obs, ahead=ahead)

    def feedback(self, *args):
        return self.policy.feedback(*args)

    def cancel(self):
        self.policy.cancel()


def frozen_server(freeze_at: int | None, whole: bool = False, first_delay: float = 0.0) -> PolicyServer:
    frozen = FreezablePolicy(tiny_so100_policy(), freeze_at, whole=whole, first_delay=first_delay)
    frozen.server = PolicyServer(EpisodeServer(frozen), port=0).start()
    return frozen.server


def tiny_so100_policy():
    return load_policy("tiny", preset="so100", device="cpu", compile=False, seed=0)


@pytest.fixture(scope="module")
def server():
    srv = PolicyServer(EpisodeServer(tiny_so100_policy(), action_keys=SO100_ACTION_KEYS,
                                     action_limits=(SO100_LOWER, SO100_UPPER)), port=0).start()
    yield srv
    srv.stop()


def _arm(remote):
    return SO100FollowerStandIn([camera_name(k) for k in remote.cfg.obs_cam_keys])


def test_lerobot_shaped_arm_driven_by_a_remote_policy_with_lookahead(server):
    remote = RemotePolicy(f"ws://127.0.0.1:{server.port}")
    assert remote.supports_lookahead
    arm = _arm(remote)
    clock = SlowClock(8.0)  # 30 Hz loop time = 3.75 Hz wall (a 2-core CPU shared by others): holds counted, not timed
    result = AsyncController(arm, remote, "pick up the red cube", fps=30, clock=clock, sleep=clock.sleep).run(
        max_chunks=3)
    remote.close()
    s = result.summary()
    assert result.mode == "lookahead" and s["chunks_executed"] == 3 and s["exec_ticks"] == 4 + 2 * 8
    assert s["holds_after_first_chunk"] == 0 and s["missed"] == 0 and result.failure is None, result.chunks
    # every action that reached the motors is inside the arm's limits, and torque is off at the end
    sent = np.array([[a[k] for k in SO100_ACTION_KEYS] for a in arm.sent])
    assert (sent >= SO100_LOWER).all() and (sent <= SO100_UPPER).all()
    assert not arm.is_connected and not arm.torque_enabled
    # bytes per chunk: keyframes resized to the policy's size on the arm side before sending
    h, w = remote.cfg.height, remote.cfg.width
    n_cams = len(remote.cfg.obs_cam_keys)
    feedback_requests = remote.request_bytes[3:]  # after reset, chunk 0 and chunk 1 (ahead, no images)
    keyframes = [4, 8]  # 4 (F - 1) after chunk 0, 4 F after the others (F = 2)
    raw = [t * n_cams * h * w * 3 for t in keyframes]
    print(f"bytes per chunk: {feedback_requests} (keyframes {raw} at {h}x{w}; "
          f"{[t * n_cams * 480 * 640 * 3 for t in keyframes]} at 480x640)")
    assert feedback_requests == remote.feedback_bytes
    assert len(feedback_requests) == 2 and all(r < b < r + 4096 for r, b in zip(raw, feedback_requests, strict=True))
    assert remote.request_bytes[1] < n_cams * h * w * 3 + 4096  # the first frame is resized too


def test_server_killed_mid_run_the_arm_holds_until_the_end():
    srv = PolicyServer(EpisodeServer(tiny_so100_policy()), port=0).start()
    remote = RemotePolicy(f"127.0.0.1:{srv.port}", timeout=5.0)
    arm = _arm(remote)

    killed = []

    def kill(obs, tick):
        if tick.index == 0:
            clock.origin = clock()
        if tick.index >= 14 and not killed:  # (a tick slot may be skipped on a loaded machine)
            killed.append(threading.Thread(target=srv.stop))
            killed[0].start()

    clock = SlowClock(2.0)
    result = AsyncController(arm, remote, "reach", fps=30, on_tick=kill, clock=clock, sleep=clock.sleep).run(2.0)
    elapsed = clock() - clock.origin  # loop time since the first tick
    remote.close()
    s = result.summary()
    assert "connection lost" in result.failure
    slots = (2.0 - result.first_tick_s) * 30  # the run's 2 s count the reset and chunk 0
    assert abs(s["ticks"] + s["missed"] - slots) <= 1 and s["hold_ticks"] > 0
    assert result.overruns[-1]["open"] and s["overrun_hold_ticks"] == s["hold_ticks"]
    assert elapsed < 2.0 + 1.0 and not arm.is_connected and not arm.torque_enabled


FREEZES = {  # where the server freezes -> (freeze_at, whole server, first_delay, client timeout, run seconds)
    "chunk 1, client timeout inside the run": (1, False, 0.0, 0.5, 1.5),
    "chunk 1 after a slow chunk 0, client timeout longer than the run": (1, True, 1.0, 30.0, 2.0),
    "chunk 3, client timeout inside the run, no closing handshake": (3, True, 0.0, 0.3, 1.5),
    "chunk 0 (first_timeout 60 s)": (0, False, 0.0, 5.0, 1.5),
    "the reset, the very first request": (None, True, 0.0, 5.0, 1.5),
}


@pytest.mark.parametrize("where", FREEZES)
def test_server_frozen_the_run_still_ends_on_time_with_torque_off(where):
    """The run ends within --seconds + 1 s of its start (and of its first tick), the connection closed too,
    wherever the server freezes: before chunk 0, with a chunk in flight at the end, after a timeout."""
    freeze_at, whole, first_delay, timeout, seconds = FREEZES[where]
    srv = frozen_server(freeze_at, whole, first_delay)
    try:
        remote = RemotePolicy(f"127.0.0.1:{srv.port}", timeout=timeout)
        arm = _arm(remote)
        first_tick = []

        def note(obs, tick):
            if tick.index == 0:
                first_tick.append(time.perf_counter())

        start = time.perf_counter()
        result = AsyncController(arm, remote, "reach", fps=30, on_tick=note).run(seconds)
        returned = time.perf_counter()
        remote.close()
        closed = time.perf_counter()
        print(f"{where}: run returned {returned - start:.2f} s after its start "
              f"({returned - first_tick[0] if first_tick else float('nan'):.2f} s after the first tick), "
              f"closed at {closed - start:.2f} s; {result.summary()['ticks']} ticks, failure {result.failure!r}")
        assert closed - start < seconds + 1.0, (returned - start, closed - start)
        assert not arm.is_connected and not arm.torque_enabled
        s = result.summary()
        if freeze_at is None or freeze_at == 0:  # no chunk ever: no tick, and the failure says why
            assert s["ticks"] == 0 and result.failure.startswith(f"no first chunk within the run's {seconds:g} s")
        elif s["ticks"] > 4:  # chunk 0 came in time and the arm then held until the end
            assert s["hold_ticks"] > 0 and result.overruns[-1]["open"]
            assert s["overrun_hold_ticks"] == s["hold_ticks"]  # every holding tick is in an overrun
        if timeout < seconds and freeze_at:
            assert f"no reply within {timeout:g} s" in result.failure
    finally:
        srv.episodes.policy.thaw.set()
        srv.stop()


def test_the_client_refuses_float_frames_in_0_1_before_sending(server):
    """A robot whose cameras give floats in 0..1 would drive the policy with black frames: refused on the arm's
    side already, naming the camera; floats in 0..255 go out as uint8."""
    remote = RemotePolicy(f"ws://127.0.0.1:{server.port}")
    remote.reset("reach")
    frames = {k: np.random.default_rng(0).random((48, 64, 3), dtype=np.float32) for k in remote.cfg.obs_cam_keys}
    sent = len(remote.request_bytes)
    with pytest.raises(ValueError, match=rf"{remote.cfg.obs_cam_keys[0]}: float image .* looks scaled to 0\.\.1"):
        remote.infer(frames)
    assert len(remote.request_bytes) == sent  # nothing went out
    assert remote.infer({k: 255 * v for k, v in frames.items()}).index == 0
    remote.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_absent_one_line_and_a_non_zero_exit(capsys):
    from lingbot_edge.cli.main import main

    port = _free_port()
    with pytest.raises(PolicyUnavailableError, match="cannot connect"):
        RemotePolicy(f"127.0.0.1:{port}", connect_timeout=2.0)
    assert main(["run-so100", "--policy", f"ws://127.0.0.1:{port}", "--seconds", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"run-so100: policy server ws://127.0.0.1:{port}: cannot connect")
    assert not any("Traceback" in line for line in err)


def test_cli_remote_run_reports_bytes_per_chunk_and_a_dead_server_exits_non_zero(capsys):
    from lingbot_edge.cli.main import main

    srv = PolicyServer(EpisodeServer(tiny_so100_policy()), port=0).start()
    try:
        assert main(["run-so100", "--policy", f"ws://127.0.0.1:{srv.port}", "--seconds", "1", "--sim-size", "96x128",
                     "--max-chunks", "3"]) == 0
        out = capsys.readouterr().out
        assert "MB sent per chunk" in out and "run-so100: lookahead" in out
    finally:
        srv.stop()
    srv = frozen_server(freeze_at=1, whole=True)  # a stopped server: no reply, no closing handshake
    try:
        start = time.perf_counter()
        code = main(["run-so100", "--policy", f"ws://127.0.0.1:{srv.port}", "--seconds", "1.5",
                     "--policy-timeout", "0.5"])
        assert time.perf_counter() - start < 1.5 + 1.0  # the whole command, connecting to the server included
        captured = capsys.readouterr()
        assert code == 1 and "Traceback" not in captured.err
        assert "run-so100: policy unavailable" in captured.err and "torque off" in captured.err
    finally:
        srv.episodes.policy.thaw.set()
        srv.stop()


class RecordingPolicy:
    """The so100 preset's geometry (F = 4, 96x128, 3 cameras) without a model: zero actions, frames kept."""

    supports_lookahead = False
    takes_executing_keyframes = False

    def __init__(self):
        from lingbot_edge.core.config import get_policy_config

        self.cfg, self.fed = get_policy_config("so100"), []

    def reset(self, prompt):
        self.n = 0

    def infer(self, obs, ahead=False):
        self.n += 1
        steps = (self.cfg.frame_chunk_size - (self.n == 1)) * self.cfg.action_per_frame
        return Chunk(np.zeros((steps, 6), np.float32) + [0, 0, 0, 30, 0, 50], index=self.n - 1, first=self.n == 1,
                     keyframe_stride=self.cfg.keyframe_stride, cameras=self.cfg.obs_cam_keys)

    def feedback(self, chunk):
        self.fed.append(chunk.keyframes())
        return {}

    def cancel(self):
        pass


def test_so100_preset_bytes_per_chunk_raw_and_jpeg():
    from lingbot_edge.serve.frames import decode_images

    recorder = RecordingPolicy()
    srv = PolicyServer(EpisodeServer(recorder), port=0).start()
    sizes = {}
    try:
        for quality in (None, 90):
            remote = RemotePolicy(f"127.0.0.1:{srv.port}", jpeg_quality=quality)
            arm = SO100FollowerStandIn([camera_name(k) for k in remote.cfg.obs_cam_keys])  # 480x640 frames
            AsyncController(arm, remote, "stack", fps=30).run(max_chunks=3)
            remote.close()
            sizes[quality] = remote.request_bytes[3]  # a full chunk: 16 keyframes x 3 cameras
            time.sleep(0.1)
    finally:
        srv.stop()
    raw = 16 * 3 * 96 * 128 * 3
    print(f"so100 preset, bytes per chunk: raw {sizes[None]} ({raw} of pixels), JPEG q90 {sizes[90]}")
    assert raw < sizes[None] < raw + 4096 and sizes[90] < 1_000_000 < sizes[None]
    # what the server fed back from JPEG is the raw frames to JPEG's error, at the policy's size
    exact, lossy = recorder.fed[1], recorder.fed[3]
    assert all(v.shape == (16, 96, 128, 3) for v in lossy.values())
    assert max(np.abs(exact[k].astype(int) - lossy[k]).mean() for k in exact) < 3.0
    with pytest.raises(ValueError, match=r"not a valid JPEG or PNG"):
        decode_images([b"\xff\xd8 not a jpeg"], "observation.images.top", 96, 128, max_side=4096)
