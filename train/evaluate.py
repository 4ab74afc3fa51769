"""Task success of a trained checkpoint: bf16 / fp32, each 8-bit scheme, and the random-weight baseline.

The episode loop and the held-out seeds are the runtime's (`lingbot_edge.eval.sim`, which `lingbot-edge
demo` uses too); the settings (scheme x step setting), their measurement and the table are
`lingbot_edge.eval.task_success`'s, shared with the ladder, the drift table and the calibration report. This module adds
the rows only training has: the scripted expert and the checkpoint with a random-weight DiT.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lingbot_edge.eval.sim import EVAL_SEED0, EVAL_STEPS, held_out_seeds, with_random_transformer
from lingbot_edge.eval.task_success import TaskSetting, checkpoint_loader, format_table, measure, row
from lingbot_edge.robot.scenes import get_scene
from quantize.task import quantize_setting
from train.dataset import EXPERTS
from train.expert import run_expert

log = logging.getLogger(__name__)
__all__ = ["evaluate_checkpoint", "evaluate_expert", "format_table"]


def evaluate_expert(seeds: Sequence[int], steps: int = EVAL_STEPS, scene: str = "grasp") -> dict:
    """The scripted expert as recorded, on the same seeds, through the same safety filter (the task's ceiling)."""
    episodes = []
    for seed in seeds:
        sim = get_scene(scene).cls(seed, cameras=())
        safety = run_expert(sim, EXPERTS[scene](sim, seed), steps)
        episodes.append({"seed": seed, "success": bool(sim.success), "clipped": safety.clipped})
    successes = sum(e["success"] for e in episodes)
    return {"success_rate": successes / max(1, len(episodes)), "successes": successes, "episodes": episodes}


@dataclass(frozen=True)
class EvalEpisodes:
    """The episodes every row of `evaluate_checkpoint` runs."""

    episodes: int = 20  # seeds, the same for every row
    first_seed: int = EVAL_SEED0  # the first of them (VALIDATION_SEED0 for the validation set)
    scene: str = "grasp"  # the task (`robot.scenes.SCENES`)
    steps: int | None = None  # actions per episode (None: the scene's `eval_steps`)
    delay_ticks: float | None = None  # inference delay in control ticks of the lookahead loops (None: half a chunk)


@dataclass(frozen=True)
class EvalRows:
    """Which rows `evaluate_checkpoint` measures."""

    # video step settings, a set of rows each (`video_exec_step`; -1: full video steps, None: the checkpoint's own)
    exec_steps: tuple[int | None, ...] = (None,)
    modes: tuple[str, ...] = ("sync",)  # the robot loops of the trained rows (`eval.sim.MODES`)
    schemes: tuple[str, ...] = ()  # 8-bit schemes (`quantize.SCHEMES`) on the blocks' Linears, a row each
    random_baseline: bool = True  # the same checkpoint with a random-weight DiT
    expert: bool = False  # the scripted expert, as recorded
    overrides: Mapping[str, Any] = field(default_factory=dict)  # policy settings of every row (`--set`)
    transformer: str | Path | None = None  # another DiT folder for the trained rows (e.g. `lingbot-edge quantize`'s)


def evaluate_checkpoint(checkpoint: str | Path, dtype: str = "bf16", rows: EvalRows = EvalRows(),
                        episodes: EvalEpisodes = EvalEpisodes(), video: str | Path | None = None,
                        progress: bool = True) -> list[dict]:
    """Success over the same seeds, for every step setting of `rows.exec_steps`: the checkpoint in `dtype`, each
    8-bit scheme applied to its blocks' Linears (quantize_ in memory), and the same checkpoint with a random-weight
    DiT; the trained rows in every loop of `rows.modes`, the 8-bit rows and the random baseline in the first.
    Overrides and another DiT are named in the row labels. `video`: the first row's first episode as an mp4."""
    steps, scene, first_seed, delay_ticks = episodes.steps, episodes.scene, episodes.first_seed, episodes.delay_ticks
    overrides, transformer, modes, exec_steps = rows.overrides, rows.transformer, rows.modes, rows.exec_steps
    schemes, random_baseline, expert = rows.schemes, rows.random_baseline, rows.expert
    episodes = episodes.episodes
    steps = get_scene(scene).eval_steps if steps is None else steps
    load = checkpoint_loader(checkpoint, dtype)

    def random_dit(**kwargs):  # the random DiT copies the checkpoint's architecture
        return with_random_transformer(checkpoint, lambda transformer: load(**kwargs, transformer=transformer))

    seeds = held_out_seeds(episodes, first_seed)
    table = [row("scripted expert", "-", evaluate_expert(seeds, steps, scene), None, None)] if expert else []
    overrides = dict(overrides or {})
    note = f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else ""
    for exec_step in exec_steps:
        tag = {None: "the checkpoint's", -1: "full"}.get(exec_step, f"video_exec_step {exec_step}")
        axes = dict(overrides) if exec_step is None else {**overrides, "video_exec_step": exec_step}
        label = "trained" + note + ("" if transformer is None else f" (DiT {transformer})")
        settings = [TaskSetting(label, None, axes, mode=m, delay_ticks=delay_ticks, transformer=transformer)
                    for m in modes]
        settings += [TaskSetting(f"trained + {s}{note}", s, axes, mode=modes[0], delay_ticks=delay_ticks)
                     for s in schemes]
        table += measure(load, settings, episodes, steps, progress, video if exec_step == exec_steps[0] else None,
                        first_seed, scene, quantize_setting)
        if random_baseline:
            table += measure(random_dit, [TaskSetting("random weights" + note, None, axes, mode=modes[0],
                                                     delay_ticks=delay_ticks)],
                            episodes, steps, progress, first_seed=first_seed, scene=scene)
        log.info("step setting %s done", tag)
    return table
