"""`lingbot-edge calibrate capture / sensitivity / plan` end to end on the tiny model with injected
outlier channels, then `lingbot-edge quantize --plan` on what the plan wrote."""

import argparse
import json

import torch

from calib import commands as cli_calibrate
from calib.outliers import DEFAULT_TARGETS
from lingbot_edge.cli.main import main as lingbot_edge_main
from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io.checkpoint import load_transformer
from lingbot_edge.io.quantized import load_quantized
from quantize.metrics import episode_error, make_episode, run_episode

COMMON = ["--model", "tiny-outliers", "--steps", "2,3", "--synthetic", "2", "--chunks", "2"]


def calibrate(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-edge")
    cli_calibrate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["calibrate", *argv])
    return args.func(args)


def test_calibrate_cli_then_quantize_the_plan(tmp_path, capsys):
    out = tmp_path / "calib"
    assert calibrate("capture", "--out", str(out), *COMMON) == 0
    assert "2 episodes" in capsys.readouterr().out
    assert calibrate("capture", "--out", str(out), *COMMON) == 0  # resumed: nothing left to do
    assert calibrate("sensitivity", "--out", str(out), *COMMON, "--schemes", "int8_dynamic", "--smooth", "0.5") == 0
    assert calibrate("plan", "--out", str(out), *COMMON, "--max-action-rms", "0.003") == 0
    printed = capsys.readouterr().out
    assert "meets the budget" in printed
    for name in ("plan.json", "calibration.json", "report.md", "transformer/config.json"):
        assert (out / name).is_file(), name
    calibration = json.loads((out / "calibration.json").read_text())
    assert set(DEFAULT_TARGETS) <= set(calibration["smoothing"]["factors"])

    # The smoothed weights + plan through the real quantize command.
    quantized_dir = tmp_path / "quantized"
    assert lingbot_edge_main(["quantize", "--checkpoint", str(out / "transformer"), "--plan",
                              str(out / "plan.json"), "--out", str(quantized_dir), "--dtype", "float32"]) == 0
    cfg = get_policy_config("tiny").replace(num_inference_steps=2, action_num_inference_steps=3)
    reference = load_transformer(out / "transformer", dtype=torch.float32)
    quantized = load_quantized(quantized_dir, dtype=torch.float32)
    episode = make_episode(cfg, 2, seed=0)
    err = episode_error(run_episode(reference, cfg, episode), run_episode(quantized, cfg, episode), cfg)
    assert 0 < err["action_rms"] <= 0.003


def test_plan_without_sensitivity_is_an_error(tmp_path, capsys):
    assert calibrate("plan", "--out", str(tmp_path), *COMMON, "--max-action-rms", "0.003") == 2
    assert "run `lingbot-edge calibrate sensitivity" in capsys.readouterr().err
