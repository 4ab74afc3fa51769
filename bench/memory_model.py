"""Memory model of the full LingBot-VA pipeline on one GPU, computed, not measured.

    python -m bench.memory_model                                   # prints the table
    python -m bench.memory_model --out bench/results/memory_model.md   # and writes it (what make bench does)

Counts come from the `full` preset built on the meta device (no allocation) and the policy
presets; sizes are GiB (2**30 bytes). What it counts:
- DiT weights per scheme: block Linears (attn1, attn2, ffn) at the scheme's bytes per weight plus
  one scale per output channel; everything else (embedders, modulation, norms, heads) in bf16.
- Wan2.2 VAE: the encoder runs every chunk; the decoder only for debug videos.
- UMT5-XXL: needed only on a prompt-cache miss, and then on the CPU or released after encoding.
- Self-attention KV cache: layers x CFG rows x capacity x dim x (K, V) x 2 bytes (bf16).
- Prompt cross-attention K/V computed once per prompt: layers x CFG rows x 512 x dim x 2 x 2 bytes.
- Activations: the largest per-forward working set (FFN hidden + attention logits when the math
  SDPA kernel materialises them), with the CUDA context and allocator slack as a fixed reserve.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from lingbot_edge.core.config import MODEL_PRESETS, PolicyConfig, get_policy_config
from lingbot_edge.io.checkpoint import build_meta_model
from lingbot_edge.io.files import write_text

GIB = 2**30
# Parameter counts of the frozen parts (diffusers AutoencoderKLWan Wan2.2 config, UMT5-XXL encoder).
VAE_ENCODER_PARAMS = 150e6
VAE_TOTAL_PARAMS = 705e6
UMT5_XXL_PARAMS = 5.7e9
CUDA_RESERVE_GIB = 0.6  # CUDA context + cuBLAS workspace + allocator slack (typical on a 4090)

# Bytes per block-Linear weight and per output-channel scale.
SCHEMES: dict[str, tuple[float, int]] = {
    "bf16": (2.0, 0),
    "int8": (1.0, 4),  # int8 weight-only / W8A8: fp32 or bf16 scale per output channel (count 4)
    "fp8": (1.0, 4),
    "int4": (0.5, 4 * 14336 // 128),  # group 128: one scale per group (upper bound used per row)
}


@dataclass(frozen=True)
class DiTBytes:
    quantizable: int  # block Linear weights
    quantizable_rows: int  # their output channels (one scale each)
    other: int  # parameters kept in bf16


def dit_param_counts() -> DiTBytes:
    model = build_meta_model(MODEL_PRESETS["full"])
    q = rows = other = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("blocks.") and (".attn" in name or ".ffn" in name):
            q += mod.weight.numel()
            rows += mod.weight.shape[0]
            other += mod.bias.numel() if mod.bias is not None else 0
    total = sum(p.numel() for p in model.parameters())
    return DiTBytes(quantizable=q, quantizable_rows=rows, other=total - q)


def dit_bytes(scheme: str, counts: DiTBytes | None = None) -> float:
    counts = counts or dit_param_counts()
    per_weight, per_row = SCHEMES[scheme]
    return counts.quantizable * per_weight + counts.quantizable_rows * per_row + counts.other * 2


def kv_cache_bytes(cfg: PolicyConfig) -> float:
    mc = cfg.model_config
    return mc.num_layers * cfg.cfg_batch * cfg.cache_capacity * mc.dim * 2 * 2


def text_kv_bytes(cfg: PolicyConfig) -> float:
    mc = cfg.model_config
    return mc.num_layers * cfg.cfg_batch * cfg.max_sequence_length * mc.dim * 2 * 2


def activation_bytes(cfg: PolicyConfig) -> float:
    mc = cfg.model_config
    tokens = cfg.cfg_batch * cfg.video_tokens_per_chunk
    ffn = tokens * mc.ffn_dim * 2 * 2  # GELU input + output, bf16
    keys = cfg.cache_capacity + cfg.video_tokens_per_chunk
    logits = cfg.cfg_batch * mc.num_attention_heads * cfg.video_tokens_per_chunk * keys * 4  # fp32 math SDPA
    residual = tokens * mc.dim * 4 * 6  # fp32 residual, modulation and norm temporaries
    return ffn + logits + residual


def budget(preset: str, scheme: str, counts: DiTBytes) -> dict[str, float]:
    cfg = get_policy_config(preset)
    rows = {
        "DiT weights": dit_bytes(scheme, counts),
        "VAE encoder (bf16)": VAE_ENCODER_PARAMS * 2,
        "KV cache (bf16)": kv_cache_bytes(cfg),
        "prompt cross-attn K/V": text_kv_bytes(cfg),
        "activations (peak forward)": activation_bytes(cfg),
    }
    # What torch.cuda.max_memory_allocated reports, then what the card must hold.
    rows["allocated (tensors)"] = sum(rows.values())
    rows["CUDA context + slack"] = CUDA_RESERVE_GIB * GIB
    rows["total"] = rows["allocated (tensors)"] + rows["CUDA context + slack"]
    return {k: v / GIB for k, v in rows.items()}


def render(counts: DiTBytes) -> str:
    lines = [
        "# Memory model: full LingBot-VA on one GPU (GiB = 2**30 bytes, computed)",
        "",
        f"DiT: {counts.quantizable / 1e9:.2f}B quantizable block-Linear weights + {counts.other / 1e9:.2f}B other "
        "parameters (bf16). UMT5-XXL "
        f"({UMT5_XXL_PARAMS * 2 / GIB:.1f} GiB in bf16) is not resident: prompts are encoded once, on the CPU or "
        "released after encoding. VAE decoder "
        f"({(VAE_TOTAL_PARAMS - VAE_ENCODER_PARAMS) * 2 / GIB:.1f} GiB) only for debug videos.",
        "",
    ]
    for preset in ("libero", "robotwin", "so100"):
        cfg = get_policy_config(preset)
        lines += [
            f"## {preset}: {cfg.height}x{cfg.width}, {len(cfg.obs_cam_keys)} cameras, CFG batch {cfg.cfg_batch}, "
            f"cache capacity {cfg.cache_capacity} tokens",
            "",
            "| component | " + " | ".join(SCHEMES) + " |",
            "|---|" + "---:|" * len(SCHEMES),
        ]
        budgets = {s: budget(preset, s, counts) for s in SCHEMES}
        for row in budgets["bf16"]:
            lines.append(f"| {row} | " + " | ".join(f"{budgets[s][row]:.2f}" for s in SCHEMES) + " |")
        for cap in (8, 16, 24):
            fits = ["yes" if budgets[s]["total"] <= cap else "no" for s in SCHEMES]
            lines.append(f"| fits {cap} GiB? | " + " | ".join(fits) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the table to this file (replaced atomically); default: print only")
    args = parser.parse_args(argv)
    text = render(dit_param_counts())
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
