"""Task success on the simulated SO-100 tasks (`robot.scenes.SCENES`: grasp, place), through the episode protocol.

Each episode runs the robot loop itself (`robot.control.AsyncController`) on the scene of a seed under
virtual time (`robot.virtual`): the same hand-off as `run-so100`, synchronous or lookahead, with every
inference taking a fixed number of control ticks instead of wall time, so results do not depend on the
machine. Held-out seeds start at
EVAL_SEED0, far from the seeds a training dataset is recorded from (0, 1, ...); validation seeds start at
VALIDATION_SEED0: training recipes and policy settings are chosen on those, success is reported on the
held-out ones.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lingbot_edge.core.episode import chunk_steps
from lingbot_edge.io.checkpoint import build_model, read_model_config, save_transformer
from lingbot_edge.io.loading import checkpoint_folder
from lingbot_edge.robot.control import AsyncController
from lingbot_edge.robot.safety import SafetyFilter
from lingbot_edge.robot.scenes import get_scene
from lingbot_edge.robot.sim import VideoRecorder
from lingbot_edge.robot.so100 import camera_name
from lingbot_edge.robot.virtual import DelayedExecutor, VirtualClock

log = logging.getLogger(__name__)

EVAL_SEED0 = 100_000
VALIDATION_SEED0 = 200_000
SEED_SETS = {"held-out": EVAL_SEED0, "validation": VALIDATION_SEED0}  # `--seeds` of `lingbot-edge train eval`
EVAL_STEPS = 124  # 4 + 8 * 15 actions (16 chunks of the tiny so100 policy): twice what the expert needs
EVAL_FPS = 30.0  # the control rate the inference delay is counted at


def held_out_seeds(n: int, start: int = EVAL_SEED0) -> list[int]:
    return list(range(start, start + n))


# The robot loops: sync infers after each chunk; the others look ahead with the policy's async_mode (`loop_async_mode`).
# "grounded" requests late (with the executing chunk's keyframes, as run-so100 does); "grounded-at-start" requests
# at the executing chunk's start, on the history alone (as over the websocket).
MODES = ("sync", "naive", "grounded", "grounded-at-start")


def loop_async_mode(mode: str) -> str | None:
    """The policy's `async_mode` a loop of `MODES` needs (None for sync)."""
    return None if mode == "sync" else mode.removesuffix("-at-start")


