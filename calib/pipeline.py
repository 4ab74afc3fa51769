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
from quantize.plan import BLOCK_LINEARS

from .capture import capture
from .data import EpisodeSource
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
    """Fold smoothing into `model` (in place) if asked, derive input ranges, run the reference."""
    factors: dict[str, Tensor] = {}
    names = [n for t in sensitivity_targets(model, pattern, "module").values() for n in t]
    if smooth_alpha is not None:
        if stats is None:
            raise ValueError("smoothing needs captured statistics: run `calibrate capture` first")
        factors = smoothing_factors(model, stats, names, smooth_alpha)
        apply_smoothing(model, factors)
        log.info("smoothing (alpha %g) folded into %d Linears", smooth_alpha, len(factors))
    absmax = {m: smoothed_absmax(stats, m, factors) for m in stats.modules} if stats is not None else {}
    ids = tuple(source.episode_ids()[:episodes])
    evaluator = Evaluator(model, cfg, [source.load(i) for i in ids], absmax)
    meta = {"episodes": list(ids), "data": source.describe(), "smooth_alpha": smooth_alpha, "pattern": pattern,
            "granularity": granularity, "policy": cfg.name,
            "steps": [cfg.num_inference_steps, cfg.action_num_inference_steps]}
    return Setup(evaluator, factors, absmax, ids, meta)


def sensitivity_step(s: Setup, schemes: list[str], out: str | Path, progress: bool = False) -> Sensitivity:
    targets = sensitivity_targets(s.evaluator.model, s.meta["pattern"], s.meta["granularity"])
    return measure_sensitivity(s.evaluator, schemes, targets, out=Path(out) / SENSITIVITY_FILE, meta=s.meta,
                               progress=progress)


def plan_step(s: Setup, budget: Budget, out: str | Path, schemes: list[str] | None = None,
              stats: ActivationStats | None = None, progress: bool = False) -> tuple[PlanResult, dict[str, Path]]:
    out = Path(out)
    path = out / SENSITIVITY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run `calibrate sensitivity` first")
    sensitivity = Sensitivity.load(path)
    mismatched = {k: (v, s.meta.get(k)) for k, v in sensitivity.meta.items() if k in s.meta and s.meta[k] != v}
    if mismatched:
        raise ValueError(f"{path}: measured with other settings than this plan's: {mismatched}")
    result = choose_plan(sensitivity, s.evaluator, budget, schemes, progress=progress)
    paths = write_outputs(out, result, sensitivity, stats, s.input_absmax, s.factors, s.meta["smooth_alpha"])
    if s.factors:  # the plan is for the smoothed weights: write them next to it
        from lingbot_edge.io.checkpoint import save_transformer

        paths["transformer"] = save_transformer(s.evaluator.model, out / "transformer")
    return result, paths
