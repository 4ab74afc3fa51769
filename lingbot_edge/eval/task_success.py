"""Task success per precision and step setting, on the simulated SO-100 tasks.

The episode loop, the held-out seeds and the summary are `lingbot_edge.eval.sim`'s (which `lingbot-edge demo`
uses too); this module measures rows of settings: each `TaskSetting` loads a fresh policy with its step axes
(`video_exec_step`, action steps), has its DiT quantized in memory by the caller's `quantize` hook when it names
a scheme or a plan (`quantize.task.quantize_setting`: the runtime never imports the offline tools) and runs the
same held-out seeds. Every table with a task-success column measures through `measure` and prints through
`format_table`: `lingbot-edge train eval` (`train.evaluate`), `calibrate plan --task-episodes`, the ladder and
the drift table (`bench/`).

The grasp task runs any SO-100 policy (6 used action channels: 5 joints + gripper, any cameras); the one it
means something for is the trained embedded checkpoint `TASK_CHECKPOINT`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from lingbot_edge.eval.sim import (
    EVAL_SEED0,
    EVAL_STEPS,
    chunk_delay_ticks,
    evaluate,
    held_out_seeds,
    loop_async_mode,
    summarize,
)
from lingbot_edge.io.loading import load_policy
from lingbot_edge.robot.so100 import SO100_MOTORS

log = logging.getLogger(__name__)

TASK_CHECKPOINT = "so100-grasp"  # lingbot_edge.io.loading.EMBEDDED_CHECKPOINTS: the DiT trained on the grasp task
LoadFn = Callable[..., Any]  # load(**kwargs) -> LingBotPolicy; kwargs: sampler, transformer, PolicyConfig fields
QuantizeFn = Callable[[Any, "TaskSetting"], None]  # quantize(policy, setting): its DiT quantized in place


@dataclass(frozen=True)
class TaskSetting:
    """One row: the DiT's Linears on `quant` (a `quantize.SCHEMES` name, a `quantize.QuantPlan`, or None:
    unquantized; what the `quantize` hook of `measure` applies),
    the policy settings `overrides` (the step axes: `video_exec_step`, `action_num_inference_steps`; absent =
    the checkpoint's), the sampler, another DiT folder (`transformer`, e.g. the smoothed weights a plan applies
    to), the plan's static activation scales (`calibration.json`; else calibrated on one training-seed episode)."""

    label: str
    quant: Any = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    sampler: str = "static"
    transformer: str | Path | None = None
    input_scales: Mapping[str, float] | None = None
    check_hardware: bool = True  # False: float8 W8A8 emulated on a CPU, as the drift table runs it
    mode: str = "sync"  # the robot loop (`eval.sim.MODES`): sync, or a lookahead (naive, grounded, grounded-at-start)
    delay_ticks: float | None = None  # inference delay in control ticks (None: `eval.sim.chunk_delay_ticks`)


def checkpoint_loader(checkpoint: str | Path = TASK_CHECKPOINT, dtype: str = "bfloat16", device: str = "cpu",
                      **kwargs: Any) -> LoadFn:
    """`load` of an SO-100 checkpoint folder (or an embedded checkpoint's name) for `measure`: eager, prompts
    encoded in memory, the so100 preset under the checkpoint's own settings; `kwargs`: more `load_policy` ones."""
    return partial(load_policy, checkpoint, **{"preset": "so100", "device": device, "dtype": dtype, "compile": False,
                                                "prompt_cache_dir": False, **kwargs})


def check_task_policy(cfg, where: str = "policy") -> None:
    """The grasp task drives the SO-100: the policy must output its 6 joints (5 + gripper)."""
    if len(cfg.used_action_channel_ids) != len(SO100_MOTORS):
        raise ValueError(f"{where}: the SO-100 grasp task needs a policy with {len(SO100_MOTORS)} used action "
                         f"channels ({', '.join(SO100_MOTORS)}); {cfg.name!r} has "
                         f"{len(cfg.used_action_channel_ids)}")


