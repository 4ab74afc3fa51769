"""Outputs of `calibrate plan`: the plan JSON (what `lingbot-edge quantize --plan` reads), the
calibration JSON (static input scales, smoothing factors) and a markdown report with a per-target
sensitivity bar chart (PNG, matplotlib when installed)."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from lingbot_edge.eval.sim import EVAL_SEED0
from lingbot_edge.io.files import write_json, write_text
from quantize import get_scheme
from quantize.api import needs_calibration

from .evaluate import static_qmax
from .planner import PlanResult
from .sensitivity import Sensitivity
from .smoothing import producer
from .stats import ActivationStats

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 2  # 2: provenance


def calibration_dict(result: PlanResult, input_absmax: dict[str, float], factors: dict[str, Tensor],
                     alpha: float | None, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Static input scales of the plan's static-activation modules (absmax / qmax of the captured
    inputs, after smoothing) and the smoothing folded into the weights the plan applies to."""
    scales = {}
    for name, s in sorted(result.assignment.items()):
        if s != "keep" and needs_calibration(get_scheme(s)):
            scales[name] = input_absmax[name] / static_qmax(get_scheme(s))
    return {
        "version": CALIBRATION_VERSION,
        "provenance": provenance,
        # What the plan was verified to give end to end, in provenance's dtype (normalized action units).
        "verified": {**result.error.to_dict(), "max_action_rms": result.budget.max_action_rms,
                     "feasible": result.feasible},
        "input_absmax": dict(sorted(input_absmax.items())),
        "static_input_scales": scales,
        "smoothing": {"alpha": alpha, "producers": {n: producer(n) for n in sorted(factors)},
                      "factors": {n: f.tolist() for n, f in sorted(factors.items())}},
    }


def write_outputs(out: str | Path, result: PlanResult, sensitivity: Sensitivity, stats: ActivationStats | None,
                  input_absmax: dict[str, float], factors: dict[str, Tensor], alpha: float | None,
                  provenance: dict[str, Any] | None = None) -> dict[str, Path]:
    """plan.json and calibration.json carry `provenance` (checkpoint hash, dtype, smoothing, data):
    `lingbot-edge quantize` checks it against the checkpoint it quantizes."""
    out = Path(out)
    paths = {"plan": write_json(out / "plan.json", result.quant_plan(provenance).to_dict()),
             "calibration": write_json(out / "calibration.json",
                                              calibration_dict(result, input_absmax, factors, alpha, provenance))}
    png = out / "sensitivity.png"
    has_png = plot_sensitivity(sensitivity, result, png)
    if has_png:
        paths["png"] = png
    report = out / "report.md"
    text = markdown_report(result, sensitivity, stats, factors, png.name if has_png else None)
    write_text(report, text)
    paths["report"] = report
    return paths


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e3:,.1f} kB"


