"""Task success per scheme and step setting (`lingbot_edge.eval.task_success`) and the three tables that print it: the
ladder's column, the drift table's column, the calibration report's section. Every value is checked against
an independent run: the trained SO-100 grasp checkpoint loaded by `load_policy`, quantized by `quantize_`
and run by `lingbot_edge.eval.sim.evaluate` directly. Episodes are shortened (STEPS actions, 2 chunks) to keep
the default run fast: the closest approach of every episode is compared exactly, success is 0 that early."""

from __future__ import annotations

import argparse
import json
from functools import cache

import numpy as np
import pytest
import torch

from bench import ladder
from lingbot_edge.core.config import get_policy_config
from lingbot_edge.eval.sim import EVAL_SEED0, VALIDATION_SEED0, evaluate, held_out_seeds
from lingbot_edge.eval.task_success import TASK_CHECKPOINT, TaskSetting, check_task_policy, format_table, measure
from lingbot_edge.io.loading import load_policy
from quantize import SCHEMES, QuantPlan, default_plan, quantize_
from quantize.task import quantize_setting

EPISODES = 2
STEPS = 12  # the first chunk's 4 actions + one 8-action chunk


@pytest.fixture(autouse=True)
def _prompt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LINGBOT_EDGE_CACHE", str(tmp_path / "cache"))  # CLI loads: never the user's cache


@cache
def direct(quant: str | None = None, first_seed: int = EVAL_SEED0, **overrides) -> list[dict]:
    """The independent computation: load, quantize (a scheme name or 'plan:<scheme>', its default plan as a
    QuantPlan), evaluate on the seeds from `first_seed`; per-episode results."""
    policy = load_policy(TASK_CHECKPOINT, preset="so100", device="cpu", dtype="bfloat16", compile=False,
                         prompt_cache_dir=False, **overrides)
    if quant is not None:
        scheme = SCHEMES[quant.removeprefix("plan:")]
        quantize_(policy.model, QuantPlan.from_dict(default_plan(scheme).to_dict()) if quant.startswith("plan:")
                  else scheme)
    return evaluate(policy, held_out_seeds(EPISODES, first_seed), STEPS, progress=False)["episodes"]


def _closest(episodes: list[dict]) -> list[float]:
    return [e["min_distance"] for e in episodes]


def test_measure_is_load_quantize_evaluate():
    from lingbot_edge.eval.task_success import checkpoint_loader

    setting = TaskSetting("int8 wo, fewer steps", "int8_weight_only",
                          {"video_exec_step": 1, "action_num_inference_steps": 5})
    (r,) = measure(checkpoint_loader(), [setting], EPISODES, STEPS, quantize=quantize_setting)
    ref = direct("int8_weight_only", video_exec_step=1, action_num_inference_steps=5)
    assert _closest(r["per_episode"]) == _closest(ref)
    assert r["successes"] == sum(e["success"] for e in ref) and r["episodes"] == EPISODES
    assert (r["dtype"], r["video_exec_step"], r["action_steps"]) == ("bfloat16", 1, 5)
    assert _closest(ref) != _closest(direct(video_exec_step=1, action_num_inference_steps=5))  # int8 did act
    assert f"| int8 wo, fewer steps | bfloat16 | video_exec_step 1, 5 action | {r['successes']}/2 " in format_table(
        [r], EPISODES)


def test_train_eval_set_applies_to_every_row(tmp_path):
    """`train eval --set KEY=VALUE`: every policy row (trained, 8-bit, random) runs with the setting, named in its
    label; the trained and int8 rows equal direct runs with it."""
    from train.evaluate import EvalEpisodes, EvalRows, evaluate_checkpoint

    rows = evaluate_checkpoint(TASK_CHECKPOINT, rows=EvalRows(schemes=("int8_weight_only",),
                                                              overrides={"action_noise_scale": 0.5}),
                               episodes=EvalEpisodes(EPISODES, steps=STEPS), progress=False)
    assert [r["policy"] for r in rows] == ["trained (action_noise_scale=0.5)",
                                           "trained + int8_weight_only (action_noise_scale=0.5)",
                                           "random weights (action_noise_scale=0.5)"]
    # No --exec-steps: the checkpoint's own step setting (its policy_config.json).
    assert _closest(rows[0]["per_episode"]) == _closest(direct(action_noise_scale=0.5))
    assert _closest(rows[1]["per_episode"]) == _closest(direct("int8_weight_only", action_noise_scale=0.5))
    assert _closest(rows[0]["per_episode"]) != _closest(direct(action_noise_scale=1.0))  # the setting did act
    assert rows[0]["video_exec_step"] == load_policy(TASK_CHECKPOINT, preset="so100", device="cpu",
                                                     prompt_cache_dir=False).cfg.video_exec_step


