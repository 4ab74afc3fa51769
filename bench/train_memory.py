"""Memory model of one LoRA training step of the LingBot-VA DiT on one GPU, computed, not measured.

    python -m bench.train_memory                                     # prints the table
    python -m bench.train_memory --out bench/results/train_memory.md   # and writes it
    lingbot-edge bench --train-memory [--out FILE]                   # the same

One step of `train.trainer.FlowMatchingLoss` (the teacher-forced episode: `train.teacher.episode_layout` with the
grounded segments, every chunk's 4 video and 4 action copies in one sequence) over a batch of one episode:
the base DiT frozen in int8 (weight-only, one fp32 scale per output channel, as `quantize_` stores it) or
bf16; rank-r LoRA adapters on the 10 block Linears of self-attention, cross-attention and FFN
(`bench.train_step_measure.LORA_TARGETS`; the blocks are shared by the video and the action stream);
adapters, their gradients and AdamW's two states in the adapters' dtype (fp32 by default; torch's AdamW keeps
its states in the parameter's dtype); activations in bf16, with or without per-block activation
checkpointing. Sizes are GiB (2**30 bytes).

What it counts, and why (the tensors autograd saves, read off the code and checked against
`torch.autograd.graph.saved_tensors_hooks` and a live-tensor tracker in tests/train/test_train_memory.py):
- Per block, what the backward pass needs: the fp32 copies LayerNorm / RMSNorm save of their inputs (7 of
  them), the fp32 (1 + scale) factors of the two modulated norms, the whole fp32 [L, 6, dim] modulation
  (the gates are views of it), the bf16 inputs of the adapted Linears, the FFN's two [L, ffn] tensors,
  and the attention's operands: per segment of the chunk, the keys and values gathered for every chunk
  (`ChunkBandAttention`: a chunk's queries see up to a cache of history, so every chunk carries its own copy
  of those keys) and the materialized bf16 mask.
- With checkpointing, a block keeps only its input; in the backward pass one block at a time is recomputed
  and its saved tensors come back, plus the gradients of its largest operation.
- Around the blocks: the per-token modulation and time embedding, the RoPE tables, the attention masks, the
  prompt's cross-attention K/V of every block (they depend on the adapted to_k / to_v), the head.
- The CUDA context and allocator slack as a fixed reserve (`bench.memory_model.CUDA_RESERVE_GIB`).

`cpu=True` adds what only the CPU run has (bench/train_step_measure.py measures it): the working set of
the CPU's int8 weight-only kernel (`qlinear.int8_weight_only_limbs`: fp32 and int8 limbs of its input) instead
of the GPU's dequantized weight, and no CUDA reserve.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.memory_model import CUDA_RESERVE_GIB, GIB, SCHEMES
from lingbot_edge.core.config import MODEL_PRESETS, ModelConfig, PolicyConfig, get_policy_config
from lingbot_edge.io.checkpoint import build_meta_model
from lingbot_edge.io.files import write_text
from train.teacher import GROUNDED_SEGMENTS, SEGMENTS, episode_layout

LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "ffn.net.0.proj", "ffn.net.2")
ACT = 2  # bytes per activation element (bf16)
F32 = 4
BUDGET_GIB = 20.0  # what a 24 GB card leaves for the step (display, other processes, fragmentation)


@dataclass(frozen=True)
class TrainSetup:
    """One training step to model."""

    preset: str  # policy preset: latent size, chunk geometry, cache capacity, prompt length
    chunks: int  # episode length in chunks (the whole episode is one teacher-forced sequence)
    base: str = "int8"  # frozen base weights: "int8" (weight-only, per-channel fp32 scale) or "bf16"
    rank: int = 16  # LoRA rank on every adapted Linear
    checkpointing: bool = True  # per-block activation checkpointing
    adapter_bytes: int = 4  # bytes per adapter parameter (4: fp32 master weights, 2: bf16); AdamW states alike
    grounded: bool = True  # the grounded lookahead's segments train too (TrainConfig.grounded_weight > 0)
    model: ModelConfig | None = None  # another DiT for the preset's robot side (a narrow one in the tests)


@dataclass(frozen=True)
class ParamCounts:
    quantizable: int  # block Linear weights (attn1, attn2, ffn)
    quantizable_rows: int  # their output channels (one int8 scale each)
    other: int  # everything else, kept in bf16
    lora: int  # adapter parameters at rank 1 (times the rank: the adapters' size)


def model_config(setup: TrainSetup) -> ModelConfig:
    return setup.model or get_policy_config(setup.preset).model_config


def param_counts(mc: ModelConfig) -> ParamCounts:
    """Counted on the meta model (no memory), the way `bench.memory_model.dit_param_counts` counts."""
    model = build_meta_model(mc)
    q = rows = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("blocks.") and (".attn" in name or ".ffn" in name):
            q += mod.weight.numel()
            rows += mod.weight.shape[0]
    lora = sum(mod.in_features + mod.out_features for blk in model.blocks
               for mod in (blk.get_submodule(t) for t in LORA_TARGETS))
    return ParamCounts(q, rows, sum(p.numel() for p in model.parameters()) - q, lora)


def base_bytes(base: str, counts: ParamCounts) -> float:
    if base not in ("int8", "bf16"):
        raise ValueError(f"base: expected 'int8' or 'bf16', got {base!r}")
    per_weight, per_row = SCHEMES[base]
    return counts.quantizable * per_weight + counts.quantizable_rows * per_row + counts.other * 2


@dataclass(frozen=True)
class AttentionShape:
    """What `ChunkBandAttention` gathers for one layout."""

    band: int  # chunks a query's keys reach back (itself included)
    chunk_tokens: int  # sequence tokens per chunk
    segments: tuple[tuple[int, int], ...]  # (queries, keys) per chunk of every segment


@functools.lru_cache(maxsize=32)
def attention_shape(cfg: PolicyConfig, chunks: int, grounded: bool) -> AttentionShape:
    """Read off the attention backend the trainer builds for this layout (`train.teacher.episode_layout`)."""
    layout = episode_layout(cfg, chunks, grounded=grounded)
    att = layout.attention
    return AttentionShape(att.band, layout.chunk_tokens,
                          tuple((hi - lo, sum(n for _, n in runs)) for lo, hi, runs, _ in att.segments))


def sequence_tokens(cfg: PolicyConfig, chunks: int, grounded: bool) -> int:
    """Tokens of the episode sequence: per chunk one copy per segment of the trainer's layout
    (`train.teacher.SEGMENTS`, plus `GROUNDED_SEGMENTS` when grounded), video or action sized."""
    names = SEGMENTS + (GROUNDED_SEGMENTS if grounded else ())
    return chunks * sum(cfg.action_tokens_per_chunk if name.startswith("action") else cfg.video_tokens_per_chunk
                        for name in names)


def block_saved_bytes(mc: ModelConfig, length: int, chunks: int, att: AttentionShape,
                      rank: int) -> dict[str, float]:
    """What one block's forward leaves for its backward pass (bytes), in the order the block makes it:
    before the self-attention, the self-attention's operands, after it."""
    n, d, heads = length, mc.dim, mc.num_attention_heads
    nd = n * d
    low = ACT * n * rank  # one adapter's x A.T
    attention = sum(chunks * (ACT * n_k * d * 2  # gathered keys and values
                              + ACT * heads * n_q * n_k  # the materialized additive mask
                              + ACT * n_q * d * 2  # queries and output
                              + F32 * heads * n_q)  # log-sum-exp
                    for n_q, n_k in att.segments)
    return {
        # the fp32 modulation [L, 6, dim] (its gates are saved views), norm1's fp32 input + mean / rstd,
        # (1 + scale), h (input of the adapted q / k / v), 3 adapters' x A.T, q / k RMSNorm fp32 inputs + rstd
        "before self-attention": F32 * nd * 6 + F32 * (nd + 2 * n) + F32 * nd + ACT * nd + 3 * low
                                 + 2 * F32 * (nd + n),
        "self-attention operands": attention,
        # to_out input; norm2 + h2 + q RMSNorm; cross-attn q, output, lse (to_out2's input is a view of the
        # output); norm3 + (1 + c_scale) + h3; GELU input and output; the 7 adapters' x A.T
        "after self-attention": ACT * nd + F32 * (nd + 2 * n) + ACT * nd + F32 * (nd + n) + 2 * ACT * nd
                                + F32 * heads * n + F32 * (nd + 2 * n) + F32 * nd + ACT * nd
                                + 2 * ACT * n * mc.ffn_dim + 7 * low,
    }


