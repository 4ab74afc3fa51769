"""Runs `lingbot-edge quantize` (its arguments are declared in quantize/commands.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from lingbot_edge.core.config import MODEL_PRESETS, PolicyConfig
from lingbot_edge.core.qlinear import UnsupportedSchemeError
from lingbot_edge.io.checkpoint import read_model_config
from lingbot_edge.io.files import read_json
from lingbot_edge.io.layout import resolve_checkpoint
from lingbot_edge.io.loading import TINY, policy_config_for, runtime_defaults
from lingbot_edge.io.quantized import QuantizedCheckpointError, check_quantized_output

from .api import (
    as_plan,
    check_schemes_supported,
    checkpoint_sha256,
    format_summary,
    needs_calibration,
    plan_schemes,
    plan_summary,
    quantize_checkpoint,
    transformer_folder,
)
from .metrics import synthetic_calibration
from .plan import QuantPlan
from .schemes import get_scheme, scheme_name

log = logging.getLogger(__name__)

_CALIBRATION_PRESET = {"full": "libero", "tiny": "tiny"}


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (UnsupportedSchemeError, QuantizedCheckpointError, FileNotFoundError, ValueError, MismatchError) as e:
        print(f"lingbot-edge quantize: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    plan = QuantPlan.from_json(args.plan) if args.plan else as_plan(get_scheme(args.scheme, source="--scheme"))
    device, dtype, _ = runtime_defaults(args.device, args.dtype)
    device, dtype_name = str(device), str(dtype).removeprefix("torch.")  # as provenance records it

    if args.dry_run:
        if args.checkpoint and args.arch:
            raise ValueError(f"--arch {args.arch}: the architecture of --checkpoint {args.checkpoint} is its own; "
                             "pass one of them")
        if args.checkpoint == TINY:
            cfg, what = MODEL_PRESETS["tiny"], "the embedded tiny model"
        elif args.checkpoint:
            cfg = read_model_config(transformer_folder(args.checkpoint) / "config.json")
            what = str(args.checkpoint)
        elif args.arch:
            cfg, what = MODEL_PRESETS[args.arch], f"architecture {args.arch}"
        else:
            raise ValueError("--dry-run needs --checkpoint DIR|tiny (its config.json) or --arch full|tiny")
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
    if args.checkpoint == TINY:
        raise ValueError(f"--checkpoint {TINY}: the embedded tiny model has no weights folder to quantize; pass a "
                         "transformer/ folder (e.g. the one `lingbot-edge calibrate plan` writes for it), or --dry-run")
    if args.arch:
        raise ValueError(f"--arch {args.arch}: only for --dry-run; a quantized checkpoint takes --checkpoint's DiT")
    schemes = plan_schemes(plan)
    check_schemes_supported(schemes, device)
    src = transformer_folder(args.checkpoint)
    check_quantized_output(args.out, replace=args.force, inputs=(Path(args.checkpoint), src))
    source_sha = checkpoint_sha256(src)
    records = {}
    if plan.provenance is not None:
        records[f"--plan {args.plan}"] = plan.provenance
    calibrate, input_scales = None, None
    if args.calibration:  # scales the calibration planner verified (calibration.json)
        calibration = _read_calibration(args.calibration)
        records[f"--calibration {args.calibration}"] = calibration.get("provenance")
        input_scales = calibration["static_input_scales"]
    check_provenance(records, source_sha, dtype_name, args.allow_mismatch)
    if input_scales is None and any(needs_calibration(s) for s in schemes):
        policy_cfg = calibration_config(src, args.calib_preset)
        names = ", ".join(scheme_name(s) for s in schemes if needs_calibration(s))
        log.warning("%s: calibrating activation scales on a synthetic %s episode (%d chunks, random prompt and "
                    "observations); real recorded inputs calibrate better", names, policy_cfg.name, args.calib_chunks)
        calibrate = synthetic_calibration(policy_cfg, chunks=args.calib_chunks)
    if dtype != torch.bfloat16 and not records:  # with records, check_provenance compared their dtype
        log.warning("deploying in %s: plans and budgets are verified in bfloat16 by default (`calibrate --dtype`)",
                    dtype_name)
    result = quantize_checkpoint(args.checkpoint, plan, args.out, dtype=dtype, device=device, calibrate=calibrate,
                                 input_scales=input_scales, progress=True,
                                 max_shard_bytes=int(args.max_shard_gb * (1 << 30)), replace=args.force,
                                 source_sha256=source_sha)
    print(format_summary(result.summary, dtype))
    print(f"wrote {result.folder}")
    return 0


def calibration_config(transformer: Path, preset: str | None) -> PolicyConfig:
    """The policy settings of the synthetic calibration episode, as --preset means in every command: the
    checkpoint's own (policy_config.json next to transformer/) over `preset`; without own settings, `preset`
    (default: the one matching the DiT: libero for the full model, tiny for the tiny one)."""
    layout = resolve_checkpoint(transformer.parent, transformer=transformer, parts=("transformer",))
    if preset is None and not (layout.policy_config or layout.policy_fields):
        preset = next((_CALIBRATION_PRESET[k] for k, v in MODEL_PRESETS.items() if v == layout.model_config), None)
        if preset is None:
            raise ValueError(f"--calib-preset: {transformer} has no policy settings and matches no model "
                             f"architecture ({sorted(MODEL_PRESETS)}); pass a policy preset")
    return policy_config_for(layout, preset)


class MismatchError(Exception):
    """A plan or calibration measured on another checkpoint than the one being quantized."""


def _read_calibration(path: str) -> dict:
    calibration = read_json(path, name=f"--calibration {path}", obj=False)
    if not isinstance(calibration, dict) or not isinstance(calibration.get("static_input_scales"), dict):
        raise ValueError(f"--calibration {path}: expected a JSON object with 'static_input_scales' "
                         "(written by `lingbot-edge calibrate plan`)")
    return calibration


def check_provenance(records: dict[str, dict | None], source_sha256: str, dtype: str, allow_mismatch: bool) -> None:
    """Each plan / calibration record must come from this checkpoint (and from one calibrate run);
    `allow_mismatch` turns the refusal into a warning. Another deployment dtype only warns."""
    problems = []
    for what, record in records.items():
        if not isinstance(record, dict):
            problems.append(f"{what}: records no provenance (written before it was recorded, or by hand): nothing "
                            "ties its scales to this checkpoint; run `lingbot-edge calibrate plan` again")
            continue
        if record.get("checkpoint_sha256") != source_sha256:
            hint = ("; a smoothed plan applies to the transformer/ that `calibrate plan` wrote next to it"
                    if record.get("smoothing_alpha") is not None else "")
            problems.append(f"{what}: measured on checkpoint {record.get('checkpoint')} (sha256 "
                            f"{str(record.get('checkpoint_sha256'))[:12]}..., smoothing {record.get('smoothing_alpha')}"
                            f"), not this one (sha256 {source_sha256[:12]}...){hint}")
        if record.get("dtype") not in (None, dtype):
            log.warning("%s: verified in %s, deploying in %s: its error budget was not measured in this dtype",
                        what, record.get("dtype"), dtype)
    valid = [r for r in records.values() if isinstance(r, dict)]
    if len(valid) == 2 and valid[0] != valid[1]:
        problems.append(f"{' and '.join(records)}: come from different `calibrate plan` runs (provenance differs)")
    if problems and not allow_mismatch:
        raise MismatchError("; ".join(problems) + " (--allow-mismatch to use them anyway)")
    for problem in problems:
        log.warning("%s (--allow-mismatch: used anyway)", problem)
