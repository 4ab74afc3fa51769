"""The 30 Hz control loop under a fake clock: ticks, holds, overruns, late requests, the run length, safety
and torque off."""

import logging
import threading

import numpy as np
import pytest

from lingbot_edge.core.config import get_policy_config, tiny_variant
from lingbot_edge.core.episode import Chunk
from lingbot_edge.io.loading import load_policy
from lingbot_edge.robot.control import AsyncController, PolicyUnavailableError
from lingbot_edge.robot.safety import SafetyFilter, SafetyLimits
from lingbot_edge.robot.sim import KinematicSO100

CFG = tiny_variant(get_policy_config("so100"))  # F = 2, apf = 4: chunks of 4 then 8 steps (133 / 267 ms at 30 Hz)


def tiny_so100_policy(**overrides):
    return load_policy("tiny", preset="so100", device="cpu", compile=False, seed=0, **overrides)


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
