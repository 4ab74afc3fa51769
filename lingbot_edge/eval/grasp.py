"""Task success on the SO-100 reach-and-grasp task (`robot.grasp.GraspScene`), through the episode protocol.

Each episode: `GraspScene(seed)`, `policy.reset(prompt)`, then chunk after chunk `infer` -> every
action through the `SafetyFilter` -> `chunk.record` -> `feedback`, as the robot loop does
(synchronously: no wall-clock deadline, the sim waits for the policy). Held-out seeds start at
EVAL_SEED0, far from the seeds a training dataset is recorded from (0, 1, ...); validation seeds start at
VALIDATION_SEED0: training recipes and policy settings are chosen on those, success is reported on the
held-out ones.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lingbot_edge.robot.control import execute_step
from lingbot_edge.robot.grasp import TASK, GraspScene
from lingbot_edge.robot.safety import SafetyFilter
from lingbot_edge.robot.sim import VideoRecorder
from lingbot_edge.robot.so100 import camera_images, camera_name, joints_of

log = logging.getLogger(__name__)

EVAL_SEED0 = 100_000
VALIDATION_SEED0 = 200_000
SEED_SETS = {"held-out": EVAL_SEED0, "validation": VALIDATION_SEED0}  # `--seeds` of `lingbot-edge train eval`
EVAL_STEPS = 124  # 4 + 8 * 15 actions (16 chunks of the tiny so100 policy): twice what the expert needs


def held_out_seeds(n: int, start: int = EVAL_SEED0) -> list[int]:
    return list(range(start, start + n))


def run_episode(policy, seed: int, steps: int = EVAL_STEPS, prompt: str = TASK, height: int = 96,
                width: int = 128, video: VideoRecorder | None = None) -> dict:
    """One closed-loop episode; returns {"seed", "success", "clipped", "steps", "min_distance", "chunk_ms",
    "cube_xy", "grasp_xy"} (grasp_xy: the tip's xy where it came lowest, i.e. where the policy tried to grasp)."""
    cfg = policy.cfg
    scene = GraspScene(seed, cameras=[camera_name(k) for k in cfg.obs_cam_keys], height=height, width=width)
    safety = SafetyFilter()
    scene.connect()
    obs = scene.get_observation()
    policy.reset(prompt=prompt, seed=seed)
    last = joints_of(obs)
    cube_xy = scene.cube.copy()
    done, chunk_index, tick, min_dist, infer_ms, lowest = 0, 0, 0, np.inf, [], (np.inf, None)
    try:
        while done < steps:
            t = time.perf_counter()
            chunk = policy.infer(camera_images(obs, cfg.obs_cam_keys) if chunk_index == 0 else {})
            infer_ms.append(1e3 * (time.perf_counter() - t))
            for step in range(chunk.steps):
                obs, last = execute_step(scene, chunk, step, safety, obs, last)
                tip = scene.tip()
                min_dist = min(min_dist, float(np.linalg.norm(tip[:2] - scene.cube)))
                lowest = min(lowest, (float(tip[2]), tip[:2].tolist()), key=lambda x: x[0])
                if video is not None:
                    video(obs, SimpleNamespace(index=tick))
                tick += 1
            done += chunk.steps
            chunk_index += 1
            if done < steps:
                policy.feedback(chunk)
    finally:
        scene.disconnect()
    return {"seed": seed, "success": bool(scene.success), "clipped": safety.clipped, "steps": done,
            "min_distance": min_dist, "chunk_ms": float(np.median(infer_ms)), "cube_xy": cube_xy.tolist(),
            "grasp_xy": lowest[1]}


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


def summarize(episodes: Sequence[dict]) -> dict:
    """The figures every success table prints, from `run_episode` results: successes, median closest approach
    (m), median ms per chunk, and the grasp-point slopes (`cube_tracking`; None below two episodes)."""
    return {"successes": sum(bool(e["success"]) for e in episodes), "episodes": len(episodes),
            "min_distance": float(np.median([e["min_distance"] for e in episodes])) if episodes else float("nan"),
            "chunk_ms": float(np.median([e["chunk_ms"] for e in episodes])) if episodes else float("nan"),
            "tracking": cube_tracking(episodes) if len(episodes) > 1 else None}


def evaluate(policy, seeds: Sequence[int], steps: int = EVAL_STEPS, progress: bool = True, desc: str = "eval",
             video_path: str | Path | None = None) -> dict:
    """Success rate over `seeds`; the first episode is written to `video_path` (mp4) when given."""
    from tqdm import tqdm

    episodes = []
    bar = tqdm(seeds, desc=desc, unit="episode", disable=not progress)
    for i, seed in enumerate(bar):
        video = VideoRecorder([camera_name(k) for k in policy.cfg.obs_cam_keys]) if video_path and i == 0 else None
        episodes.append(run_episode(policy, seed, steps, video=video))
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
    from lingbot_edge.core.config import ModelConfig
    from lingbot_edge.io.checkpoint import build_model, save_transformer
    from lingbot_edge.io.loading import checkpoint_folder

    config = ModelConfig.from_json(Path(checkpoint_folder(checkpoint)) / "transformer" / "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        save_transformer(build_model(config, seed=seed), Path(tmp) / "transformer")
        return load(transformer=Path(tmp) / "transformer")
