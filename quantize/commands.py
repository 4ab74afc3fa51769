"""`lingbot-edge quantize`: the argument surface of the offline quantizer.

    lingbot-edge quantize --checkpoint DIR (--scheme NAME | --plan plan.json) --out DIR
    lingbot-edge quantize (--checkpoint DIR | --preset full) (--scheme NAME | --plan plan.json) --dry-run

The runtime never imports `quantize/` at import time: the command imports it when it runs.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="quantize the DiT's Linears to int8 / fp8 and write a quantized checkpoint",
        description="Quantize a LingBot-VA transformer/ checkpoint (torchao, optimum-quanto, bitsandbytes "
                    "schemes) into a quantized checkpoint that lingbot_edge.io.quantized.load_quantized loads. "
                    "Schemes: int8_weight_only, int8_dynamic, fp8_weight_only, fp8_dynamic (torchao), "
                    "quanto_int8, quanto_fp8, quanto_int8_a8, quanto_fp8_a8 (optimum-quanto), "
                    "llm_int8 (bitsandbytes).",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--scheme", help="a scheme name, applied to the Linears inside the blocks")
    what.add_argument("--plan", help="a plan JSON (per-module / regex schemes or 'keep')")
    p.add_argument("--checkpoint", help="upstream transformer/ folder (or a checkpoint root containing one)")
    p.add_argument("--out", help="output folder of the quantized checkpoint: absent or empty, or (with --force) a "
                                 "quantized checkpoint, replaced atomically; never inside or around --checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing quantized checkpoint at --out "
                                                       "(never anything else)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use a --plan / --calibration measured on another checkpoint (warns instead of refusing)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the weight-byte table of the plan on the meta device; reads only config.json")
    p.add_argument("--preset", choices=("full", "tiny"), help="model preset for --dry-run without --checkpoint")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the kept modules and of the source weights when loaded (default bfloat16)")
    p.add_argument("--device", help="device the quantized model will run on (default: cuda if available, else cpu)")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors shard size limit (default 4)")
    p.add_argument("--calibration", help="calibration.json of `lingbot-edge calibrate plan`: its static activation "
                   "scales replace the synthetic calibration episode")
    p.add_argument("--calib-chunks", type=int, default=2,
                   help="chunks of the synthetic calibration episode for calibrated activations (default 2)")
    p.add_argument("--calib-preset", help="policy preset of the calibration episode (default: libero for the "
                                          "full model, tiny for the tiny one)")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from quantize.cli import run

    return run(args)
