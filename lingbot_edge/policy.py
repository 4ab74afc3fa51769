"""The policy: openpi-style `reset(prompt)` / `infer(obs) -> dict` / `feedback(...)`.

One episode:

    policy.reset(prompt="pick up the cube")
    out = policy.infer({"observation.images.image": img0, ...})   # first chunk: conditions on obs
    ... execute out["actions"] (steps x used channels) and record keyframes ...
    policy.feedback(frames={cam: [T, H, W, 3] uint8}, executed_actions=out["actions"])
    out = policy.infer({})                                           # next chunk
    ...

Per chunk the robot executes `steps` actions; for feedback it records one camera frame every
`action_per_frame / 4` steps (4 frames per latent frame: the VAE's temporal compression), i.e.
4 * (F - 1) frames after the first chunk and 4 * F after the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .actions import ActionCodec
from .config import VAE_TEMPORAL, PolicyConfig, get_policy_config
from .model import WanVATransformer
from .sampler import ReferenceSampler, StaticSampler

log = logging.getLogger(__name__)


class PhaseTimer:
    """Wall time per phase; on CUDA with events so phases cost no extra host sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = [("start", self._now())]

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        self.marks.append((phase, self._now()))

    def result(self) -> dict[str, float]:
        """Milliseconds per phase plus `total`; call after the results were read back (synced)."""
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:], strict=False):
            out[f"{name}_ms"] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        out["total_ms"] = sum(out.values())
        return out


class LingBotPolicy:
    def __init__(
        self,
        cfg: PolicyConfig,
        model: WanVATransformer,
        obs_encoder,
        prompt_encoder,
        sampler: str = "static",
        compile: bool = True,
        seed: int = 0,
    ):
        if model.config != cfg.model_config:
            raise ValueError(f"model: its config does not match preset {cfg.name!r}'s model {cfg.model!r}")
        self.cfg = cfg
        self.model = model
        self.device = next(model.parameters()).device
        self.obs_encoder = obs_encoder
        self.prompt_encoder = prompt_encoder
        self.codec = ActionCodec(cfg)
        if sampler == "static":
            self.sampler = StaticSampler(model, cfg, compile=compile)
        elif sampler == "reference":
            self.sampler = ReferenceSampler(model, cfg)
        else:
            raise ValueError(f"sampler: expected 'static' or 'reference', got {sampler!r}")
        self.seed = seed
        self._prompt_cache: dict[str, tuple[Tensor, Tensor | None]] = {}
        self.prompt: str | None = None

    # ------------------------------------------------------------------ episode state

    def reset(self, prompt: str, seed: int | None = None) -> None:
        """Start an episode: encode the prompt (once per distinct prompt), empty the caches."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected str, got {type(prompt).__name__}")
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self.prompt_encoder.encode_pair(prompt, self.cfg.use_cfg)
        cond, uncond = self._prompt_cache[prompt]
        self.sampler.reset(cond, uncond)
        self.obs_encoder.reset()
        self.prompt = prompt
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed if seed is None else seed)
        self.chunk_index = 0
        self.init_latent: Tensor | None = None
        self.awaiting_feedback = False

    def _noise(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------------ openpi interface

    @torch.no_grad()
    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """Predict the next chunk. The first chunk of an episode needs one frame per camera in obs."""
        if self.prompt is None:
            raise RuntimeError("infer: call reset(prompt=...) first")
        if self.awaiting_feedback:
            raise RuntimeError("infer: call feedback(...) with the executed chunk before the next infer")
        timer = PhaseTimer(self.device)
        first = self.chunk_index == 0
        first_latent = None
        if first:
            frames = {k: obs[k] for k in self.cfg.obs_cam_keys if k in obs}
            missing = [k for k in self.cfg.obs_cam_keys if k not in obs]
            if missing:
                raise ValueError(f"obs: the first chunk needs camera images {missing} (HxWx3 uint8)")
            first_latent = self.obs_encoder.encode(frames).to(self.sampler.dtype)
            self.init_latent = first_latent
            timer.mark("encode_obs")
        result = self.sampler.sample_chunk(
            self._noise(self.sampler.latent_shape), self._noise(self.sampler.action_shape), first_latent, timer=timer
        )
        actions = self.codec.to_robot(result.actions, first_chunk=first)  # host copy: syncs once
        self.last_result = result
        self.awaiting_feedback = True
        return {
            "actions": actions,
            "chunk": self.chunk_index,
            "frame_start": self.sampler.frame_start,
            "timing": timer.result(),
        }

    @torch.no_grad()
    def feedback(self, frames: Mapping[str, Any], executed_actions: np.ndarray) -> dict[str, float]:
        """Write what really happened into the cache: the keyframes observed while the chunk ran
        ({camera: [T, H, W, 3] uint8}, T = 4 * latent frames) and the actions executed."""
        if not self.awaiting_feedback:
            raise RuntimeError("feedback: no chunk to feed back (call infer first)")
        timer = PhaseTimer(self.device)
        first = self.chunk_index == 0
        want_t = VAE_TEMPORAL * (self.cfg.frame_chunk_size - (1 if first else 0))
        for key in self.cfg.obs_cam_keys:
            if key not in frames:
                raise ValueError(f"frames: missing camera {key!r}; expected {list(self.cfg.obs_cam_keys)}")
            t = np.shape(frames[key])[0] if np.ndim(frames[key]) == 4 else 1
            if t != want_t:
                raise ValueError(f"frames[{key!r}]: expected {want_t} keyframes [T, H, W, 3], got {t}")
        actions = self.codec.from_robot(executed_actions, first_chunk=first).to(self.device)
        latents = self.obs_encoder.encode(frames).to(self.sampler.dtype)
        if first:  # the conditioning frame is the chunk's latent frame 0
            latents = torch.cat([self.init_latent, latents], dim=2)
        timer.mark("encode_obs")
        self.sampler.feedback(latents, actions, timer=timer)
        self.chunk_index += 1
        self.awaiting_feedback = False
        return timer.result()


def build_tiny_policy(sampler: str = "static", compile: bool = True, seed: int = 0,
                      device: str = "cpu", dtype: torch.dtype = torch.float32) -> LingBotPolicy:
    """The embedded default: tiny DiT + tiny VAE / UMT5 / byte tokenizer, all built in-process."""
    from .checkpoint import build_model
    from .frozen import (
        ByteTokenizer,
        ObservationEncoder,
        PromptEncoder,
        StreamingVAEEncoder,
        build_tiny_umt5,
        build_tiny_vae,
    )

    cfg = get_policy_config("tiny")
    mc = cfg.model_config
    model = build_model(mc, dtype=dtype, device=device, seed=seed)
    vae = StreamingVAEEncoder(build_tiny_vae(z_dim=mc.in_channels, seed=seed), device=device, dtype=torch.float32)
    obs_encoder = ObservationEncoder(vae, list(cfg.obs_cam_keys), cfg.height, cfg.width)
    umt5 = build_tiny_umt5(d_model=mc.text_dim, seed=seed)
    prompt_encoder = PromptEncoder(umt5, ByteTokenizer(), cfg.max_sequence_length, device=device, dtype=dtype)
    return LingBotPolicy(cfg, model, obs_encoder, prompt_encoder, sampler=sampler, compile=compile, seed=seed)
