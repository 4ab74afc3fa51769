"""Latency model: what one chunk costs on a GPU at the roofline, computed, not measured.

    lingbot-edge bench --plan [--gpu rtx4090] [--preset libero] [--all]
    python -m bench.plan --gpu rtx4090

Per (preset, scheme, video steps, video_exec_step, action steps): the forwards the static sampler
runs for one chunk plus its two history writes, each costed as max(bytes / bandwidth, FLOPs / peak)
(docs/design.md section 5). Bytes: the weights one forward reads (block Linears at the scheme's width
plus one fp32 scale per output channel; the prompt's cross-attention K/V projections are not read:
computed once per prompt) and the self/cross-attention K/V of its CFG rows. FLOPs: the block
Linears at the scheme's peak (bf16 for weight-only formats: they dequantize into a bf16 GEMM),
attention and the small embedders at the bf16 peak. The chunk's budget is its execution time at
the control rate (16 actions at 30 Hz = 533 ms); the next chunk is inferred while one executes.
A configuration "meets" the rate when 1.5x its roofline time fits (the efficiency docs/design.md
targets); launch overheads are what CUDA graphs remove and are not modelled.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from bench.memory_model import GIB, budget, dit_bytes, dit_param_counts
from lingbot_edge.core.config import MODEL_PRESETS, PolicyConfig, get_policy_config

CONTROL_HZ = 30.0
EFFICIENCY = 1.5  # docs/design.md: chunk latency within 1.5x of the roofline
BF16 = 2


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # bytes/s
    bf16: float  # dense tensor FLOP/s, fp32 accumulate
    int8: float  # dense tensor OP/s
    fp8: float | None  # dense tensor FLOP/s; None: no fp8 tensor cores
    memory_gib: float
    source: str


# Datasheet / whitepaper numbers, dense (no 2:4 sparsity).
GPUS: dict[str, Gpu] = {
    # NVIDIA Ada GPU Architecture whitepaper v2.1, appendix table 2 (RTX 4090): 1008 GB/s GDDR6X,
    # 165.2 TFLOPS FP16/BF16 tensor with FP32 accumulate, 330.3 FP8, 660.6 INT8 TOPS, 24 GB.
    "rtx4090": Gpu("RTX 4090", 1008e9, 165.2e12, 660.6e12, 330.3e12, 24, "Ada whitepaper v2.1"),
    # Same whitepaper (RTX 4080 16GB): 716.8 GB/s, 97.5 TFLOPS BF16 (FP32 acc), 194.9 FP8, 389.9 INT8.
    "rtx4080": Gpu("RTX 4080", 716.8e9, 97.5e12, 389.9e12, 194.9e12, 16, "Ada whitepaper v2.1"),
    # NVIDIA Ampere GA102 whitepaper v2.0, table 9 (RTX 3090): 936 GB/s, 71 TFLOPS FP16/BF16 tensor
    # with FP32 accumulate, 284 INT8 TOPS, no FP8, 24 GB.
    "rtx3090": Gpu("RTX 3090", 936e9, 71e12, 284e12, None, 24, "GA102 whitepaper v2.0"),
    # NVIDIA A100 datasheet (SXM4 80GB): 2039 GB/s HBM2e, 312 TFLOPS BF16, 624 INT8 TOPS, no FP8.
    "a100": Gpu("A100 SXM 80GB", 2039e9, 312e12, 624e12, None, 80, "A100 datasheet"),
    # NVIDIA H100 datasheet (SXM5): 3.35 TB/s HBM3, 989.4 TFLOPS BF16, 1978.9 FP8 / INT8, 80 GB.
    "h100": Gpu("H100 SXM", 3.35e12, 989.4e12, 1978.9e12, 1978.9e12, 80, "H100 datasheet"),
    # NVIDIA H200 datasheet (SXM): 4.8 TB/s HBM3e, H100's tensor cores (989.4 BF16, 1978.9 FP8/INT8),
    # 141 GB.
    "h200": Gpu("H200 SXM", 4.8e12, 989.4e12, 1978.9e12, 1978.9e12, 141, "H200 datasheet"),
    # Jetson AGX Orin 64GB technical brief: 204.8 GB/s LPDDR5 (shared with the CPU), GPU 170 sparse
    # INT8 TOPS -> 85 dense, FP16/BF16 dense half of that (42.5), no FP8, 64 GB unified memory.
    "orin": Gpu("Jetson AGX Orin 64GB", 204.8e9, 42.5e12, 85e12, None, 64, "AGX Orin technical brief"),
}

# Runtime schemes: (bytes per block-Linear weight, GEMM peak key, memory_model scheme).
SCHEMES: dict[str, tuple[float, str, str]] = {
    "bf16": (2.0, "bf16", "bf16"),
    "int8_weight_only": (1.0, "bf16", "int8"),
    "int8_w8a8": (1.0, "int8", "int8"),
    "fp8_weight_only": (1.0, "bf16", "fp8"),
    "fp8_w8a8": (1.0, "fp8", "fp8"),
}
EXEC_STEPS = (-1, 10, 5, 3, 2, 1)
# Action steps: upstream's 50, the paper's deployed 10, and the distilled 2 and 1 (`lingbot-edge train distill`;
# LingBot-VA 2.0 is reported to distil actions 10 -> 2, docs/design.md section 9).
ACTION_STEPS = (50, 25, 10, 5, 2, 1)
# Few-step video schedules run in full (video_exec_step -1: N denoising forwards + the PREDICTED write): the
# paper's deployed 3 video steps, and 2 as a distilled video stream would run them.
FEW_VIDEO_STEPS = (3, 2)
DISTILLED_ACTION_STEPS = (2, 1)  # the rows of the "distilled step counts" section


@dataclass(frozen=True)
class Forward:
    tokens: int  # per CFG row
    rows: int
    action: bool


def chunk_forwards(cfg: PolicyConfig) -> list[Forward]:
    """The forwards of one chunk of the static sampler (video loop, action loop, 2 history writes)."""
    b = cfg.cfg_batch
    video_rows = b if cfg.guidance_scale > 1 else 1
    action_rows = b if cfg.action_guidance_scale > 1 else 1
    n_video = cfg.num_inference_steps + 1 if cfg.video_exec_step == -1 else cfg.video_exec_step
    v, a = cfg.video_tokens_per_chunk, cfg.action_tokens_per_chunk
    fwd = [Forward(v, video_rows, False)] * (n_video - 1) + [Forward(v, b, False)]
    fwd += [Forward(a, action_rows, True)] * cfg.action_num_inference_steps + [Forward(a, b, True)]
    return fwd + [Forward(v, b, False), Forward(a, b, True)]


def forward_cost(cfg: PolicyConfig, f: Forward, weight_bytes_per_param: float) -> tuple[float, float, float]:
    """(bytes read, block-Linear FLOPs, other FLOPs) of one forward of the full model."""
    mc = cfg.model_config
    d, layers, n = mc.dim, mc.num_layers, f.tokens * f.rows
    # Block Linears read per forward: attn1 q/k/v/out, attn2 q/out, ffn in/out (attn2 k/v: per prompt).
    block_params = layers * (6 * d * d + 2 * d * mc.ffn_dim)
    block_rows = layers * (6 * d + mc.ffn_dim + d)
    scale_bytes = 4 * block_rows if weight_bytes_per_param < 2 else 0
    # Per-stream embedders (timestep MLP + time_proj, patch/action embedding, head), bf16.
    time_params = mc.freq_dim * d + d * d + 6 * d * d
    io_width = mc.action_dim if f.action else mc.patch_dim
    io_params = 2 * io_width * d  # input embedding + output head
    weights = block_params * weight_bytes_per_param + scale_bytes + (time_params + io_params) * BF16
    kv = layers * f.rows * (cfg.cache_capacity + cfg.max_sequence_length) * d * 2 * BF16
    linear_flops = 2 * n * block_params
    attention_flops = layers * 4 * n * d * (cfg.cache_capacity + cfg.max_sequence_length)
    other_flops = 2 * n * (time_params + io_params) + attention_flops
    return weights + kv, linear_flops, other_flops


def chunk_roofline_s(cfg: PolicyConfig, gpu: Gpu, scheme: str) -> float:
    per_param, peak_key, _ = SCHEMES[scheme]
    peak = getattr(gpu, peak_key)
    total = 0.0
    for f in chunk_forwards(cfg):
        nbytes, linear, other = forward_cost(cfg, f, per_param)
        total += max(nbytes / gpu.bandwidth, linear / peak + other / gpu.bf16)
    return total


def supported(gpu: Gpu, scheme: str) -> bool:
    return SCHEMES[scheme][1] != "fp8" or gpu.fp8 is not None


def rows_for(gpu: Gpu, presets: tuple[str, ...]) -> list[dict]:
    counts = dit_param_counts()
    out = []
    for preset in presets:
        base = get_policy_config(preset)
        budget_s = base.action_tokens_per_chunk / CONTROL_HZ
        for scheme in SCHEMES:
            if not supported(gpu, scheme):
                continue
            mem = budget(preset, SCHEMES[scheme][2], counts)["allocated (tensors)"]
            video = [(base.num_inference_steps, k) for k in EXEC_STEPS] + [(n, -1) for n in FEW_VIDEO_STEPS]
            for n, k in video:
                for a in ACTION_STEPS:
                    cfg = base.replace(num_inference_steps=n, video_exec_step=k, action_num_inference_steps=a)
                    t = chunk_roofline_s(cfg, gpu, scheme)
                    out.append(dict(preset=preset, scheme=scheme, video_steps=cfg.num_inference_steps,
                                    video_exec_step=k, action_steps=a, forwards=len(chunk_forwards(cfg)),
                                    roofline_ms=t * 1e3, budget_ms=budget_s * 1e3, margin=budget_s / t,
                                    remaining_ms=(budget_s - EFFICIENCY * t) * 1e3,
                                    meets=EFFICIENCY * t <= budget_s and mem <= gpu.memory_gib,
                                    peak_gib=mem, weight_gib=_weight_gib(scheme, counts)))
    return out


def _weight_gib(scheme: str, counts) -> float:
    return dit_bytes(SCHEMES[scheme][2], counts) / GIB


def _quality_rank(r: dict) -> tuple:
    """Fewer approximations first: full video steps, then more video forwards, more action steps."""
    k = r["video_exec_step"] if r["video_exec_step"] != -1 else r["video_steps"] + 1
    return (-k, -r["action_steps"])


def cheapest_meeting(rows: list[dict]) -> list[dict]:
    """Per preset and scheme, the configuration with the most denoising that still meets the rate."""
    best = {}
    for r in sorted(rows, key=_quality_rank):
        if r["meets"]:
            best.setdefault((r["preset"], r["scheme"]), r)
    return list(best.values())


def render(gpu: Gpu, rows: list[dict], show_all: bool) -> str:
    lines = [
        f"# Latency plan: {gpu.name} ({gpu.bandwidth / 1e9:.0f} GB/s, {gpu.bf16 / 1e12:.0f} TFLOP/s bf16, "
        + (f"{gpu.fp8 / 1e12:.0f} fp8, " if gpu.fp8 else "no fp8, ") + f"{gpu.int8 / 1e12:.0f} int8; "
        f"{gpu.memory_gib:.0f} GiB; {gpu.source})",
        "",
        f"Roofline per chunk (static sampler forwards + 2 history writes), budget = chunk actions at "
        f"{CONTROL_HZ:.0f} Hz, margin = budget / roofline, meets = {EFFICIENCY}x roofline within budget and "
        "peak memory (tensors, bench.memory_model) fits.",
        "",
    ]
    header = ["| preset | scheme | video steps | video_exec_step | action steps | forwards | weights GiB | peak GiB "
              "| roofline ms | budget ms | margin | meets 30 Hz |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def line(r):
        return (f"| {r['preset']} | {r['scheme']} | {r['video_steps']} | {r['video_exec_step']} | {r['action_steps']} "
                f"| {r['forwards']} | {r['weight_gib']:.2f} | {r['peak_gib']:.2f} | {r['roofline_ms']:.0f} "
                f"| {r['budget_ms']:.0f} | {r['margin']:.2f} | {'yes' if r['meets'] else 'no'} |")

    base_video = {r["preset"]: r["video_steps"] for r in rows if r["video_exec_step"] != -1}  # the preset's
    shown = rows if show_all else [r for r in rows if r["action_steps"] in (50, 10)
                                   and r["video_exec_step"] in (-1, 5, 2)
                                   and r["video_steps"] == base_video[r["preset"]]]
    lines += ["## Configurations" + ("" if show_all else " (subset; --all for every row)"), ""] + header
    lines += [line(r) for r in shown]
    few = [r for r in rows if r["scheme"] == "bf16" and r["action_steps"] in DISTILLED_ACTION_STEPS
           and (r["video_exec_step"] in (1, 2, 3) or r["video_steps"] in FEW_VIDEO_STEPS)]
    lines += ["", f"## Distilled step counts, bf16: {' or '.join(map(str, DISTILLED_ACTION_STEPS))} action steps, "
              f"1-3 video forwards (video_exec_step) or {' or '.join(map(str, FEW_VIDEO_STEPS))} full video steps",
              "", f"remaining = budget - {EFFICIENCY}x roofline: what is left of the chunk's execution time for the "
              "VAE encode, the robot I/O and launch overheads.", "",
              header[0] + " remaining ms |", header[1] + "---:|"]
    lines += [line(r) + f" {r['remaining_ms']:.0f} |" for r in few]
    best = sorted(cheapest_meeting(rows), key=lambda r: (r["preset"], r["roofline_ms"]))
    lines += ["", f"## Most denoising that meets {CONTROL_HZ:.0f} Hz, per preset and scheme", ""]
    lines += header + [line(r) for r in best] if best else ["(none)"]
    missing = {(r["preset"], r["scheme"]) for r in rows} - {(r["preset"], r["scheme"]) for r in best}
    lines += [f"- {p} / {s}: no configuration meets {CONTROL_HZ:.0f} Hz" for p, s in sorted(missing)]
    return "\n".join(lines)


def run(gpu: str, presets: tuple[str, ...] = ("libero", "so100", "robotwin"), show_all: bool = False) -> str:
    if gpu not in GPUS:
        raise ValueError(f"--gpu: expected one of {sorted(GPUS)}, got {gpu!r}")
    for p in presets:
        if get_policy_config(p).model_config != MODEL_PRESETS["full"]:
            raise ValueError(f"--preset: {p!r} is not a full-model preset (the plan models the released DiT)")
    return render(GPUS[gpu], rows_for(GPUS[gpu], presets), show_all)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    print(run(args.gpu, tuple(args.preset), args.all))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", default="rtx4090", choices=sorted(GPUS), help="GPU model (default rtx4090)")
    parser.add_argument("--preset", nargs="+", default=["libero", "so100", "robotwin"],
                        help="policy presets (full model)")
    parser.add_argument("--all", action="store_true", help="print every configuration, not a subset")


if __name__ == "__main__":
    raise SystemExit(main())
