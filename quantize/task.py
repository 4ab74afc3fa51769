"""The quantization of a task-success row (`lingbot_edge.eval.task_success.measure`'s `quantize` hook)."""

from __future__ import annotations

from lingbot_edge.eval.sim import EVAL_STEPS, run_episode
from lingbot_edge.eval.task_success import TaskSetting
from quantize import QuantPlan, get_scheme, quantize_

CALIBRATION_SEED = 0  # a training seed (held-out seeds start far above): static activation scales come from it


def quantize_setting(policy, setting: TaskSetting, calibration_steps: int = EVAL_STEPS) -> None:
    """`policy`'s DiT quantized in place on `setting.quant` (a `quantize.SCHEMES` name by the default plan, or a
    `QuantPlan`), with the setting's static activation scales or, without them, scales calibrated on one
    training-seed episode."""
    config = setting.quant if isinstance(setting.quant, QuantPlan) else get_scheme(setting.quant)

    def calibrate(model):  # static-activation schemes without scales: one training-seed episode
        run_episode(policy, CALIBRATION_SEED, calibration_steps)

    quantize_(policy.model, config, calibrate=calibrate, input_scales=setting.input_scales,
              check_hardware=setting.check_hardware)
