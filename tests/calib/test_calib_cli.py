"""`lingbot-edge calibrate capture / sensitivity / plan` end to end on the tiny model with injected
outlier channels, in bf16 (the default: the dtype it deploys in), then the printed `next:`
`lingbot-edge quantize` command: the deployed bf16 checkpoint meets the budget against the bf16
original, with exactly the error the plan verified; the plan refuses a checkpoint it was not
measured on (the unsmoothed one) unless --allow-mismatch."""

import argparse
import json
import logging
import math
import shlex

import pytest
import torch

from calib import commands as cli_calibrate
from calib.data import SyntheticEpisodes
from calib.outliers import DEFAULT_TARGETS, inject_outlier_channels
from lingbot_edge.cli.main import main as lingbot_edge_main
from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io.checkpoint import save_transformer
from lingbot_edge.io.loading import load_policy
from lingbot_edge.io.quantized import load_quantized
from quantize.api import checkpoint_sha256
from quantize.metrics import episode_error, run_episode

# The shared policy flags (lingbot_edge.flags), then calibrate's own data flags.
MODEL = ["--checkpoint", "tiny", "--inject-outliers", "--set", "num_inference_steps=2",
         "--set", "action_num_inference_steps=3"]
DATA = ["--synthetic", "2", "--chunks", "2"]
COMMON = [*MODEL, *DATA]
CFG = get_policy_config("tiny").replace(num_inference_steps=2, action_num_inference_steps=3)
BUDGET = 3e-3


def calibrate(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-edge")
    cli_calibrate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["calibrate", *argv])
    return args.func(args)


def deployed_error(model) -> float:
    """Action RMS of `model` against the unsmoothed bf16 original over the calibration episodes,
    combined as the planner does (RMS over episodes)."""
    policy = load_policy("tiny", compile=False, seed=0, device="cpu", dtype=torch.bfloat16)
    inject_outlier_channels(policy.model)
    source = SyntheticEpisodes(CFG, 2, chunks=2, seed=0)
    errors = []
    for episode_id in source.episode_ids():
        episode = source.load(episode_id)
        reference = run_episode(policy.model, CFG, episode)
        errors.append(episode_error(reference, run_episode(model, CFG, episode), CFG)["action_rms"])
    return math.sqrt(sum(e * e for e in errors) / len(errors))


def test_bf16_plan_meets_its_budget_deployed_in_bf16(tmp_path, capsys, caplog):
    out = tmp_path / "calib"
    assert calibrate("capture", "--out", str(out), *COMMON) == 0
    assert "2 episodes" in capsys.readouterr().out
    assert calibrate("capture", "--out", str(out), *COMMON) == 0  # resumed: nothing left to do
    assert calibrate("sensitivity", "--out", str(out), *COMMON, "--schemes", "int8_dynamic", "--smooth", "0.5") == 0
    assert calibrate("plan", "--out", str(out), *COMMON, "--max-action-rms", str(BUDGET)) == 0
    printed = capsys.readouterr().out
    assert "meets the budget" in printed
    for name in ("plan.json", "calibration.json", "report.md", "transformer/config.json"):
        assert (out / name).is_file(), name
    calibration = json.loads((out / "calibration.json").read_text())
    assert set(DEFAULT_TARGETS) <= set(calibration["smoothing"]["factors"])
    provenance = json.loads((out / "plan.json").read_text())["provenance"]
    assert provenance == calibration["provenance"]
    assert provenance["dtype"] == "bfloat16" and provenance["smoothing_alpha"] == 0.5
    assert provenance["checkpoint_sha256"] == checkpoint_sha256(out / "transformer")  # the smoothed weights
    assert provenance["data"]["episodes"] == ["synthetic-0", "synthetic-1"]

    # Deploy with the printed command, as a user would.
    next_line = next(line for line in printed.splitlines() if line.startswith("next: "))
    argv = shlex.split(next_line.removeprefix("next: lingbot-edge "))
    assert "--dtype" in argv and argv[argv.index("--dtype") + 1] == "bf16"  # the shared --dtype values
    quantized_dir = tmp_path / "quantized"
    argv[argv.index("QUANTIZED_DIR")] = str(quantized_dir)
    assert lingbot_edge_main(argv) == 0
    err = deployed_error(load_quantized(quantized_dir, dtype=torch.bfloat16))
    assert 0 < err <= BUDGET
    assert err == pytest.approx(calibration["verified"]["action_rms"], rel=1e-9)  # what the plan promised

    # The same plan on the checkpoint it was not measured on (the unsmoothed weights) is refused...
    policy = load_policy("tiny", compile=False, seed=0, device="cpu", dtype=torch.bfloat16)
    inject_outlier_channels(policy.model)
    unsmoothed = save_transformer(policy.model, tmp_path / "unsmoothed" / "transformer")
    wrong = ["quantize", "--checkpoint", str(unsmoothed), "--plan", str(out / "plan.json"), "--calibration",
             str(out / "calibration.json"), "--out", str(tmp_path / "wrong")]
    assert lingbot_edge_main(wrong) == 2
    assert "measured on checkpoint" in capsys.readouterr().err and not (tmp_path / "wrong").exists()
    # ... unless asked for, with a warning.
    with caplog.at_level(logging.WARNING):
        assert lingbot_edge_main([*wrong, "--allow-mismatch"]) == 0
    assert "--allow-mismatch: used anyway" in caplog.text
    mismatched = deployed_error(load_quantized(tmp_path / "wrong", dtype=torch.bfloat16))
    assert mismatched > BUDGET  # measured 9.8e-3: the smoothed plan does not fit the unsmoothed weights
    print(f"deployed bf16 action RMS {err:.3g} (budget {BUDGET:g}); on the unsmoothed checkpoint {mismatched:.3g}")