def _padded_rows(n: int, att: AttentionShape) -> int:
    """Rows of the zero-padded keys / values the attention slices its gathers from."""
    return n + att.band * att.chunk_tokens


def working_sets(mc: ModelConfig, n: int, chunks: int, att: AttentionShape, base: str, cpu: bool) -> dict[str, float]:
    """Bytes one block allocates on top of its saved tensors at its largest moments (forward and backward)."""
    d, nd = mc.dim, n * mc.dim
    n_q, n_k = max(att.segments, key=lambda s: s[1])
    padded = ACT * _padded_rows(n, att) * d
    dequant = ACT * d * mc.ffn_dim if base == "int8" else 0  # the frozen int8 weight cast for a matmul
    # CPU int8 (`int8_weight_only_limbs` at the FFN's down projection): its input in fp32, scaled, the two
    # limbs, the stacked limbs in fp32 and in int8
    ffn_kernel = 26 * n * mc.ffn_dim if cpu and base == "int8" else dequant
    return {
        # padded keys and values, one gathered copy before its head-major copy, the mask cast to bf16
        "attention forward": 2 * padded + ACT * chunks * n_k * d + ACT * chunks * mc.num_attention_heads * n_q * n_k,
        "FFN forward": ffn_kernel,
        "block start": F32 * nd * 6,  # mod.float() next to the fp32 modulation
        # the segment's dq / dk / dv and the layout copies of dk / dv, the padded key / value gradients and one
        # slice's, the output gradient
        "attention backward": ACT * chunks * (n_q + 4 * n_k) * d + 3 * padded + ACT * nd,
        # GELU input / output gradients, fp32 residual gradients, the frozen base's input gradient
        "FFN backward": 2 * ACT * n * mc.ffn_dim + 2 * F32 * nd + ACT * n * mc.ffn_dim + dequant,
    }


