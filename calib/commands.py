"""`lingbot-edge calibrate`: activation statistics, per-layer sensitivity, mixed-precision plans.

    lingbot-edge calibrate capture     --out DIR --checkpoint CKPT|tiny [--preset P] [--data PATH ...]
    lingbot-edge calibrate sensitivity --out DIR (same policy flags and data) --schemes int8_dynamic,int8_weight_only
    lingbot-edge calibrate plan        --out DIR (same policy flags and data) --max-action-rms 0.003
    lingbot-edge quantize --checkpoint CKPT --plan DIR/plan.json --dtype bf16 --out CKPT-mixed   (printed as next:)

The policy flags are the runtime commands' (lingbot_edge.flags: --checkpoint, --preset, --set,
--device, --dtype bf16|fp16|fp32, --seed, ...); `--inject-outliers` adds the outlier channels of
calib.outliers to the embedded tiny model (the tests' construction). Data: `--data` takes a LeRobot
dataset folder (v2.0 / v2.1 / v3.0; needs pyarrow) or `.npz` recordings (see calib/data.py); without it,
random-input episodes (`--synthetic N`). The runtime never imports `calib/` or `quantize/` at import
time: the commands import them when they run.
"""

from __future__ import annotations

import argparse
import sys

from lingbot_edge.flags import add_policy_args, policy_kwargs

_SCHEMES_HELP = "comma-separated scheme names, in order of preference (quantize.SCHEMES)"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate",
        help="calibration: activation statistics, per-layer sensitivity, mixed-precision quantization plans",
        description="Capture activation statistics over calibration episodes, measure each Linear's sensitivity "
                    "to quantization end to end, and choose a per-module plan that meets an action-error or "
                    "weight-bytes budget (the plan JSON `lingbot-edge quantize --plan` reads). Steps share an "
                    "output folder; capture and sensitivity resume where a stopped run ended.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder shared by the three steps")
    add_policy_args(common)
    common.add_argument("--inject-outliers", action="store_true",
                        help="with --checkpoint tiny: add the outlier channels of calib.outliers (the tests' model)")
    common.add_argument("--data", nargs="+", help="LeRobot dataset folder, or .npz recordings / folders of them")
    common.add_argument("--camera-map", nargs="*", default=[], metavar="DATASET_KEY=PRESET_KEY",
                        help="rename LeRobot video keys to the preset's camera keys")
    common.add_argument("--synthetic", type=int, default=4, help="random-input episodes when no --data (default 4)")
    common.add_argument("--chunks", type=int, default=2, help="chunks per episode (default 2)")
    common.add_argument("--max-episodes", type=int, help="use at most this many episodes of --data")
    steps = p.add_subparsers(dest="calibrate_step", required=True)

    cap = steps.add_parser("capture", parents=[common], help="record activation statistics (resumable)")
    cap.add_argument("--no-resume", action="store_true", help="start over instead of continuing OUT/stats.safetensors")
    cap.set_defaults(func=_run_capture)

    sens = steps.add_parser("sensitivity", parents=[common], help="quantize one module at a time, measure the error")
    sens.add_argument("--schemes", default="int8_dynamic,int8_weight_only", help=_SCHEMES_HELP)
    sens.add_argument("--episodes", type=int, default=2, help="episodes each measurement runs (default 2)")
    sens.add_argument("--granularity", choices=("module", "block"), default="module")
    sens.add_argument("--modules", default=r"blocks\.\d+\.(attn1|attn2|ffn)\..+",
                      help="regex of the candidate Linears (default: the block Linears)")
    sens.add_argument("--smooth", type=float, metavar="ALPHA",
                      help="fold SmoothQuant factors (alpha, e.g. 0.5) into the foldable Linears first")
    sens.set_defaults(func=_run_sensitivity)

    plan = steps.add_parser("plan", parents=[common], help="choose a per-module plan under a budget")
    plan.add_argument("--max-action-rms", type=float, help="action RMS error budget (normalized units)")
    plan.add_argument("--max-weight-gb", type=float, help="weight bytes budget of the whole DiT (GB, 1e9)")
    plan.add_argument("--schemes", help=f"{_SCHEMES_HELP}; default: those of sensitivity.json")
    plan.add_argument("--task-episodes", type=int, default=0, metavar="N",
                      help="SO-100 checkpoints: add to report.md the success of the unquantized policy and of the "
                           "plan on the simulated grasp task over N held-out seeds (default 0: off)")
    plan.add_argument("--exec-steps", default="full,1",
                      help="with --task-episodes: comma-separated video step settings, 'full' or a video_exec_step "
                           "count (default full,1)")
    plan.set_defaults(func=_run_plan)
    return p


