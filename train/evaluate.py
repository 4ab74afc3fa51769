"""Task success of a policy on held-out seeds of the grasp scene, through the episode protocol.

Each episode: `GraspScene(seed)`, `policy.reset(prompt)`, then chunk after chunk `infer` -> every
action through the `SafetyFilter` -> `chunk.record` -> `feedback`, as `lingbot-edge demo` and the
robot loop do (synchronously: no wall-clock deadline, the sim waits for the policy). Held-out seeds
start at EVAL_SEED0, far from the seeds a dataset is recorded from (0, 1, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lingbot_edge.robot.control import execute_step
from lingbot_edge.robot.safety import SafetyFilter
from lingbot_edge.robot.sim import VideoRecorder
from lingbot_edge.robot.so100 import camera_images, camera_name, joints_of
from train.dataset import TASK
from train.scene import GraspScene

log = logging.getLogger(__name__)

EVAL_SEED0 = 100_000
EVAL_STEPS = 124  # 4 + 8 * 15 actions (16 chunks of the tiny so100 policy): twice what the expert needs


def held_out_seeds(n: int, start: int = EVAL_SEED0) -> list[int]:
    return list(range(start, start + n))


def run_episode(policy, seed: int, steps: int = EVAL_STEPS, prompt: str = TASK, height: int = 96,
                width: int = 128, video: VideoRecorder | None = None) -> dict:
    """One closed-loop episode; returns {"seed", "success", "clipped", "steps", "min_distance"}."""
    cfg = policy.cfg
    cams = [camera_name(k) for k in cfg.obs_cam_keys]
    scene = GraspScene(seed, cameras=cams, height=height, width=width)
    safety = SafetyFilter()
    scene.connect()
    obs = scene.get_observation()
    policy.reset(prompt=prompt, seed=seed)
    last = joints_of(obs)
    done, chunk_index, tick, min_dist = 0, 0, 0, np.inf
    try:
        while done < steps:
            chunk = policy.infer(camera_images(obs, cfg.obs_cam_keys) if chunk_index == 0 else {})
            for step in range(chunk.steps):
                obs, last = execute_step(scene, chunk, step, safety, obs, last)
                min_dist = min(min_dist, float(np.linalg.norm(scene.tip()[:2] - scene.cube)))
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
            "min_distance": min_dist}


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
    rate = sum(e["success"] for e in episodes) / max(1, len(episodes))
    log.info("%s: success %d/%d (%.0f%%)", desc, sum(e["success"] for e in episodes), len(episodes), 100 * rate)
    return {"success_rate": rate, "successes": sum(e["success"] for e in episodes), "episodes": episodes}


def _row(name: str, dtype: str, result: dict) -> dict:
    return {"policy": name, "dtype": dtype, "success_rate": result["success_rate"], "successes": result["successes"],
            "episodes": len(result["episodes"]), "per_episode": result["episodes"]}


def evaluate_checkpoint(checkpoint: str | Path, episodes: int = 20, dtype: str = "bfloat16",
                        schemes: Sequence[str] = (), random_baseline: bool = True, video: str | Path | None = None,
                        steps: int = EVAL_STEPS, progress: bool = True) -> list[dict]:
    """Success over `episodes` held-out seeds: the checkpoint in `dtype`, each 8-bit scheme of
    `quantize.schemes.SCHEMES` applied to its blocks' Linears (quantize_ in memory, on the bf16/fp32
    model), and the same checkpoint with a random-weight DiT (the frozen parts and settings unchanged)."""
    import tempfile

    from train.pipeline import load_checkpoint_policy

    seeds = held_out_seeds(episodes)
    rows = [_row("trained", dtype, evaluate(load_checkpoint_policy(checkpoint, dtype), seeds, steps, progress,
                                            "trained", video))]
    for scheme in schemes:
        from quantize.api import quantize_
        from quantize.schemes import SCHEMES

        policy = load_checkpoint_policy(checkpoint, dtype)
        quantize_(policy.model, SCHEMES[scheme])
        rows.append(_row(f"trained + {scheme}", dtype, evaluate(policy, seeds, steps, progress, scheme)))
    if random_baseline:
        from lingbot_edge.io.checkpoint import build_model, save_transformer

        with tempfile.TemporaryDirectory() as tmp:
            policy = load_checkpoint_policy(checkpoint, dtype)
            save_transformer(build_model(policy.cfg.model_config, seed=0), Path(tmp) / "transformer")
            policy = load_checkpoint_policy(checkpoint, dtype, transformer=Path(tmp) / "transformer")
            rows.append(_row("random weights", dtype, evaluate(policy, seeds, steps, progress, "random")))
    return rows


def format_table(rows: Sequence[dict], episodes: int) -> str:
    lines = [f"| policy | dtype | success over {episodes} held-out seeds |", "|---|---|---|"]
    lines += [f"| {r['policy']} | {r['dtype']} | {r['successes']}/{r['episodes']} ({100 * r['success_rate']:.0f}%) |"
              for r in rows]
    return "\n".join(lines)