def test_train_eval_validation_seeds(tmp_path):
    """`train eval --seeds validation`: every row (expert too) on the seeds from VALIDATION_SEED0, the trained row
    equal to a direct run there; the table and the Markdown header name the set."""
    from train.evaluate import EvalEpisodes, EvalRows, evaluate_checkpoint

    rows = evaluate_checkpoint(TASK_CHECKPOINT, rows=EvalRows(random_baseline=False, expert=True),
                               episodes=EvalEpisodes(EPISODES, VALIDATION_SEED0, steps=STEPS), progress=False)
    validation = held_out_seeds(EPISODES, VALIDATION_SEED0)
    assert [[e["seed"] for e in r["per_episode"]] for r in rows] == [validation, validation]
    assert _closest(rows[1]["per_episode"]) == _closest(direct(first_seed=VALIDATION_SEED0))
    assert _closest(rows[1]["per_episode"]) != _closest(direct())  # other seeds, other episodes
    from train.commands import main

    md = tmp_path / "v.md"
    assert main(["eval", "--checkpoint", TASK_CHECKPOINT, "--episodes", "1", "--seeds", "validation", "--no-random",
                 "--markdown", str(md)]) == 0
    text = md.read_text()
    assert f"validation seeds {VALIDATION_SEED0}..{VALIDATION_SEED0}, " in text and "--seeds validation" in text
    assert "| success over 1 validation seeds |" in text
    with pytest.raises(SystemExit, match="--exec-steps: expected 'checkpoint', 'full'"):
        main(["eval", "--checkpoint", TASK_CHECKPOINT, "--exec-steps", "1,fast"])


def test_the_task_runs_so100_policies_only():
    check_task_policy(get_policy_config("so100"))
    with pytest.raises(ValueError, match="6 used action channels"):
        check_task_policy(get_policy_config("libero"))


def test_ladder_maps_every_rung_to_its_setting():
    cfg = get_policy_config("so100").replace(num_inference_steps=8, action_num_inference_steps=10)
    cpu = ladder.task_settings(ladder.all_variants(), cfg, torch.device("cpu"))
    gpu = ladder.task_settings(ladder.all_variants(), cfg, torch.device("cuda"))
    full = {"video_exec_step": -1}  # rungs without step axes: full video steps, whatever the checkpoint's default
    expected = {  # (quantization, sampler, step overrides) by hand from the rung descriptions
        "a_reference": (None, "reference", full), "b_static_eager": (None, "static", full),
        "c_static_compiled": (None, "static", full), "d_int8_weight_only": ("int8_weight_only", "static", full),
        "e_int8_w8a8": ("int8_dynamic", "static", full), "f_fp8_weight_only": ("fp8_weight_only", "static", full),
        "h_video_exec_half": (None, "static", {"video_exec_step": 4}),
        "h_video_exec_quarter": (None, "static", {"video_exec_step": 2}),
        "h_action_steps_fifth": (None, "static", {"action_num_inference_steps": 2}),
        "h_exec_quarter_action_fifth": (None, "static", {"video_exec_step": 2, "action_num_inference_steps": 2}),
        "i_int8_exec_quarter_action_fifth": ("int8_weight_only", "static",
                                             {"video_exec_step": 2, "action_num_inference_steps": 2}),
    }
    for name, (quant, sampler, overrides) in expected.items():
        s = cpu[name]
        assert (s.quant, s.sampler, dict(s.overrides)) == (quant, sampler, overrides), name
    assert cpu["f_fp8_w8a8"] == "needs a CUDA GPU"
    assert gpu["f_fp8_w8a8"].quant == "fp8_dynamic"