# ----------------------------------------------------------------------------- commands


def _load(args: argparse.Namespace):
    """(model, cfg, policy) of the policy flags; the policy encodes recorded data. The model runs in the
    policy's dtype, the one it will be deployed in, so plans meet their budget there (recorded in plan.json)."""
    from calib.pipeline import check_output
    from lingbot_edge.io.loading import TINY, load_policy

    if args.inject_outliers and args.checkpoint != TINY:
        raise ValueError(f"--inject-outliers: only with --checkpoint {TINY} (the embedded test model), "
                         f"not {args.checkpoint!r}")
    check_output(args.out, [p for p in (_checkpoint_folder(args), args.transformer, *(args.data or ())) if p])
    policy = load_policy(args.checkpoint, **policy_kwargs(args))
    if args.inject_outliers:
        from calib.outliers import inject_outlier_channels

        inject_outlier_channels(policy.model)
    return policy.model, policy.cfg, policy


def _checkpoint_folder(args: argparse.Namespace) -> str | None:
    """--checkpoint as a folder: an embedded checkpoint's name resolved (None: the embedded tiny model)."""
    from lingbot_edge.io.loading import TINY, checkpoint_folder

    if args.checkpoint == TINY:
        return None
    return str(checkpoint_folder(args.checkpoint))


def _folder(args: argparse.Namespace) -> str | None:
    """The DiT folder the plan applies to (None: the embedded tiny model, written next to the plan)."""
    folder = _checkpoint_folder(args)
    return None if folder is None else args.transformer or folder


def _source(args: argparse.Namespace, cfg, policy):
    from calib.data import SyntheticEpisodes, open_source

    if args.data:
        camera_map = dict(kv.split("=", 1) for kv in args.camera_map)
        return open_source(args.data, policy, max_chunks=args.chunks, max_episodes=args.max_episodes,
                           camera_map=camera_map)
    return SyntheticEpisodes(cfg, args.synthetic, chunks=args.chunks, seed=args.seed)


def _errors(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"lingbot-edge calibrate {args.calibrate_step}: error: {e}", file=sys.stderr)
            return 2

    return run


def dtype_flag(model) -> str:
    """The shared --dtype value (bf16 / fp16 / fp32) of the dtype `model` was measured in."""
    from lingbot_edge.flags import DTYPES
    from lingbot_edge.io.loading import runtime_defaults

    dtype = next(model.parameters()).dtype
    return next(name for name in DTYPES if runtime_defaults("cpu", name)[1] == dtype)


def quantize_command(paths: dict, checkpoint: str | None, dtype: str) -> str:
    """The `lingbot-edge quantize` command that deploys what `calibrate plan` wrote (`dtype`: a --dtype value)."""
    import json

    command = (f"lingbot-edge quantize --checkpoint {paths.get('transformer', checkpoint)} --plan {paths['plan']} "
               f"--dtype {dtype}")
    if json.loads(paths["calibration"].read_text())["static_input_scales"]:
        command += f" --calibration {paths['calibration']}"
    return command + " --out QUANTIZED_DIR"


@_errors
def _run_capture(args: argparse.Namespace) -> int:
    from calib.pipeline import STATS_FILE, capture_step

    model, cfg, policy = _load(args)
    stats = capture_step(model, cfg, _source(args, cfg, policy), args.out, resume=not args.no_resume, progress=True)
    print(f"{len(stats.episodes)} episodes, {len(stats.modules)} Linears, {len(stats.groups())} groups, "
          f"{stats.nbytes:,} bytes of statistics -> {args.out}/{STATS_FILE}")
    return 0


@_errors
def _run_sensitivity(args: argparse.Namespace) -> int:
    from calib.pipeline import SENSITIVITY_FILE, load_stats, sensitivity_step, setup
    from quantize import get_scheme

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    for name in schemes:
        get_scheme(name, source="--schemes")
    model, cfg, policy = _load(args)
    s = setup(model, cfg, _source(args, cfg, policy), load_stats(args.out), episodes=args.episodes,
              smooth_alpha=args.smooth, pattern=args.modules, granularity=args.granularity)
    sens = sensitivity_step(s, schemes, args.out, progress=True)
    worst = sorted(sens.entries, key=lambda e: -e.action_rms)[:5]
    print(f"{len(sens.targets)} targets x {len(schemes)} schemes -> {args.out}/{SENSITIVITY_FILE}; most sensitive:")
    for e in worst:
        print(f"  {e.target:32s} {e.scheme:18s} action RMS {e.action_rms:.3g}  latent SQNR {e.latent_sqnr:.1f} dB")
    return 0