def chunk_delay_ticks(cfg) -> int:
    """The default inference delay: half a steady-state chunk's execution (a GPU that meets the control rate
    with room to spare), in control ticks."""
    return max(1, chunk_steps(cfg, 1) // 2)


def run_episode(policy, seed: int, steps: int = EVAL_STEPS, prompt: str | None = None, height: int = 96,
                width: int = 128, video: VideoRecorder | None = None, mode: str = "sync",
                delay_ticks: float | None = None, scene: str = "grasp") -> dict:
    """One closed-loop episode through the robot loop (`AsyncController`) under virtual time: every inference
    takes `delay_ticks` control ticks (default `chunk_delay_ticks`), the synchronous loop holds the arm while it
    waits, the lookahead loop (`mode` naive / grounded: the policy's `async_mode`) infers the next chunk while
    the current one executes. The episode runs the chunks of `steps` actions, however many ticks that takes.
    `scene`: the task (`robot.scenes.SCENES`: grasp, place); `prompt`: default the scene's.

    Returns {"seed", "success", "clipped", "steps", "ticks", "completion_tick" (first tick with the cube held,
    None if never), "hold_ticks", "min_distance", "chunk_ms" (median CPU ms of a chunk's feedback + infer),
    "cube_xy", "grasp_xy"} (grasp_xy: the tip's xy where it came lowest, i.e. where the policy tried to grasp).
    """
    cfg = policy.cfg
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    needs = loop_async_mode(mode)
    if needs is not None and cfg.async_mode != needs:
        raise ValueError(f"mode {mode!r}: the policy's async_mode is {cfg.async_mode!r}; load it with "
                         f"async_mode={needs!r}")
    chunks, total = 0, 0
    while total < steps:
        total += chunk_steps(cfg, chunks)
        chunks += 1
    task = get_scene(scene)
    prompt = task.task if prompt is None else prompt
    scene = task.cls(seed, cameras=[camera_name(k) for k in cfg.obs_cam_keys], height=height, width=width)
    cube_xy = scene.cube.copy()
    track = {"min_dist": np.inf, "lowest": (np.inf, None), "completion": None}

    def on_tick(obs, tick) -> None:
        tip = scene.tip()
        track["min_dist"] = min(track["min_dist"], float(np.linalg.norm(tip[:2] - scene.cube)))
        track["lowest"] = min(track["lowest"], (float(tip[2]), tip[:2].tolist()), key=lambda x: x[0])
        if track["completion"] is None and scene.success:
            track["completion"] = tick.index
        if video is not None:
            video(obs, tick)

    clock = VirtualClock()
    delay = chunk_delay_ticks(cfg) if delay_ticks is None else delay_ticks
    safety = SafetyFilter()
    controller = AsyncController(scene, _Seeded(policy, seed), prompt, safety=safety, lookahead=mode != "sync",
                                 on_tick=on_tick, clock=clock, sleep=clock.sleep,
                                 executor=DelayedExecutor(clock, delay, EVAL_FPS),
                                 request_late=False if mode.endswith("-at-start") else None)
    # A synchronous loop holds at every boundary: expected here, not news. Only this thread's records below ERROR
    # are dropped while the episode runs; the logger's level and every other thread's records stay as they are.
    quiet = _ThisThreadBelow(logging.ERROR)
    control_log = logging.getLogger(AsyncController.__module__)
    control_log.addFilter(quiet)
    try:
        logbook = controller.run(max_chunks=chunks)
    finally:
        control_log.removeFilter(quiet)
    summary = logbook.summary()
    job_ms = [c["job_ms"] for c in logbook.chunks]
    return {"seed": seed, "success": bool(scene.success), "clipped": safety.clipped, "steps": summary["exec_ticks"],
            "ticks": summary["ticks"], "completion_tick": track["completion"], "hold_ticks": summary["hold_ticks"],
            "min_distance": track["min_dist"], "chunk_ms": float(np.median(job_ms)), "cube_xy": cube_xy.tolist(),
            "grasp_xy": track["lowest"][1]}


class _ThisThreadBelow(logging.Filter):
    """Drops the records below `level` that the creating thread emits."""

    def __init__(self, level: int):
        super().__init__()
        self.level, self.thread = level, threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or record.thread != self.thread


class _Seeded:
    """The policy with `reset(prompt)` seeded by the episode (the controller resets with the prompt alone)."""

    def __init__(self, policy, seed: int):
        self._policy, self._seed = policy, seed
        self.cfg = policy.cfg
        self.supports_lookahead = policy.supports_lookahead
        self.takes_executing_keyframes = policy.takes_executing_keyframes

    def reset(self, prompt: str) -> None:
        self._policy.reset(prompt=prompt, seed=self._seed)

    def infer(self, obs, ahead: bool = False):
        return self._policy.infer(obs, ahead=ahead)

    def feedback(self, chunk):
        return self._policy.feedback(chunk)

    def cancel(self) -> None:
        self._policy.cancel()


def cube_tracking(episodes: Sequence[dict]) -> tuple[float, float]:
    """Least-squares slope of the grasp point on the cube position, per axis (x forward, y left): 1 = the policy
    goes where the cube is, 0 = it goes to the same place whatever the cube's position."""
    cube = np.array([e["cube_xy"] for e in episodes])
    grasp = np.array([e["grasp_xy"] for e in episodes])
    slopes = []
    for axis in range(2):
        c = cube[:, axis] - cube[:, axis].mean()
        slopes.append(float((c * (grasp[:, axis] - grasp[:, axis].mean())).sum() / max((c * c).sum(), 1e-12)))
    return slopes[0], slopes[1]


def completion_ticks(episodes: Sequence[dict]) -> float | None:
    """Median ticks to task completion over the successful episodes (None without one)."""
    done = [e["completion_tick"] for e in episodes if e.get("completion_tick") is not None and e["success"]]
    return float(np.median(done)) if done else None


def summarize(episodes: Sequence[dict]) -> dict:
    """The figures every success table prints, from `run_episode` results: successes, median closest approach
    (m), median ms per chunk, the grasp-point slopes (`cube_tracking`; None below two episodes) and the median
    ticks to completion of the successful episodes (`completion_ticks`)."""
    return {"successes": sum(bool(e["success"]) for e in episodes), "episodes": len(episodes),
            "completion_ticks": completion_ticks(episodes),
            "min_distance": float(np.median([e["min_distance"] for e in episodes])) if episodes else float("nan"),
            "chunk_ms": float(np.median([e["chunk_ms"] for e in episodes])) if episodes else float("nan"),
            "tracking": cube_tracking(episodes) if len(episodes) > 1 else None}


def evaluate(policy, seeds: Sequence[int], steps: int = EVAL_STEPS, progress: bool = True, desc: str = "eval",
             video_path: str | Path | None = None, mode: str = "sync", delay_ticks: float | None = None,
             scene: str = "grasp") -> dict:
    """Success rate over `seeds` in `mode` on `scene` (`run_episode`); the first episode is written to
    `video_path` (mp4) when given."""
    from tqdm import tqdm

    episodes = []
    bar = tqdm(seeds, desc=desc, unit="episode", disable=not progress)
    for i, seed in enumerate(bar):
        video = VideoRecorder([camera_name(k) for k in policy.cfg.obs_cam_keys]) if video_path and i == 0 else None
        episodes.append(run_episode(policy, seed, steps, video=video, mode=mode, delay_ticks=delay_ticks,
                                    scene=scene))
        bar.set_postfix(success=f"{sum(e['success'] for e in episodes)}/{len(episodes)}",
                        dist_cm=f"{100 * episodes[-1]['min_distance']:.1f}")
        if video is not None:
            video.write(video_path, fps=30)
    successes = sum(e["success"] for e in episodes)
    rate = successes / max(1, len(episodes))
    log.info("%s: success %d/%d (%.0f%%)", desc, successes, len(episodes), 100 * rate)
    return {"success_rate": rate, "successes": successes, "episodes": episodes}


def with_random_transformer(checkpoint: str | Path, load, seed: int = 0):
    """`load(transformer=DIR)` with a random-weight DiT of the checkpoint's architecture (a folder or an embedded
    checkpoint's name) in DIR (the frozen parts and settings unchanged): the baseline a trained DiT is measured
    against."""
    config = read_model_config(Path(checkpoint_folder(checkpoint)) / "transformer" / "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        save_transformer(build_model(config, seed=seed), Path(tmp) / "transformer")
        return load(transformer=Path(tmp) / "transformer")