def markdown_report(result: PlanResult, sensitivity: Sensitivity, stats: ActivationStats | None,
                    factors: dict[str, Tensor], png: str | None) -> str:
    b = result.budget
    budget = ", ".join(x for x in (
        f"action RMS <= {b.max_action_rms:.3g}" if b.max_action_rms is not None else "",
        f"weights <= {_fmt_bytes(b.max_weight_bytes)}" if b.max_weight_bytes is not None else "") if x)
    schemes = sensitivity.schemes
    lines = [
        "# Calibration report",
        "",
        f"Budget: {budget}. Plan: **{'meets it' if result.feasible else 'does NOT meet it'}**: action RMS "
        f"{result.error.action_rms:.3g} (normalized units), action cosine {result.error.action_cos:.6f}, "
        f"latent SQNR {result.error.latent_sqnr:.1f} dB; weights {_fmt_bytes(result.weight_bytes)} "
        f"(all bf16: {_fmt_bytes(result.weight_bytes_bf16)}); {len(result.kept)} of {len(result.assignment)} "
        f"candidate Linears kept; {result.verifications} verification runs.",
        "",
        "Every candidate Linear on one scheme (naive):",
        "",
        *[f"- {s}: action RMS {e.action_rms:.3g}, latent SQNR {e.latent_sqnr:.1f} dB"
          f"{' (over budget)' if b.max_action_rms is not None and e.action_rms > b.max_action_rms else ''}"
          for s, e in result.naive.items()],
        "",
        f"Episodes: {sensitivity.meta.get('episodes', '?')}. Errors are end to end over the episodes (same noise, "
        "observations and executed actions as the unquantized run); per target, with that target alone quantized.",
        "",
    ]
    if png:
        lines += [f"![sensitivity]({png})", ""]
    else:
        lines += ["(no chart: matplotlib is not installed)", ""]
    header = ["target", "plan", *[f"{s} action RMS" for s in schemes], "input absmax", "p99.9 |x|",
              "channel outlier ratio", "smoothed"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in sensitivity.targets:
        mods = sensitivity.get(t, schemes[0]).modules
        chosen = sorted({result.assignment.get(m, "keep") for m in mods})
        cells = [f"`{t}`", ", ".join(chosen), *[f"{sensitivity.get(t, s).action_rms:.3g}" for s in schemes]]
        if stats is not None and all(m in stats.modules for m in mods):
            summaries = [stats.summary(m) for m in mods]
            cells += [f"{max(s.absmax for s in summaries):.3g}", f"{max(s.percentile(99.9) for s in summaries):.3g}",
                      f"{max(s.channel_outlier_ratio for s in summaries):.1f}"]
        else:
            cells += ["-", "-", "-"]
        cells.append("yes" if any(m in factors for m in mods) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def append_task_success(report: Path, table: str, checkpoint: str, episodes: int) -> None:
    """Add the task-success section (`lingbot_edge.eval.task_success.format_table` of `calibrate plan
    --task-episodes`) to report.md, atomically."""
    text = report.read_text().rstrip("\n") + "\n\n" + "\n".join([
        "## Task success: SO-100 grasp task (simulated)",
        "",
        f"`{checkpoint}` unquantized and with this plan (its static input scales from calibration.json, on the DiT "
        f"it applies to), same dtype and settings as above; held-out seeds {EVAL_SEED0}..{EVAL_SEED0 + episodes - 1} "
        "(`lingbot_edge.eval.task_success`, `--task-episodes`). The action RMS budget above is over the calibration "
        "episodes; this is whether the task still succeeds.",
        "",
        table,
        "",
    ])
    write_text(report, text)


def plot_sensitivity(sensitivity: Sensitivity, result: PlanResult, path: Path) -> bool:
    """Horizontal bars: standalone action RMS per target and scheme (log scale), the budget as a
    line, kept targets' labels in red. False (and nothing written) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib not installed: no sensitivity chart (pip install matplotlib)")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets, schemes = sensitivity.targets, sensitivity.schemes
    height = 0.8 / len(schemes)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.28 * len(targets) * max(1, len(schemes) / 2)))
    for i, s in enumerate(schemes):
        values = [max(sensitivity.get(t, s).action_rms, 1e-12) for t in targets]
        ax.barh([k + i * height for k in range(len(targets))], values, height=height, label=s)
    ax.set_yticks([k + height * (len(schemes) - 1) / 2 for k in range(len(targets))])
    ax.set_yticklabels(targets, fontsize=7)
    kept = set(result.kept)
    for label, t in zip(ax.get_yticklabels(), targets, strict=True):
        if all(m in kept for m in sensitivity.get(t, schemes[0]).modules):
            label.set_color("red")
    ax.invert_yaxis()
    ax.set_xscale("log")
    if result.budget.max_action_rms is not None and math.isfinite(result.budget.max_action_rms):
        ax.axvline(result.budget.max_action_rms, color="black", linestyle="--", label="budget")
    ax.set_xlabel("action RMS error, this target alone quantized (normalized units)")
    ax.set_title("Per-layer sensitivity (red: kept in high precision)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
