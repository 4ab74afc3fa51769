"""`lingbot-edge eval-libero`: real LIBERO episodes, success rate per DiT variant side by side.

    lingbot-edge eval-libero --suite libero_10 --episodes N --checkpoint DIR|tiny [--preset libero] \\
        [--quantized int8_weight_only=DIR ...] [--tasks 0 3 ...] [--device cuda] [--set KEY=VALUE] [--out DIR]

The policy flags are the ones of every runtime command (`lingbot_edge.flags`); each variant is built by
`load_policy` (a quantized one as `transformer=DIR`). Needs the `libero` extra (hf-libero + the scene asset
packages); without it, or without a usable checkpoint, it lists what is missing and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from lingbot_edge.eval.libero import LIBERO_SUITES
from lingbot_edge.flags import add_policy_args, policy_kwargs
from lingbot_edge.io.files import write_text

log = logging.getLogger(__name__)


def parse_variant(spec: str) -> tuple[str, str]:
    """`--quantized NAME=DIR` -> (NAME, DIR)."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {spec!r}")
    return name, folder


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval-libero",
        help="run LIBERO episodes and report the success rate per DiT variant (bf16 and quantized) side by side",
        description="Run real LIBERO episodes (hf-libero's OffScreenRenderEnv) with a LingBot-VA checkpoint and "
                    "report success rates per variant side by side: the checkpoint's own DiT (or --transformer) and "
                    "every quantized checkpoint given with --quantized (written by `lingbot-edge quantize`). Episode "
                    "e of a task starts from the task's initial state e, for every variant. Frames reach the policy "
                    "in LeRobot's orientation (raw render rotated 180 degrees); the libero settings' "
                    "image_transform (hflip) maps them to upstream's training orientation (--set image_transform=...).",
    )
    p.add_argument("--suite", default="libero_10", choices=LIBERO_SUITES, help="LIBERO suite (default libero_10)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default 10)")
    p.add_argument("--tasks", dest="task_ids", type=int, nargs="+", help="task ids (default: every task of the suite)")
    p.add_argument("--quantized", type=parse_variant, action="append", metavar="NAME=DIR",
                   help="a quantized DiT checkpoint to compare (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="skip the checkpoint's own (unquantized) DiT")
    p.add_argument("--max-steps", type=int, help="steps per episode (default: LeRobot's per-suite limit)")
    p.add_argument("--render-size", type=int, default=256, help="camera render size (default 256; the policy resizes)")
    p.add_argument("--out", help="folder for eval_<suite>.md / .json")
    add_policy_args(p, default_checkpoint=None, default_preset="libero")
    p.set_defaults(func=run_eval_libero)
    return p


def run_eval_libero(args: argparse.Namespace) -> int:
    """Success rate per DiT variant, side by side; exit 2 if something is missing."""
    from lingbot_edge.eval import libero

    if args.episodes < 1:
        raise SystemExit("eval-libero: --episodes must be >= 1")
    quantized = dict(args.quantized or [])
    kwargs = policy_kwargs(args)
    from lingbot_edge.io.loading import load_policy, runtime_defaults

    device = str(runtime_defaults(args.device)[0])
    missing = libero.missing_requirements(args.suite, args.checkpoint, quantized, device=device, preset=args.preset,
                                          transformer=args.transformer)
    if missing:
        print(f"eval-libero {args.suite}: cannot run LIBERO episodes here; missing:", file=sys.stderr)
        for m in missing:
            print(f"  - {m}", file=sys.stderr)
        print("Without LIBERO: `pytest tests/libero` checks the tiny-LIBERO policy against committed goldens and "
              "bounds quantized-vs-reference drift; `python -m bench.libero_drift` writes the drift table.",
              file=sys.stderr)
        return 2
    variants = {}
    if not args.no_baseline:
        variants[args.dtype or "bf16"] = lambda: load_policy(args.checkpoint, **kwargs)
    for name, folder in quantized.items():
        variants[name] = lambda folder=folder: load_policy(args.checkpoint, **{**kwargs, "transformer": folder})
    if not variants:
        print("eval-libero: nothing to evaluate (--no-baseline and no --quantized)", file=sys.stderr)
        return 2
    task_ids = args.task_ids or list(range(libero.suite_size(args.suite)))
    max_steps = args.max_steps or libero.LIBERO_MAX_STEPS[args.suite]
    names: dict[int, str] = {}

    def make_env(task_id: int) -> libero.LiberoEnv:
        env = libero.LiberoEnv(args.suite, task_id, args.render_size, args.seed)
        names[task_id] = env.prompt
        return env

    t0 = time.perf_counter()
    results = libero.evaluate(variants, make_env, task_ids, args.episodes, max_steps,
                              progress=lambda s: log.info("%s", s))
    table = libero.success_table(results, names)
    print(f"LIBERO {args.suite}: {args.episodes} episode(s) per task, {len(task_ids)} task(s), max {max_steps} steps, "
          f"checkpoint {args.checkpoint}, {time.perf_counter() - t0:.0f} s\n")
    print(table)
    if args.out:
        out = Path(args.out)
        write_text(out / f"eval_{args.suite}.md", table)
        write_text(out / f"eval_{args.suite}.json", json.dumps(
            {k: [dataclasses.asdict(o) for o in v] for k, v in results.items()}, indent=1))
    return 0
