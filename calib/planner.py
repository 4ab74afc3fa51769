"""Plan: which Linear gets which scheme, to meet a budget, verified end to end.

Budgets (`Budget`): `max_action_rms` (action RMS error in normalized units over the calibration
episodes) and / or `max_weight_bytes` (deployed weights of the whole DiT, bf16 where kept).

Error budget (greedy, verified): targets are ordered by standalone error per byte saved with their
first admissible scheme (schemes in order of preference; a scheme is admissible for a target when
its standalone error is within the budget). The longest prefix of that order whose plan meets the
budget end to end is found by bisection (the error grows with the prefix), then every remaining
target is tried alone on top, each admissible scheme in order of preference, and kept only if the
whole plan still meets the budget. Every accepted step is a full re-run of the episodes, so the
returned plan's error is measured, not a sum of standalone errors.

Bytes budget alone: targets in the same order (with their lowest-error scheme) are quantized until
the weights fit; the result is verified once. With both budgets the error budget decides and the
bytes budget is checked (`PlanResult.feasible`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from tqdm import tqdm

from quantize import QuantPlan, Scheme, get_scheme

from .evaluate import KEEP_DTYPE_BYTES, Error, Evaluator
from .sensitivity import Sensitivity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    max_action_rms: float | None = None
    max_weight_bytes: int | None = None

    def __post_init__(self):
        if self.max_action_rms is None and self.max_weight_bytes is None:
            raise ValueError("budget: give max_action_rms and / or max_weight_bytes")

    def meets_error(self, err: Error) -> bool:
        return self.max_action_rms is None or err.action_rms <= self.max_action_rms


@dataclass(frozen=True)
class PlanResult:
    assignment: dict[str, str]  # every candidate Linear -> scheme name or "keep"
    error: Error
    weight_bytes: int  # deployed DiT weights with the plan
    weight_bytes_bf16: int  # ... all in bf16
    budget: Budget
    feasible: bool
    naive: dict[str, Error] = field(default_factory=dict)  # scheme -> error with every target on it
    verifications: int = 0

    @property
    def kept(self) -> list[str]:
        return sorted(n for n, s in self.assignment.items() if s == "keep")

    def quant_plan(self, provenance: dict | None = None) -> QuantPlan:
        """One entry per candidate Linear; everything else is kept (the plan default)."""
        modules = {n: None if s == "keep" else get_scheme(s) for n, s in sorted(self.assignment.items())}
        return QuantPlan(modules=modules, provenance=provenance)


def model_weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) * KEEP_DTYPE_BYTES


def choose_plan(
    sensitivity: Sensitivity,
    evaluator: Evaluator,
    budget: Budget,
    schemes: Sequence[str] | None = None,
    *,
    progress: bool = False,
) -> PlanResult:
    """A plan over the targets of `sensitivity` with `schemes` (default: its schemes, in its order
    = order of preference)."""
    schemes = list(schemes or sensitivity.schemes)
    targets = sensitivity.targets
    modules = {t: sensitivity.get(t, schemes[0]).modules for t in targets}
    resolved = {s: get_scheme(s) for s in schemes}

    def assignment_of(choice: dict[str, str]) -> dict[str, Scheme]:
        return {m: resolved[s] for t, s in choice.items() for m in modules[t]}

    def saved(choice: dict[str, str]) -> int:
        return sum(sensitivity.get(t, s).bytes_saved for t, s in choice.items())

    total_bf16 = model_weight_bytes(evaluator.model)
    runs_before = evaluator.runs
    naive = {s: evaluator.error(assignment_of(dict.fromkeys(targets, s))) for s in schemes}
    for s, err in naive.items():
        log.info("every target on %s: action RMS %.3g", s, err.action_rms)

    if budget.max_action_rms is not None:
        choice = _greedy_under_error(sensitivity, evaluator, budget, schemes, targets, assignment_of, progress)
    else:
        choice = _greedy_under_bytes(sensitivity, budget, schemes, targets, total_bf16)
    error = evaluator.error(assignment_of(choice))
    weight = total_bf16 - saved(choice)
    feasible = budget.meets_error(error) and (budget.max_weight_bytes is None or weight <= budget.max_weight_bytes)
    if not feasible:
        log.warning("no plan meets the budget %s: best found has action RMS %.3g and %d weight bytes",
                    budget, error.action_rms, weight)
    assignment = {m: "keep" for t in targets for m in modules[t]}
    assignment.update({m: s for t, s in choice.items() for m in modules[t]})
    return PlanResult(assignment, error, weight, total_bf16, budget, feasible, naive, evaluator.runs - runs_before)


def _order(sensitivity: Sensitivity, targets: list[str], scheme_of: dict[str, str]) -> list[str]:
    """Least standalone error per byte saved first (ties: name order, for determinism)."""
    def key(t: str):
        e = sensitivity.get(t, scheme_of[t])
        return e.action_rms / max(e.bytes_saved, 1), t

    return sorted(scheme_of, key=key)


def _greedy_under_error(sensitivity, evaluator, budget, schemes, targets, assignment_of, progress) -> dict[str, str]:
    limit = budget.max_action_rms
    admissible = {t: [s for s in schemes if sensitivity.get(t, s).action_rms <= limit] for t in targets}
    order = _order(sensitivity, targets, {t: a[0] for t, a in admissible.items() if a})

    def meets(choice: dict[str, str]) -> bool:
        return evaluator.error(assignment_of(choice)).action_rms <= limit

    # Longest prefix (first admissible scheme each) that meets the budget, by bisection.
    lo, hi = 0, len(order)
    with tqdm(total=len(order), desc="plan", unit="target", disable=not progress) as bar:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if meets({t: admissible[t][0] for t in order[:mid]}):
                lo = mid
            else:
                hi = mid - 1
        choice = {t: admissible[t][0] for t in order[:lo]}
        bar.update(lo)
        for t in order[lo:]:
            for s in admissible[t]:
                if meets({**choice, t: s}):
                    choice[t] = s
                    break
            bar.update(1)
    return choice


def _greedy_under_bytes(sensitivity, budget, schemes, targets, total_bf16) -> dict[str, str]:
    best = {t: min(schemes, key=lambda s, t=t: (sensitivity.get(t, s).action_rms, schemes.index(s))) for t in targets}
    choice: dict[str, str] = {}
    weight = total_bf16
    for t in _order(sensitivity, targets, best):
        if weight <= budget.max_weight_bytes:
            break
        choice[t] = best[t]
        weight -= sensitivity.get(t, best[t]).bytes_saved
    return choice
