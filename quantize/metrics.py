"""Accuracy of a quantized DiT against its high-precision original.

- `layer_sqnr`: each quantized Linear fed the exact inputs its original sees during a run, SQNR of
  its output (the isolated error of that layer, as torchao's `compute_error`).
- `run_episode` + `episode_error`: both models through the static sampler with the same noise,
  observed latents and executed actions (fed back identically, so errors do not compound through
  different histories): action RMS error (normalized units) and cosine, video latent SQNR.
- `synthetic_calibration`: a calibration function running a random-input episode, for schemes
  with calibrated activations when no recorded data is at hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lingbot_edge.core.actions import action_error
from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.qlinear import quantized_linears
from lingbot_edge.core.sampler import ChunkResult, StaticSampler
from lingbot_edge.io.episodes import Episode


def sqnr(ref: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - test|^2)."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def layer_sqnr(float_model: nn.Module, quantized_model: nn.Module,
               run: Callable[[nn.Module], object]) -> dict[str, float]:
    """Per quantized Linear: SQNR of its output vs the original Linear's, on the inputs the original
    receives while `run(float_model)` executes. Streams sums: no activation is stored."""
    qmodules = quantized_linears(quantized_model)
    signal = dict.fromkeys(qmodules, 0.0)
    noise = dict.fromkeys(qmodules, 0.0)

    def compare(name: str):
        def hook(module, args, out):
            test = qmodules[name](args[0]).double()
            signal[name] += out.double().pow(2).sum().item()
            noise[name] += (out.double() - test).pow(2).sum().item()

        return hook

    handles = [float_model.get_submodule(name).register_forward_hook(compare(name)) for name in qmodules]
    try:
        with torch.no_grad():
            run(float_model)
    finally:
        for h in handles:
            h.remove()
    return {name: math.inf if noise[name] == 0 else 10 * math.log10(signal[name] / noise[name]) for name in qmodules}


def make_episode(cfg: PolicyConfig, chunks: int, seed: int = 0, text_std: float = 1.0) -> Episode:
    mc = cfg.model_config
    g = torch.Generator().manual_seed(seed)
    latent_shape = (1, mc.in_channels, cfg.frame_chunk_size, *cfg.latent_hw)
    action_shape = (1, mc.action_dim, cfg.frame_chunk_size, cfg.action_per_frame, 1)
    text = torch.randn(1, cfg.max_sequence_length, mc.text_dim, generator=g) * text_std
    negative = torch.randn(1, cfg.max_sequence_length, mc.text_dim, generator=g) * text_std
    first = torch.randn(*latent_shape[:2], 1, *latent_shape[3:], generator=g)
    steps = [
        dict(
            noise_video=torch.randn(latent_shape, generator=g),
            noise_action=torch.randn(action_shape, generator=g),
            observed=torch.randn(latent_shape, generator=g),
            executed=torch.randn(action_shape, generator=g).clamp(-1, 1),
        )
        for _ in range(chunks)
    ]
    return Episode(text, negative, first, steps)


def run_episode(model: nn.Module, cfg: PolicyConfig, episode: Episode, compile: bool = False,
                sampler: StaticSampler | None = None) -> list[ChunkResult]:
    """All chunks of `episode` through the static sampler (a new one unless given)."""
    sampler = sampler or StaticSampler(model, cfg, compile=compile)
    sampler.reset(episode.text, episode.negative_text)
    results = []
    for i, step in enumerate(episode.chunks):
        result = sampler.sample_chunk(step["noise_video"], step["noise_action"],
                                      episode.first_latent if i == 0 else None)
        results.append(ChunkResult(actions=result.actions.float().cpu(), latents=result.latents.float().cpu()))
        sampler.feedback(step["observed"], step["executed"])
    return results


def _latents(results: list[ChunkResult]) -> Tensor:
    """Latents of every chunk, without the first chunk's pinned frame 0."""
    return torch.cat([r.latents[:, :, 1 if i == 0 else 0:].flatten() for i, r in enumerate(results)]).double()


def episode_error(reference: list[ChunkResult], test: list[ChunkResult], cfg: PolicyConfig) -> dict[str, float]:
    """action_rms (normalized units), action_rel_rms (/ reference RMS), action_cos (all three from
    `lingbot_edge.core.actions.action_error`: used channels, executed steps), latent_sqnr (dB)."""
    errors = action_error([r.actions for r in reference], [r.actions for r in test], cfg)
    return dict(**errors, latent_sqnr=sqnr(_latents(reference), _latents(test)))


def synthetic_calibration(cfg: PolicyConfig, chunks: int = 2, seed: int = 0) -> Callable[[nn.Module], None]:
    """Calibration by a random-input episode (eager sampler). A stand-in: activation ranges from
    real prompts and observations (the calibration issue) are what a deployed model should use."""

    def calibrate(model: nn.Module) -> None:
        run_episode(model, cfg, make_episode(cfg, chunks, seed=seed))

    return calibrate
