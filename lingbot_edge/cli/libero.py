"""`lingbot-edge eval-libero`: real LIBERO episodes, success rate per DiT variant side by side.

    lingbot-edge eval-libero --suite libero_object --tasks 3 5 --init-states 20-39 --checkpoint DIR|libero-tiny \\
        [--modes sync,grounded] [--quantized int8_weight_only=DIR ...] [--action-steps 2] [--random] [--expert] \\
        [--device cuda] [--set KEY=VALUE] [--out DIR]

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

from lingbot_edge.eval import libero
from lingbot_edge.eval.libero import LIBERO_MODES, LIBERO_SUITES
from lingbot_edge.flags import add_policy_args, policy_kwargs
from lingbot_edge.io.files import write_text

log = logging.getLogger(__name__)


def parse_variant(spec: str) -> tuple[str, str]:
    """`--quantized NAME=DIR` -> (NAME, DIR)."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {spec!r}")
    return name, folder


def parse_init_states(spec: str) -> list[int]:
    """`--init-states A-B` (inclusive) or `A` -> the benchmark initial states."""
    lo, sep, hi = spec.partition("-")
    try:
        first, last = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B or A (initial state ids, 0-49), got {spec!r}") from None
    if not 0 <= first <= last:
        raise argparse.ArgumentTypeError(f"expected 0 <= A <= B, got {spec!r}")
    return list(range(first, last + 1))


def parse_counts(spec: str) -> list[int]:
    """`--action-steps 2,1` -> [2, 1]."""
    try:
        counts = [int(c) for c in spec.split(",") if c]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts, got {spec!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected counts >= 1, got {spec!r}")
    return counts


def parse_modes(spec: str) -> list[str]:
    modes = [m for m in spec.split(",") if m]
    if not modes or any(m not in LIBERO_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(LIBERO_MODES)}, got "
                                         f"{spec!r}")
    return modes


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval-libero",
        help="run LIBERO episodes and report the success rate per DiT variant (bf16 and quantized) side by side",
        description="Run real LIBERO episodes (hf-libero's scenes on MuJoCo) and report the success LIBERO's own "
                    "check_success() gives, per row side by side: the checkpoint's DiT in each --modes loop, every "
                    "quantized DiT given with --quantized (written by `lingbot-edge quantize`), few-step rows "
                    "(--action-steps), random weights (--random) and the scripted expert (--expert). Every row plays "
                    "the same benchmark initial states. Frames reach the policy in LeRobot's orientation (raw render "
                    "rotated 180 degrees); the settings' image_transform maps them to what the model was trained on.",
    )
    p.add_argument("--suite", default="libero_10", choices=LIBERO_SUITES, help="LIBERO suite (default libero_10)")
    p.add_argument("--init-states", type=parse_init_states, metavar="A-B",
                   help="the benchmark initial states each task plays, e.g. 20-39 (default 0-9)")
    p.add_argument("--episodes", type=int, help="initial states 0..N-1 (the same as --init-states 0-(N-1))")
    p.add_argument("--tasks", dest="task_ids", type=int, nargs="+", help="task ids (default: every task of the suite)")
    p.add_argument("--modes", type=parse_modes, default=["sync"],
                   help="comma-separated loops for the checkpoint's DiT: sync (the scene waits for each chunk) and "
                        "grounded (the real-time lookahead loop under virtual time); the other rows run the first "
                        "(default sync)")
    p.add_argument("--delay", type=int, metavar="STEPS",
                   help="the real-time loop's inference delay in env steps (default: half a chunk)")
    p.add_argument("--quantized", type=parse_variant, action="append", metavar="NAME=DIR",
                   help="a quantized DiT checkpoint to compare (repeatable)")
    p.add_argument("--action-steps", type=parse_counts, metavar="N[,M]",
                   help="few-step rows: the checkpoint's DiT with these action step counts")
    p.add_argument("--random", action="store_true", help="add a row with a random-weight DiT of the same architecture")
    p.add_argument("--expert", action="store_true", help="add the scripted expert's row (privileged state)")
    p.add_argument("--no-baseline", action="store_true", help="skip the checkpoint's own (unquantized) DiT")
    p.add_argument("--max-steps", type=int, help="steps per episode (default: LeRobot's per-suite limit)")
    p.add_argument("--render-size", type=int, default=128,
                   help="camera render size (default 128: the libero preset's input, no resize)")
    p.add_argument("--antialias", action="store_true",
                   help="LIBERO's 4x multisampled renders (default off: about half the CPU time; use what the "
                        "policy was trained on)")
    p.add_argument("--out", help="folder for eval_<suite>.md / .json")
    add_policy_args(p, default_checkpoint=None, default_preset="libero")
    p.set_defaults(func=run_eval_libero)
    return p


