"""`lingbot-edge quantize`: the argument surface of the offline quantizer.

    lingbot-edge quantize --checkpoint DIR (--scheme NAME | --plan plan.json) --out DIR
    lingbot-edge quantize (--checkpoint DIR|tiny | --arch full|tiny) (--scheme NAME | --plan plan.json) --dry-run

--checkpoint (a checkpoint root or its transformer/ folder; 'tiny' with --dry-run), --dtype (bf16|fp16|fp32, or
bfloat16, ...) and --device mean what they mean in every command (lingbot_edge.flags); `--arch` names a model
architecture (a MODEL preset), not a policy preset.

The runtime never imports `quantize/` at import time: the command imports it when it runs.
"""

from __future__ import annotations

import argparse

from lingbot_edge.flags import add_policy_args


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
    add_policy_args(p, default_checkpoint=None, flags=("checkpoint", "dtype", "device"))
    p.add_argument("--out", help="output folder of the quantized checkpoint: absent or empty, or (with --force) a "
                                 "quantized checkpoint, replaced atomically; never inside or around --checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing quantized checkpoint at --out "
                                                       "(never anything else)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use a --plan / --calibration measured on another checkpoint (warns instead of refusing)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the weight-byte table of the plan on the meta device; reads only config.json")
    p.add_argument("--arch", choices=("full", "tiny"), help="model architecture for --dry-run without --checkpoint "
                                                         "(full: the 5B LingBot-VA DiT)")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors shard size limit (default 4)")
    p.add_argument("--calibration", help="calibration.json of `lingbot-edge calibrate plan`: its static activation "
                   "scales replace the synthetic calibration episode")
    p.add_argument("--calib-chunks", type=int, default=2,
                   help="chunks of the synthetic calibration episode for calibrated activations (default 2)")
    p.add_argument("--calib-preset", help="policy preset of the synthetic calibration episode, as --preset everywhere: "
                                          "the default settings (default: the checkpoint's own, else the preset "
                                          "matching its DiT: libero for the full model, tiny for the tiny one); not "
                                          "--preset, which quantize once took for the model architecture (--arch)")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from quantize.run import run

    return run(args)