def test_ladder_column_equals_direct_runs():
    variants = {v.name: v for v in ladder.all_variants()}
    picked = [variants[n] for n in ("d_int8_weight_only", "f_fp8_w8a8", "h_exec_quarter_action_fifth")]
    column = ladder.task_success(picked, EPISODES, torch.device("cpu"), steps=STEPS)
    assert column["f_fp8_w8a8"] == {"reason": "needs a CUDA GPU"}
    checkpoint_steps = load_policy(TASK_CHECKPOINT, preset="so100", device="cpu", prompt_cache_dir=False).cfg
    axes = {"video_exec_step": max(1, int(checkpoint_steps.num_inference_steps / 4)),
            "action_num_inference_steps": max(1, int(checkpoint_steps.action_num_inference_steps / 5))}
    for name, ref in (("d_int8_weight_only", direct("int8_weight_only", video_exec_step=-1)),
                      ("h_exec_quarter_action_fifth", direct(**axes))):
        cell = column[name]
        assert (cell["successes"], cell["episodes"]) == (sum(e["success"] for e in ref), EPISODES), name
        assert cell["min_distance"] == float(np.median(_closest(ref))), name
    assert column["h_exec_quarter_action_fifth"]["setting"] == (
        f"bf16, video_exec_step {axes['video_exec_step']}, {axes['action_num_inference_steps']} action steps")


def test_ladder_report_prints_the_column():
    from bench import report

    def chunk(name):
        return {"group": "chunk", "stats": {"median": 0.1}, "extra_info": {
            "variant": name, "description": name, "device": "CPU test", "preset": "tiny", "torch": "x",
            "peak_memory_bytes": 2**20, "weight_bytes": 2**20, "actions_per_chunk": 8,
            "action_rms": 1e-3, "action_cos": 1.0, "latent_sqnr_db": 40.0}}

    data = {"benchmarks": [chunk("a_reference"), chunk("d_int8_weight_only")]}
    assert "task success" not in report.render(data)  # off by default
    data["task_success"] = {"checkpoint": TASK_CHECKPOINT, "episodes": 2, "variants": {
        "a_reference": {"successes": 1, "episodes": 2, "setting": "bf16, full, 10 action steps",
                        "sampler": "reference"},
        "d_int8_weight_only": {"successes": 0, "episodes": 2, "setting": "int8_weight_only, full, 10 action steps"},
        "f_fp8_w8a8": {"reason": "needs a CUDA GPU"}}}
    text = report.render(data)
    assert "| task success | task setting |" in text and "2 held-out seeds" in text
    assert text.count(" 1/2 | bf16, full, 10 action steps, reference sampler |") == 1
    assert " 0/2 | int8_weight_only, full, 10 action steps |" in text
    assert "`f_fp8_w8a8`: + fp8 dynamic W8A8 (CUDA sm >= 8.9): not run here (needs a CUDA GPU); task success - " \
           "(needs a CUDA GPU)" in text


def test_drift_table_task_column_equals_direct_runs():
    from bench import libero_drift

    task = libero_drift.task_success(["int8_weight_only"], EPISODES, steps=STEPS)
    assert list(task) == [libero_drift.BF16_TASK_ROW, "int8_weight_only"]
    assert _closest(task[libero_drift.BF16_TASK_ROW]["per_episode"]) == _closest(direct())
    assert _closest(task["int8_weight_only"]["per_episode"]) == _closest(direct("int8_weight_only"))
    drift = {"max_step_err": 1e-3, "mean_step_err": 1e-4, "cumulative_err": 1e-2, "rms": 1e-4, "cos": 1.0,
             "xyz_drift": 1e-3, "gripper_flips": 0, "chunk_mean_err": [1e-4, 1e-4], "steps": 124}
    tables = {"fp32": {"bf16 (no quantization)": drift, "int8_weight_only": drift},
              "bf16": {"int8_weight_only": drift, "fp8_dynamic (emulated)": drift}}
    text = libero_drift.report(tables, 1.0, task)
    k = task["int8_weight_only"]["successes"]
    assert "| task success, SO-100 grasp (2 seeds) |" in text
    assert f"| 0 | {k}/2 ({50 * k:.0f}%) |" in text.split("## bf16 compute")[1]
    assert "| fp8_dynamic (emulated) |" in text and "NOT this tiny-LIBERO policy" in text
    assert "task success" not in libero_drift.report(tables, 1.0)