def test_plan_without_sensitivity_is_an_error(tmp_path, capsys):
    assert calibrate("plan", "--out", str(tmp_path), *COMMON, "--max-action-rms", "0.003") == 2
    assert "run `lingbot-edge calibrate sensitivity" in capsys.readouterr().err


def test_output_folder_must_be_a_calibration_folder(tmp_path, capsys):
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    assert calibrate("capture", "--out", str(own), *COMMON) == 2
    assert "not empty (notes.txt) and not a calibration folder" in capsys.readouterr().err
    assert [p.name for p in own.iterdir()] == ["notes.txt"] and (own / "notes.txt").read_text() == "mine"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert calibrate("capture", "--out", str(ckpt / "calib"), "--checkpoint", str(ckpt), *DATA) == 2
    assert "the output is inside the input" in capsys.readouterr().err and not (ckpt / "calib").exists()


def test_next_hint_names_the_calibration_when_the_plan_needs_it(tmp_path):
    calibration = tmp_path / "calibration.json"
    paths = {"plan": tmp_path / "plan.json", "calibration": calibration, "transformer": tmp_path / "transformer"}
    calibration.write_text(json.dumps({"static_input_scales": {"blocks.0.attn1.to_q": 0.01}}))
    hint = cli_calibrate.quantize_command(paths, None, "bf16")
    assert f"--calibration {calibration}" in hint and f"--checkpoint {tmp_path / 'transformer'}" in hint
    calibration.write_text(json.dumps({"static_input_scales": {}}))
    assert "--calibration" not in cli_calibrate.quantize_command(paths, None, "bf16")


@pytest.mark.parametrize(("argv", "error"), [
    (["--checkpoint", "CKPT", "--inject-outliers", *DATA], "--inject-outliers: only with --checkpoint tiny"),
    (["--checkpoint", "tiny", "--dtype", "float64", *DATA], "expected one of bf16 (bfloat16)"),
    (["--model", "tiny-outliers", *DATA], "unrecognized arguments: --model"),
])
def test_flags_are_the_shared_ones(tmp_path, capsys, argv, error):
    argv = [str(tmp_path / "ckpt") if a == "CKPT" else a for a in argv]
    try:
        assert calibrate("capture", "--out", str(tmp_path / "calib"), *argv) == 2
    except SystemExit as e:  # argparse refuses the flag itself
        assert e.code == 2
    assert error in capsys.readouterr().err and not (tmp_path / "calib").exists()