def load_setting(load: LoadFn, setting: TaskSetting, quantize: QuantizeFn | None = None):
    """(policy, its compute dtype) of `setting`: loaded with its settings, its DiT quantized in place by
    `quantize` when the setting names a scheme or a plan."""
    kwargs = {**setting.overrides, "sampler": setting.sampler}
    if loop_async_mode(setting.mode) is not None:
        kwargs["async_mode"] = loop_async_mode(setting.mode)
    if setting.transformer is not None:
        kwargs["transformer"] = setting.transformer
    policy = load(**kwargs)
    check_task_policy(policy.cfg, setting.label)
    dtype = str(next(policy.model.parameters()).dtype).removeprefix("torch.")
    if setting.quant is not None:
        if quantize is None:
            raise ValueError(f"{setting.label}: quant {setting.quant!r} needs a quantize hook "
                             "(measure(..., quantize=quantize.task.quantize_setting))")
        quantize(policy, setting)
    return policy, dtype


def row(label: str, dtype: str, result: dict, video_exec_step: int | None, action_steps: int | None,
        mode: str | None = None, delay_ticks: float | None = None) -> dict:
    """One table row of an `evaluate` result (`video_exec_step` -1: full video steps; None: not a policy; `mode`:
    the robot loop, None for the expert)."""
    return {"policy": label, "dtype": dtype, "video_exec_step": video_exec_step, "action_steps": action_steps,
            "mode": mode, "delay_ticks": delay_ticks, "success_rate": result["success_rate"],
            "successes": result["successes"], "episodes": len(result["episodes"]), "per_episode": result["episodes"]}


def measure(load: LoadFn, settings: Sequence[TaskSetting], episodes: int, steps: int = EVAL_STEPS,
            progress: bool = False, video: str | Path | None = None, first_seed: int = EVAL_SEED0,
            scene: str = "grasp", quantize: QuantizeFn | None = None) -> list[dict]:
    """Success of each setting over the same `episodes` held-out seeds (`steps` actions each; from
    `first_seed`, e.g. `VALIDATION_SEED0`); rows for `format_table`. `video`: the first setting's first
    episode as an mp4. `scene`: the task (`robot.scenes.SCENES`). `quantize`: applies a setting's `quant`."""
    if episodes < 1:
        raise ValueError(f"task episodes: expected >= 1, got {episodes}")
    seeds = held_out_seeds(episodes, first_seed)
    rows = []
    for i, setting in enumerate(settings):
        policy, dtype = load_setting(load, setting, quantize)
        delay = chunk_delay_ticks(policy.cfg) if setting.delay_ticks is None else setting.delay_ticks
        result = evaluate(policy, seeds, steps, progress, setting.label, video if i == 0 else None, setting.mode,
                          delay, scene)
        rows.append(row(setting.label, dtype, result, policy.cfg.video_exec_step,
                        policy.cfg.action_num_inference_steps, setting.mode, delay))
    return rows


def steps_cell(r: dict) -> str:
    steps = {None: "-", -1: "full"}.get(r["video_exec_step"], f"video_exec_step {r['video_exec_step']}")
    return steps if r.get("action_steps") is None else f"{steps}, {r['action_steps']} action"


def success_cell(r: dict) -> str:
    return f"{r['successes']}/{r['episodes']} ({100 * r['success_rate']:.0f}%)"


def format_table(rows: Sequence[dict], episodes: int, seeds: str = "held-out") -> str:
    """Markdown: one row per `measure` row (or the expert's: successes only); `seeds`: their set's name."""
    lines = [f"| policy | dtype | steps | success over {episodes} {seeds} seeds | closest approach (median) "
             "| grasp point vs cube (slope x, y) | CPU ms per chunk (median) | loop (inference delay) "
             "| ticks to completion (median of successes) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["per_episode"]
        s = summarize(per) if per and "min_distance" in per[0] else None  # the expert's rows have no distances
        dist = f"{100 * s['min_distance']:.1f} cm" if s else "-"
        ms = f"{s['chunk_ms']:.0f}" if s else "-"
        track = "{:.2f}, {:.2f}".format(*s["tracking"]) if s and s["tracking"] else "-"
        loop = "-" if r.get("mode") is None else f"{r['mode']} ({r['delay_ticks']:g} ticks)"
        ticks = s["completion_ticks"] if s else None
        lines.append(f"| {r['policy']} | {r['dtype']} | {steps_cell(r)} | {success_cell(r)} | {dist} | {track} "
                     f"| {ms} | {loop} | {'-' if ticks is None else f'{ticks:g}'} |")
    return "\n".join(lines)
