"""One prepared GPU run: the full-size random-weight model, chunk by chunk, every way it can run.

    bench/gpu_run.sh            # H100 / H200 (or any CUDA GPU): libero + so100, writes bench/results/<gpu>/
    bench/gpu_run.sh --tiny     # CPU rehearsal of the same code path on the tiny preset (a default test)

Needs only what a bare machine has: Python 3.12, torch, numpy, safetensors (nothing from quantize/,
calib/ or their libraries: the 8-bit variants quantize the random weights here with the runtime's
own per-channel math). Variants, in priority order (a time budget skips the rest, recorded as
skipped): eager reference sampler (upstream-style dynamic cache) vs static compiled vs CUDA graphs,
bf16 vs int8 vs fp8, full steps vs `video_exec_step` / fewer action steps. Per variant: per-chunk
p50/p99 ms (warm-up chunks excluded), fraction of the roofline (bench.plan, datasheet peaks),
peak `max_memory_allocated` and device total, recompiles after warm-up, CUDA-graph skips, and the
action error vs the bf16 reference on the same seeds. Results are rewritten after every variant.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bench.ladder import sync
from lingbot_edge.core.config import MODEL_PRESETS, PolicyConfig, get_policy_config
from lingbot_edge.core.qlinear import QuantFormat, QuantizedLinear, check_device_support, quantize_per_row
from lingbot_edge.core.sampler import CUDA_GRAPHS_MODE, ReferenceSampler, StaticSampler
from lingbot_edge.io.checkpoint import build_model
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


@dataclass(frozen=True)
class RunVariant:
    name: str
    sampler: str  # reference | compiled | cudagraphs | eager (static, not compiled)
    scheme: str = "bf16"
    video_exec_step: int = -1
    action_steps: int | None = None  # None: the preset's
    chunks: int | None = None  # None: the run's default
    loop: str = "sync"  # sync: chunk then feedback; grounded: the real-time lookahead's job per chunk


def variants(tiny: bool) -> list[RunVariant]:
    """Priority order: the time budget drops the tail. The CPU rehearsal (--tiny) runs every
    variant but one eagerly, under the same names (compiling every scheme's graphs would take
    minutes on 2 cores); the GPU run compiles them all."""
    graphs = "eager" if tiny else "cudagraphs"
    return [
        RunVariant("reference_eager_bf16", "reference", chunks=3),
        # The rehearsal compiles once, the CUDA-graphs variant (its bookkeeping runs on CPU too;
        # inductor skips the graphs there): a cold compile costs minutes on a busy 2-core box.
        RunVariant("static_compiled_bf16", "eager" if tiny else "compiled"),
        RunVariant("static_cudagraphs_bf16", "cudagraphs", chunks=3),
        RunVariant("cudagraphs_int8_weight_only", graphs, "int8_weight_only"),
        # The real-time loop's job per chunk: feedback, grounding of the executing chunk, the next action pass.
        RunVariant("cudagraphs_int8_weight_only_exec2_action10_grounded", graphs, "int8_weight_only", 2, 10,
                   loop="grounded"),
        RunVariant("cudagraphs_int8_weight_only_exec5_action10", graphs, "int8_weight_only", 5, 10),
        RunVariant("cudagraphs_fp8_w8a8", graphs, "fp8_w8a8"),
        RunVariant("cudagraphs_fp8_w8a8_exec2_action10", graphs, "fp8_w8a8", 2, 10),
        RunVariant("cudagraphs_int8_w8a8", graphs, "int8_w8a8"),
        RunVariant("cudagraphs_bf16_exec5_action10", graphs, "bf16", 5, 10),
        RunVariant("cudagraphs_fp8_weight_only", graphs, "fp8_weight_only"),
        RunVariant("cudagraphs_int8_weight_only_exec2_action10", graphs, "int8_weight_only", 2, 10),
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
    graphs_after_warmup: int | None = None
    graphs_end: int | None = None


def run_variant(sampler, episode: dict, chunks: int, warmup: int, device: torch.device,
                loop: str = "sync") -> Measured:
    """Per chunk, timed with a sync. sync: the chunk, then its feedback (the executed actions = the predicted
    ones). grounded: what the real-time loop's worker runs while a chunk executes: the previous chunk's
    feedback, the grounding of the executing chunk, the next chunk's action pass (chunk 0 and the first
    action pass ahead at the first step). Counts the graphs dynamo compiles after the warm-up chunks."""
    from torch._dynamo.utils import counters

    m = Measured()
    sampler.reset(episode["text"], episode["neg"])
    steps = episode["chunks"][:chunks]
    shift = sampler.cfg.frame_chunk_size
    executing = None
    for i, s in enumerate(steps):
        if i == warmup:
            m.graphs_after_warmup = counters["stats"]["unique_graphs"]
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
    m.graphs_end = counters["stats"]["unique_graphs"]
    return m


def _error(actions: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    n = min(len(actions), len(reference))
    if n == 0:
        return {}
    a, ref = torch.cat([x.flatten() for x in actions[:n]]), torch.cat([x.flatten() for x in reference[:n]])
    return {"action_rms": float((a - ref).pow(2).mean().sqrt()),
            "action_cos": float(nn.functional.cosine_similarity(a, ref, dim=0)), "chunks_compared": n}


def _roofline_s(cfg: PolicyConfig, device: torch.device, scheme: str) -> float | None:
    from bench.plan import GPUS, SCHEMES, chunk_roofline_s

    if device.type != "cuda" or cfg.model_config != MODEL_PRESETS["full"]:
        return None
    name = torch.cuda.get_device_name(device).lower().replace(" ", "")
    key = next((k for k in GPUS if k.replace("rtx", "") in name), None)
    return chunk_roofline_s(cfg, GPUS[key], scheme) if key and scheme in SCHEMES else None


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


def measure(preset: str, v: RunVariant, device: torch.device, dtype: torch.dtype, episode: dict,
            default_chunks: int, reference: list[torch.Tensor] | None) -> tuple[dict, list[torch.Tensor]]:
    """Build the variant's model (same seed, so the same random weights every time), run it, report."""
    from torch._dynamo.utils import counters

    cfg = get_policy_config(preset)
    cfg = cfg.replace(video_exec_step=min(v.video_exec_step, cfg.num_inference_steps),
                      action_num_inference_steps=min(v.action_steps or cfg.action_num_inference_steps,
                                                     cfg.action_num_inference_steps))
    fmt = FORMATS[v.scheme]
    if fmt is not None:
        check_device_support(fmt, device, v.scheme)
    model = build_model(MODEL_PRESETS[cfg.model], dtype=dtype, device=device, seed=0)
    if fmt is not None:
        quantize_in_place(model, fmt)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if v.sampler == "reference":
        sampler = ReferenceSampler(model, cfg)
    else:
        mode = CUDA_GRAPHS_MODE if v.sampler == "cudagraphs" else None
        sampler = StaticSampler(model, cfg, compile=v.sampler != "eager", compile_mode=mode)
    chunks = min(v.chunks or default_chunks, len(episode["chunks"]))
    warmup = 1 if v.sampler in ("reference", "eager") else 2  # first chunk (pinning) + steady state compile
    graphs_before, skips_before = counters["stats"]["unique_graphs"], _cudagraph_skips(counters)
    with counting_cudagraph_recordings() as recordings:
        m = run_variant(sampler, episode, chunks, warmup, device, v.loop)
    timed = m.times_s[warmup:] or m.times_s
    p50 = statistics.median(timed)
    row = {
        "preset": preset, "variant": v.name, "sampler": v.sampler, "scheme": v.scheme, "loop": v.loop,
        "video_steps": cfg.num_inference_steps, "video_exec_step": cfg.video_exec_step,
        "action_steps": cfg.action_num_inference_steps, "chunks": chunks, "warmup_chunks": warmup,
        "p50_ms": p50 * 1e3, "p99_ms": _quantile(timed, 0.99) * 1e3, "first_chunk_ms": m.times_s[0] * 1e3,
        "graphs": m.graphs_end - graphs_before,
        "recompiles_after_warmup": None if m.graphs_after_warmup is None else m.graphs_end - m.graphs_after_warmup,
        "cudagraph_skips": _cudagraph_skips(counters) - skips_before,
        "cudagraph_recordings": recordings[0],
        "expected_recordings": len(sampler.graph_keys()) if v.sampler == "cudagraphs" and device.type == "cuda"
        else 0,
    }
    roofline = _roofline_s(cfg, device, v.scheme)
    row["roofline_ms"] = roofline * 1e3 if roofline else None
    row["roofline_fraction"] = roofline / p50 if roofline else None
    if device.type == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        row["device_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
    # Another loop gives another episode: its actions are not compared with the synchronous reference.
    row.update(_error(m.actions, reference) if reference is not None and v.loop == "sync" else {})
    return row, m.actions


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _cudagraph_skips(counters) -> int:
    return int(counters["inductor"].get("cudagraph_skips", 0))


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


def render(env: dict, rows: list[dict], skipped: list[str]) -> str:
    lines = [f"# GPU run: {env.get('gpu')}", "",
             f"{env['date']}, Python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}"
             + (f", capability {env['capability']}, {env['device_total_bytes'] / 2**30:.1f} GiB" if "capability" in env
                else ""),
             "", "Random-weight model; per-chunk times include the 2 history writes and exclude warm-up chunks.", "",
             "| preset | variant | scheme | video_exec_step | action steps | p50 ms | p99 ms | roofline frac "
             "| peak alloc GiB | graphs | recompiles | action RMS vs ref | action cos |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for r in rows:
        peak = r.get("peak_allocated_bytes")
        lines.append(f"| {r['preset']} | {r['variant']} | {r['scheme']} | {r['video_exec_step']} | {r['action_steps']} "
                     f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {fmt(r['roofline_fraction'], '.2f')} "
                     f"| {fmt(peak / 2**30 if peak else None, '.2f')} | {r['graphs']} "
                     f"| {fmt(r['recompiles_after_warmup'], 'd')} | {fmt(r.get('action_rms'), '.2e')} "
                     f"| {fmt(r.get('action_cos'), '.4f')} |")
    lines += [f"- skipped: {s}" for s in skipped]
    return "\n".join(lines)


def _write(out: Path, env: dict, rows: list[dict], skipped: list[str]) -> None:
    write_text(out / "gpu_run.json", json.dumps({"environment": env, "rows": rows, "skipped": skipped}, indent=1))
    write_text(out / "gpu_run.md", render(env, rows, skipped) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal on the tiny preset")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<gpu>/)")
    parser.add_argument("--chunks", type=int, help="chunks per variant (default 8 on GPU, 3 tiny)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip variants once this much time is spent")
    parser.add_argument("--preset", nargs="+", help="default: libero so100 (tiny with --tiny)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    start = time.perf_counter()
    if args.tiny:  # a shared 2-core CI box: one intra-op thread (as tests/conftest.py) avoids spin-waits
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        parser.error("no CUDA GPU: run with --tiny for the CPU rehearsal")
    presets = args.preset or (["tiny"] if args.tiny else ["libero", "so100"])
    chunks = args.chunks or (3 if args.tiny else 8)
    env = environment(device)
    slug = "cpu-tiny" if args.tiny else env["gpu"].lower().replace("nvidia", "").strip().replace(" ", "-")
    out = args.out or RESULTS / slug
    rows, skipped = [], []
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.float32 if args.tiny else torch.bfloat16  # tiny: fp32, so CPU kernels stay fast
    for preset in presets:
        episode = _episode(get_policy_config(preset), max(chunks, 3))
        reference = None
        for v in variants(args.tiny):
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                skipped.append(f"{preset}/{v.name} (time budget: {elapsed:.0f} s spent)")
                continue
            try:
                row, actions = measure(preset, v, device, dtype, episode, chunks, reference)
            except Exception as e:  # an unsupported format on this GPU, an OOM: record it, keep going
                log.exception("%s/%s failed", preset, v.name)
                skipped.append(f"{preset}/{v.name} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            finally:
                # Drop the variant's graphs and CUDA-graph pools: their guards can keep the variant's
                # model alive, which would inflate the next variant's max_memory_allocated (and, over
                # ten 5B-parameter variants, run out of memory). Inductor's on-disk cache keeps
                # recompiling an identical graph cheap.
                torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if reference is None and v.sampler == "reference":
                reference = actions
            row["elapsed_s"] = time.perf_counter() - start
            rows.append(row)
            log.info("%s/%s: p50 %.1f ms, p99 %.1f ms", preset, v.name, row["p50_ms"], row["p99_ms"])
            _write(out, env, rows, skipped)
    env["third_party_modules"] = third_party_modules()
    _write(out, env, rows, skipped)
    print(render(env, rows, skipped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
