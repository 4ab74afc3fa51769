"""One prepared GPU run that checks itself and brings its results home, row by row.

    bench/gpu_run.sh --out "$OUT"        # on the GPU machine (default --out: $OUT when set)
    bench/gpu_run.sh --out /tmp/x        # the same on a CPU: the rehearsal (libero rows skipped by the budget)
    bench/gpu_run.sh --eager --budget-s 120 --out DIR   # nothing compiled, libero skipped: seconds (tests/bench/)

Needs only what a bare machine has: Python 3.12, torch, numpy, safetensors and this repository (nothing from
quantize/, calib/ or their libraries: the 8-bit rows quantize random weights with the runtime's own
per-channel math).

1. Smoke pass, `tiny` preset, every scheme: compile (+ CUDA-graph capture on CUDA), two chunks, actions
   compared with the eager reference sampler on the same quantized model. Seconds per scheme on a GPU.
2. `libero` (full size, random weights): reference -> CUDA graphs bf16 -> int8 W8A8 -> fp8 W8A8 -> the rest.
   A row starts only if its estimated time (model build + compile + chunks, from the datasheet roofline or
   what the rows before it measured) fits what is left of `--budget-s`; otherwise it is listed as skipped,
   with the estimate.

Per row: compile seconds (the sampler's warm-up: compile, capture, one episode), CUDA-graph recordings
(cudagraph trees' `record_function`; the plan: one per graph, `StaticSampler.graph_keys`, 3) and
`cudagraph_skips`, graphs compiled after warm-up, per-chunk p50 / p90 ms, peak `max_memory_allocated`,
roofline fraction (bench.plan, datasheet peaks), action error vs the reference on the same seeds.

Everything lands in --out as it happens: `gpu_run.log` (the log), `rows/NN-<phase>-<preset>-<variant>.json`
(one per finished row), `gpu_run.json` + `gpu_run.md` (rewritten after every row, and on SIGINT / SIGTERM:
gpu_run.sh's timeout sends SIGINT, the run records what it was doing as interrupted and exits 130).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import logging
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench.ladder import measure_cpu_peaks, sync
from bench.plan import GPUS, Gpu, chunk_roofline_s
from lingbot_edge.core.config import MODEL_PRESETS, PolicyConfig, get_policy_config
from lingbot_edge.core.qlinear import QuantFormat, QuantizedLinear, check_device_support, quantize_per_row
from lingbot_edge.core.sampler import CUDA_GRAPHS_MODE, ReferenceSampler, StaticSampler
from lingbot_edge.io.checkpoint import build_meta_model, build_model
from lingbot_edge.io.files import write_text

log = logging.getLogger("bench.gpu_run")
RESULTS = Path(__file__).parent / "results"
FORMATS = {
    "bf16": None,
    "int8_weight_only": QuantFormat("int8", "none"),
    "int8_w8a8": QuantFormat("int8", "dynamic"),
    "fp8_weight_only": QuantFormat("float8_e4m3fn", "none"),
    "fp8_w8a8": QuantFormat("float8_e4m3fn", "dynamic"),
}
SMOKE_MAX_ACTION_RMS = 2e-2  # compiled vs eager on the same bf16 model (bench/test_ladder.py's accuracy bound)
# Estimates before anything was measured (each row's own measurements replace them for the rows after it).
CHUNK_OVER_ROOFLINE = 3.0  # a chunk takes this many times its roofline
COMPILE_S_PER_LAYER_GRAPH = 2.0  # ~3 min for the 3 graphs of the 30-layer model on an H100 (an estimate)
BUILD_BYTES_PER_S = {"cuda": 2e9, "cpu": 2e8}  # random weights drawn on the device, then quantized


@dataclass(frozen=True)
class RunVariant:
    name: str
    sampler: str  # reference | cudagraphs | compiled (inductor, no CUDA graphs) | eager (static, not compiled)
    scheme: str = "bf16"
    video_exec_step: int = -1
    action_steps: int | None = None  # None: the preset's
    loop: str = "sync"  # sync: chunk then feedback; grounded: the real-time lookahead's job per chunk


def smoke_variants(graphs: str) -> list[RunVariant]:
    return [RunVariant(f"smoke_{scheme}", graphs, scheme) for scheme in FORMATS]


def main_variants(graphs: str) -> list[RunVariant]:
    """Priority order: what the budget leaves out is the tail."""
    return [
        RunVariant("reference_eager_bf16", "reference"),
        RunVariant("cudagraphs_bf16", graphs),
        RunVariant("cudagraphs_int8_w8a8", graphs, "int8_w8a8"),
        RunVariant("cudagraphs_fp8_w8a8", graphs, "fp8_w8a8"),
        RunVariant("cudagraphs_int8_weight_only", graphs, "int8_weight_only"),
        RunVariant("cudagraphs_fp8_weight_only", graphs, "fp8_weight_only"),
        # The real-time loop's job per chunk: feedback, grounding of the executing chunk, the next action pass.
        RunVariant("cudagraphs_fp8_w8a8_exec2_action10_grounded", graphs, "fp8_w8a8", 2, 10, loop="grounded"),
        RunVariant("cudagraphs_int8_w8a8_exec2_action10", graphs, "int8_w8a8", 2, 10),
        RunVariant("cudagraphs_bf16_exec5_action10", graphs, "bf16", 5, 10),
        RunVariant("compiled_bf16_no_cudagraphs", "eager" if graphs == "eager" else "compiled"),
    ]


def quantize_in_place(model: nn.Module, fmt: QuantFormat) -> nn.Module:
    """The block Linears (attn1, attn2, ffn) as QuantizedLinear: absmax per output channel
    (int8: / 127, fp8 e4m3: / 448), the runtime's own math; the rest stays in the model's dtype."""
    for block in model.blocks:
        for name, mod in list(block.named_modules()):
            if isinstance(mod, nn.Linear) and name.startswith(("attn", "ffn")):
                qdata, scale = quantize_per_row(mod.weight, fmt.weight_dtype, int8_range=127.0)
                block.set_submodule(name, QuantizedLinear.from_components(qdata, scale.view(-1), mod.bias, fmt,
                                                                          mod.weight.dtype))
    return model


def variant_config(preset: str, v: RunVariant) -> PolicyConfig:
    cfg = get_policy_config(preset)
    return cfg.replace(video_exec_step=min(v.video_exec_step, cfg.num_inference_steps),
                       action_num_inference_steps=min(v.action_steps or cfg.action_num_inference_steps,
                                                      cfg.action_num_inference_steps))


def _episode(cfg: PolicyConfig, chunks: int, seed: int = 0) -> dict:
    mc = cfg.model_config
    g = torch.Generator().manual_seed(seed)
    latent = (1, mc.in_channels, cfg.frame_chunk_size, *cfg.latent_hw)
    action = (1, mc.action_dim, cfg.frame_chunk_size, cfg.action_per_frame, 1)
    text = torch.randn(1, cfg.max_sequence_length, mc.text_dim, generator=g)
    return {"text": text, "neg": torch.randn(text.shape, generator=g),
            "first": torch.randn(*latent[:2], 1, *latent[3:], generator=g),
            "chunks": [{"noise_video": torch.randn(latent, generator=g),
                        "noise_action": torch.randn(action, generator=g),
                        "observed": torch.randn(latent, generator=g)} for _ in range(chunks)]}


@dataclass
class Measured:
    times_s: list[float] = field(default_factory=list)
    actions: list[torch.Tensor] = field(default_factory=list)


def run_episode(sampler, episode: dict, chunks: int, device: torch.device, loop: str = "sync") -> Measured:
    """Per chunk, timed with a sync. sync: the chunk, then its feedback (the executed actions = the predicted
    ones). grounded: what the real-time loop's worker runs while a chunk executes: the previous chunk's
    feedback, the grounding of the executing chunk, the next chunk's action pass (chunk 0 and the first
    action pass ahead at the first step)."""
    m = Measured()
    sampler.reset(episode["text"], episode["neg"])
    steps = episode["chunks"][:chunks]
    shift = sampler.cfg.frame_chunk_size
    executing = None
    for i, s in enumerate(steps):
        sync(device)
        start = time.perf_counter()
        nxt = steps[(i + 1) % len(steps)]["noise_action"]
        if loop == "sync":
            actions = sampler.sample_chunk(s["noise_video"], s["noise_action"],
                                           episode["first"] if i == 0 else None).actions
            sampler.feedback(s["observed"], actions)
        elif i == 0:
            actions = sampler.sample_chunk(s["noise_video"], s["noise_action"], episode["first"]).actions
            executing = sampler.sample_actions(nxt, frame_shift=shift)
        else:
            sampler.feedback(steps[i - 1]["observed"], actions)
            seen = s["observed"][:, :, :1] if shift > 1 else None  # a late request: the first latent frame seen
            sampler.ground(s["noise_video"], executing, seen)
            actions, executing = executing, sampler.sample_actions(nxt, frame_shift=shift)
        sync(device)
        m.times_s.append(time.perf_counter() - start)
        m.actions.append(actions.float().cpu())
    return m


def action_error(actions: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    n = min(len(actions), len(reference))
    if n == 0:
        return {}
    a, ref = torch.cat([x.flatten() for x in actions[:n]]), torch.cat([x.flatten() for x in reference[:n]])
    return {"action_rms": float((a - ref).pow(2).mean().sqrt()),
            "action_cos": float(nn.functional.cosine_similarity(a, ref, dim=0)), "chunks_compared": n}


@contextlib.contextmanager
def counting_cudagraph_recordings():
    """Counts CUDA-graph recordings (cudagraph trees' `record_function`) while active: yields a one-item list.
    The plan is one per compiled graph (`StaticSampler.graph_keys`); more means a static input moved."""
    from torch._inductor import cudagraph_trees

    count = [0]
    original = cudagraph_trees.CUDAGraphTreeManager.record_function

    def record_function(manager, *args, **kwargs):
        count[0] += 1
        return original(manager, *args, **kwargs)

    cudagraph_trees.CUDAGraphTreeManager.record_function = record_function
    try:
        yield count
    finally:
        cudagraph_trees.CUDAGraphTreeManager.record_function = original


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def device_spec(device: torch.device) -> Gpu:
    """The datasheet peaks of this GPU (bench.plan), or this CPU's measured ones (int8 at the bf16 rate)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().replace(" ", "")
        key = next((k for k in GPUS if k.replace("rtx", "") in name), None)
        if key is not None:
            return GPUS[key]
        log.warning("no datasheet peaks for %s: the H100's stand in for the estimates", name)
        return GPUS["h100"]
    peaks = measure_cpu_peaks(0.3)
    return Gpu("CPU (measured)", peaks["bandwidth"], peaks["bf16"], peaks["bf16"], None, 0, "measured in this run")


def roofline_s(cfg: PolicyConfig, spec: Gpu, scheme: str) -> float | None:
    if scheme == "fp8_w8a8" and spec.fp8 is None:
        return None
    return chunk_roofline_s(cfg, spec, scheme)


class Budget:
    """What is left of the run's time, and each row's estimated time from the measurements so far."""

    def __init__(self, seconds: float, spec: Gpu, device: torch.device, start: float):
        self.seconds, self.spec, self.device, self.start = seconds, spec, device, start
        # Per model (tiny, full): the last measured compile (warm-up) seconds and chunk time / roofline. A tiny
        # model is launch-bound, far from its roofline: its ratio says nothing about the full model's.
        self.compile_s: dict[str, float] = {}
        self.chunk_over_roofline: dict[str, float] = {}
        self.build_bytes_per_s: dict[str, float] = {}

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def estimate(self, cfg: PolicyConfig, v: RunVariant, chunks: int) -> tuple[float, str]:
        weight_bytes = 2 * _param_count(cfg.model)
        build = weight_bytes / self.build_bytes_per_s.get(cfg.model, BUILD_BYTES_PER_S[self.device.type])
        roofline = roofline_s(cfg, self.spec, v.scheme) or roofline_s(cfg, self.spec, "bf16")
        ratio = self.chunk_over_roofline.get(cfg.model, CHUNK_OVER_ROOFLINE)
        chunk = roofline * ratio * (3 if v.sampler == "reference" else 1)  # the reference: eager, dynamic cache
        compile_s = 0.0
        if v.sampler in ("cudagraphs", "compiled"):
            graphs = 3
            layers = cfg.model_config.num_layers
            compile_s = self.compile_s.get(cfg.model) or COMPILE_S_PER_LAYER_GRAPH * layers * graphs
            compile_s += chunk  # the warm-up episode runs a chunk
        total = build + compile_s + chunks * chunk
        return total, (f"build {build:.0f} s + compile {compile_s:.0f} s + {chunks} chunks x {chunk:.1f} s "
                       f"({ratio:.1f}x the roofline{', x3 eager reference' if v.sampler == 'reference' else ''})")

    def learn(self, cfg: PolicyConfig, v: RunVariant, row: dict) -> None:
        if row.get("compile_s") is not None and v.sampler in ("cudagraphs", "compiled"):
            self.compile_s[cfg.model] = row["compile_s"]
        roofline = roofline_s(cfg, self.spec, v.scheme)
        if roofline and v.sampler != "reference":
            self.chunk_over_roofline[cfg.model] = row["p50_ms"] / 1e3 / roofline
        if row.get("build_s"):
            self.build_bytes_per_s[cfg.model] = 2 * _param_count(cfg.model) / row["build_s"]


@functools.cache
def _param_count(model_name: str) -> int:
    return sum(p.numel() for p in build_meta_model(MODEL_PRESETS[model_name]).parameters())


def measure(preset: str, v: RunVariant, device: torch.device, dtype: torch.dtype, episode: dict, chunks: int,
            reference: list[torch.Tensor] | None, spec: Gpu) -> tuple[dict, list[torch.Tensor]]:
    """Build the variant's model (same seed, so the same random weights every time), warm it up, run it."""
    cfg = variant_config(preset, v)
    fmt = FORMATS[v.scheme]
    if fmt is not None:
        check_device_support(fmt, device, v.scheme)
    t0 = time.perf_counter()
    model = build_model(MODEL_PRESETS[cfg.model], dtype=dtype, device=device, seed=0)
    if fmt is not None:
        quantize_in_place(model, fmt)
    sync(device)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if v.sampler == "reference":
        sampler = ReferenceSampler(model, cfg)
    else:
        mode = CUDA_GRAPHS_MODE if v.sampler == "cudagraphs" else None
        sampler = StaticSampler(model, cfg, compile=v.sampler in ("cudagraphs", "compiled"), compile_mode=mode)
    before = _counters()
    with counting_cudagraph_recordings() as recordings:
        compile_s = None
        if v.sampler in ("cudagraphs", "compiled"):
            t0 = time.perf_counter()
            sampler.warm_up()
            sync(device)
            compile_s = time.perf_counter() - t0
        warm = _counters()
        m = run_episode(sampler, episode, chunks, device, v.loop)
    after = _counters()
    timed = m.times_s[1:] if v.sampler in ("reference", "eager") and len(m.times_s) > 1 else m.times_s
    p50 = statistics.median(timed)
    graphs = sorted(sampler.graph_keys()) if isinstance(sampler, StaticSampler) else []
    row = {
        "preset": preset, "variant": v.name, "sampler": v.sampler, "scheme": v.scheme, "loop": v.loop,
        "video_steps": cfg.num_inference_steps, "video_exec_step": cfg.video_exec_step,
        "action_steps": cfg.action_num_inference_steps, "chunks": chunks, "timed_chunks": len(timed),
        "build_s": build_s, "compile_s": compile_s,
        "p50_ms": p50 * 1e3, "p90_ms": _quantile(timed, 0.9) * 1e3, "first_chunk_ms": m.times_s[0] * 1e3,
        "graphs": after["graphs"] - before["graphs"], "recompiles_after_warmup": after["graphs"] - warm["graphs"],
        "cudagraph_recordings": recordings[0], "cudagraph_skips": after["cudagraph_skips"] - before["cudagraph_skips"],
        "expected_recordings": len(graphs) if v.sampler == "cudagraphs" and device.type == "cuda" else 0,
    }
    roofline = roofline_s(cfg, spec, v.scheme) if cfg.model == "full" else None
    row["roofline_ms"] = roofline * 1e3 if roofline else None
    row["roofline_fraction"] = roofline / p50 if roofline else None
    if device.type == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        row["device_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
    # Another loop gives another episode: its actions are not compared with the synchronous reference.
    row.update(action_error(m.actions, reference) if reference is not None and v.loop == "sync" else {})
    return row, m.actions


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def third_party_modules() -> list[str]:
    """Top-level non-stdlib packages loaded so far: what the bare machine must provide (torch and its
    own dependencies, numpy, safetensors) plus this repository's packages."""
    names = set()
    for name, module in list(sys.modules.items()):
        top = name.split(".")[0]
        path = str(getattr(module, "__file__", None) or "")
        installed = "site-packages" in path or "dist-packages" in path  # not inductor's generated modules
        if top not in sys.stdlib_module_names and not top.startswith("_") and (installed or top in ("bench",
                                                                                                     "lingbot_edge")):
            names.add(top)
    return sorted(names)


def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", device_total_bytes=props.total_memory)
    else:
        env.update(gpu=f"CPU {platform.machine()} x{torch.get_num_threads()} threads")
    return env


class Results:
    """The run's folder, kept current: every finished row as its own JSON, the whole run as gpu_run.json /
    gpu_run.md (rewritten after each row and at the end, interrupted or not). Writes are atomic."""

    def __init__(self, out: Path, env: dict, budget_s: float, start: float):
        self.out, self.env, self.start = out, env, start
        self.run = {"environment": env, "budget_s": budget_s, "status": "running", "rows": [], "skipped": []}
        (out / "rows").mkdir(parents=True, exist_ok=True)

    def add(self, phase: str, row: dict) -> None:
        row = {"phase": phase, **row}
        self.run["rows"].append(row)
        name = f"{len(self.run['rows']):02d}-{phase}-{row['preset']}-{row['variant']}.json"
        write_text(self.out / "rows" / name, json.dumps(row, indent=1))
        self.write()

    def skip(self, phase: str, preset: str, variant: str, reason: str) -> None:
        log.info("skipped %s/%s: %s", preset, variant, reason)
        self.run["skipped"].append({"phase": phase, "preset": preset, "variant": variant, "reason": reason})
        self.write()

    def write(self) -> None:
        self.run["elapsed_s"] = time.perf_counter() - self.start
        data = {**self.run, "environment": self.env}
        write_text(self.out / "gpu_run.json", json.dumps(data, indent=1))
        write_text(self.out / "gpu_run.md", render(data) + "\n")


def render(data: dict) -> str:
    env = data["environment"]
    lines = [f"# GPU run: {env.get('gpu')}", "",
             f"{env['date']}, Python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}"
             + (f", capability {env['capability']}, {env['device_total_bytes'] / 2**30:.1f} GiB" if "capability" in env
                else "") + f". Status: {data['status']} after {data.get('elapsed_s', 0):.0f} s "
             f"(budget {data['budget_s']:.0f} s).", "",
             "Random-weight models; per-chunk times include the 2 history writes. Compile = the sampler's "
             "warm-up (compile, CUDA-graph capture, one episode). Recordings: CUDA graphs recorded (expected: "
             "one per graph).", "",
             "| phase | preset | variant | scheme | exec / action steps | compile s | recordings (exp.) | skips "
             "| recompiles | p50 ms | p90 ms | roofline frac | peak alloc GiB | action RMS vs ref |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for r in data["rows"]:
        peak = r.get("peak_allocated_bytes")
        lines.append(f"| {r['phase']} | {r['preset']} | {r['variant']} | {r['scheme']} "
                     f"| {r['video_exec_step']} / {r['action_steps']} | {fmt(r['compile_s'], '.1f')} "
                     f"| {r['cudagraph_recordings']} ({r['expected_recordings']}) | {r['cudagraph_skips']} "
                     f"| {r['recompiles_after_warmup']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} "
                     f"| {fmt(r['roofline_fraction'], '.2f')} | {fmt(peak / 2**30 if peak else None, '.2f')} "
                     f"| {fmt(r.get('action_rms'), '.2e')} |")
    lines += [f"- skipped {s['preset']}/{s['variant']}: {s['reason']}" for s in data["skipped"]]
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run_phase(phase: str, preset: str, variants: list[RunVariant], results: Results, budget: Budget,
               device: torch.device, dtype: torch.dtype, chunks: int) -> None:
    episode = _episode(get_policy_config(preset), chunks)
    reference = None
    for v in variants:
        cfg = variant_config(preset, v)
        needed, how = budget.estimate(cfg, v, chunks)
        if needed > budget.left():
            results.skip(phase, preset, v.name, f"estimated {needed:.0f} s ({how}) > {budget.left():.0f} s left")
            continue
        log.info("%s/%s: starting (estimated %.0f s: %s)", preset, v.name, needed, how)
        results.run["current"] = f"{phase}/{preset}/{v.name}"
        try:
            if phase == "smoke" and v.sampler != "reference":  # the eager reference on this scheme's model
                ref_variant = dataclasses.replace(v, name=f"{v.name}_reference", sampler="reference")
                _, reference = measure(preset, ref_variant, device, dtype, episode, chunks, None, budget.spec)
            row, actions = measure(preset, v, device, dtype, episode, chunks, reference, budget.spec)
        except (RuntimeError, ValueError) as e:  # an unsupported format on this device, an OOM: record it
            log.exception("%s/%s failed", preset, v.name)
            results.skip(phase, preset, v.name, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        finally:
            # Drop the variant's graphs and CUDA-graph pools: their guards can keep the variant's model alive,
            # which would inflate the next variant's max_memory_allocated (and run out of memory).
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if phase == "smoke":
            row["ok"] = row["action_rms"] <= SMOKE_MAX_ACTION_RMS and (
                row["cudagraph_recordings"] == row["expected_recordings"]) and row["recompiles_after_warmup"] == 0
        elif reference is None and v.sampler == "reference":
            reference = actions
        budget.learn(cfg, v, row)
        results.add(phase, row)
        log.info("%s/%s: compile %s s, p50 %.1f ms, p90 %.1f ms, recordings %d (expected %d), skips %d", preset,
                 v.name, "-" if row["compile_s"] is None else f"{row['compile_s']:.1f}", row["p50_ms"],
                 row["p90_ms"], row["cudagraph_recordings"], row["expected_recordings"], row["cudagraph_skips"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT") or None,
                        help="results folder (default: $OUT when set, else bench/results/<device>/)")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="start a row only if its estimated time fits what is left of this (default 470: a "
                             "600 s device call less start-up and margin)")
    parser.add_argument("--chunks", type=int, default=None, help="chunks per row (default 6 on CUDA, 2 on a CPU)")
    parser.add_argument("--preset", nargs="+", default=["libero"], help="presets of the main rows (default libero)")
    parser.add_argument("--eager", action="store_true",
                        help="compile nothing (every static row eager): the bookkeeping alone, in seconds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # a shared CPU: one intra-op thread (as tests/conftest.py) avoids spin-waits
        torch.set_num_threads(1)
    env = environment(device)
    out = args.out or RESULTS / ("cpu-rehearsal" if device.type == "cpu" else
                                 env["gpu"].lower().replace("nvidia", "").strip().replace(" ", "-"))
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "gpu_run.log")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr), handler])
    signal.signal(signal.SIGTERM, _interrupt)  # SIGINT already raises KeyboardInterrupt
    results = Results(out, env, args.budget_s, start)
    log.info("%s, torch %s, results in %s", env["gpu"], torch.__version__, out)
    chunks = args.chunks or (6 if device.type == "cuda" else 2)
    graphs = "eager" if args.eager else ("cudagraphs" if device.type == "cuda" else "compiled")
    dtype = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    status = 0
    try:
        budget = Budget(args.budget_s, device_spec(device), device, start)
        _run_phase("smoke", "tiny", smoke_variants(graphs), results, budget, device, dtype, 2)
        for preset in args.preset:
            _run_phase("main", preset, main_variants(graphs), results, budget, device, dtype, chunks)
        results.run["status"] = "done"
    except KeyboardInterrupt as e:
        results.run["status"] = f"interrupted ({str(e) or 'SIGINT'}) during {results.run.get('current')}"
        log.warning("interrupted during %s: the finished rows are in %s", results.run.get("current"), out)
        status = 130
    finally:
        results.run.pop("current", None)
        env["third_party_modules"] = third_party_modules()
        results.write()
    print(render(json.loads((out / "gpu_run.json").read_text())))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
