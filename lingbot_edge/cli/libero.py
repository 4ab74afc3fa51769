"""`lingbot-edge eval-libero`: real LIBERO episodes, success rate per DiT variant side by side.

    lingbot-edge eval-libero --suite libero_10 --episodes N --checkpoint DIR \\
        [--quantized int8_weight_only=DIR ...] [--tasks 0 3 ...] [--device cuda] [--out DIR]

Needs hf-libero (`import libero`) with its assets and a LIBERO checkpoint; without them it lists
what is missing and exits with status 2. The heavy imports happen when the command runs.
"""

from __future__ import annotations

import argparse

from lingbot_edge.eval.libero import LIBERO_SUITES, parse_variant


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval-libero",
        help="run LIBERO episodes and report the success rate per DiT variant (bf16 and quantized) side by side",
        description="Run real LIBERO episodes (hf-libero's OffScreenRenderEnv) with a LingBot-VA LIBERO checkpoint "
                    "and report success rates per variant side by side: the checkpoint's own DiT and every "
                    "quantized checkpoint given with --quantized (written by `lingbot-edge quantize`). Episode e "
                    "of a task starts from the task's initial state e, for every variant. Frames reach the policy "
                    "in LeRobot's orientation (raw render rotated 180 degrees); the libero preset's "
                    "image_transform (hflip) maps them to upstream's training orientation.",
    )
    p.add_argument("--suite", default="libero_10", choices=LIBERO_SUITES, help="LIBERO suite (default libero_10)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    p.add_argument("--tasks", dest="task_ids", type=int, nargs="+", help="task ids (default: every task of the suite)")
    p.add_argument("--checkpoint", help="LingBot-VA LIBERO checkpoint folder (released or LeRobot layout)")
    p.add_argument("--quantized", type=parse_variant, action="append", metavar="NAME=DIR",
                   help="a quantized DiT checkpoint to compare (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="skip the checkpoint's own (unquantized) DiT")
    p.add_argument("--device", help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the DiT (kept modules of quantized ones) and the VAE (default bfloat16)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the static sampler (auto: on CUDA)")
    p.add_argument("--image-transform", choices=("none", "vflip", "hflip", "rot180"),
                   help="override the preset's image_transform (relative to LeRobot's orientation; default hflip)")
    p.add_argument("--max-steps", type=int, help="steps per episode (default: LeRobot's per-suite limit)")
    p.add_argument("--render-size", type=int, default=256, help="camera render size (default 256, resized to 128)")
    p.add_argument("--seed", type=int, default=0, help="env and noise seed (default 0)")
    p.add_argument("--out", help="folder for eval_<suite>.md / .json")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    if args.episodes < 1:
        raise SystemExit("eval-libero: --episodes must be >= 1")
    from lingbot_edge.eval.libero import run_eval_libero

    return run_eval_libero(args)
