"""The three steps over one output folder, as the CLI runs them:

    stats.safetensors    capture (resumable)
    sensitivity.json     sensitivity (resumable)
    plan.json            plan: for `lingbot-edge quantize --plan` (+ calibration.json, report.md,
                         sensitivity.png; with smoothing also transformer/, the smoothed weights the
                         plan applies to: `lingbot-edge quantize --checkpoint OUT/transformer --plan ...`)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.io.checkpoint import save_transformer
from lingbot_edge.io.episodes import EpisodeSource
from lingbot_edge.io.files import check_output_folder, is_temp_path
from lingbot_edge.io.quantized import sha256_file
from quantize.api import checkpoint_sha256, transformer_folder
from quantize.plan import BLOCK_LINEARS

from .capture import capture
from .evaluate import Evaluator
from .planner import Budget, PlanResult, choose_plan
from .report import write_outputs
from .sensitivity import Sensitivity, measure_sensitivity, sensitivity_targets
from .smoothing import apply_smoothing, smoothed_absmax, smoothing_factors
from .stats import ActivationStats

log = logging.getLogger(__name__)

STATS_FILE = "stats.safetensors"
SENSITIVITY_FILE = "sensitivity.json"


@dataclass(frozen=True)
class Setup:
    """The model prepared for sensitivity / plan: smoothing folded in, input ranges, the episodes."""

    evaluator: Evaluator
    factors: dict[str, Tensor] = field(default_factory=dict)
    input_absmax: dict[str, float] = field(default_factory=dict)
    episode_ids: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


def capture_step(model: nn.Module, cfg: PolicyConfig, source: EpisodeSource, out: str | Path, *,
                 resume: bool = True, progress: bool = False) -> ActivationStats:
    return capture(model, cfg, source, Path(out) / STATS_FILE, resume=resume, progress=progress)


def load_stats(out: str | Path) -> ActivationStats | None:
    path = Path(out) / STATS_FILE
    return ActivationStats.load(path) if path.is_file() else None


def setup(model: nn.Module, cfg: PolicyConfig, source: EpisodeSource, stats: ActivationStats | None, *,
          episodes: int = 2, smooth_alpha: float | None = None, pattern: str = BLOCK_LINEARS,
          granularity: str = "module") -> Setup:
    """Run the reference (the model as given, in its dtype: the one deployed), then fold smoothing into
    `model` (in place) if asked and derive input ranges. Errors are measured against that reference,
    so they include the rounding of the smoothed weights."""
    factors: dict[str, Tensor] = {}
    names = [n for t in sensitivity_targets(model, pattern, "module").values() for n in t]
    if smooth_alpha is not None:
        if stats is None:
            raise ValueError("smoothing needs captured statistics: run `calibrate capture` first")
        factors = smoothing_factors(model, stats, names, smooth_alpha)
    absmax = {m: smoothed_absmax(stats, m, factors) for m in stats.modules} if stats is not None else {}
    ids = tuple(source.episode_ids()[:episodes])
    evaluator = Evaluator(model, cfg, [source.load(i) for i in ids], absmax)
    if factors:
        apply_smoothing(model, factors)
        log.info("smoothing (alpha %g) folded into %d Linears", smooth_alpha, len(factors))
    meta = {"episodes": list(ids), "data": source.describe(), "smooth_alpha": smooth_alpha, "pattern": pattern,
            "granularity": granularity, "policy": cfg.name, "dtype": dtype_name(model),
            "steps": [cfg.num_inference_steps, cfg.action_num_inference_steps]}
    return Setup(evaluator, factors, absmax, ids, meta)


def dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def sensitivity_step(s: Setup, schemes: list[str], out: str | Path, progress: bool = False) -> Sensitivity:
    targets = sensitivity_targets(s.evaluator.model, s.meta["pattern"], s.meta["granularity"])
    return measure_sensitivity(s.evaluator, schemes, targets, out=Path(out) / SENSITIVITY_FILE, meta=s.meta,
                               progress=progress)


def plan_step(s: Setup, budget: Budget, out: str | Path, schemes: list[str] | None = None,
              stats: ActivationStats | None = None, progress: bool = False,
              checkpoint: str | Path | None = None) -> tuple[PlanResult, dict[str, Path]]:
    """Choose the plan and write it with what it was measured on (`provenance`). The plan applies to
    `checkpoint`'s transformer, or, when smoothing changed the weights or the model has no folder
    (the embedded tiny one), to OUT/transformer, written here."""
    out = Path(out)
    path = out / SENSITIVITY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run `calibrate sensitivity` first")
    sensitivity = Sensitivity.load(path)
    mismatched = {k: (v, s.meta.get(k)) for k, v in sensitivity.meta.items() if k in s.meta and s.meta[k] != v}
    if mismatched:
        raise ValueError(f"{path}: measured with other settings than this plan's: {mismatched}")
    result = choose_plan(sensitivity, s.evaluator, budget, schemes, progress=progress)
    written = {}
    if s.factors or checkpoint is None:
        inputs = [checkpoint] if checkpoint is not None else []
        written["transformer"] = target = save_transformer(s.evaluator.model, out / "transformer", replace=True,
                                                           inputs=inputs)
    else:
        target = transformer_folder(checkpoint)
    stats_file = out / STATS_FILE
    provenance = {
        "checkpoint": str(Path(target).resolve()),
        "checkpoint_sha256": checkpoint_sha256(target),
        "dtype": s.meta["dtype"],
        "smoothing_alpha": s.meta["smooth_alpha"],
        "data": {**s.meta["data"], "episodes": s.meta["episodes"]},
        "stats_sha256": sha256_file(stats_file) if stats_file.is_file() else None,
        "steps": s.meta["steps"],
    }
    paths = write_outputs(out, result, sensitivity, stats, s.input_absmax, s.factors, s.meta["smooth_alpha"],
                          provenance)
    return result, {**paths, **written}


CALIBRATION_FILES = {STATS_FILE, SENSITIVITY_FILE, "plan.json", "calibration.json", "report.md", "sensitivity.png",
                     "transformer"}


def is_calibration_folder(folder: Path) -> bool:
    """Only what the calibrate steps write (and their temp files)."""
    return all(p.name in CALIBRATION_FILES or is_temp_path(p) for p in folder.iterdir())


def check_output(out: str | Path, inputs: list[str | Path]) -> None:
    """The steps share OUT: absent, empty or a calibration folder; never inside or around an input."""
    check_output_folder(out, ours=is_calibration_folder, what="a calibration folder (stats.safetensors, "
                        "sensitivity.json, plan.json, ...)", replace=True, inputs=inputs)
