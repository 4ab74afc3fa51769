"""SmoothQuant-style per-channel smoothing, folded exactly into the weights.

For a Linear y = x W^T, dividing input channel j by s_j and multiplying weight column j by s_j
changes nothing in exact arithmetic but moves the range of outlier channels from the activations
(quantized per token or per tensor) into the weights (quantized per output channel):
s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (SmoothQuant, alpha 0.5).

The division must happen where x_j is produced. In this DiT that is exact for three Linears of each
block, whose input is a per-channel linear function of one producer's output:

- `attn1.to_out.0` and `attn2.to_out.0`: the attention output is a convex mix of value rows, so
  channel j scales with row j of the same attention's `to_v` (weight and bias);
- `attn2.to_q`: its input is `norm2` with its affine weight and bias.

The other block Linears read the modulated norm1 / norm3 outputs (the modulation comes from
`time_proj`, shared by all blocks), the prompt context (shared by all blocks) or a GELU output: their
smoothing needs a per-channel input multiplier in the runtime kernel (not in the quantized format
yet), so they are reported, not smoothed. The weights of the producer change by rows, which a
per-output-channel weight quantization absorbs exactly.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .stats import ActivationStats

# consumer suffix -> producer suffix (same block)
FOLDABLE = {"attn1.to_out.0": "attn1.to_v", "attn2.to_out.0": "attn2.to_v", "attn2.to_q": "norm2"}
MIN_FACTOR = 1e-5


def producer(name: str) -> str | None:
    """The module whose output channels feed `name`'s input channels one to one, if foldable."""
    m = re.fullmatch(r"(blocks\.\d+)\.(.+)", name)
    if m is None or m.group(2) not in FOLDABLE:
        return None
    return f"{m.group(1)}.{FOLDABLE[m.group(2)]}"


def smoothing_factors(model: nn.Module, stats: ActivationStats, names: list[str], alpha: float = 0.5
                      ) -> dict[str, Tensor]:
    """s [in_features] fp32 per foldable Linear of `names` (others are skipped)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    factors = {}
    for name in names:
        if producer(name) is None or name not in stats.modules:
            continue
        x_max = stats.summary(name).channel_absmax.float()
        w_max = model.get_submodule(name).weight.detach().abs().amax(dim=0).float().cpu()
        s = x_max.pow(alpha) / w_max.pow(1 - alpha).clamp_min(MIN_FACTOR)
        # Channels never active (or dead weights) stay as they are.
        s = torch.where((x_max > 0) & (w_max > 0), s.clamp_min(MIN_FACTOR), torch.ones_like(s))
        factors[name] = s
    return factors


@torch.no_grad()
def apply_smoothing(model: nn.Module, factors: dict[str, Tensor]) -> None:
    """Fold `factors` into the model in place: producer output channel j / s_j, consumer weight
    column j * s_j (the function is unchanged up to rounding)."""
    for name, s in factors.items():
        src = producer(name)
        if src is None:
            raise ValueError(f"{name}: no producer to fold a smoothing factor into (foldable: {sorted(FOLDABLE)})")
        consumer, prod = model.get_submodule(name), model.get_submodule(src)
        s = s.to(consumer.weight.device, torch.float32)
        # In fp32, rounded once to the weights' dtype (a bf16 model is smoothed with one rounding per weight).
        prod.weight.copy_(prod.weight.float() / s.view(-1, *([1] * (prod.weight.dim() - 1))))
        if prod.bias is not None:
            prod.bias.copy_(prod.bias.float() / s)
        consumer.weight.copy_(consumer.weight.float() * s.view(1, -1))


def smoothed_absmax(stats: ActivationStats, name: str, factors: dict[str, Tensor]) -> float:
    """Input absmax of `name` after smoothing (per-channel maxima scale exactly)."""
    channel = stats.summary(name).channel_absmax
    if name in factors:
        channel = channel / factors[name]
    return float(channel.max())
