"""Flags that mean the same in every runtime command, and the one way a command builds its policy.

    --checkpoint DIR | tiny | so100-grasp   the policy source (a checkpoint folder, the embedded tiny model
                              with random weights, or the embedded grasp-trained one)
    --preset NAME             the default policy settings (the checkpoint's own come first)
    --transformer DIR         another DiT folder, e.g. a quantized checkpoint from `lingbot-edge quantize`
    --set KEY=VALUE           a policy setting (PolicyConfig or upstream's name), repeatable, applied last
    --device / --dtype / --compile / --sampler / --seed

Everything goes to `lingbot_edge.io.loading.load_policy`; its `runtime_defaults` decides what is not given.
"""

from __future__ import annotations

import argparse
from typing import Any

from lingbot_edge.core.config import get_policy_config, parse_overrides, tiny_variant
from lingbot_edge.io.datasets import load_action_quantiles, quantile_overrides
from lingbot_edge.io.layout import resolve_checkpoint
from lingbot_edge.io.loading import TINY, load_policy, policy_config_for
from lingbot_edge.robot.so100 import SO100_MOTORS, camera_keys, parse_camera

DTYPES = ("bf16", "fp16", "fp32")
ASYNC_MODES = ("grounded", "naive")  # core.config.ASYNC_MODES (not imported: the CLI's parser stays light)


def add_policy_args(p: argparse.ArgumentParser, *, default_checkpoint: str | None = "tiny",
                    default_preset: str | None = None) -> None:
    """The policy flags, identical in every command that runs a policy."""
    p.add_argument("--checkpoint", default=default_checkpoint,
                   help="checkpoint folder (released, LeRobot or post-trained layout), 'tiny' for the embedded "
                        "tiny model (random weights) or 'so100-grasp' for the embedded one trained on the SO-100 "
                        f"grasp task (default: {default_checkpoint or 'required'})")
    p.add_argument("--preset", default=default_preset,
                   help="policy preset used as the default settings: libero, robotwin, so100, tiny (default: "
                        f"{default_preset or 'from the checkpoint'})")
    p.add_argument("--transformer", default=None, help="DiT folder replacing the checkpoint's (e.g. a quantized one)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="policy setting override, JSON value (e.g. --set num_inference_steps=10); repeatable")
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="DiT dtype (default bf16)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the static sampler (auto: on CUDA only)")
    p.add_argument("--sampler", choices=("static", "reference"), default="static",
                   help="static: ring-buffer cache, compiled; reference: upstream's loop, eager")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--async-mode", choices=ASYNC_MODES, default=None,
                   help="how a chunk inferred ahead (lookahead, real time) is conditioned: grounded (the real "
                        "history, then the executing chunk's known actions) or naive (the model's stale forecast, "
                        "for comparison) (default: the checkpoint's, else grounded)")


def policy_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """load_policy keyword arguments of the policy flags (`overrides`: PolicyConfig fields a command sets)."""
    if args.async_mode is not None:
        overrides = {**overrides, "async_mode": args.async_mode}
    settings = {**overrides, **parse_overrides(args.settings)}  # --set wins over a command's own mapping
    return dict(preset=args.preset, transformer=args.transformer, device=args.device, dtype=args.dtype,
                compile={"auto": None, "on": True, "off": False}[args.compile], sampler=args.sampler,
                seed=args.seed, **settings)


def build_policy(args: argparse.Namespace, **overrides: Any):
    """The command's policy, through the one factory."""
    return load_policy(args.checkpoint, **policy_kwargs(args, **overrides))


def parse_cameras(args) -> list:
    """The robot cameras of the repeatable --camera flag (a clear error on an unknown one)."""
    try:
        return [parse_camera(c) for c in args.camera]
    except ValueError as e:
        raise SystemExit(str(e)) from e


def resolved_config(args):
    """The settings `load_policy` will start from for these flags (no weights read)."""
    settings = parse_overrides(args.settings)
    if args.checkpoint == TINY:
        cfg = tiny_variant(get_policy_config(args.preset or TINY))
        return (cfg.replace(**settings) if settings else cfg), None
    layout = resolve_checkpoint(args.checkpoint, transformer=args.transformer)
    own = {**(layout.policy_config or {}), **(layout.policy_fields or {})}.get("obs_cam_keys")
    return policy_config_for(layout, args.preset, settings), (tuple(own) if own else None)


def robot_overrides(args, cameras) -> dict:
    """PolicyConfig overrides of the robot flags: --camera (the camera set and order) and --stats (the
    dataset's action quantiles on the used channels)."""
    overrides: dict = {}
    if not cameras and not args.stats:
        return overrides
    cfg, own_keys = resolved_config(args)
    if cameras:
        keys = camera_keys(cameras)
        if own_keys is not None and set(own_keys) != set(keys):
            raise SystemExit(f"--camera: the cameras {list(keys)} do not match the checkpoint's obs_cam_keys "
                             f"{list(own_keys)}")
        overrides["obs_cam_keys"] = own_keys or keys
    if args.stats:
        q01, q99 = load_action_quantiles(args.stats, SO100_MOTORS)
        overrides.update(quantile_overrides(cfg, q01, q99))
    return overrides