def step_bytes(setup: TrainSetup, cpu: bool = False, first_step: bool = False) -> dict[str, float]:
    """The step's peak by component (bytes), and the phase it is reached in (`phases`).

    The step's phases: the last block's forward, the head at the end of the forward, the first block of the
    backward pass (recomputed under checkpointing), the optimizer step. In steady state (every step after the
    first) the adapters' gradients and AdamW's states exist all through (the trainer zeroes the gradients
    after the forward); `first_step` counts them only where they are made. `cpu`: the CPU run's int8 kernel
    and its [L, L] layout mask, no CUDA reserve."""
    cfg = get_policy_config(setup.preset)
    mc = model_config(setup)
    counts = param_counts(mc)
    layers, d = mc.num_layers, mc.dim
    n = sequence_tokens(cfg, setup.chunks, setup.grounded)
    nd = n * d
    att = attention_shape(cfg, setup.chunks, setup.grounded)
    t = cfg.max_sequence_length
    lora = counts.lora * setup.rank
    saved = block_saved_bytes(mc, n, setup.chunks, att, setup.rank)
    pre, attn, post = saved.values()
    block = pre + attn + post
    work = working_sets(mc, n, setup.chunks, att, setup.base, cpu)
    weights = {
        f"base weights ({setup.base}, frozen)": base_bytes(setup.base, counts),
        "LoRA adapters": lora * setup.adapter_bytes,
    }
    optimizer = {"adapter gradients": lora * setup.adapter_bytes, "AdamW states": 2 * lora * setup.adapter_bytes}
    inputs = {
        # per-token modulation [L, 6, dim] and time embedding (bf16), RoPE cos / sin (fp32)
        "modulation, time embedding, RoPE": ACT * nd * 7 + F32 * n * mc.attention_head_dim,
        "attention masks (fp32)": sum(F32 * setup.chunks * q * k for q, k in att.segments),
        # prompt K/V of every block (bf16) and the RMSNorm inputs of their adapted to_k (fp32), the projected
        # prompt (bf16)
        "prompt cross-attn K/V": layers * t * d * (2 * ACT + F32) + ACT * t * d,
    }
    h, w = cfg.latent_hw
    video = setup.chunks * mc.in_channels * cfg.frame_chunk_size * h * w
    action = setup.chunks * mc.action_dim * cfg.action_tokens_per_chunk
    # the episode (fp32 latents, actions, prompt embedding) and the objective's noise / noisy copies of it
    inputs["episode and its noisy copies"] = F32 * (4 * video + 8 * action + t * mc.text_dim)
    if cpu:
        inputs["layout mask (CPU)"] = n * n
    stored = ACT * nd if setup.checkpointing else block
    during_step = {} if first_step else optimizer
    common = sum(weights.values()) + sum(during_step.values()) + sum(inputs.values())
    parts = ACT * nd * 9  # the forward's per-segment tokens / temb / modulation and their concatenated tokens
    block_forward = max(pre + attn + work["attention forward"], block + work["FFN forward"],
                        work["block start"])
    block_backward = max(block_forward, block + work["FFN backward"], pre + attn + work["attention backward"])
    phases = {
        "forward (last block)": common + parts + (layers - 1) * stored + block_forward,
        "forward (head)": common + parts + layers * stored + 6 * F32 * nd,
        "backward (first block)": common + (layers - 1) * stored
                                  + (ACT * nd + block_backward if setup.checkpointing else block_backward),
        "optimizer step": sum(weights.values()) + sum(optimizer.values()) + 2 * lora * setup.adapter_bytes,
    }
    phase = max(phases, key=phases.get)
    rows = {**weights, **optimizer, **inputs}
    if phase == "optimizer step":
        rows["AdamW temporaries"] = 2 * lora * setup.adapter_bytes
    else:
        if first_step:
            rows = {k: v for k, v in rows.items() if k not in optimizer}
        if phase.startswith("forward"):
            rows["forward temporaries (segment parts)"] = parts
        label = "block inputs (checkpoints)" if setup.checkpointing else "activations of the other blocks"
        rows[label] = (layers if phase == "forward (head)" else layers - 1) * stored
        rows["head" if phase == "forward (head)" else "this block (saved + working set)"] = \
            phases[phase] - sum(rows.values())
    rows["allocated (tensors)"] = phases[phase]
    rows["CUDA context + slack"] = 0 if cpu else CUDA_RESERVE_GIB * GIB
    rows["total"] = rows["allocated (tensors)"] + rows["CUDA context + slack"]
    rows["phases"] = phases
    rows["peak phase"] = phase
    return rows


