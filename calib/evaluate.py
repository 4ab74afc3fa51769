"""End-to-end error of a (partial) quantization: the model with some Linears swapped for runtime
`QuantizedLinear`s, run over fixed calibration episodes, against the unquantized model's outputs.

Swaps are temporary (`quantized_modules` restores the original Linears), so one model object
serves every sensitivity measurement and every plan verification without a copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.sampler import StaticSampler
from lingbot_edge.io.episodes import Episode
from quantize import Scheme
from quantize.api import needs_calibration
from quantize.metrics import episode_error, run_episode
from quantize.schemes import quantize_linear

KEEP_DTYPE_BYTES = 2  # deployed weights are bf16: the byte counts compare against that


@dataclass(frozen=True)
class Error:
    """Over all episodes: action RMS (normalized units; RMS over episodes), worst action cosine,
    worst video latent SQNR (dB)."""

    action_rms: float
    action_cos: float
    latent_sqnr: float

    def to_dict(self) -> dict[str, float]:
        return {"action_rms": self.action_rms, "action_cos": self.action_cos, "latent_sqnr": self.latent_sqnr}


def linear_deploy_bytes(linear: nn.Linear, scheme: Scheme | None) -> int:
    """Deployed bytes of a Linear: bf16 when kept; 8-bit data + fp32 per-channel scales (+ an input
    scale for static activations) when quantized; the bias stays bf16 either way."""
    out_features, in_features = linear.weight.shape
    bias = out_features * KEEP_DTYPE_BYTES if linear.bias is not None else 0
    if scheme is None:
        return out_features * in_features * KEEP_DTYPE_BYTES + bias
    return out_features * in_features + out_features * 4 + bias + (4 if needs_calibration(scheme) else 0)


def static_qmax(scheme: Scheme) -> float:
    return 127.0 if scheme.runtime_format().weight == "int8" else float(torch.finfo(torch.float8_e4m3fn).max)


@contextmanager
def quantized_modules(model: nn.Module, assignment: Mapping[str, Scheme],
                      input_absmax: Mapping[str, float] | None = None) -> Iterator[None]:
    """`model` with the Linears of `assignment` quantized (runtime kernels), restored on exit.
    Static-activation schemes take their input scale from `input_absmax` (captured statistics)."""
    originals = {name: model.get_submodule(name) for name in assignment}
    try:
        for name, scheme in assignment.items():
            q = quantize_linear(scheme, originals[name])
            if needs_calibration(scheme):
                if input_absmax is None or name not in input_absmax:
                    raise ValueError(f"{name}: {scheme.label} needs a static input scale: capture statistics first")
                q.input_scale.fill_(max(input_absmax[name], torch.finfo(torch.float32).eps) / static_qmax(scheme))
            model.set_submodule(name, q)
        yield
    finally:
        for name, linear in originals.items():
            model.set_submodule(name, linear)


class Evaluator:
    """Runs `episodes` once unquantized (the reference), then any assignment against it."""

    def __init__(self, model: nn.Module, cfg: PolicyConfig, episodes: list[Episode],
                 input_absmax: Mapping[str, float] | None = None):
        self.model, self.cfg, self.episodes = model, cfg, episodes
        self.input_absmax = dict(input_absmax or {})
        self.sampler = StaticSampler(model, cfg, compile=False)
        self.reference = [self._run(e) for e in episodes]
        self.runs = 0

    def _run(self, episode: Episode):
        return run_episode(self.model, self.cfg, episode, sampler=self.sampler)

    def error(self, assignment: Mapping[str, Scheme]) -> Error:
        self.runs += 1
        with quantized_modules(self.model, assignment, self.input_absmax):
            errors = [episode_error(ref, self._run(e), self.cfg) for ref, e in zip(self.reference, self.episodes,
                                                                                     strict=True)]
        return Error(
            action_rms=math.sqrt(sum(e["action_rms"] ** 2 for e in errors) / len(errors)),
            action_cos=min(e["action_cos"] for e in errors),
            latent_sqnr=min(e["latent_sqnr"] for e in errors),
        )