@_errors
def _run_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from calib.pipeline import SENSITIVITY_FILE, load_stats, plan_step, setup
    from calib.planner import Budget
    from calib.sensitivity import Sensitivity

    path = Path(args.out) / SENSITIVITY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run `lingbot-edge calibrate sensitivity --out {args.out}` first")
    meta = Sensitivity.load(path).meta  # the plan runs the same episodes, smoothing and targets
    budget = Budget(args.max_action_rms, int(args.max_weight_gb * 1e9) if args.max_weight_gb is not None else None)
    schemes = [s.strip() for s in args.schemes.split(",")] if args.schemes else None
    exec_steps = _task_options(args)
    model, cfg, policy = _load(args)
    if args.task_episodes:
        from lingbot_edge.eval.task_success import check_task_policy

        check_task_policy(cfg, "--task-episodes")
    stats = load_stats(args.out)
    s = setup(model, cfg, _source(args, cfg, policy), stats, episodes=len(meta["episodes"]),
              smooth_alpha=meta["smooth_alpha"], pattern=meta["pattern"], granularity=meta["granularity"])
    result, paths = plan_step(s, budget, args.out, schemes, stats=stats, progress=True, checkpoint=_folder(args))
    for name, err in result.naive.items():
        print(f"every candidate on {name}: action RMS {err.action_rms:.3g}")
    print(f"plan: action RMS {result.error.action_rms:.3g} ({'meets' if result.feasible else 'MISSES'} the budget), "
          f"weights {result.weight_bytes:,} bytes (bf16 {result.weight_bytes_bf16:,}), kept: {result.kept}")
    deploy_dtype = dtype_flag(model)
    if args.task_episodes:
        del model, policy, s  # the task loads fresh policies
        table = task_success_report(args, paths, exec_steps)
        print(table)
    for name, p in paths.items():
        print(f"{name}: {p}")
    print("next: " + quantize_command(paths, _folder(args), deploy_dtype))
    return 0 if result.feasible else 1


def _task_options(args: argparse.Namespace) -> list[int]:
    """The video step settings of --task-episodes (refused up front, before any measurement)."""
    from lingbot_edge.io.loading import TINY

    if args.task_episodes < 0:
        raise ValueError(f"--task-episodes: expected >= 0, got {args.task_episodes}")
    if args.task_episodes and args.checkpoint == TINY:
        raise ValueError(f"--task-episodes: needs a checkpoint folder or an embedded checkpoint (so100-grasp); the "
                         f"embedded {TINY!r} model has random weights and no folder for the plan to load from")
    try:
        return [-1 if x.strip() == "full" else int(x) for x in args.exec_steps.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--exec-steps: expected 'full' or video_exec_step counts, comma-separated; got "
                         f"{args.exec_steps!r}") from None


def task_success_report(args: argparse.Namespace, paths: dict, exec_steps: list[int], steps: int | None = None) -> str:
    """Task success of the unquantized policy and of the plan just written (with its static input scales, on the
    DiT it applies to), per video step setting, `steps` actions per episode (default the task's); appended to
    report.md. Returns the table."""
    import json

    from calib.report import append_task_success
    from lingbot_edge.eval.task_success import TaskSetting, format_table, measure
    from lingbot_edge.io.loading import load_policy
    from quantize import QuantPlan
    from quantize.task import quantize_setting

    kwargs = policy_kwargs(args)

    def load(**overrides):
        return load_policy(args.checkpoint, **{**kwargs, **overrides})

    plan = QuantPlan.from_json(paths["plan"])
    scales = json.loads(paths["calibration"].read_text())["static_input_scales"] or None
    settings = []
    for step in exec_steps:
        axes = {"video_exec_step": step}
        settings += [TaskSetting("unquantized", None, axes),
                     TaskSetting(f"plan {paths['plan'].name}", plan, axes, transformer=paths.get("transformer"),
                                 input_scales=scales)]
    rows = measure(load, settings, args.task_episodes, **({} if steps is None else {"steps": steps}), progress=True,
                   quantize=quantize_setting)
    table = format_table(rows, args.task_episodes)
    append_task_success(paths["report"], table, args.checkpoint, args.task_episodes)
    return table