# ----------------------------------------------------------------------------- table

TABLE_CHUNKS = (4, 8, 16, 20, 24, 30)  # 2.1 s .. 16 s at 30 Hz


def render(presets=("so100", "libero"), chunks=TABLE_CHUNKS, ranks=(16, 64)) -> str:
    full = MODEL_PRESETS["full"]
    counts = param_counts(full)
    lines = [
        "# Memory model: one LoRA training step of the 5B LingBot-VA DiT on one GPU (GiB = 2**30 bytes, computed)",
        "",
        f"DiT {full.num_layers} blocks, dim {full.dim} ({full.num_attention_heads} heads x "
        f"{full.attention_head_dim}), ffn {full.ffn_dim}: {counts.quantizable / 1e9:.2f}B block-Linear weights + "
        f"{counts.other / 1e9:.2f}B other parameters. LoRA on the 10 Linears of every block (attn1 q/k/v/out, "
        f"attn2 q/k/v/out, ffn in/out): {counts.lora / 1e6:.2f}M parameters per unit of rank. Adapters, their "
        "gradients and AdamW's two states fp32 (16 bytes per adapter parameter); activations bf16; batch of one "
        "episode; the grounded layout (per chunk 4 video + 4 action copies). A chunk is "
        "frame_chunk_size x action_per_frame = 16 actions (0.53 s at 30 Hz). `total` adds the CUDA context and "
        f"allocator slack ({CUDA_RESERVE_GIB} GiB). Budget: {BUDGET_GIB:.0f} GiB, what a 24 GB card leaves.",
        "",
        "Reproduce: `python -m bench.train_memory --out bench/results/train_memory.md` (the measured rows: "
        "`--measured` with the JSON files of `python -m bench.train_step_measure --chunks 4 --layers 2 --json F`). "
        "Checked against a step of the full-width DiT measured on the CPU: [below](#measured).",
        "",
    ]
    for preset in presets:
        cfg = get_policy_config(preset)
        per_chunk = sequence_tokens(cfg, 1, True)
        lines += [
            f"## {preset}: {cfg.height}x{cfg.width} x {len(cfg.obs_cam_keys)} cameras, "
            f"{cfg.video_tokens_per_chunk} video + {cfg.action_tokens_per_chunk} action tokens per chunk, "
            f"{per_chunk} sequence tokens per chunk, cache {cfg.cache_capacity} tokens, prompt "
            f"{cfg.max_sequence_length} tokens",
            "",
            "| base | rank | checkpointing | chunks (s at 30 Hz) | tokens | weights | adapters + grads + AdamW | "
            "activations | total | fits 20 GiB? |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for base in ("int8", "bf16"):
            for rank in ranks:
                for ckpt in (True, False):
                    for k in chunks:
                        rows = step_bytes(TrainSetup(preset, k, base, rank, ckpt))
                        weights = rows[f"base weights ({base}, frozen)"]
                        opt = rows["LoRA adapters"] + rows["adapter gradients"] + rows["AdamW states"]
                        act = rows["allocated (tensors)"] - weights - opt
                        seconds = k * cfg.frame_chunk_size * cfg.action_per_frame / 30
                        lines.append(
                            f"| {base} | {rank} | {'per block' if ckpt else 'off'} | {k} ({seconds:.1f}) | "
                            f"{sequence_tokens(cfg, k, True)} | {weights / GIB:.2f} | {opt / GIB:.2f} | "
                            f"{act / GIB:.2f} | {rows['total'] / GIB:.2f} | "
                            f"{'yes' if rows['total'] <= BUDGET_GIB * GIB else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def model_prediction(measured: dict) -> dict:
    """The model's CPU prediction for a measured step (first step, CPU kernels) and its ratios to
    the live-tensor peak and to the RSS peak above the baseline."""
    mc = dataclasses.replace(get_policy_config(measured["preset"]).model_config, num_layers=measured["layers"])
    setup = TrainSetup(measured["preset"], measured["chunks"], measured["base"], measured["rank"],
                       measured["checkpointing"], 4 if measured["adapter_dtype"] == "float32" else 2, model=mc)
    rows = step_bytes(setup, cpu=True, first_step=True)
    predicted = rows["allocated (tensors)"]
    out = {"model_cpu_bytes": predicted, "model_peak_phase": rows["peak phase"],
           "rss_over_model": measured["step_peak_above_baseline"] / predicted}
    if measured.get("live_peak_bytes"):
        out["live_over_model"] = measured["live_peak_bytes"] / predicted
    return out


def render_measured(paths) -> str:
    """The measured steps (`bench.train_step_measure --json` files) next to the model's CPU prediction."""
    import json
    import platform

    lines = [
        '<a id="measured"></a>',
        "## Measured: one step on the CPU against the model",
        "",
        "`python -m bench.train_step_measure` (random weights; the block Linears quantized to int8 by `quantize_`; "
        "rank-16 fp32 `LoRALinear` adapters on the 10 Linears of every block; per-block checkpointing; one step of "
        "`FlowMatchingLoss` on the grounded layout, backward, AdamW) in a fresh process, niced, 1 thread, on "
        f"{platform.processor() or platform.machine()} ({os_cpu_count()} cores). The model's prediction is "
        "`step_bytes(cpu=True, first_step=True)`: the first step (no AdamW state before it), the CPU's int8 kernel "
        "and layout mask. `live peak`: the peak of live tensor bytes during the step (a dispatch-mode tracker, "
        "what `max_memory_allocated` is on a GPU). `RSS peak`: VmHWM during the step minus the RSS before the "
        "model was built (imports excluded), with glibc's mmap threshold as listed: its dynamic default grows to "
        "32 MiB, and freed memory below it stays in the heap, so the RSS then counts the allocator's fragmentation "
        "too; the script's default `--mmap-threshold 65536` serves every allocation of 64 KiB or more by mmap.",
        "",
        "| DiT | episode | live peak | model | live / model | RSS peak | RSS / model | mmap threshold | step |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for path in paths:
        m = json.loads(Path(path).read_text())
        dim = get_policy_config(m["preset"]).model_config.dim
        p = model_prediction(m)
        threshold = m.get("mmap_threshold")
        lines.append(
            f"| {m['layers']} blocks x dim {dim}, {m['base']} base | {m['preset']}, {m['chunks']} chunks | "
            f"{_gib(m['live_peak_bytes'])} | {p['model_cpu_bytes'] / GIB:.3f} | {_ratio(p.get('live_over_model'))} | "
            f"{m['step_peak_above_baseline'] / GIB:.3f} | {p['rss_over_model']:.3f} | "
            f"{'glibc default (dynamic)' if threshold is None else f'{threshold // 1024} KiB'} | "
            f"{m['step_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def _gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.3f}"  # None: measured without tensor tracking (--no-track)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def os_cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="also write the table to this file (replaced atomically); default: print only")
    parser.add_argument("--measured", nargs="*", default=[], metavar="JSON",
                        help="`bench.train_step_measure --json` files to set against the model's CPU prediction")


def run(out: str | None = None, measured=()) -> str:
    text = render() + ("\n" + render_measured(measured) if measured else "")
    if out:
        write_text(out, text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(run(args.out, args.measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
