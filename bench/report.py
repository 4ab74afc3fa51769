"""Turn a ladder run (pytest-benchmark JSON) into a markdown table and a Pareto plot.

    python -m bench.report bench/results/cpu/ladder.json   # writes ladder.md + pareto.png beside it

Ratios are against variant a (the upstream-style reference) from the same run. On a CPU only
ratios are meaningful; absolute times are printed for GPU runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.ladder import all_variants
from lingbot_edge.core.config import POLICY_PRESETS


def _rows(data: dict) -> tuple[dict, dict]:
    chunks, forwards = {}, {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if b["group"] == "chunk":
            chunks[info["variant"]] = {"median_s": b["stats"]["median"], **info}
        else:
            forwards[(info["variant"], info["stream"])] = {"median_s": b["stats"]["median"], **info}
    return chunks, forwards


def render(data: dict) -> str:
    chunks, forwards = _rows(data)
    if not chunks:
        raise ValueError("no 'chunk' benchmarks in this file (was it produced by bench/test_ladder.py?)")
    first = next(iter(chunks.values()))
    gpu = not first["device"].startswith("CPU")
    base = chunks.get("a_reference", first)["median_s"]
    lines = [
        f"# Ladder: preset `{first['preset']}`, {first['device']}",
        "",
        f"torch {first['torch']}, {data.get('datetime', '')[:19]} UTC, pytest-benchmark {data.get('version', '')}. "
        "Medians; every variant in one process on the same inputs. Accuracy vs variant a (bf16 reference): "
        "action RMS and cosine in normalized units, video-latent SQNR.",
        "",
        "| variant | chunk " + ("ms" if gpu else "(x of a)") + " | speedup vs a | video fwd "
        + ("" if gpu else "(x of a) ") + "| action fwd " + ("" if gpu else "(x of a) ")
        + "| actions/s | roofline frac (video/action) | weights MiB | peak mem MiB | action RMS | action cos "
        "| latent SQNR dB | video_exec_step | action steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    task = data.get("task_success")  # the opt-in column (LINGBOT_BENCH_TASK_EPISODES)
    if task:
        lines[2] += (f" Task success: each rung's setting (quantization, sampler, step axes on the checkpoint's own "
                     f"steps; eager) on the trained `{task['checkpoint']}` checkpoint in bf16, the SO-100 grasp task "
                     f"(`lingbot_edge.eval.task_success`), {task['episodes']} held-out seeds.")
        lines[4] += " task success | task setting |"
        lines[5] += "---:|---|"
    axes = _step_axes(first["preset"])
    base_fwd = {s: forwards.get(("a_reference", s)) for s in ("video", "action")}
    for name, c in chunks.items():
        fv, fa = forwards.get((name, "video")), forwards.get((name, "action"))

        def fwd(f):
            if f is None:
                return "-"
            if gpu:
                return f"{f['median_s'] * 1e3:.2f} ms"
            ref = base_fwd[f["stream"]]
            return "-" if ref is None else f"{f['median_s'] / ref['median_s']:.3f}"

        def frac(f):
            return "-" if f is None else f"{f['roofline_s'] / f['median_s']:.3f}"

        chunk_col = f"{c['median_s'] * 1e3:.1f}" if gpu else f"{c['median_s'] / base:.3f}"
        rate = f"{c['actions_per_chunk'] / c['median_s']:.0f}" if gpu else "-"  # absolute: GPU only
        lines.append(
            f"| {name} | {chunk_col} | {base / c['median_s']:.2f}x | {fwd(fv)} | {fwd(fa)} "
            f"| {rate} | {frac(fv)} / {frac(fa)} "
            f"| {c['weight_bytes'] / 2**20:.2f} | {c['peak_memory_bytes'] / 2**20:.0f} | {c['action_rms']:.2e} "
            f"| {c['action_cos']:.5f} | {c['latent_sqnr_db']:.1f} | {axes(name)[0]} | {axes(name)[1]} |"
            + (" {} | {} |".format(*task_cells(task["variants"].get(name))) if task else "")
        )
    lines += ["", "Variants:", ""] + [f"- `{n}`: {c['description']}" for n, c in chunks.items()]

    not_run = [v for v in all_variants() if v.name not in chunks]
    lines += [f"- `{v.name}`: {v.description}: not run here" + (" (needs a CUDA GPU)" if v.gpu_only else "")
              + ("; task success {} ({})".format(*task_cells(task["variants"].get(v.name))) if task else "")
              for v in not_run]
    peaks = next(iter(forwards.values()))["peaks"] if forwards else {}
    if peaks:
        lines += [
            "",
            "Roofline per forward = max(weight bytes / bandwidth, FLOPs / bf16 peak), FLOPs counted by torch's "
            "FlopCounterMode; peaks used: " + ", ".join(f"{k} {v:.3g}" for k, v in peaks.items())
            + (" (measured in this run: copy bandwidth, matmul)" if not gpu else " (datasheet)"),
        ]
    counts = first.get("peak_memory_counts")
    lines += ["", f"Peak memory: {counts}." if counts else
              "Peak memory: not labelled in this file (older runs: the CPU column was the whole run's max RSS)."]
    return "\n".join(lines)


def task_cells(cell: dict | None) -> tuple[str, str]:
    """(success, setting) cells of one rung of the task-success column: "k/N" or "-" and why not."""
    if cell is None:
        return "-", "not measured"
    if "reason" in cell:
        return "-", cell["reason"]
    return f"{cell['successes']}/{cell['episodes']}", cell["setting"] + (
        f", {cell['sampler']} sampler" if cell.get("sampler", "static") != "static" else "")


def _step_axes(preset: str):
    """variant name -> (video_exec_step, action steps) on `preset` (the ladder's step axes)."""
    variants = {v.name: v for v in all_variants()}
    cfg = POLICY_PRESETS.get(preset)

    def axes(name: str) -> tuple:
        if cfg is None or name not in variants:
            return ("-", "-")
        return variants[name].step_axes(cfg)

    return axes


def pareto_png(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks, _ = _rows(data)
    base = chunks.get("a_reference", next(iter(chunks.values())))["median_s"]
    axes = _step_axes(next(iter(chunks.values()))["preset"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, c) in enumerate(chunks.items()):
        x = c["median_s"] / base
        y = max(c["action_rms"], 1e-7)  # the reference itself (0) sits on the floor
        exec_step, _ = axes(name)
        # Marker = the step axes: circles full steps, triangles fewer video / action forwards.
        ax.scatter(x, y, marker="o" if name[0] not in "hi" else "^",
                   label=None if exec_step in (-1, "-") else f"video_exec_step {exec_step}")
        # Close points (the 8-bit rungs) get staggered labels.
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4 + 9 * (i % 4) - 13), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("chunk latency (fraction of reference)")
    ax.set_ylabel("action RMS vs bf16 reference (normalized)")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_title(f"{next(iter(chunks.values()))['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    text = render(data)
    (args.json.parent / "ladder.md").write_text(text + "\n")
    pareto_png(data, args.json.parent / "pareto.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
