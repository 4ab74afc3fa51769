"""The accuracy-vs-latency ladder: every sampler / precision variant on the same inputs.

A variant is a name plus a function building a sampler from a fresh model. `run_episode`
drives any sampler through the same fixed-seed episode (same noise, same observed latents, same
executed actions fed back), so outputs are comparable chunk by chunk; `forward_timers` gives the
per-forward callables pytest-benchmark times. Accuracy is measured against the bf16 reference.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lingbot_edge.core.actions import action_error
from lingbot_edge.core.config import MODEL_PRESETS, PolicyConfig, get_policy_config
from lingbot_edge.core.kv_cache import CacheMode
from lingbot_edge.core.sampler import ReferenceSampler, StaticSampler
from lingbot_edge.eval.sim import EVAL_STEPS, summarize
from lingbot_edge.eval.task_success import TASK_CHECKPOINT, TaskSetting, checkpoint_loader, measure, steps_cell
from lingbot_edge.io.checkpoint import build_meta_model, build_model
from quantize import SCHEMES, QuantPlan, quantize_
from quantize.task import quantize_setting

# Peak numbers per GPU model (dense, no sparsity): bytes/s and FLOP/s by dtype.
GPU_PEAKS = {
    "H100": {"bandwidth": 3.35e12, "bf16": 989e12, "fp8": 1979e12, "int8": 1979e12},
    "H200": {"bandwidth": 4.8e12, "bf16": 989e12, "fp8": 1979e12, "int8": 1979e12},
    "RTX 4090": {"bandwidth": 1.008e12, "bf16": 165e12, "fp8": 330e12, "int8": 330e12},
    "RTX 3090": {"bandwidth": 0.936e12, "bf16": 71e12, "fp8": 71e12, "int8": 142e12},
}


@dataclass
class Variant:
    name: str
    description: str
    build: Callable[[torch.nn.Module, PolicyConfig], object]  # (bf16 model, cfg) -> sampler
    gpu_only: bool = False
    mutates_model: bool = False  # quantizing variants get their own copy of the model
    # Step axes: PolicyConfig changes of this variant (video_exec_step, action_num_inference_steps)
    # for a preset; None = full steps (video_exec_step -1, whatever the checkpoint's default). The accuracy
    # reference keeps full steps.
    steps: Callable[[PolicyConfig], dict] | None = None
    # What the rung runs, for its task-success setting (`task_settings`): the quantization (a SCHEMES name or
    # a plan JSON path; None = bf16) and the sampler. Compilation is not part of it (the same math, eager).
    quant: str | None = None
    sampler: str = "static"

    def axes(self, cfg: PolicyConfig) -> dict:
        """The PolicyConfig changes this variant runs `cfg` with (full video steps unless it has step axes)."""
        return self.steps(cfg) if self.steps else {"video_exec_step": -1}

    def step_axes(self, cfg: PolicyConfig) -> tuple[int, int]:
        """(video_exec_step, action steps) this variant runs on `cfg`."""
        c = cfg.replace(**self.axes(cfg))
        return c.video_exec_step, c.action_num_inference_steps


def _static(compile: bool) -> Callable:
    def build(model, cfg):
        return StaticSampler(model, cfg, compile=compile)

    return build


def base_variants() -> list[Variant]:
    return [
        Variant("a_reference", "reference sampler, eager, dynamic list cache (upstream-style)",
                lambda m, c: ReferenceSampler(m, c), sampler="reference"),
        Variant("b_static_eager", "static ring cache + per-prompt cross K/V, eager", _static(False)),
        Variant("c_static_compiled", "static + torch.compile(fullgraph, dynamic=False)", _static(True)),
    ]


def _quantized(scheme: str, plan_path: str | None = None) -> Callable:
    def build(model, cfg):
        quantize_(model, QuantPlan.from_json(plan_path) if plan_path else SCHEMES[scheme])
        return StaticSampler(model, cfg, compile=True)

    return build


def quant_variants() -> list[Variant]:
    """Rungs d-g: the compiled static sampler with the block Linears in 8 bits (default plan)."""
    variants = [
        Variant("d_int8_weight_only", "+ int8 weight-only (torchao scales, runtime QuantizedLinear)",
                _quantized("int8_weight_only"), mutates_model=True, quant="int8_weight_only"),
        Variant("e_int8_w8a8", "+ int8 dynamic activations x int8 weights", _quantized("int8_dynamic"),
                mutates_model=True, quant="int8_dynamic"),
        Variant("f_fp8_weight_only", "+ fp8 e4m3 weight-only", _quantized("fp8_weight_only"), mutates_model=True,
                quant="fp8_weight_only"),
        Variant("f_fp8_w8a8", "+ fp8 dynamic W8A8 (CUDA sm >= 8.9)", _quantized("fp8_dynamic"), gpu_only=True,
                mutates_model=True, quant="fp8_dynamic"),
    ]
    plan = os.environ.get("LINGBOT_BENCH_PLAN")  # a calibrated plan JSON (lingbot-edge calibrate plan)
    if plan:
        variants.append(Variant("g_calibrated_plan", f"+ calibrated mixed plan {Path(plan).name}",
                                _quantized("", plan), mutates_model=True, quant=plan))
    return variants


def _video_fraction(fraction: float) -> Callable[[PolicyConfig], dict]:
    return lambda cfg: {"video_exec_step": max(1, int(cfg.num_inference_steps * fraction))}


def _action_fraction(fraction: float) -> Callable[[PolicyConfig], dict]:
    return lambda cfg: {"action_num_inference_steps": max(1, int(cfg.action_num_inference_steps * fraction))}


def _both(*parts: Callable[[PolicyConfig], dict]) -> Callable[[PolicyConfig], dict]:
    return lambda cfg: {k: v for part in parts for k, v in part(cfg).items()}


def _with_steps(build: Callable, steps: Callable[[PolicyConfig], dict]) -> Callable:
    return lambda model, cfg: build(model, cfg.replace(**steps(cfg)))


def step_variants() -> list[Variant]:
    """Rungs h-i: fewer denoising forwards (upstream video_exec_step, fewer action steps), compiled
    static sampler in bf16 and int8 weight-only: the latency lever of the real-time plan."""
    half, quarter, fifth = _video_fraction(0.5), _video_fraction(0.25), _action_fraction(0.2)
    rungs = [("h_video_exec_half", "video_exec_step = N/2", half),
             ("h_video_exec_quarter", "video_exec_step = N/4", quarter),
             ("h_action_steps_fifth", "action steps / 5", fifth),
             ("h_exec_quarter_action_fifth", "video_exec_step = N/4, action steps / 5", _both(quarter, fifth))]
    variants = [Variant(name, f"static compiled, {what}", _with_steps(_static(True), steps), steps=steps)
                for name, what, steps in rungs]
    combined = _both(quarter, fifth)
    variants.append(Variant("i_int8_exec_quarter_action_fifth", "int8 weight-only + video_exec_step = N/4, "
                            "action steps / 5", _with_steps(_quantized("int8_weight_only"), combined),
                            mutates_model=True, steps=combined, quant="int8_weight_only"))
    return variants


def all_variants() -> list[Variant]:
    return base_variants() + quant_variants() + step_variants()


def task_settings(variants: list[Variant], cfg: PolicyConfig, device: torch.device) -> dict[str, object]:
    """{variant: its `lingbot_edge.eval.task_success.TaskSetting` on a policy of `cfg` (the rung's quantization and
    sampler, its step axes applied to `cfg`'s steps), or the reason it has none on `device`}."""
    out: dict[str, object] = {}
    for v in variants:
        if v.gpu_only and device.type != "cuda":
            out[v.name] = "needs a CUDA GPU"
            continue
        quant = QuantPlan.from_json(v.quant) if v.quant and v.quant.endswith(".json") else v.quant
        out[v.name] = TaskSetting(v.name, quant, v.axes(cfg), sampler=v.sampler)
    return out


def task_success(variants: list[Variant], episodes: int, device: torch.device, steps: int | None = None,
                 progress: bool = False) -> dict[str, dict]:
    """The ladder's task-success column: each rung's setting (`task_settings`) on the trained SO-100 grasp
    checkpoint (bf16, `lingbot_edge.eval.task_success.TASK_CHECKPOINT`), over `episodes` held-out seeds. {variant:
    {"successes", "episodes", "setting", "sampler", "min_distance" (median closest approach, m)} or {"reason"}};
    rungs with the same setting share one measurement."""
    load = checkpoint_loader(TASK_CHECKPOINT, "bfloat16", str(device))
    settings = task_settings(variants, load().cfg, device)
    done: dict[tuple, dict] = {}
    column: dict[str, dict] = {}
    for v in variants:
        setting = settings[v.name]
        if isinstance(setting, str):
            column[v.name] = {"reason": setting}
            continue
        quant = Path(v.quant).name if v.quant and v.quant.endswith(".json") else v.quant or "bf16"
        key = (quant, setting.sampler, tuple(sorted(setting.overrides.items())))
        if key not in done:
            try:
                done[key] = measure(load, [setting], episodes, steps or EVAL_STEPS, progress,
                                    quantize=quantize_setting)[0]
            except ValueError as e:  # e.g. a calibrated plan of another model: nothing to quantize here
                done[key] = {"reason": str(e)}
        r = done[key]
        column[v.name] = dict(r) if "reason" in r else {
            "successes": r["successes"], "episodes": r["episodes"], "setting": f"{quant}, {steps_cell(r)} steps",
            "sampler": setting.sampler, "min_distance": summarize(r["per_episode"])["min_distance"]}
    return column


@dataclass
class EpisodeInputs:
    text: torch.Tensor
    neg: torch.Tensor
    first: torch.Tensor
    chunks: list[dict[str, torch.Tensor]]


def episode_inputs(cfg: PolicyConfig, chunks: int, seed: int = 0) -> EpisodeInputs:
    mc = cfg.model_config
    g = torch.Generator().manual_seed(seed)
    latent = (1, mc.in_channels, cfg.frame_chunk_size, *cfg.latent_hw)
    action = (1, mc.action_dim, cfg.frame_chunk_size, cfg.action_per_frame, 1)
    text = torch.randn(1, cfg.max_sequence_length, mc.text_dim, generator=g)
    neg = torch.randn(1, cfg.max_sequence_length, mc.text_dim, generator=g)
    first = torch.randn(*latent[:2], 1, *latent[3:], generator=g)
    steps = [
        {
            "noise_video": torch.randn(latent, generator=g),
            "noise_action": torch.randn(action, generator=g),
            "observed": torch.randn(latent, generator=g),
            "executed": torch.randn(action, generator=g).clamp(-1, 1),
        }
        for _ in range(chunks)
    ]
    return EpisodeInputs(text, neg, first, steps)


def sync(device: str | torch.device) -> None:
    """Wait for the work queued on `device` (CUDA); nothing to wait for on the CPU. Every timed call ends
    with it (the bench's one device sync)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_episode(sampler, inputs: EpisodeInputs, sync: Callable[[], None] = lambda: None) -> list:
    """All chunks with feedback; returns the ChunkResults (on their device)."""
    sampler.reset(inputs.text, inputs.neg)
    out = []
    for i, s in enumerate(inputs.chunks):
        r = sampler.sample_chunk(s["noise_video"], s["noise_action"], inputs.first if i == 0 else None)
        sampler.feedback(s["observed"], s["executed"])
        out.append(r)
    sync()
    return out


def accuracy(results: list, reference: list, cfg: PolicyConfig) -> dict[str, float]:
    """Action RMS / cosine (normalized units; `core.actions.action_error`: used channels, executed
    steps) and video-latent SQNR (dB) vs the reference run."""
    actions = action_error([r.actions for r in reference], [r.actions for r in results], cfg)
    v = torch.cat([r.latents.float().flatten().cpu() for r in results])
    v_ref = torch.cat([r.latents.float().flatten().cpu() for r in reference])
    err = (v - v_ref).pow(2).mean()
    sqnr = float("inf") if err == 0 else float(10 * torch.log10(v_ref.pow(2).mean() / err))
    return {"action_rms": actions["action_rms"], "action_cos": actions["action_cos"], "latent_sqnr_db": sqnr}


def forward_timers(sampler, cfg: PolicyConfig) -> dict[str, Callable[[], None]]:
    """One transient video forward and one transient action forward (cache left unchanged)."""
    dev, dt = sampler.device, sampler.dtype
    x_v = torch.randn(sampler.latent_shape, device=dev, dtype=dt)
    x_a = torch.randn(sampler.action_shape, device=dev, dtype=dt)
    if isinstance(sampler, StaticSampler):
        schedule = sampler.schedules[False]  # one entry only when video_exec_step = 1
        t, ds = schedule[min(1, len(schedule) - 1)]
        mode = sampler.modes[CacheMode.TRANSIENT]
        rows_v, rows_a = sampler.transient_rows(False), sampler.transient_rows(True)
        return {
            "video": lambda: sampler._run_step(x_v, t, ds, mode, sampler.no_pin, False, rows_v),
            "action": lambda: sampler._run_step(x_a, t, ds, mode, sampler.no_pin, True, rows_a),
        }
    t = torch.full((cfg.frame_chunk_size,), 500.0, device=dev)
    return {
        "video": lambda: sampler._forward(x_v, t, CacheMode.TRANSIENT, False, sampler.frame_start),
        "action": lambda: sampler._forward(x_a, t, CacheMode.TRANSIENT, True, sampler.frame_start),
    }


def forward_flops_and_bytes(cfg: PolicyConfig, model: torch.nn.Module, action: bool) -> tuple[float, float]:
    """FLOPs of one static-sampler forward (counted by torch's FlopCounterMode on the meta
    device, cache full) and the weight bytes it reads."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = build_meta_model(model.config).to(model.dtype)
    sampler = StaticSampler(meta, cfg.replace(num_inference_steps=1, action_num_inference_steps=1), compile=False)
    sampler.cache.valid.fill_(True)
    with FlopCounterMode(display=False) as counter:
        forward_timers(sampler, cfg)["action" if action else "video"]()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return float(counter.get_total_flops()), float(weight_bytes)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def gpu_peaks(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS.items():
        if key.replace("RTX ", "") in name:
            return peaks
    return None


def tiny_setup(dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> tuple[PolicyConfig, torch.nn.Module]:
    cfg = get_policy_config("tiny")
    return cfg, build_model(MODEL_PRESETS["tiny"], dtype=dtype, device=device, seed=0)


def weight_bytes(model: torch.nn.Module) -> int:
    """A whole model's bytes: everything it holds (parameters and buffers, quantized tensors included), as
    loaded. One Linear's deployed bytes under a scheme: `calib.evaluate.linear_deploy_bytes`."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None:  # tensor subclass (e.g. torchao): count its component tensors
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


def measure_cpu_peaks(seconds: float = 0.5) -> dict[str, float]:
    """Copy bandwidth and bf16 / fp32 matmul throughput of this CPU, measured in this run: the fastest call of
    each within `seconds` (a peak: on a shared machine the mean also counts the other jobs' share of the cores)."""
    import time

    def rate(fn, work):
        fn()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return work / best

    src = torch.empty(64 * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    bandwidth = rate(lambda: dst.copy_(src), 2 * src.numel() * 4)  # read + write
    a32 = torch.randn(512, 512)
    a16 = a32.bfloat16()
    return {
        "bandwidth": bandwidth,
        "fp32": rate(lambda: a32 @ a32, 2 * 512**3),
        "bf16": rate(lambda: a16 @ a16, 2 * 512**3),
    }