def _rows(args, kwargs: dict) -> dict[str, libero.Row]:
    """The table's rows, in order: the checkpoint's DiT per mode, few-step, quantized, random, expert."""
    from lingbot_edge.eval.sim import with_random_transformer
    from lingbot_edge.io.loading import load_policy

    def build(mode: str = "sync", **more):
        settings = {**kwargs, **more}
        if mode == "grounded":
            settings["async_mode"] = "grounded"
        return lambda: load_policy(args.checkpoint, **settings)

    first, rows = args.modes[0], {}
    dtype = args.dtype or "bf16"
    if not args.no_baseline:
        for mode in args.modes:
            rows[f"{dtype} {mode}"] = libero.Row(build(mode), mode)
    for steps in args.action_steps or []:
        rows[f"{dtype} {steps} action steps"] = libero.Row(build(first, action_num_inference_steps=steps), first)
    for name, folder in dict(args.quantized or []).items():
        rows[name] = libero.Row(build(first, transformer=folder), first)
    if args.random:
        def load(**more):
            return load_policy(args.checkpoint, **{**kwargs, **more})

        rows["random weights"] = libero.Row(lambda: with_random_transformer(args.checkpoint, load), first)
    if args.expert:
        rows["expert"] = libero.Row(None)
    return rows


def run_eval_libero(args: argparse.Namespace) -> int:
    """Success rate per row, side by side; exit 2 if something is missing."""
    if args.episodes is not None and args.init_states is not None:
        raise SystemExit("eval-libero: error: --episodes and --init-states: give one")
    if args.episodes is not None and args.episodes < 1:
        raise SystemExit("eval-libero: error: --episodes must be >= 1")
    init_states = args.init_states or list(range(args.episodes or 10))
    quantized = dict(args.quantized or [])
    kwargs = policy_kwargs(args)
    from lingbot_edge.io.loading import runtime_defaults

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
    rows = _rows(args, kwargs)
    if not rows:
        print("eval-libero: nothing to evaluate (--no-baseline and no other row)", file=sys.stderr)
        return 2
    task_ids = args.task_ids or list(range(libero.suite_size(args.suite)))
    max_steps = args.max_steps or libero.LIBERO_MAX_STEPS[args.suite]
    names: dict[int, str] = {}

    def make_env(task_id: int, cameras: bool = True) -> libero.LiberoEnv:
        env = libero.LiberoEnv(args.suite, task_id, args.render_size, args.seed, antialias=args.antialias,
                               cameras=cameras)
        names[task_id] = env.prompt
        return env

    t0 = time.perf_counter()
    results = libero.evaluate(rows, make_env, task_ids, init_states, max_steps, delay_steps=args.delay,
                              progress=lambda s: log.info("%s", s))
    table = libero.success_table(results, names)
    states = f"{init_states[0]}-{init_states[-1]}" if len(init_states) > 1 else str(init_states[0])
    header = (f"LIBERO {args.suite}: initial states {states} of each task, {len(task_ids)} task(s), max {max_steps} "
              f"steps, checkpoint {args.checkpoint}, {time.perf_counter() - t0:.0f} s\n")
    print(header)
    print(table)
    if args.out:
        out = Path(args.out)
        write_text(out / f"eval_{args.suite}.md", header + "\n" + table)
        write_text(out / f"eval_{args.suite}.json", json.dumps(
            {k: [dataclasses.asdict(o) for o in v] for k, v in results.items()}, indent=1))
    return 0
