"""A known construction of activation outliers, for tests and demos of the calibration pipeline.

`inject_outlier_channels` multiplies a few input channels of chosen block Linears by `factor` and
divides the same weight columns by it, scaling the producer's output channels (the inverse of
smoothing, `calib.smoothing.FOLDABLE`): the model computes the same function (up to rounding), but
those Linears now see a few channels `factor` times larger than the rest, as the "massive
activations" of large transformers. Per-token or per-tensor 8-bit activations then spend their
range on those channels, and the weight columns that read them lose their precision too.
"""

from __future__ import annotations

import torch
from torch import nn

from .smoothing import apply_smoothing, producer

DEFAULT_TARGETS = ("blocks.0.attn1.to_out.0", "blocks.1.attn2.to_q")


def inject_outlier_channels(model: nn.Module, targets=DEFAULT_TARGETS, channels: int = 4, factor: float = 300.0,
                            seed: int = 0) -> dict[str, list[int]]:
    """Make `channels` input channels (seeded choice) of each target `factor` times larger, in place.
    Returns the channels per target."""
    g = torch.Generator().manual_seed(seed)
    chosen = {}
    factors = {}
    for name in targets:
        if producer(name) is None:
            raise ValueError(f"{name}: outliers can be injected only where a producer can carry them "
                             f"(attn1.to_out.0, attn2.to_out.0, attn2.to_q of a block)")
        linear = model.get_submodule(name)
        ch = torch.randperm(linear.in_features, generator=g)[:channels].sort().values
        s = torch.ones(linear.in_features)
        s[ch] = 1.0 / factor  # smoothing by 1/factor: the input grows, the weight columns shrink
        factors[name] = s
        chosen[name] = ch.tolist()
    apply_smoothing(model, factors)
    return chosen
