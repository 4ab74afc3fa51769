"""Quantized-vs-reference action drift of the tiny-LIBERO policy over a whole replayed episode.

    python -m bench.libero_drift        # ~2 min on 2 CPU cores; writes bench/results/libero_drift.md

The committed regression episode of tests/libero (8 chunks, 124 control steps, two 128x128 cameras)
is replayed by the tiny-LIBERO policy (libero preset on the tiny DiT, committed checkpoint, CPU) and
by every quantization scheme of `quantize.SCHEMES` applied to its DiT, with the same prompt
embeddings, noise, observed latents and the reference run's executed actions fed back, so the runs
compare step by step (`lingbot_edge.eval.libero.DriftHarness`). Two settings:

- fp32 compute: reference = the fp32 model; each scheme keeps its other modules in fp32. This isolates
  the quantization error; the float8 W8A8 schemes need sm >= 8.9 and are refused on a CPU, so their
  rows are the kernel math emulated on the CPU (`check_hardware=False`).
- bf16 compute (what a GPU runs): reference = the same model cast to bf16; each scheme applied to it.

Static-activation schemes are calibrated on another synthesized scene (2 chunks). The random tiny
model says how the schemes and the policy around them behave, not how the real 5B checkpoint does:
the GPU benchmarks on the real checkpoint report that.

    python -m bench.libero_drift --task-episodes N   # + task success per scheme (bf16 compute)

`--task-episodes N` adds what the drift cannot say, whether the task still succeeds: each scheme applied to
the trained SO-100 grasp checkpoint (not tiny-LIBERO: no trained LIBERO policy exists here) in bf16, over N
held-out seeds of the simulated grasp task (`lingbot_edge.eval.task_success`), in the bf16-compute table.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

from lingbot_edge.eval.sim import EVAL_STEPS
from lingbot_edge.eval.task_success import TASK_CHECKPOINT, TaskSetting, checkpoint_loader, success_cell
from lingbot_edge.eval.task_success import measure as measure_task_success
from lingbot_edge.testing import libero
from quantize import SCHEMES, quantize_
from quantize.task import quantize_setting

DATA = Path(__file__).resolve().parent.parent / "tests" / "libero" / "data"
OUT = Path(__file__).resolve().parent / "results" / "libero_drift.md"
FP8_W8A8 = ("fp8_dynamic", "quanto_fp8_a8")  # float8 matmuls: CUDA sm >= 8.9 only
BF16_TASK_ROW = "bf16 (no quantization)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(data_dir: Path = DATA, schemes: list[str] | None = None, log=print) -> dict[str, dict]:
    """{setting: {variant: action_drift}} for the fp32 and bf16 settings."""
    torch.set_num_threads(1)
    policy = libero.load_tiny_libero_policy(data_dir / libero.CHECKPOINT_DIR)
    episode = libero.load_episodes(data_dir)["episode_bowl_plate"]
    calib = libero.synthesize_episode("pick up the red mug", seed=1, chunks=2)
    schemes = schemes or list(SCHEMES)
    tables: dict[str, dict] = {}
    fp32 = libero.DriftHarness(policy, episode)
    bf16_model = copy.deepcopy(policy.model).to(torch.bfloat16)
    bf16 = libero.DriftHarness(fp32.policy(bf16_model, real_encoder=True), episode)
    for setting, harness in (("fp32", fp32), ("bf16", bf16)):
        rows = tables[setting] = {}
        if setting == "fp32":
            rows["bf16 (no quantization)"] = harness.run(copy.deepcopy(bf16_model))[1]
        for name in schemes:
            t0 = time.perf_counter()
            model = copy.deepcopy(harness.model)

            def calibrate(m, harness=harness):
                libero.replay_episode(harness.policy(m, real_encoder=True), calib)

            quantize_(model, SCHEMES[name], calibrate=calibrate, check_hardware=name not in FP8_W8A8)
            label = _label(name)
            rows[label] = harness.run(model)[1]
            log(f"{setting} {label}: max {rows[label]['max_step_err']:.3g} cumulative "
                f"{rows[label]['cumulative_err']:.3g} ({time.perf_counter() - t0:.1f} s)")
    return tables


def _label(name: str) -> str:
    return f"{name} (emulated)" if name in FP8_W8A8 else name


def task_success(schemes: list[str] | None, episodes: int, steps: int | None = None,
                 progress: bool = False) -> dict[str, dict]:
    """{bf16-table label: `lingbot_edge.eval.task_success.measure` row}: the unquantized bf16 SO-100 grasp checkpoint
    (label "bf16 (no quantization)") and each scheme on it, over `episodes` held-out seeds; float8 W8A8
    emulated on a CPU, as in the drift rows."""
    settings = [TaskSetting(BF16_TASK_ROW)] + [
        TaskSetting(_label(n), n, check_hardware=n not in FP8_W8A8) for n in (schemes or list(SCHEMES))]
    rows = measure_task_success(checkpoint_loader(TASK_CHECKPOINT, "bfloat16"), settings, episodes, steps or EVAL_STEPS,
                   progress, quantize=quantize_setting)
    return {r["policy"]: r for r in rows}


def _task_section(task: dict[str, dict]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """(the bf16 table's extra column, the paragraph under it) of `task_success` rows."""
    n = next(iter(task.values()))["episodes"]
    title = f"task success, SO-100 grasp ({n} seeds)"
    text = [f"Task success (`--task-episodes {n}`): NOT this tiny-LIBERO policy (it has no task to succeed at here) "
            f"but the trained SO-100 grasp checkpoint `{TASK_CHECKPOINT}` in bf16 with the same scheme, over {n} "
            f"held-out seeds of the simulated grasp task (`lingbot_edge.eval.task_success`); unquantized bf16: "
            f"{success_cell(task[BF16_TASK_ROW])}.", ""]
    return {title: {label: success_cell(r) for label, r in task.items()}}, text


def _reading(tables: dict[str, dict]) -> list[str]:
    """Observations computed from the tables (so they stay true when the tables are regenerated)."""
    fp32, bf16 = tables["fp32"], tables["bf16"]

    def span(names, key="max_step_err", rows=fp32):
        vals = [rows[n][key] for n in names if n in rows]
        if not vals:
            return "-"
        return f"{min(vals):.1e}" if min(vals) == max(vals) else f"{min(vals):.1e}-{max(vals):.1e}"

    int8 = span(("int8_weight_only", "int8_dynamic", "quanto_int8"))
    out = [f"- fp32 compute, max per-step error: int8 weights {int8}"
           f", LLM.int8 {span(('llm_int8',))}, fp8 weights {span(('fp8_weight_only', 'quanto_fp8'))}, "
           f"static int8 activations {span(('quanto_int8_a8',))}."]
    if "quanto_int8_a8" in fp32:
        c = fp32["quanto_int8_a8"]["chunk_mean_err"]
        out.append(f"- quanto_int8_a8 (activation scales calibrated on 2 chunks of another scene): its mean error per "
                   f"step goes from {sum(c[:2]) / 2:.1e} (chunks 0-1) to {sum(c[-2:]) / 2:.1e} (chunks 6-7), "
                   "presumably as activations leave the range its static scales saw; the dynamic schemes stay flat.")
    base = fp32.get("bf16 (no quantization)")
    if base and "int8_weight_only" in fp32 and bf16:
        mean_bf16 = sum(r["mean_step_err"] for r in bf16.values()) / len(bf16)
        ratio = base["mean_step_err"] / fp32["int8_weight_only"]["mean_step_err"]
        out.append(f"- bf16 rounding is the larger effect: the bf16 model is {base['mean_step_err']:.1e} per step "
                   f"(mean) from the fp32 one, {ratio:.0f}x "
                   "int8 weight-only's error in fp32; in bf16 compute the schemes are "
                   f"{mean_bf16:.1e} per step (mean over schemes) from the bf16 run.")
    flips = sum(r.get("gripper_flips", 0) for rows in tables.values() for r in rows.values())
    out.append(f"- Gripper commands flipped against the reference: {flips} steps over all runs.")
    out.append("- `tests/libero/test_libero_drift.py` bounds the fp32-compute rows of the CPU-capable schemes (max "
               "and cumulative error at ~2.5x these values, no gripper flip).")
    return out


def report(tables: dict[str, dict], seconds: float, task: dict[str, dict] | None = None) -> str:
    """The markdown report; `task`: `task_success` rows, a column of the bf16-compute table."""
    cfg = libero.tiny_libero_config()
    extra, task_text = _task_section(task) if task else ({}, [])
    steps = next(iter(tables["fp32"].values()))["steps"]
    lines = [
        "# LIBERO action drift: quantized vs reference, tiny-LIBERO policy (CPU)",
        "",
        "Generated by `python -m bench.libero_drift"
        + (f" --task-episodes {next(iter(task.values()))['episodes']}" if task else "") + "` (see its docstring) in "
        f"{seconds:.0f} s: torch {torch.__version__}, {_cpu_name()}, 1 thread.",
        "",
        f"Policy: the libero preset on the tiny DiT ({cfg.height}x{cfg.width}, 2 cameras, F={cfg.frame_chunk_size} x "
        f"apf={cfg.action_per_frame}, {cfg.num_inference_steps}/{cfg.action_num_inference_steps} steps, "
        f"CFG {cfg.guidance_scale:g}/{cfg.action_guidance_scale:g}, 7 channels), committed checkpoint "
        "`tests/libero/data/tiny_libero_ckpt`. Episode: the committed 8-chunk regression episode "
        f"({steps} control steps). Every run gets the same prompt, noise, observed latents and the "
        "reference run's executed actions, so only the DiT differs.",
        "",
        "Columns (normalized action units: the q01..q99 range maps to [-1, 1]): per-step error = the largest "
        "|difference| over the 7 channels at one step; max / mean over the episode; cumulative = its sum over "
        f"the {steps} steps; RMS and cosine over all steps and channels; xyz drift = |sum of the translation "
        "differences| in action units (LIBERO's actions are end-effector deltas: how far apart the commanded "
        "positions end up); gripper flips = steps whose gripper command has the other sign.",
        "",
        "## fp32 compute: reference = the fp32 model",
        "",
        "The quantization error alone. `(emulated)`: float8 W8A8 needs CUDA sm >= 8.9 and is refused on a CPU; "
        "these rows run its kernel math on the CPU. `bf16 (no quantization)` is the fp32 model cast to bf16, "
        "for scale.",
        "",
        libero.format_drift_table(tables["fp32"]),
        "## bf16 compute: reference = the bf16 model (the GPU setting)",
        "",
        "Each scheme applied to the bf16 model, against the bf16 run.",
        "",
        *task_text,
        libero.format_drift_table(tables["bf16"], extra=extra),
        "## Reading it",
        "",
        *_reading(tables),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA), help="tests/libero/data")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), help="default: all")
    parser.add_argument("--task-episodes", type=int, default=0,
                        help="also task success per scheme on the SO-100 grasp checkpoint over N held-out seeds")
    args = parser.parse_args(argv)
    if args.task_episodes < 0:
        parser.error(f"--task-episodes: expected >= 0, got {args.task_episodes}")
    t0 = time.perf_counter()
    tables = measure(Path(args.data), args.schemes)
    task = task_success(args.schemes, args.task_episodes, progress=True) if args.task_episodes else None
    text = report(tables, time.perf_counter() - t0, task)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
