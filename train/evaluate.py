"""Task success of a trained checkpoint: bf16 / fp32, each 8-bit scheme, and the random-weight baseline.

The episode loop and the held-out seeds are the runtime's (`lingbot_edge.eval.grasp`, which `lingbot-edge
demo` uses too); this module adds what needs the offline tools: the quantization schemes of `quantize/`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from lingbot_edge.eval.grasp import EVAL_STEPS, evaluate, held_out_seeds, with_random_transformer

log = logging.getLogger(__name__)


def _row(name: str, dtype: str, result: dict, exec_step: int | None) -> dict:
    return {"policy": name, "dtype": dtype, "video_exec_step": exec_step, "success_rate": result["success_rate"],
            "successes": result["successes"],
            "episodes": len(result["episodes"]), "per_episode": result["episodes"]}


def evaluate_expert(seeds: Sequence[int], steps: int = EVAL_STEPS) -> dict:
    """The scripted expert as recorded, on the same seeds, through the same safety filter (the task's ceiling)."""
    from lingbot_edge.robot.grasp import GraspScene
    from train.expert import RECORDING_CARTESIAN_SPEED, ScriptedExpert, run_expert

    episodes = []
    for seed in seeds:
        scene = GraspScene(seed, cameras=())
        safety = run_expert(scene, ScriptedExpert(scene.cube.copy(), cartesian_speed=RECORDING_CARTESIAN_SPEED), steps)
        episodes.append({"seed": seed, "success": bool(scene.success), "clipped": safety.clipped})
    successes = sum(e["success"] for e in episodes)
    return {"success_rate": successes / max(1, len(episodes)), "successes": successes, "episodes": episodes}


def evaluate_checkpoint(checkpoint: str | Path, episodes: int = 20, dtype: str = "bfloat16",
                        schemes: Sequence[str] = (), exec_steps: Sequence[int] = (-1,), random_baseline: bool = True,
                        expert: bool = False, video: str | Path | None = None, steps: int = EVAL_STEPS,
                        progress: bool = True) -> list[dict]:
    """Success over `episodes` held-out seeds, for every step setting in `exec_steps` (`video_exec_step`, -1 =
    full video steps): the checkpoint in `dtype`, each 8-bit scheme of `quantize.schemes.SCHEMES` applied to
    its blocks' Linears (quantize_ in memory), and the same checkpoint with a random-weight DiT."""
    from train.pipeline import load_checkpoint_policy

    seeds = held_out_seeds(episodes)
    rows = [_row("scripted expert", "-", evaluate_expert(seeds, steps), None)] if expert else []
    for exec_step in exec_steps:
        def load(transformer=None, exec_step=exec_step):
            return load_checkpoint_policy(checkpoint, dtype, transformer=transformer, video_exec_step=exec_step)

        tag = "" if exec_step == -1 else f" (video_exec_step {exec_step})"
        rows.append(_row("trained", dtype, evaluate(load(), seeds, steps, progress, f"trained{tag}",
                                                    video if exec_step == exec_steps[0] else None), exec_step))
        for scheme in schemes:
            from quantize.api import quantize_
            from quantize.schemes import SCHEMES

            policy = load()
            quantize_(policy.model, SCHEMES[scheme])
            rows.append(_row(f"trained + {scheme}", dtype, evaluate(policy, seeds, steps, progress, scheme + tag),
                             exec_step))
        if random_baseline:
            rows.append(_row("random weights", dtype, evaluate(with_random_transformer(checkpoint, load), seeds,
                                                               steps, progress, "random" + tag), exec_step))
    return rows


def format_table(rows: Sequence[dict], episodes: int) -> str:
    from lingbot_edge.eval.grasp import summarize

    lines = [f"| policy | dtype | video steps | success over {episodes} held-out seeds | closest approach (median) "
             "| grasp point vs cube (slope x, y) | CPU ms per chunk (median) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["per_episode"]
        steps = {None: "-", -1: "full"}.get(r["video_exec_step"], f"video_exec_step {r['video_exec_step']}")
        s = summarize(per) if per and "min_distance" in per[0] else None  # the expert's rows have no distances
        dist = f"{100 * s['min_distance']:.1f} cm" if s else "-"
        ms = f"{s['chunk_ms']:.0f}" if s else "-"
        track = "{:.2f}, {:.2f}".format(*s["tracking"]) if s and s["tracking"] else "-"
        lines.append(f"| {r['policy']} | {r['dtype']} | {steps} | {r['successes']}/{r['episodes']} "
                     f"({100 * r['success_rate']:.0f}%) | {dist} | {track} | {ms} |")
    return "\n".join(lines)
