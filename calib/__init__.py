"""Calibration: activation statistics, per-layer sensitivity and mixed-precision plans.

    from calib import SyntheticEpisodes, capture, Evaluator, measure_sensitivity, sensitivity_targets
    from calib import Budget, choose_plan

    stats = capture(model, cfg, source, "out/stats.safetensors")        # resumable, constant memory
    evaluator = Evaluator(model, cfg, episodes, {m: stats.summary(m).absmax for m in stats.modules})
    sens = measure_sensitivity(evaluator, ["int8_dynamic", "int8_weight_only"], sensitivity_targets(model))
    result = choose_plan(sens, evaluator, Budget(max_action_rms=3e-3))  # verified end to end
    result.quant_plan().to_json("plan.json")                           # for `lingbot-edge quantize --plan`

- `stats`: streaming per-module statistics by stream and timestep bucket (absmax, per-channel absmax,
  RMS, log-histogram percentiles), bit-identical across runs; `capture`: over episodes, saved atomically.
- `data`: episode sources: synthetic, recorded `.npz` files, LeRobot dataset folders (v2.0, v2.1, v3.0).
- `evaluate`: temporary quantization of some Linears and the end-to-end error against the original.
- `sensitivity`, `planner`: one target at a time, then a greedy plan under an action-error and / or
  weight-bytes budget; `smoothing`: SmoothQuant factors folded exactly where the DiT allows it;
  `report`: plan.json, calibration.json, report.md, sensitivity.png; `pipeline`: the CLI's steps.
- Task success per (scheme / plan, step setting) is measured by `lingbot_edge.eval.task_success` (the quantization
  of a row: `quantize.task`), for `train eval`, `plan --task-episodes`, the ladder and the drift table.
- `outliers`: the injected-outlier construction the tests and `--checkpoint tiny --inject-outliers` use.

Import direction: `calib -> quantize -> lingbot_edge`, never back.
"""

from lingbot_edge.io.episodes import LeRobotEpisodes, RecordedEpisode, RecordedEpisodes

from .capture import capture
from .data import SyntheticEpisodes, open_source
from .evaluate import Error, Evaluator, quantized_modules
from .planner import Budget, PlanResult, choose_plan
from .sensitivity import Sensitivity, SensitivityEntry, measure_sensitivity, sensitivity_targets
from .smoothing import apply_smoothing, smoothing_factors
from .stats import ActivationRecorder, ActivationStats, ModuleStats

__all__ = [
    "ActivationRecorder",
    "ActivationStats",
    "Budget",
    "Error",
    "Evaluator",
    "LeRobotEpisodes",
    "ModuleStats",
    "PlanResult",
    "RecordedEpisode",
    "RecordedEpisodes",
    "Sensitivity",
    "SensitivityEntry",
    "SyntheticEpisodes",
    "apply_smoothing",
    "capture",
    "choose_plan",
    "measure_sensitivity",
    "open_source",
    "quantized_modules",
    "sensitivity_targets",
    "smoothing_factors",
]
