"""The 30 Hz control loop: a control thread ticks on absolute deadlines, one worker thread runs the policy.

Each tick sends one action of the current chunk (an `episode.Chunk`) through the `SafetyFilter` and
records it with `chunk.record(step, executed, images)`: the chunk decides which steps are keyframes. When
a chunk is done, `policy.feedback(chunk)` and the next `infer` go to the worker. If the next chunk is not
ready when the current one ends, the loop keeps ticking but re-sends the last safe target ("hold"); each
such wait is one overrun (a wait still open when the run ends counts too). The robot is always
disconnected (torque off) on exit, KeyboardInterrupt included.

Pipelining with a KV-cache world model (docs/design.md sections 2-3). `infer(k+1)` conditions on what the
cache holds about chunk k; `feedback(k)` needs chunk k fully executed. Two schedules:

- sync (any policy): at the end of chunk k the worker runs `feedback(k)` then `infer(k+1)` while the arm
  holds: the arm waits one feedback + one infer at every boundary.
- lookahead (`policy.supports_lookahead`, i.e. `infer(obs, ahead=True)`): chunk k+1 is inferred while
  chunk k executes, conditioned on the model's own PREDICTED entries for chunk k. At the end of chunk k
  the worker runs `feedback(k)` then `infer(k+2, ahead=True)`, all while chunk k+1 executes. Chunk 0 is
  inferred before the first tick (it needs the first observation), chunk 1 while chunk 0 executes. The
  arm never waits as long as feedback + infer take less than one chunk of execution time.
  With a policy that `takes_executing_keyframes` (grounded lookahead) the request goes out later: at the
  last latent-frame boundary of chunk k+1 that still leaves the measured inference time (the longest of
  the last few requests, in ticks; at chunk k+1's start until one was measured), with the keyframes chunk
  k+1 recorded so far, so chunk k+2 sees images up to that point instead of up to chunk k's end.

A policy that cannot answer (`PolicyUnavailableError`: a remote server dead, absent or frozen past its
timeout) makes the arm hold until the run's end; `ControlLog.failure` says why. Any other policy error
stops the loop at once (robot disconnected) and propagates.

A run's `duration_s` counts from the moment the robot is connected, the policy's reset and chunk 0
included, so a frozen server cannot stretch it: the reset and chunk 0 are cancelled (`policy.cancel()`)
when the time is over, and so is a call still running when the loop ends; `run` then returns at once.

Timing is injectable for tests: `clock()` / `sleep(s)` (a fake clock makes ticks exact) and `executor`
(anything with `submit(fn, *args) -> future` with `done()` / `result()`, and `shutdown(...)`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lingbot_edge.core.episode import Chunk, chunk_steps, frame_boundaries
from lingbot_edge.core.protocols import Policy
from lingbot_edge.robot.safety import SafetyFilter
from lingbot_edge.robot.so100 import Robot, action_dict, camera_images, joints_of

log = logging.getLogger(__name__)


def execute_step(robot: Robot, chunk: Chunk, step: int, safety: SafetyFilter, obs: Mapping[str, Any],
                 last_safe: np.ndarray | None) -> tuple[Mapping[str, Any], np.ndarray]:
    """One step of a chunk without a clock (the synchronous loop of the demo and the evaluations): its target
    through the safety filter, sent, the robot observed, the step recorded (with the cameras at keyframes).

    Args:
        robot: the robot (connected).
        chunk: the chunk executing; `step` is recorded into it.
        step: the step of the chunk to execute (0-based, in order).
        safety: the filter the target goes through.
        obs: the robot's observation before the step (the safety filter's reference).
        last_safe: the previous target sent (None before the first).

    Returns:
        (obs, sent): the observation after the step, and the joint targets the robot took.

    Example:
        obs, last = robot.get_observation(), None
        for step in range(chunk.steps):
            obs, last = execute_step(robot, chunk, step, safety, obs, last)
        policy.feedback(chunk)
    """
    safe = safety(chunk.actions[step], joints_of(obs), last_safe)
    sent = joints_of(robot.send_action(action_dict(safe)))
    obs = robot.get_observation()
    chunk.record(step, sent, camera_images(obs, chunk.cameras) if chunk.is_keyframe(step) else None)
    return obs, sent


class PolicyUnavailableError(RuntimeError):
    """The policy cannot answer now (remote server dead, absent or frozen): the arm holds."""


@dataclass
class Tick:
    index: int
    scheduled: float  # deadline (s, loop clock, 0 = first tick)
    start: float
    end: float
    kind: str  # "exec" or "hold"
    chunk: int  # chunk being executed (-1 while holding)
    step: int  # step inside the chunk (-1 when holding)
    target: np.ndarray  # the safe target sent
    present: np.ndarray  # the joint positions read before the tick (the safety reference)


@dataclass
class ControlLog:
    """What the loop did, tick by tick: the timing evidence the tests assert on."""

    fps: float
    mode: str  # "lookahead" or "sync"
    ticks: list[Tick] = field(default_factory=list)
    missed: int = 0  # tick slots skipped because a tick started more than one period late
    overruns: list[dict] = field(default_factory=list)  # {"chunk", "hold_ticks", "late_ms", "open"}
    chunks: list[dict] = field(default_factory=list)  # {"chunk", "steps", "job_ms", "first_tick"}
    failure: str | None = None  # why the policy stopped answering (PolicyUnavailableError), else None
    first_tick_s: float = 0.0  # clock seconds from the robot's connection to tick 0 (reset + chunk 0): part of the run

    def summary(self) -> dict[str, Any]:
        period = 1.0 / self.fps
        starts = np.array([t.start for t in self.ticks])
        late = np.array([t.start - t.scheduled for t in self.ticks]) if self.ticks else np.zeros(1)
        work = np.array([t.end - t.start for t in self.ticks]) if self.ticks else np.zeros(1)
        intervals = np.diff(starts) if len(starts) > 1 else np.zeros(1)
        first_chunk_end = next((t.index for t in self.ticks if t.kind == "exec" and t.chunk > 0), len(self.ticks))
        return {
            "ticks": len(self.ticks),
            "exec_ticks": sum(t.kind == "exec" for t in self.ticks),
            "hold_ticks": sum(t.kind == "hold" for t in self.ticks),
            "holds_after_first_chunk": sum(t.kind == "hold" for t in self.ticks[first_chunk_end:]),
            "missed": self.missed,
            "chunks_executed": len({t.chunk for t in self.ticks if t.kind == "exec"}),
            "overruns": len(self.overruns),
            "overrun_hold_ticks": sum(o["hold_ticks"] for o in self.overruns),
            "period_ms": period * 1e3,
            "mean_interval_ms": float(intervals.mean() * 1e3),
            "max_interval_ms": float(intervals.max() * 1e3),
            "max_late_ms": float(late.max() * 1e3),
            "max_tick_work_ms": float(work.max() * 1e3),
            "failure": self.failure,
        }


SHUTDOWN_WAIT_S = 0.5  # how long `run` waits for a cancelled policy call to return before leaving it behind


class _Watchdog:
    """Calls `cancel()` once `clock()` reaches `until`, from a thread that reads the clock every `poll_s`
    seconds of real time (any clock works: a fake one that does not move never fires). `stop()` ends it."""

    def __init__(self, clock: Callable[[], float], until: float, cancel: Callable[[], None], poll_s: float = 0.01):
        self.fired = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(clock, until, cancel, poll_s),
                                        name="lingbot-watchdog", daemon=True)
        self._thread.start()

    def _watch(self, clock, until, cancel, poll_s) -> None:
        while not self._done.wait(poll_s):
            if clock() >= until:
                self.fired = True
                try:
                    cancel()
                except Exception:  # noqa: BLE001 - the loop goes on; the run's end still stops it
                    log.exception("policy.cancel failed")
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def supports_lookahead(policy: Policy) -> bool:
    """Whether `policy.infer(obs, ahead=True)` works (the lookahead schedule)."""
    return bool(policy.supports_lookahead)


LATENCY_WINDOW = 4  # late requests plan with the longest of the last this-many worker jobs (ticks)


@dataclass
class _RunState:
    """What one `AsyncController.run` carries from tick to tick (its steps read and update it)."""

    logbook: ControlLog
    worker: Any  # runs the policy calls: an executor with submit(fn, *args) -> future
    upcoming: deque = field(default_factory=deque)  # worker futures of (Chunk, job_ms), oldest first
    obs: Mapping[str, Any] = field(default_factory=dict)  # the robot's latest observation
    last_safe: np.ndarray | None = None  # the last target sent: what a hold re-sends
    current: Chunk | None = None  # the chunk executing, None while holding
    holding: int | None = None  # hold ticks of the wait going on; None when not waiting
    done_chunks: int = 0  # chunks fully executed
    tick: int = 0  # the next tick's slot (deadline = tick * period)
    t0: float = 0.0  # the loop clock at tick 0
    started: float = 0.0  # the loop clock once the robot is connected (where `duration_s` starts)
    deferred: Chunk | None = None  # a done chunk whose feedback waits for a late request (`request_late`)
    request_at: int = 0  # with `deferred`: the executing chunk's executed steps at which the request goes out
    submitted: dict = field(default_factory=dict)  # worker future -> tick it was submitted at (not yet seen done)
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))  # ticks to a finished job


class AsyncController:
    """Runs a policy on a robot: control ticks at `fps` here, policy calls on one worker thread.

    Each tick is a sequence of small steps (see `run`): wait for the deadline (`_wait_for_tick`), take a
    chunk the worker finished (`_take_ready_chunk`), send the next step of the current chunk (`_act`) or
    the last safe target again (`_hold`), read the robot (`_observe`), record the step and, at the end
    of a chunk, hand its feedback and the next infer to the worker (`_record_step`,
    `_request_next_chunk`), then log the tick (`_log_tick`).

    Args:
        robot: a `robot.so100.Robot` (connected and disconnected by `run`).
        policy: a `core.protocols.Policy`: a `LingBotPolicy`, a `serve.client.RemotePolicy`, or a test
            double; the loop reads `policy.cfg.obs_cam_keys`.
        prompt: the task, given to `policy.reset`.
        fps: control ticks per second.
        safety: the filter every target goes through (default `SafetyFilter()`).
        lookahead: infer each chunk while the previous one executes (`infer(obs, ahead=True)`); default:
            whenever `policy.supports_lookahead`. True with a policy that has no lookahead is an error.
        request_late: with lookahead, request the next chunk as late in the executing chunk as the measured
            inference time allows, with the keyframes recorded so far (module docstring); default: whenever
            `policy.takes_executing_keyframes`. True with a policy that does not take them is an error.
        on_tick: called as `on_tick(obs, tick)` after every tick (e.g. to record video).
        clock: seconds, monotonic (a fake clock makes ticks exact: `testing.clocks`).
        sleep: sleeps `s` seconds of `clock`.
        executor: runs the policy calls (anything with `submit(fn, *args) -> future` with `done()` /
            `result()`, and `shutdown(...)`); default: one worker thread, shut down by `run`.

    Raises:
        ValueError: `lookahead=True` with a policy whose `supports_lookahead` is false, or `request_late=True`
            without lookahead or with a policy whose `takes_executing_keyframes` is false.

    Example:
        controller = AsyncController(KinematicSO100(), load_policy("so100-grasp"), "pick up the cube", fps=30)
        log = controller.run(duration_s=10)
        print(log.summary()["overruns"])
    """

    def __init__(self, robot: Robot, policy: Policy, prompt: str, fps: float = 30.0,
                 safety: SafetyFilter | None = None, lookahead: bool | None = None,
                 on_tick: Callable[[dict, Tick], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
                 executor=None, request_late: bool | None = None):
        self.robot, self.policy, self.prompt = robot, policy, prompt
        self.fps, self.period = float(fps), 1.0 / float(fps)
        self.safety = safety or SafetyFilter()
        self.lookahead = supports_lookahead(policy) if lookahead is None else lookahead
        if self.lookahead and not supports_lookahead(policy):
            raise ValueError("lookahead: this policy has no infer(..., ahead=True) (supports_lookahead)")
        takes_frames = self.lookahead and bool(policy.takes_executing_keyframes)
        self.request_late = takes_frames if request_late is None else request_late
        if self.request_late and not takes_frames:
            raise ValueError("request_late: needs lookahead and a policy that takes the executing chunk's keyframes "
                             "(takes_executing_keyframes)")
        self.chunk_steps = chunk_steps(policy.cfg, 1)  # steps of a chunk after the first
        self.frame_boundaries = frame_boundaries(policy.cfg, 1)  # where a late request can go out
        self.on_tick = on_tick
        self.clock, self.sleep, self.executor = clock, sleep, executor
        self.cam_keys = tuple(policy.cfg.obs_cam_keys)
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the loop to finish after the current tick (thread-safe)."""
        self._stop.set()

    # -- worker jobs (run on the worker, strictly in submission order)
    def _infer(self, obs: Mapping[str, Any], ahead: bool) -> tuple[Chunk, float]:
        t = time.perf_counter()
        chunk = self.policy.infer(obs, ahead=True) if ahead else self.policy.infer(obs)
        if not isinstance(chunk, Chunk):
            raise TypeError(f"policy.infer: expected an episode.Chunk, got {type(chunk).__name__}")
        return chunk, (time.perf_counter() - t) * 1e3

    def _boundary_job(self, done: Chunk, executing_keyframes: Mapping[str, Any] | None = None) -> tuple[Chunk, float]:
        t = time.perf_counter()
        self.policy.feedback(done)
        chunk, _ = self._infer(executing_keyframes or {}, ahead=self.lookahead)
        return chunk, (time.perf_counter() - t) * 1e3

    def _images(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return camera_images(obs, self.cam_keys)

    def _fail(self, logbook: ControlLog, error: PolicyUnavailableError) -> None:
        logbook.failure = str(error)
        log.error("policy unavailable: %s; holding the last safe target until the end of the run", error)

    # -- the loop
    def run(self, duration_s: float | None = None, max_chunks: int | None = None) -> ControlLog:
        """Connect, run the episode, then always disconnect (torque off), KeyboardInterrupt included.

        Args:
            duration_s: the run's length in seconds of `clock`, from the moment the robot is connected: the
                policy's reset and chunk 0 count, so the first tick comes that much later and the loop stops
                before the first tick whose deadline is at or past the end (None: no limit). A reset or
                chunk 0 still running at the end is cancelled (`policy.cancel()`), and so is a call still
                running when the loop ends: `run` returns within a fraction of a second of the end even
                with a frozen server.
            max_chunks: stop after this many chunks were executed (None: no limit).

        Returns:
            The `ControlLog`: every tick, the missed slots, the overruns, the chunks; `.summary()` sums it up.

        Raises:
            Any error of the robot or of the policy other than `PolicyUnavailableError` (which makes the arm
            hold until the end, with `ControlLog.failure` saying why), after the robot was disconnected.
        """
        logbook = ControlLog(self.fps, "lookahead" if self.lookahead else "sync")
        worker = self.executor or concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                        thread_name_prefix="lingbot-infer")
        state = _RunState(logbook, worker)
        connected = False
        try:
            self.robot.connect()
            connected = True
            state.started = self.clock()
            self._observe(state)
            state.last_safe = joints_of(state.obs)
            self._start_episode(state, duration_s)
            state.t0 = self.clock()
            logbook.first_tick_s = state.t0 - state.started
            # the end in loop time (t0 = 0): `duration_s` less what connecting, the reset and chunk 0 took
            end = None if duration_s is None else duration_s - logbook.first_tick_s
            while not self._stop.is_set():
                deadline = state.tick * self.period
                if end is not None and deadline >= end:
                    break
                deadline, start = self._wait_for_tick(state, deadline)
                self._note_finished_jobs(state)
                present = joints_of(state.obs)
                self._take_ready_chunk(state)
                chunk = state.current
                if chunk is not None:
                    step = self._act(state, chunk, present)
                else:
                    step = -1
                    self._hold(state)
                self._observe(state)
                if chunk is not None:
                    self._record_step(state, chunk, step, max_chunks)
                self._log_tick(state, deadline, start, chunk, step, present)
                state.tick += 1
                if max_chunks is not None and state.done_chunks >= max_chunks:
                    state.holding = None  # done, not waiting
                    break
            self._close_open_wait(state)
        finally:
            self._shut_down(state, connected)
        self._log_summary(logbook)
        return logbook

    # -- the steps of `run`
    def _start_episode(self, state: _RunState, duration_s: float | None) -> None:
        """Reset the policy and infer chunk 0 here (it needs the first observation); with lookahead,
        chunk 1 goes to the worker at once, to run while chunk 0 executes. A policy that is unavailable
        leaves the arm holding from the first tick. Both calls are cancelled (`policy.cancel()`) once the
        run's `duration_s` is over: a server frozen before chunk 0 cannot delay the end of the run."""
        logbook = state.logbook
        watchdog = None
        if duration_s is not None:
            watchdog = _Watchdog(self.clock, state.started + duration_s, self.policy.cancel)
        try:
            try:
                self.policy.reset(self.prompt)
                chunk, job_ms = self._infer(self._images(state.obs), ahead=False)
            finally:
                if watchdog is not None:
                    watchdog.stop()
            state.current = chunk
            logbook.chunks.append({"chunk": chunk.index, "steps": chunk.steps, "job_ms": job_ms, "first_tick": 0})
            log.info("control loop: %s mode, %.0f Hz, chunk 0 (%d steps) in %.0f ms", logbook.mode, self.fps,
                     chunk.steps, job_ms)
            if self.lookahead:
                self._submit(state, self._infer, {}, True)
        except PolicyUnavailableError as e:
            if watchdog is not None and watchdog.fired:
                e = PolicyUnavailableError(f"no first chunk within the run's {duration_s:g} s, cancelled ({e})")
            self._fail(logbook, e)
        state.holding = None if state.current is not None else 0

    def _wait_for_tick(self, state: _RunState, deadline: float) -> tuple[float, float]:
        """Sleep until `deadline` (loop time); a tick that starts a whole period or more late skips the slots
        that went by (counted in `missed`), never bursts. Returns (deadline, start) of this tick."""
        now = self.clock() - state.t0
        if now < deadline:
            self.sleep(deadline - now)
        start = self.clock() - state.t0
        if start - deadline >= self.period:
            skipped = int((start - deadline) // self.period)
            state.logbook.missed += skipped
            log.warning("control loop late by %.1f ms: skipped %d tick(s)", (start - deadline) * 1e3, skipped)
            state.tick += skipped
            deadline = state.tick * self.period
        return deadline, start

    def _submit(self, state: _RunState, fn: Callable[..., tuple[Chunk, float]], *args: Any) -> None:
        future = state.worker.submit(fn, *args)
        state.upcoming.append(future)
        state.submitted[future] = state.tick

    def _note_finished_jobs(self, state: _RunState) -> None:
        """Measure, in ticks, how long each worker job took to become usable (what late requests plan with)."""
        for future in [f for f in state.submitted if f.done()]:
            state.latencies.append(state.tick - state.submitted.pop(future))

    def _take_ready_chunk(self, state: _RunState) -> None:
        """While holding: make the worker's oldest result the current chunk once it is done (closing the
        overrun, if the arm held for it), or note that the policy became unavailable."""
        if state.current is not None:
            return
        if state.upcoming and state.upcoming[0].done():
            try:
                chunk, job_ms = state.upcoming.popleft().result()  # another error raises: the loop stops safely
            except PolicyUnavailableError as e:
                self._fail(state.logbook, e)
                state.upcoming.clear()
                return
            holds = state.holding
            state.current = chunk
            state.logbook.chunks.append({"chunk": chunk.index, "steps": chunk.steps, "job_ms": job_ms,
                                         "first_tick": state.tick})
            if holds > 0:
                state.logbook.overruns.append({"chunk": chunk.index, "hold_ticks": holds,
                                               "late_ms": holds * self.period * 1e3, "open": False})
                log.info("chunk %d ready after holding %d tick(s)", chunk.index, holds)
            state.holding = None
        elif state.holding == 0 and state.upcoming:
            log.warning("overrun: the next chunk is not ready when the previous one ended; holding the last "
                        "safe target")

    def _act(self, state: _RunState, chunk: Chunk, present: np.ndarray) -> int:
        """Send the chunk's next step through the safety filter; returns the step."""
        step = chunk.executed_steps
        self._send(state, self.safety(chunk.actions[step], present, state.last_safe))
        return step

    def _hold(self, state: _RunState) -> None:
        """No chunk to execute: send the last safe target again (one more hold tick of the wait)."""
        state.holding = (state.holding or 0) + 1
        self._send(state, state.last_safe)

    def _send(self, state: _RunState, target: np.ndarray) -> None:
        state.last_safe = joints_of(self.robot.send_action(action_dict(target)))

    def _observe(self, state: _RunState) -> None:
        state.obs = self.robot.get_observation()

    def _record_step(self, state: _RunState, chunk: Chunk, step: int, max_chunks: int | None) -> None:
        """Record the step sent (with the cameras at a keyframe); a chunk now complete is done: the arm
        holds until the next one is ready."""
        chunk.record(step, state.last_safe, self._images(state.obs) if chunk.is_keyframe(step) else None)
        if chunk.complete:
            state.done_chunks += 1
            if state.logbook.failure is None and (max_chunks is None or state.done_chunks < max_chunks):
                self._request_next_chunk(state, chunk)
            state.current, state.holding = None, 0
        elif state.deferred is not None and chunk.executed_steps == state.request_at:
            self._request_late(state, chunk)

    def _request_next_chunk(self, state: _RunState, done: Chunk) -> None:
        """Hand the worker `feedback(done)` then the next infer (ahead of the pending chunk with lookahead), now
        or, with `request_late`, at the next chunk's `_late_request_step`."""
        state.request_at = self._late_request_step(state) if self.request_late else 0
        if state.request_at == 0:
            self._submit(state, self._boundary_job, done)
        else:
            state.deferred = done

    def _late_request_step(self, state: _RunState) -> int:
        """The executed steps of the next chunk after which to request the one after it: the last latent-frame
        boundary whose request is still usable at the chunk's end with the longest recent job, in ticks, and a
        tick to spare (a request made during the tick of step s - 1 is taken when the chunk ends if
        s - 1 + latency <= steps; one tick of jitter allowed: s + latency <= steps); 0 until a job was measured."""
        if not state.latencies:
            return 0
        latency = max(state.latencies)
        last = self.chunk_steps - latency
        return max((s for s in self.frame_boundaries if s <= last), default=0)

    def _request_late(self, state: _RunState, chunk: Chunk) -> None:
        """The deferred feedback and the next infer, with the executing chunk's keyframes recorded so far."""
        done, state.deferred = state.deferred, None
        self._submit(state, self._boundary_job, done, chunk.recorded_keyframes())

    def _log_tick(self, state: _RunState, deadline: float, start: float, chunk: Chunk | None, step: int,
                  present: np.ndarray) -> None:
        tick = Tick(state.tick, deadline, start, self.clock() - state.t0, "exec" if chunk is not None else "hold",
                    chunk.index if chunk is not None else -1, step, state.last_safe, present)
        state.logbook.ticks.append(tick)
        if self.on_tick is not None:
            self.on_tick(state.obs, tick)

    def _close_open_wait(self, state: _RunState) -> None:
        """A wait still open at the end of the run is an overrun too."""
        if state.holding:
            holds = state.holding
            state.logbook.overruns.append({"chunk": None, "hold_ticks": holds, "late_ms": holds * self.period * 1e3,
                                           "open": True})

    def _shut_down(self, state: _RunState, connected: bool) -> None:
        """Stop our worker (queued jobs dropped), unblock a policy call still running (e.g. a remote call on a
        frozen server), disconnect the robot (torque off) without masking an error on the way out, then give
        the running call `SHUTDOWN_WAIT_S` to return (a policy whose `cancel` cannot interrupt it finishes it
        in the background; the worker only ever calls the policy, never the robot)."""
        if self.executor is None:
            state.worker.shutdown(wait=False, cancel_futures=True)
        running = [f for f in state.upcoming if not f.done()]
        try:
            if running:
                self.policy.cancel()
        finally:
            if connected:
                try:
                    self.robot.disconnect()  # torque off
                except Exception:  # noqa: BLE001 - never mask the original error on the way out
                    log.exception("robot disconnect failed")
            if self.executor is None:
                t = time.perf_counter()
                _, still = concurrent.futures.wait(running, timeout=SHUTDOWN_WAIT_S)
                log.debug("shut down: %d policy call(s) cancelled, worker stopped in %.0f ms", len(running),
                          (time.perf_counter() - t) * 1e3)
                if still:
                    log.warning("a policy call did not return within %.1f s of policy.cancel(); it finishes in the "
                                "background", SHUTDOWN_WAIT_S)

    def _log_summary(self, logbook: ControlLog) -> None:
        s = logbook.summary()
        log.info("control loop done: %d ticks (%d exec, %d hold), %d missed, %d chunk(s), %d overrun(s), mean "
                 "interval %.2f ms, max late %.2f ms", s["ticks"], s["exec_ticks"], s["hold_ticks"], s["missed"],
                 s["chunks_executed"], s["overruns"], s["mean_interval_ms"], s["max_late_ms"])
