"""`lingbot-edge` command line.

    lingbot-edge demo [--chunks N] [--compile auto|on|off] [--sampler static|reference] [--device D]
    lingbot-edge encode-prompt --checkpoint DIR --prompt TEXT [--prompt TEXT ...]
    lingbot-edge quantize --checkpoint DIR (--scheme NAME | --plan plan.json) --out DIR [--dry-run]
    lingbot-edge calibrate {capture,sensitivity,plan} --out DIR [...]
    lingbot-edge serve --preset so100 --model tiny|full [--checkpoint DIR] --host 127.0.0.1 --port N
    lingbot-edge run-so100 --robot sim|mujoco|lerobot|remote [...]
    lingbot-edge eval-libero --suite libero_10 --episodes N --checkpoint DIR [--quantized NAME=DIR ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

import numpy as np
import torch

log = logging.getLogger("lingbot_edge")

# Runtime subcommands: each module has `register(subparsers)` and keeps its heavy imports inside the
# command function, so `lingbot-edge --help` stays fast.
_COMMAND_MODULES: tuple[str, ...] = ("frozen", "robot", "libero")
# Offline tools (quantize/, calib/) register their commands through this entry-point group from their
# own packages: the runtime never imports them (imports point calib -> quantize -> lingbot_edge).
COMMAND_ENTRY_POINTS = "lingbot_edge.commands"


def _register_plugins(sub) -> None:
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMAND_ENTRY_POINTS), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:  # a tool whose package is not installed: the rest of the CLI still works
            log.debug("command %s not available: %s", ep.name, e)
            continue
        register(sub)






def run_demo(args: argparse.Namespace) -> int:
    from lingbot_edge.io.tiny import build_tiny_policy
    from lingbot_edge.testing.toy import toy_episode

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # torch.compile pays off on a GPU; on a CPU its ~30 s cold compile outweighs the tiny model.
    compile = args.compile == "on" or (args.compile == "auto" and device.startswith("cuda"))
    policy = build_tiny_policy(sampler=args.sampler, compile=compile, seed=args.seed, device=device)
    log.info("tiny policy on %s (sampler=%s, compile=%s)%s", device, args.sampler, compile,
             "; the first chunk compiles" if compile else "")
    np.set_printoptions(precision=3, suppress=True, linewidth=120)
    for chunk, out in enumerate(toy_episode(policy, args.chunks, args.prompt, seed=args.seed)):
        actions = out["actions"]
        timing = ", ".join(f"{k[:-3]} {v:.0f}" for k, v in out["timing"].items())
        print(f"chunk {chunk}: {actions.shape[0]} actions x {actions.shape[1]} channels  [{timing} ms]")
        print(actions)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-edge", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded tiny policy on a toy scene and print its actions")
    demo.add_argument("--chunks", type=int, default=4)
    demo.add_argument("--prompt", default="push the disk to the left")
    demo.add_argument("--sampler", choices=("static", "reference"), default="static")
    demo.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                      help="torch.compile the static sampler (auto: only on CUDA)")
    demo.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)
    for module in _COMMAND_MODULES:
        import_module(f"lingbot_edge.cli.{module}").register(sub)
    _register_plugins(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # import-time noise of optional backends (ENVIRONMENT.md: harmless)
        for name in ("bitsandbytes", "torchao", "torch.utils._pytree", "diffusers.models.modeling_utils",
                     "diffusers.quantizers"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
