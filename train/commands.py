"""`lingbot-edge train`: record demonstrations, train the tiny SO-100 policy, measure its task success.

    lingbot-edge train record --out DIR [--episodes 200]
    lingbot-edge train fit --out DIR [--dataset DIR] [--episodes 200] [--steps 2600] [--eval-episodes 20]
    lingbot-edge train fit --out DIR --scene place --episodes 50 --base so100-grasp --lora-rank 32  # post-train
    lingbot-edge train eval --checkpoint DIR [--episodes 20] [--dtype bf16] [--schemes a,b] [--json F]
    lingbot-edge train distill --teacher DIR|so100-grasp --data RUN_DIR --action-steps N --out DIR

Registered from this package through the `lingbot_edge.commands` entry point (`train.commands:register`);
`python -m train.commands ...` runs the same parser without the entry point.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lingbot_edge.flags import add_dtype_arg, add_policy_args, add_seed_arg, add_threads_arg
from lingbot_edge.io.files import write_text  # standard library only: the CLI stays light

log = logging.getLogger("train")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train the tiny SO-100 policy on scripted demonstrations (CPU)",
                              description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="train_command", required=True)
    from lingbot_edge.robot.scenes import SCENES
    from train.scenes import TRAIN_SCENES

    rec = sub.add_parser("record", help="record scripted-expert episodes as a LeRobot v2.1 dataset")
    rec.add_argument("--out", required=True, help="new dataset folder (refused if it exists)")
    rec.add_argument("--episodes", type=int, default=200)
    rec.add_argument("--first-seed", type=int, default=0)
    _scene_arg(rec, TRAIN_SCENES)
    _libero_args(rec)
    _expert_args(rec)
    rec.add_argument("--camera", action="append", default=[], metavar="NAME",
                     help="camera to record (repeatable; default: all three SO-100 cameras)")
    rec.set_defaults(func=_record)

    fit = sub.add_parser("fit", help="record (unless --dataset), train, export the checkpoint; resumes from --out")
    fit.add_argument("--out", required=True, help="run folder: dataset/, checkpoint/, train_state.pt, loss.png")
    fit.add_argument("--dataset", help="an existing LeRobot dataset (default: record one into OUT/dataset)")
    fit.add_argument("--episodes", type=int, default=200, help="episodes to record / use (default 200)")
    from train.config import TrainConfig

    tc = TrainConfig()  # the one place for the training defaults
    fit.add_argument("--steps", type=int, default=tc.steps, help=f"optimizer steps (default {tc.steps})")
    fit.add_argument("--batch-size", type=int, default=tc.batch_size,
                     help=f"episodes per step (default {tc.batch_size})")
    fit.add_argument("--lr", type=float, default=tc.lr, help=f"peak learning rate (default {tc.lr:g})")
    fit.add_argument("--save-every", type=int, default=tc.save_every, help=f"steps between saved states "
                                                                             f"(default {tc.save_every})")
    add_seed_arg(fit, tc.seed, "seed of the DiT's initial weights and of the batch and noise draws")
    fit.add_argument("--model", default="tiny", choices=("tiny", "tiny-grasp"),
                     help="DiT model preset: tiny (2 blocks x 48) or tiny-grasp (4 blocks x 64)")
    fit.add_argument("--action-weight", type=float, help="weight of the action loss next to the video loss "
                                                         "(default: TrainConfig's)")
    _expert_args(fit)
    fit.add_argument("--camera", action="append", default=[], metavar="NAME",
                     help="a camera of the trained policy (repeatable; default: POLICY_SETTINGS' cameras); only "
                          "these are recorded")
    fit.add_argument("--height", type=int, help="policy image height per camera (default: POLICY_SETTINGS')")
    fit.add_argument("--width", type=int, help="policy image width per camera (default: POLICY_SETTINGS')")
    fit.add_argument("--history-action-noise", type=float, default=tc.history_action_noise,
                     help="noise std (normalized units) on the action history the model is trained with")
    fit.add_argument("--change-weight", type=float, default=tc.change_weight,
                     help="extra loss weight on chunks where the expert's motion changes (see TrainConfig)")
    fit.add_argument("--predicted-sigma", choices=("sampler", "random"),
                     default="sampler" if tc.predicted_at_sampler_sigma else "random",
                     help="the noise on the PREDICTED video the actions train on: the sigma the policy's sampler "
                          "writes it at (its video_exec_step) or a random one of the video grid (default: %(default)s)")
    fit.add_argument("--grounded-weight", type=float, default=tc.grounded_weight,
                     help="weight of the grounded lookahead's action loss (0: train the synchronous order alone; "
                          "default %(default)s)")
    fit.add_argument("--clean-predicted", action="store_true",
                     help="train the actions on the clean future video (no noise on the PREDICTED copy)")
    add_threads_arg(fit)
    _scene_arg(fit, TRAIN_SCENES)
    _libero_args(fit)
    from train.lora import DEFAULT_TARGETS, AdapterConfig

    ac = AdapterConfig()
    fit.add_argument("--base", metavar="DIR|so100-grasp",
                     help="post-train from this checkpoint (its frozen parts and settings; the DiT starts from its "
                          "weights) instead of training from scratch")
    fit.add_argument("--from-scratch", action="store_true",
                     help="with --base: train a random DiT of its architecture on its frozen parts and settings (the "
                          "baseline a post-training run is compared with; --latents can share its encoded data)")
    fit.add_argument("--lora-rank", type=int,
                     help="with --base: train LoRA adapters of this rank over the frozen base DiT (default: train "
                          "the whole DiT)")
    fit.add_argument("--lora-alpha", type=float, default=ac.alpha, help="LoRA scale alpha (update x alpha / rank; "
                                                                        "default %(default)s)")
    fit.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                     help="comma-separated module names or name suffixes that get adapters (default: the block "
                          "attention and FFN Linears: %(default)s)")
    fit.add_argument("--lora-train-modules", default="",
                     help="comma-separated modules trained in full next to the adapters (e.g. action_proj_out)")
    add_dtype_arg(fit, ac.base_dtype, "the frozen base under the adapters: bf16, fp32 (the tiny DiT's fast path on a "
                  "CPU) or the runtime's int8 weight-only format (QLoRA-style)", flag="--base-dtype",
                  allowed=("bf16", "fp32", "int8"), long=True)
    fit.add_argument("--checkpointing", action="store_true",
                     help="per-block activation checkpointing (recompute each block's activations in the backward)")
    fit.add_argument("--latents", help="an earlier run's latents.pt of the same dataset and base (skips encoding)")
    fit.add_argument("--eval-episodes", type=int, default=0, help="then evaluate on this many held-out seeds")
    fit.add_argument("--distributed", action="store_true",
                     help="data parallel over the processes of `torchrun --nproc-per-node N -m train.commands fit "
                          "...` (DDP; --batch-size a multiple of N; rank 0 writes; see train/distributed.py)")
    fit.set_defaults(func=_fit)

    _distill_args(sub)

    ev = sub.add_parser("eval", help="task success over held-out seeds: the checkpoint vs random weights")
    add_policy_args(ev, default_checkpoint=None, flags=("checkpoint", "transformer", "set", "dtype"),
                    default_dtype="bf16")
    ev.add_argument("--episodes", "--task-episodes", dest="episodes", type=int, default=20,
                    help="held-out seeds (default 20); --task-episodes is the same flag as in `calibrate plan`")
    ev.add_argument("--schemes", default="", help="comma-separated 8-bit schemes to evaluate too "
                                                  "(e.g. int8_weight_only,int8_dynamic,fp8_weight_only)")
    ev.add_argument("--exec-steps", default="checkpoint",
                    help="comma-separated video step settings to evaluate: 'checkpoint' (its policy_config's; the "
                         "default), 'full' or a video_exec_step count (e.g. 1,full)")
    ev.add_argument("--action-steps", default="checkpoint",
                    help="comma-separated action step counts to evaluate: 'checkpoint' (its "
                         "action_num_inference_steps; the default) or counts (e.g. 10,5,2,1)")
    _scene_arg(ev, SCENES)
    ev.add_argument("--seeds", default="held-out", choices=("held-out", "validation"),
                    help="the seed set: held-out (100000.., to report on; default) or validation (200000.., to "
                         "choose recipes and settings on)")
    ev.add_argument("--modes", default="sync",
                    help="comma-separated robot loops for the trained rows: sync, naive, grounded (lookahead with that "
                         "async_mode, grounded requesting late with the executing chunk's keyframes), "
                         "grounded-at-start (requesting at the executing chunk's start); 8-bit and random rows run in "
                         "the first (default: sync)")
    ev.add_argument("--delay", type=float, default=None, metavar="TICKS",
                    help="inference delay in control ticks under virtual time (default: half a chunk)")
    ev.add_argument("--no-random", action="store_true", help="skip the random-weight baseline")
    ev.add_argument("--expert", action="store_true", help="add the scripted expert's row (same seeds and filter)")
    ev.add_argument("--video", help="write the first trained episode as an mp4")
    ev.add_argument("--json", help="write the results as JSON")
    ev.add_argument("--markdown", help="write the results table as Markdown (e.g. under bench/results/)")
    ev.set_defaults(func=_eval)
    return p


def _distill_args(sub) -> None:
    from train.distill_config import METHODS, DistillConfig

    dc = DistillConfig()  # the one place for the distillation defaults
    d = sub.add_parser("distill", help="a student that reaches the teacher's action endpoint in fewer action steps; "
                                       "resumes from --out")
    d.add_argument("--teacher", default="so100-grasp", help="teacher checkpoint folder or embedded name "
                                                            "(default: so100-grasp)")
    d.add_argument("--data", required=True, help="the teacher's `train fit` run folder (its latents.pt)")
    d.add_argument("--action-steps", type=int, default=dc.action_steps,
                   help=f"the student's action steps (default {dc.action_steps})")
    d.add_argument("--out", required=True, help="run folder: targets.pt, train_state.pt, loss.png, checkpoint/")
    d.add_argument("--method", default=dc.method, choices=METHODS,
                   help=f"distillation objective (default {dc.method}; see train/distill_config.py)")
    d.add_argument("--steps", type=int, default=dc.steps, help=f"optimizer steps (default {dc.steps})")
    d.add_argument("--batch-size", type=int, default=dc.batch_size,
                   help=f"samples (episode x draw) per step (default {dc.batch_size})")
    d.add_argument("--lr", type=float, default=dc.lr, help=f"peak learning rate (default {dc.lr:g})")
    d.add_argument("--draws", type=int, default=dc.draws,
                   help=f"noise draws per episode for the teacher's targets (default {dc.draws})")
    d.add_argument("--grounded-weight", type=float, default=dc.grounded_weight,
                   help="weight of the grounded lookahead's copy (0: the synchronous order alone; default %(default)s)")
    d.add_argument("--video-weight", type=float, default=dc.video_weight,
                   help="weight of the term keeping the video velocity at the teacher's (default %(default)s)")
    d.add_argument("--save-every", type=int, default=dc.save_every,
                   help=f"steps between saved states (default {dc.save_every})")
    add_seed_arg(d, dc.seed, "seed of the draws' noise and the batch order")
    add_threads_arg(d)
    d.set_defaults(func=_distill)


def _scene_arg(parser, scenes) -> None:
    parser.add_argument("--scene", choices=sorted(scenes), default="grasp",
                        help="the simulated task: grasp (pick up the red cube) or place (the green cube into the "
                             "paper box) on the SO-100, or libero (LIBERO's simulator: --suite, --tasks); default "
                             "%(default)s")


def _libero_args(parser) -> None:
    from train.libero_data import LiberoTasks

    lt = LiberoTasks()
    parser.add_argument("--env", choices=("so100", "libero"), default="so100",
                        help="so100: the simulated SO-100 (--scene); libero: LIBERO's own simulator, the same as "
                             "--scene libero (--suite, --tasks; the libero extra), demonstrations by the scripted "
                             "pick-and-place expert (default %(default)s)")
    parser.add_argument("--suite", default=lt.suite, help="with --env libero: the LIBERO suite (default %(default)s)")
    parser.add_argument("--tasks", default=",".join(map(str, lt.task_ids)),
                        help="with --env libero: comma-separated task ids of the suite, one policy for all "
                             "(default %(default)s)")
    parser.add_argument("--antialias", action="store_true",
                        help="with --env libero: LIBERO's 4x multisampled renders (default off: half the CPU time; "
                             "evaluate with the same setting)")


def _scene_name(args) -> str:
    return "libero" if args.env == "libero" else args.scene


def _scene_options(args):
    """The recording options of the chosen scene: LIBERO's tasks, or the SO-100 scripted expert's settings."""
    from train.libero_data import LiberoTasks
    from train.scenes import ExpertSettings

    if _scene_name(args) != "libero":
        return ExpertSettings(args.expert_gain, args.expert_cartesian_speed, args.expert_detour)
    try:
        task_ids = tuple(int(t) for t in args.tasks.split(",") if t)
    except ValueError:
        raise SystemExit(f"lingbot-edge train: error: --tasks: expected comma-separated task ids, got "
                         f"{args.tasks!r}") from None
    return LiberoTasks(suite=args.suite, task_ids=task_ids, antialias=args.antialias)


def _expert_args(parser) -> None:
    from train.expert import RECORDING_CARTESIAN_SPEED, RECORDING_DETOUR

    parser.add_argument("--expert-gain", type=float, default=0.0,
                        help="the recorded expert's proportional gain (0: constant speed); see train/expert.py")
    parser.add_argument("--expert-cartesian-speed", type=float, default=RECORDING_CARTESIAN_SPEED,
                        help=f"the recorded expert's straight-line approach speed in m per tick (default "
                             f"{RECORDING_CARTESIAN_SPEED}; 0: joint space)")
    parser.add_argument("--expert-detour", type=float, default=RECORDING_DETOUR,
                        help=f"largest detour (m) of the recorded expert's approach, drawn per episode (default "
                             f"{RECORDING_DETOUR}; 0: the straight path)")


def _record(args) -> int:
    from train.scenes import get_train_scene

    scene = get_train_scene(_scene_name(args))
    try:
        scene.record(Path(args.out), list(range(args.first_seed, args.first_seed + args.episodes)),
                     scene.episode_frames, args.camera or None, True, _scene_options(args))
    except ValueError as e:
        raise SystemExit(f"lingbot-edge train record: error: {e}") from None
    return 0


def _fit(args) -> int:
    from train.pipeline import DataSettings, ModelSettings, fit
    from train.trainer import TrainConfig

    extra = {} if args.action_weight is None else {"action_weight": args.action_weight}
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, save_every=args.save_every,
                     seed=args.seed, noisy_predicted=not args.clean_predicted,
                     predicted_at_sampler_sigma=args.predicted_sigma == "sampler",
                     history_action_noise=args.history_action_noise, change_weight=args.change_weight,
                     grounded_weight=args.grounded_weight, **extra)
    adapters = None
    if args.lora_rank is not None:
        from train.lora import AdapterConfig

        if args.base is None:
            raise SystemExit("lingbot-edge train fit: error: --lora-rank: adapters need a --base checkpoint")
        adapters = AdapterConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                                 targets=tuple(t for t in args.lora_targets.split(",") if t),
                                 base_dtype=args.base_dtype,
                                 train_modules=tuple(t for t in args.lora_train_modules.split(",") if t))
    if args.eval_episodes and _scene_name(args) == "libero":
        raise SystemExit("lingbot-edge train fit: error: --eval-episodes: LIBERO policies are evaluated by "
                         "`lingbot-edge eval-libero --checkpoint OUT/checkpoint` (LIBERO's own success check)")
    data = DataSettings(scene=_scene_name(args), dataset=args.dataset, episodes=args.episodes,
                        options=_scene_options(args),
                        latents=args.latents)
    model = ModelSettings(model=args.model, cameras=tuple(args.camera) or None, height=args.height, width=args.width,
                          base=args.base, adapters=adapters, from_scratch=args.from_scratch,
                          checkpointing=args.checkpointing)
    parallel = None
    if args.distributed:
        from train.distributed import init_from_env

        parallel = init_from_env(args.threads)
    try:
        report = fit(args.out, data, model, tc, threads=args.threads, parallel=parallel)
    finally:
        if parallel is not None:
            from train.distributed import shutdown

            shutdown()
    if report is None:  # not rank 0: it trained its share, rank 0 reports
        return 0
    print(f"loss video {report['first_loss']['video']:.3f} -> {report['final_loss']['video']:.3f}, "
          f"action {report['first_loss']['action']:.3f} -> {report['final_loss']['action']:.3f}; "
          f"checkpoint {Path(args.out) / 'checkpoint'}; curves {Path(args.out) / 'loss.png'}")
    if args.eval_episodes:
        from train.evaluate import EvalEpisodes, evaluate_checkpoint, format_table

        rows = evaluate_checkpoint(Path(args.out) / "checkpoint",
                                   episodes=EvalEpisodes(args.eval_episodes, scene=args.scene))
        print(format_table(rows, args.eval_episodes))
        report["evaluation"] = rows
        write_text(Path(args.out) / "report.json", json.dumps(report, indent=2))
    return 0


def _distill(args) -> int:
    from train.distill import distill
    from train.distill_config import DistillConfig

    dc = DistillConfig(action_steps=args.action_steps, method=args.method, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, draws=args.draws, grounded_weight=args.grounded_weight,
                       video_weight=args.video_weight, save_every=args.save_every, seed=args.seed)
    report = distill(args.teacher, args.data, args.out, dc, threads=args.threads)
    rms = ", ".join(f"{k} {v['sync']:.4f} / {v['grounded']:.4f}" for k, v in report["endpoint_rms"].items())
    print(f"loss action {report['first_loss']['action']:.2e} -> {report['final_loss']['action']:.2e}; endpoint RMS "
          f"against the teacher's {report['teacher_action_steps']} steps (sync / grounded): {rms}; "
          f"student {report['checkpoint']} ({report['timings']['train_s'] + report['timings']['targets_s']:.0f} s, "
          f"{report['threads']} threads)")
    return 0


def _eval(args) -> int:
    if args.checkpoint is None:
        raise SystemExit("lingbot-edge train eval: error: --checkpoint: a checkpoint folder written by `train fit` "
                         "(or an embedded checkpoint's name) is required")
    from train.evaluate import EvalEpisodes, EvalRows, evaluate_checkpoint, format_table

    schemes = [s for s in args.schemes.split(",") if s]
    named = {"full": -1, "checkpoint": None}
    try:
        exec_steps = [named[s] if s in named else int(s) for s in args.exec_steps.split(",") if s]
    except ValueError:
        raise SystemExit(f"lingbot-edge train eval: error: --exec-steps: expected 'checkpoint', 'full' or "
                         f"video_exec_step counts, comma-separated; got {args.exec_steps!r}") from None
    try:
        action_steps = [None if s == "checkpoint" else int(s) for s in args.action_steps.split(",") if s]
    except ValueError:
        raise SystemExit(f"lingbot-edge train eval: error: --action-steps: expected 'checkpoint' or action step "
                         f"counts, comma-separated; got {args.action_steps!r}") from None
    from lingbot_edge.core.config import parse_overrides
    from lingbot_edge.eval.sim import MODES, SEED_SETS
    from lingbot_edge.robot.scenes import get_scene

    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"lingbot-edge train eval: error: --modes: expected a comma-separated subset of "
                         f"{', '.join(MODES)}; got {args.modes!r}")
    first = SEED_SETS[args.seeds]
    rows = []
    for i, steps in enumerate(action_steps or [None]):  # each action step count: the rows of one evaluation
        overrides = parse_overrides(args.settings)
        if steps is not None:
            overrides["action_num_inference_steps"] = steps
        measured = EvalRows(tuple(exec_steps), tuple(modes), tuple(schemes), not args.no_random and i == 0,
                            args.expert and i == 0, overrides, args.transformer)
        rows += evaluate_checkpoint(args.checkpoint, args.dtype, measured,
                                    EvalEpisodes(args.episodes, first, args.scene, delay_ticks=args.delay),
                                    video=args.video if i == 0 else None)
    table = format_table(rows, args.episodes, args.seeds)
    print(table)
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2))
    if args.markdown:
        write_text(
            args.markdown,
            f"# Task success: {get_scene(args.scene).task} (kinematic SO-100, `--scene {args.scene}`)\n\n"
            f"Checkpoint `{args.checkpoint}`; {args.seeds} seeds {first}..{first + args.episodes - 1}, "
            f"{get_scene(args.scene).eval_steps} actions per episode, CPU, `lingbot-edge train eval --scene "
            f"{args.scene} --episodes {args.episodes} "
            f"--dtype {args.dtype} --seeds {args.seeds}{' --schemes ' + args.schemes if args.schemes else ''} "
            f"--exec-steps {args.exec_steps} --action-steps {args.action_steps} --modes {args.modes}"
            f"{'' if args.delay is None else f' --delay {args.delay:g}'}"
            f"{''.join(' --set ' + item for item in args.settings)}`.\n\n{table}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.commands")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("bitsandbytes", "torchao", "torch.utils._pytree", "diffusers.models.modeling_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
