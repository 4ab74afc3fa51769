"""The `lingbot-edge quantize` command (arguments: quantize/commands.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from lingbot_edge.core.config import MODEL_PRESETS, ModelConfig, get_policy_config
from lingbot_edge.core.qlinear import UnsupportedSchemeError
from lingbot_edge.io.quantized import QuantizedCheckpointError

from .api import (
    as_plan,
    check_schemes_supported,
    format_summary,
    needs_calibration,
    plan_schemes,
    plan_summary,
    quantize_checkpoint,
    transformer_folder,
)
from .plan import QuantPlan
from .schemes import get_scheme, scheme_name

log = logging.getLogger(__name__)

_CALIBRATION_PRESET = {"full": "libero", "tiny": "tiny"}


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (UnsupportedSchemeError, QuantizedCheckpointError, FileNotFoundError, ValueError) as e:
        print(f"lingbot-edge quantize: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    plan = QuantPlan.from_json(args.plan) if args.plan else as_plan(get_scheme(args.scheme, source="--scheme"))
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if args.dry_run:
        if args.checkpoint:
            cfg = ModelConfig.from_json(transformer_folder(args.checkpoint) / "config.json")
            what = str(args.checkpoint)
        elif args.preset:
            cfg, what = MODEL_PRESETS[args.preset], f"preset {args.preset}"
        else:
            raise ValueError("--dry-run needs --checkpoint DIR (its config.json) or --preset full|tiny")
        rows, assignment = plan_summary(cfg, plan, dtype)
        print(f"dry run: {what}, {len(assignment)} Linears quantized, counted on the meta device")
        print(format_summary(rows, dtype))
        for scheme in plan_schemes(plan):
            try:
                check_schemes_supported([scheme], device)
            except UnsupportedSchemeError as e:
                print(f"note: {e}")
        return 0

    if not args.checkpoint or not args.out:
        raise ValueError("--checkpoint DIR and --out DIR are required (or use --dry-run)")
    schemes = plan_schemes(plan)
    check_schemes_supported(schemes, device)
    calibrate, input_scales = None, None
    if args.calibration:  # scales the calibration planner verified (calibration.json)
        input_scales = json.loads(Path(args.calibration).read_text()).get("static_input_scales")
        if not isinstance(input_scales, dict):
            raise ValueError(f"--calibration {args.calibration}: expected a JSON object with 'static_input_scales' "
                             "(written by `lingbot-edge calibrate plan`)")
    elif any(needs_calibration(s) for s in schemes):
        from .metrics import synthetic_calibration

        cfg = ModelConfig.from_json(transformer_folder(args.checkpoint) / "config.json")
        preset = args.calib_preset or next((_CALIBRATION_PRESET[k] for k, v in MODEL_PRESETS.items() if v == cfg),
                                           None)
        if preset is None:
            raise ValueError("--calib-preset: needed for a model that is neither the full nor the tiny preset")
        names = ", ".join(scheme_name(s) for s in schemes if needs_calibration(s))
        log.warning("%s: calibrating activation scales on a synthetic %s episode (%d chunks, random prompt and "
                    "observations); real recorded inputs calibrate better", names, preset, args.calib_chunks)
        calibrate = synthetic_calibration(get_policy_config(preset), chunks=args.calib_chunks)
    result = quantize_checkpoint(args.checkpoint, plan, args.out, dtype=dtype, device=device, calibrate=calibrate,
                                 input_scales=input_scales, progress=True,
                                 max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(format_summary(result.summary, dtype))
    print(f"wrote {result.folder}")
    return 0
