"""The static sampler at a cache-dominated shape on the CPU: compiled vs eager, peak memory and time per chunk.

    python -m bench.cache_inplace --json run.json                          # one run: an eager and a compiled process
    python -m bench.cache_inplace --json after.json --before before.json \\
        --out bench/results/cpu/cache_inplace.md                           # the table, with an earlier run beside it

The model is the tiny one made wider and deeper (8 blocks, 4 heads x 48) with an attention window of 400
chunks' worth of tokens, so its KV cache (~113 MiB in fp32) is ~8x its weights and a forward's own
activations are small: whatever copies a whole cache buffer shows up in both peak memory and time.

Each sampler runs in a fresh process with glibc's mmap threshold fixed at 64 KiB (large blocks go back to
the system when freed, so RSS follows the allocations). Peak memory = the bytes of the persistent tensors
(weights, KV cache, prompt K/V, the sampler's fixed inputs) + the largest rise of RSS above its value at the
start of a warm chunk (VmHWM reset there). The compiled process's code and compiler state are part of its
resting RSS, so they do not count against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config
from lingbot_edge.core.sampler import StaticSampler
from lingbot_edge.io.checkpoint import build_model
from lingbot_edge.io.files import write_text

MODEL = dataclasses.replace(MODEL_PRESETS["tiny"], num_attention_heads=4, attention_head_dim=48, ffn_dim=256,
                            num_layers=8)
ATTN_WINDOW = 400  # cache slots = (window / 2) x 24 tokens per chunk = 4800 per row
WARMUP_CHUNKS, TIMED_CHUNKS = 2, 3


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}: this measurement needs Linux")


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def measure(compiled: bool) -> dict:
    """In this process: build, warm up, then time chunks (each followed by its feedback)."""
    torch.set_num_threads(1)
    cfg = get_policy_config("tiny").replace(attn_window=ATTN_WINDOW)
    model = build_model(MODEL, dtype=torch.float32, device="cpu", seed=0)
    sampler = StaticSampler(model, cfg, compile=compiled, compile_mode=None)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, cfg.max_sequence_length, MODEL.text_dim, generator=g)
    sampler.reset(text, torch.randn(text.shape, generator=g))
    first = torch.randn(*sampler.latent_shape[:2], 1, *sampler.latent_shape[3:], generator=g)
    persistent = _tensor_bytes([*model.parameters(), *model.buffers(), *sampler.cache.buffers(),
                                *(t for kv in sampler.text_kv for t in kv), *sampler.pin_values.values()])
    times, cpu_times, rises = [], [], []
    start = time.perf_counter()
    for i in range(WARMUP_CHUNKS + TIMED_CHUNKS):
        noise_video, noise_action = torch.randn(sampler.latent_shape, generator=g), torch.randn(
            sampler.action_shape, generator=g)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        rss = _status_bytes("VmRSS")
        t0, c0 = time.perf_counter(), time.process_time()
        out = sampler.sample_chunk(noise_video, noise_action, first if i == 0 else None)
        sampler.feedback(out.latents, out.actions)
        if i >= WARMUP_CHUNKS:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            rises.append(_status_bytes("VmHWM") - rss)
        if i == WARMUP_CHUNKS - 1:
            warmup_s = time.perf_counter() - start
    return {"sampler": "compiled" if compiled else "eager", "chunk_ms": statistics.median(times) * 1e3,
            "chunk_ms_all": [t * 1e3 for t in times], "chunk_cpu_ms": statistics.median(cpu_times) * 1e3,
            "persistent_bytes": persistent,
            "transient_peak_bytes": max(rises), "peak_bytes": persistent + max(rises), "warmup_s": warmup_s,
            "cache_bytes": _tensor_bytes(sampler.cache.buffers()), "cache_capacity": cfg.cache_capacity}


def run(label: str) -> dict:
    """Both samplers, each in a fresh interpreter."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    rows = []
    for mode in ("eager", "compiled"):
        proc = subprocess.run([sys.executable, "-m", "bench.cache_inplace", "--child", mode], env=env,
                              capture_output=True, text=True, cwd=Path(__file__).parents[1])
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"label": label, "torch": torch.__version__, "cpu": _cpu_model(), "rows": rows}


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def render(runs: list[dict]) -> str:
    mib = 2**20
    head = runs[-1]
    cache = head["rows"][0]
    lines = [
        "# Compiled vs eager static sampler at a cache-dominated shape (CPU)",
        "",
        f"CPU {head['cpu']}, 1 thread, torch {head['torch']}, fp32. `python -m bench.cache_inplace` "
        f"(bench/cache_inplace.py): tiny model widened to 8 blocks x 4 heads x 48, attention window "
        f"{ATTN_WINDOW}: {cache['cache_capacity']} cache slots per row, KV cache {cache['cache_bytes'] / mib:.0f} "
        f"MiB. Median of {TIMED_CHUNKS} chunks (each with its feedback) after {WARMUP_CHUNKS} warm-up chunks. "
        "Peak = persistent tensors + the largest RSS rise during a warm chunk (each sampler in its own process). "
        "CPU ms = the process's CPU time per chunk (one intra-op thread): on a shared machine it follows the work "
        "done, where wall time also counts the other jobs' share of the cores.",
        "",
        "| cache write | sampler | chunk ms (wall) | chunk ms (CPU) | persistent MiB | transient peak MiB | peak MiB "
        "| peak / eager peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        eager = next(row for row in r["rows"] if row["sampler"] == "eager")
        for row in r["rows"]:
            lines.append(f"| {r['label']} | {row['sampler']} | {row['chunk_ms']:.0f} | {row['chunk_cpu_ms']:.0f} | "
                         f"{row['persistent_bytes'] / mib:.0f} | {row['transient_peak_bytes'] / mib:.1f} | "
                         f"{row['peak_bytes'] / mib:.0f} | {row['peak_bytes'] / eager['peak_bytes']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=("eager", "compiled"), help=argparse.SUPPRESS)
    parser.add_argument("--label", default="after", help="what this run measures (a row label)")
    parser.add_argument("--json", type=Path, help="write this run's numbers here")
    parser.add_argument("--before", type=Path, help="an earlier run's JSON, shown above this one")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child == "compiled")))
        return 0
    result = run(args.label)
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
    runs = ([json.loads(args.before.read_text())] if args.before else []) + [result]
    table = render(runs)
    if args.out:
        write_text(args.out, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
