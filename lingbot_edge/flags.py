"""The one flag vocabulary: what every command (runtime and offline tools) spells the same way, and the one way a
command builds its policy.

    --checkpoint DIR | tiny | so100-grasp   the policy source (a checkpoint folder, the embedded tiny model
                              with random weights, or the embedded grasp-trained one)
    --preset NAME             the default policy settings (the checkpoint's own come first)
    --transformer DIR         another DiT folder, e.g. a quantized checkpoint from `lingbot-edge quantize`
    --set KEY=VALUE           a policy setting (PolicyConfig or upstream's name), repeatable, applied last
    --device cpu|cuda|cuda:N  where the model runs
    --dtype bf16|fp16|fp32    the DiT's dtype; the long names (bfloat16, float16, float32) are the same flag values
    --compile / --sampler / --seed / --async-mode
    --threads N               torch CPU threads
    --seed N                  the seed of a command's random draws

Everything goes to `lingbot_edge.io.loading.load_policy`; its `runtime_defaults` decides what is not given. The
parser functions use the standard library only, so `lingbot-edge --help` and every command's parser stay light;
the functions that build a policy or read a checkpoint import the runtime when they run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

# Every spelling of a dtype -> its short name (what `runtime_defaults` and the tables print).
DTYPE_SPELLINGS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "fp32",
                   "float32": "fp32", "int8": "int8"}
LONG_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "int8": "int8"}
DTYPES = ("bf16", "fp16", "fp32")  # the DiT dtypes of the runtime
ASYNC_MODES = ("grounded", "naive")  # core.config.ASYNC_MODES (not imported: the parser stays light)
POLICY_FLAGS = ("checkpoint", "preset", "transformer", "set", "device", "dtype", "compile", "sampler", "seed",
                "async_mode")


def dtype_type(allowed: Sequence[str] = DTYPES, long: bool = False) -> Callable[[str], str]:
    """An argparse `type` for a dtype flag: any spelling of a dtype in `allowed` (short names) -> its short name,
    or its long name (bfloat16, float32, ...) when `long`; anything else is refused naming both spellings."""

    def parse(value: str) -> str:
        short = DTYPE_SPELLINGS.get(value)
        if short not in allowed:
            spellings = ", ".join(f"{s} ({LONG_NAMES[s]})" if LONG_NAMES[s] != s else s for s in allowed)
            raise argparse.ArgumentTypeError(f"expected one of {spellings}; got {value!r}")
        return LONG_NAMES[short] if long else short

    parse.__name__ = "dtype"
    return parse


def add_dtype_arg(p: argparse.ArgumentParser, default: str | None = None, help: str = "DiT dtype",
                  flag: str = "--dtype", allowed: Sequence[str] = DTYPES, long: bool = False) -> None:
    """A dtype flag: short or long spellings (bf16 or bfloat16) alike."""
    names = "|".join(allowed)
    p.add_argument(flag, type=dtype_type(allowed, long), default=default, metavar=names,
                   help=f"{help}: {names}, or the long names (bfloat16, float32, ...) (default: {default or 'bf16'})")


def add_device_arg(p: argparse.ArgumentParser, help: str = "where the model runs") -> None:
    p.add_argument("--device", default=None, help=f"{help}: cpu / cuda / cuda:N (default: cuda if available)")


def add_seed_arg(p: argparse.ArgumentParser, default: int = 0, help: str = "noise seed") -> None:
    p.add_argument("--seed", type=int, default=default, help=f"{help} (default {default})")


def add_threads_arg(p: argparse.ArgumentParser, default: int | None = None) -> None:
    shown = "torch's" if default is None else default
    p.add_argument("--threads", type=int, default=default, help=f"torch CPU threads (default: {shown})")


def add_policy_args(p: argparse.ArgumentParser, *, default_checkpoint: str | None = "tiny",
                    default_preset: str | None = None, flags: Sequence[str] = POLICY_FLAGS,
                    default_dtype: str | None = None) -> None:
    """The policy flags, identical in every command that runs a policy; `flags`: the subset a command honours
    (`POLICY_FLAGS` names; a command that loads its policy its own way takes fewer)."""
    if unknown := sorted(set(flags) - set(POLICY_FLAGS)):
        raise ValueError(f"flags: unknown {unknown}; expected a subset of {list(POLICY_FLAGS)}")
    if "checkpoint" in flags:
        p.add_argument("--checkpoint", default=default_checkpoint,
                       help="checkpoint folder (released, LeRobot or post-trained layout), 'tiny' for the embedded "
                            "tiny model (random weights) or 'so100-grasp' for the embedded one trained on the SO-100 "
                            f"grasp task (default: {default_checkpoint or 'required'})")
    if "preset" in flags:
        p.add_argument("--preset", default=default_preset,
                       help="policy preset used as the default settings: libero, robotwin, so100, tiny (default: "
                            f"{default_preset or 'from the checkpoint'})")
    if "transformer" in flags:
        p.add_argument("--transformer", default=None,
                       help="DiT folder replacing the checkpoint's (e.g. a quantized one from `lingbot-edge quantize`)")
    if "set" in flags:
        p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                       help="policy setting override, JSON value (e.g. --set num_inference_steps=10); repeatable")
    if "device" in flags:
        add_device_arg(p)
    if "dtype" in flags:
        add_dtype_arg(p, default_dtype)
    if "compile" in flags:
        p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                       help="torch.compile the static sampler (auto: on CUDA only)")
    if "sampler" in flags:
        p.add_argument("--sampler", choices=("static", "reference"), default="static",
                       help="static: ring-buffer cache, compiled; reference: upstream's loop, eager")
    if "seed" in flags:
        add_seed_arg(p)
    if "async_mode" in flags:
        p.add_argument("--async-mode", choices=ASYNC_MODES, default=None,
                       help="how a chunk inferred ahead (lookahead, real time) is conditioned: grounded (the real "
                            "history, then the executing chunk's known actions) or naive (the model's stale "
                            "forecast, for comparison) (default: the checkpoint's, else grounded)")


def policy_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """load_policy keyword arguments of the policy flags (`overrides`: PolicyConfig fields a command sets)."""
    from lingbot_edge.core.config import parse_overrides

    if getattr(args, "async_mode", None) is not None:
        overrides = {**overrides, "async_mode": args.async_mode}
    settings = {**overrides, **parse_overrides(getattr(args, "settings", []))}  # --set wins over the command's own
    given = dict(preset=getattr(args, "preset", None), transformer=getattr(args, "transformer", None),
                 device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                 compile={"auto": None, "on": True, "off": False}[getattr(args, "compile", "auto")],
                 sampler=getattr(args, "sampler", "static"), seed=getattr(args, "seed", 0))
    return {**given, **settings}


def build_policy(args: argparse.Namespace, **overrides: Any):
    """The command's policy, through the one factory."""
    from lingbot_edge.io.loading import load_policy

    return load_policy(args.checkpoint, **policy_kwargs(args, **overrides))


def parse_cameras(args) -> list:
    """The robot cameras of the repeatable --camera flag (a clear error on an unknown one)."""
    from lingbot_edge.robot.so100 import parse_camera

    try:
        return [parse_camera(c) for c in args.camera]
    except ValueError as e:
        raise SystemExit(str(e)) from e


def resolved_config(args):
    """The settings `load_policy` will start from for these flags (no weights read)."""
    from lingbot_edge.core.config import get_policy_config, parse_overrides, tiny_variant
    from lingbot_edge.io.layout import resolve_checkpoint
    from lingbot_edge.io.loading import TINY, policy_config_for

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
    from lingbot_edge.io.datasets import load_action_quantiles, quantile_overrides
    from lingbot_edge.robot.so100 import SO100_MOTORS, camera_keys

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