def _plan_args(out, *extra):
    from calib import commands

    parser = argparse.ArgumentParser(prog="lingbot-edge")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["calibrate", "plan", "--out", str(out), "--checkpoint", TASK_CHECKPOINT,
                              "--preset", "so100", "--max-action-rms", "1", *extra])


def test_calibration_report_gains_the_task_rows(tmp_path):
    from calib.commands import task_success_report

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(default_plan(SCHEMES["int8_dynamic"]).to_dict()))
    (tmp_path / "calibration.json").write_text(json.dumps({"static_input_scales": {}}))
    (tmp_path / "report.md").write_text("# Calibration report\n\nBudget: ...\n")
    paths = {"plan": plan, "calibration": tmp_path / "calibration.json", "report": tmp_path / "report.md"}
    args = _plan_args(tmp_path, "--task-episodes", str(EPISODES), "--exec-steps", "full")
    table = task_success_report(args, paths, [-1], steps=STEPS)
    text = paths["report"].read_text()
    assert text.startswith("# Calibration report\n\nBudget: ...\n\n## Task success: SO-100 grasp task")
    assert table in text
    unquantized, planned = (line for line in table.splitlines()[2:])
    for line, ref in ((unquantized, direct(video_exec_step=-1)), (planned, direct("plan:int8_dynamic",
                                                                                   video_exec_step=-1))):
        k = sum(e["success"] for e in ref)
        assert f"| bfloat16 | full, 10 action | {k}/2 ({50 * k:.0f}%) |" in line
        assert f"| {100 * float(np.median(_closest(ref))):.1f} cm |" in line
    assert unquantized.startswith("| unquantized |") and planned.startswith("| plan plan.json |")


@pytest.mark.parametrize(("extra", "error"), [
    (["--task-episodes", "-1"], "--task-episodes: expected >= 0"),
    (["--task-episodes", "1", "--exec-steps", "full,x"], "--exec-steps: expected 'full'"),
])
def test_calibrate_task_flags_are_checked_up_front(tmp_path, extra, error):
    from calib import commands

    assert commands._task_options(_plan_args(tmp_path, "--task-episodes", "1")) == [-1, 1]  # default full,1
    with pytest.raises(ValueError, match=error):
        commands._task_options(_plan_args(tmp_path, *extra))
    tiny = _plan_args(tmp_path, "--task-episodes", "1")
    tiny.checkpoint = "tiny"
    with pytest.raises(ValueError, match="random weights"):
        commands._task_options(tiny)


@pytest.mark.slow
def test_calibrate_plan_task_episodes_end_to_end(tmp_path):
    """The three calibrate steps on the so100-grasp checkpoint, then `plan --task-episodes 1`: report.md gains
    the unquantized and the plan rows, full steps, the plan's row as a direct run of plan.json gives it."""
    from calib.commands import _run_capture, _run_plan, _run_sensitivity

    out = tmp_path / "calib"
    data = ["--checkpoint", TASK_CHECKPOINT, "--preset", "so100", "--synthetic", "1", "--chunks", "1"]

    def run(step, func, *extra):
        parser = argparse.ArgumentParser(prog="lingbot-edge")
        from calib import commands

        commands.register(parser.add_subparsers(dest="command", required=True))
        return func(parser.parse_args(["calibrate", step, "--out", str(out), *data, *extra]))

    assert run("capture", _run_capture) == 0
    assert run("sensitivity", _run_sensitivity, "--episodes", "1", "--schemes", "int8_dynamic",
               "--modules", r"blocks\.0\.ffn\..+") == 0
    assert run("plan", _run_plan, "--max-action-rms", "1", "--task-episodes", "1", "--exec-steps", "full") == 0
    section = (out / "report.md").read_text().split("## Task success: SO-100 grasp task (simulated)")[1]
    rows = [line for line in section.splitlines() if line.startswith("| unquantized") or line.startswith("| plan")]
    assert len(rows) == 2, section
    policy = load_policy(TASK_CHECKPOINT, preset="so100", device="cpu", dtype="bfloat16", compile=False,
                         prompt_cache_dir=False)
    quantize_(policy.model, QuantPlan.from_json(out / "plan.json"))
    ref = evaluate(policy, held_out_seeds(1), progress=False)["episodes"]
    assert f"| {sum(e['success'] for e in ref)}/1 " in rows[1]
    assert f"| {100 * ref[0]['min_distance']:.1f} cm |" in rows[1]
