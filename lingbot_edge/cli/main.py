"""`lingbot-edge` command line.

    lingbot-edge demo [--chunks N] [--compile auto|on|off] [--sampler static|reference] [--device D]
    lingbot-edge encode-prompt --checkpoint DIR --prompt TEXT [--prompt TEXT ...]
    lingbot-edge quantize --checkpoint DIR (--scheme NAME | --plan plan.json) --out DIR [--dry-run]
    lingbot-edge calibrate {capture,sensitivity,plan} --out DIR [...]
    lingbot-edge serve [--checkpoint DIR|tiny] [--preset so100] --host 127.0.0.1 --port N
    lingbot-edge run-so100 --robot sim|mujoco|lerobot --policy local|ws://HOST:PORT [...]
    lingbot-edge eval-libero --suite libero_10 --episodes N --checkpoint DIR [--quantized NAME=DIR ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

import numpy as np

from lingbot_edge.cli.common import add_policy_args, build_policy

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
    """The embedded tiny policy closing the loop on the simulated SO-100, one chunk after the other."""
    from lingbot_edge.robot.control import execute_step
    from lingbot_edge.robot.safety import SafetyFilter
    from lingbot_edge.robot.sim import KinematicSO100
    from lingbot_edge.robot.so100 import camera_images, camera_name, joints_of

    policy = build_policy(args)
    cfg = policy.cfg
    robot = KinematicSO100(cameras=[camera_name(k) for k in cfg.obs_cam_keys], height=96, width=128)
    safety = SafetyFilter()
    robot.connect()
    np.set_printoptions(precision=1, suppress=True, linewidth=120)
    try:
        obs = robot.get_observation()
        policy.reset(prompt=args.prompt)
        last = joints_of(obs)
        for i in range(args.chunks):
            chunk = policy.infer(camera_images(obs, cfg.obs_cam_keys) if i == 0 else {})
            for step in range(chunk.steps):
                obs, last = execute_step(robot, chunk, step, safety, obs, last)
            fb = policy.feedback(chunk)
            timing = ", ".join(f"{k[:-3]} {v:.0f}" for k, v in chunk.timing.items())
            print(f"chunk {i}: {chunk.steps} actions x {chunk.actions.shape[1]} joints, {chunk.num_keyframes} "
                  f"keyframes fed back  [{timing} ms; feedback {fb['total_ms']:.0f} ms]")
            print(chunk.actions)
    finally:
        robot.disconnect()
    print(f"safety filter changed {safety.clipped} of {args.chunks * chunk.steps} targets (random tiny weights)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-edge", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded tiny policy on the simulated SO-100 and print its actions")
    demo.add_argument("--chunks", type=int, default=4)
    demo.add_argument("--prompt", default="pick up the red cube")
    add_policy_args(demo, default_checkpoint="tiny", default_preset="so100")
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
