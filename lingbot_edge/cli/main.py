"""`lingbot-edge` command line.

    lingbot-edge demo [--episodes N] [--video out/demo_grasp.mp4] [--checkpoint so100-grasp|tiny|DIR] [...]
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

from lingbot_edge.flags import add_policy_args, build_policy, policy_kwargs

log = logging.getLogger("lingbot_edge")

# Runtime subcommands: each module has `register(subparsers)` and keeps its heavy imports inside the
# command function, so `lingbot-edge --help` stays fast.
_COMMAND_MODULES: tuple[str, ...] = ("encode_prompt", "robot", "libero")
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
    """The embedded trained tiny policy on the simulated SO-100 grasp task: success over held-out seeds next to
    the same checkpoint with a random-weight DiT, and the first episode as a video."""
    from lingbot_edge.eval.sim import (
        chunk_delay_ticks,
        evaluate,
        held_out_seeds,
        summarize,
        with_random_transformer,
    )
    from lingbot_edge.io.loading import TINY, load_policy

    seeds = held_out_seeds(args.episodes)
    kwargs = policy_kwargs(args)
    policy = build_policy(args)
    cfg = policy.cfg
    cams = ", ".join(k.removeprefix("observation.images.") for k in cfg.obs_cam_keys)
    print(f"policy {args.checkpoint}: {cfg.name}, {cfg.height}x{cfg.width} per camera ({cams}), "
          f"{cfg.num_inference_steps} video"
          + (f" (video_exec_step {cfg.video_exec_step})" if cfg.video_exec_step != -1 else "")
          + f" / {cfg.action_num_inference_steps} action steps, "
          + (f"action noise x{cfg.action_noise_scale:g}, " if cfg.action_noise_scale != 1.0 else "")
          + f"{sum(p.numel() for p in policy.model.parameters()) / 1e6:.2f}M DiT parameters")
    delay = chunk_delay_ticks(cfg)
    quiet = args.quiet
    rows = [("policy, sync", evaluate(policy, seeds, desc="sync", video_path=args.video, progress=not quiet)),
            (f"policy, {cfg.async_mode}", evaluate(policy, seeds, desc=cfg.async_mode, progress=not quiet,
                                                    mode=cfg.async_mode))]
    if args.video:
        print(f"video of seed {seeds[0]}: {args.video}")
    if args.baseline and args.checkpoint != TINY and args.transformer is None:
        random_policy = with_random_transformer(args.checkpoint, lambda transformer: load_policy(
            args.checkpoint, **{**kwargs, "transformer": transformer}))
        rows.append(("random weights", evaluate(random_policy, seeds, desc="random", progress=not quiet)))
    print(f"SO-100 grasp, {args.episodes} held-out seeds ({seeds[0]}..{seeds[-1]}), kinematic sim, each inference "
          f"{delay} control ticks (virtual time); sync holds the arm while it infers, {cfg.async_mode} infers the "
          "next chunk while the arm moves:")
    for name, result in rows:
        s = summarize(result["episodes"])
        done = "-" if s["completion_ticks"] is None else f"{s['completion_ticks']:.0f}"
        print(f"  {name:17s} success {s['successes']}/{s['episodes']} ({100 * result['success_rate']:.0f}%), "
              f"held in {done} ticks (median), closest approach {100 * s['min_distance']:.1f} cm (median), "
              f"{s['chunk_ms']:.0f} ms per chunk (median)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the runtime's commands and the offline tools' (entry points)."""
    parser = argparse.ArgumentParser(prog="lingbot-edge", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded trained policy grasps a cube on the simulated SO-100: success "
                                       "rate next to random weights, and a video")
    demo.add_argument("--episodes", type=int, default=10, help="held-out seeds to run (default 10)")
    demo.add_argument("--video", default="out/demo_grasp.mp4", help="mp4 of the first episode ('' for none)")
    demo.add_argument("--no-baseline", dest="baseline", action="store_false",
                      help="skip the random-weight baseline")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_policy_args(demo, default_checkpoint="so100-grasp", default_preset="so100")
    demo.set_defaults(func=run_demo)
    for module in _COMMAND_MODULES:
        import_module(f"lingbot_edge.cli.{module}").register(sub)
    _register_plugins(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Import-time noise of optional backends (harmless load failures of backends this machine lacks).
    if not args.verbose:
        for name in ("bitsandbytes", "torchao", "torch.utils._pytree", "diffusers.models.modeling_utils",
                     "diffusers.quantizers"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
