"""Frozen encoders of the policy: observations through the Wan2.2 VAE, prompts through UMT5.

docs/design.md section 3 ("Observation encoding", "Prompt"). Both encoders take already-built models
(diffusers `AutoencoderKLWan`, transformers `UMT5EncoderModel`) plus a tokenizer callable;
`lingbot_edge.io.loading` builds them from the released folders and `lingbot_edge.io.prompt_cache` keeps
prompt embeddings so UMT5 runs once per prompt, ever. For tests and the `tiny` preset,
`ByteTokenizer` and the builders of `lingbot_edge.io.tiny` make small stand-ins offline.
`decode_latents` / `write_mp4` turn predicted latents into a video for debugging.

diffusers / transformers / imageio are imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from lingbot_edge.io.files import write_file
from lingbot_edge.io.torchvision_compat import ensure_torchvision_importable

# transformers / diffusers import torchvision when it is installed; a LeRobot venv has a broken
# CUDA build of it. Fix that before any of our lazy imports of them (no-op without torchvision).
ensure_torchvision_importable()

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

logger = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "ByteTokenizer",
    "HFTokenizer",
    "VAEObservationEncoder",
    "UMT5PromptEncoder",
    "StreamingVAEEncoder",
    "Tokenizer",
    "clean_prompt",
    "decode_latents",
    "save_predicted_video",
    "write_mp4",
]






# The tiny tokenizer's training corpus (robot-task words); its alphabet covers any ASCII prompt.




# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What `UMT5PromptEncoder` needs: prompts -> (input_ids, attention_mask), both LongTensor [B, max_length]."""

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class ByteTokenizer:
    """Offline stand-in for the T5 tokenizer, used with the tiny UMT5 (tiny preset and tests only).

    Each UTF-8 byte b maps to id `b % (vocab_size - 3) + 3` (ids 0..2 are T5's pad / eos / unk), then
    eos (1) is appended and the row is right-padded with pad (0). Too-long prompts are truncated so
    that eos stays the last real token, like the T5 tokenizer with `truncation=True`.
    """

    pad_id = 0
    eos_id = 1

    def __init__(self, vocab_size: int = 256) -> None:
        if vocab_size <= 3:
            raise ValueError(f"vocab_size: expected > 3 (ids 0..2 are reserved), got {vocab_size}")
        self.vocab_size = vocab_size

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("prompts: expected list[str], got str")
        if max_length < 1:
            raise ValueError(f"max_length: expected >= 1, got {max_length}")
        ids = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), max_length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [b % (self.vocab_size - 3) + 3 for b in prompt.encode("utf-8")][: max_length - 1]
            tokens.append(self.eos_id)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask


class HFTokenizer:
    """Adapts a transformers tokenizer (e.g. the released T5 tokenizer) to the `Tokenizer` protocol,
    with the arguments Wan uses: pad to max_length, truncate, add special tokens (eos)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_ids"].long(), out["attention_mask"].long()


# --------------------------------------------------------------------------------------------------
# Prompt encoder
# --------------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's `prompt_clean` without ftfy: unescape HTML twice (double-escaped input), collapse whitespace."""
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5PromptEncoder:
    """Prompt -> UMT5 `last_hidden_state` [1, max_sequence_length, d_model], zeros past the real length.

    Computed once per prompt (the policy caches the result); the text encoder is not needed afterwards,
    so callers may drop this object to free it.
    """

    def __init__(
        self,
        text_encoder: UMT5EncoderModel,
        tokenizer: Tokenizer,
        max_sequence_length: int = 512,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: expected >= 1, got {max_sequence_length}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        self.tokenizer = tokenizer
        # Runs in the encoder's own dtype (T5 overflows in fp16); only the output is cast to `dtype`.
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)

    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, padded (input_ids, attention_mask), each [1, max_sequence_length], on `device`."""
        ids, mask = self.tokenizer([clean_prompt(prompt)], max_length=self.max_sequence_length)
        expected = (1, self.max_sequence_length)
        if tuple(ids.shape) != expected or tuple(mask.shape) != expected:
            raise ValueError(
                f"tokenizer: expected input_ids and attention_mask of shape {list(expected)}, "
                f"got {list(ids.shape)} and {list(mask.shape)}"
            )
        return ids.to(self.device), mask.to(self.device)

    # no_grad rather than inference_mode: the embeddings are kept and fed to other (possibly compiled)
    # modules for a whole episode, and inference tensors cannot be used in-place/saved outside it.
    @torch.no_grad()
    def _run(self, prompt: str) -> tuple[torch.Tensor, int]:
        """(last_hidden_state [1, max_sequence_length, d_model] in the encoder's dtype, real length)."""
        if self.text_encoder is None:
            raise RuntimeError("UMT5PromptEncoder: the text encoder was released; build a new UMT5PromptEncoder")
        ids, mask = self.tokenize(prompt)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, int(mask[0].sum())

    def encode(self, prompt: str) -> torch.Tensor:
        """[1, max_sequence_length, d_model] in `dtype`: UMT5 output, exactly zero past the real length."""
        hidden, seq_len = self._run(prompt)
        # Zero at/after the real length (Wan trims to seq_len and re-pads with zeros); torch.where
        # rather than a multiply so non-finite values at padded positions cannot leak through.
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < seq_len
        hidden = torch.where(
            keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        )
        return hidden.to(self.dtype)

    def encode_trimmed(self, prompt: str) -> torch.Tensor:
        """[seq_len, d_model] in `dtype`: the real positions only (what `encode` pads with zeros)."""
        hidden, seq_len = self._run(prompt)
        return hidden[0, :seq_len].to(self.dtype)

    def release(self) -> None:
        """Drop this object's reference to the text encoder (the caller frees memory once no other
        reference is left; see `prompt_cache.PromptCache.release_encoder`)."""
        self.text_encoder = None

    def encode_pair(self, prompt: str, use_cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond): uncond encodes the empty negative prompt, only when CFG is on."""
        cond = self.encode(prompt)
        uncond = self.encode("") if use_cfg else None
        return cond, uncond


# --------------------------------------------------------------------------------------------------
# Observation (VAE) encoder
# --------------------------------------------------------------------------------------------------


def _patchify_fallback(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Same layout as diffusers' `autoencoder_kl_wan.patchify`: [B,C,T,H,W] -> [B, C*p*p, T, H/p, W/p]
    with channel order (c, p_w, p_h). Used only if that private function moves."""
    if patch_size == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // patch_size, patch_size, w // patch_size, patch_size)
    x = x.permute(0, 1, 6, 4, 2, 3, 5).contiguous()
    return x.view(b, c * patch_size * patch_size, t, h // patch_size, w // patch_size)


def _wan_patchify() -> Any:
    try:
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify
    except ImportError:  # pragma: no cover - depends on the installed diffusers
        logger.warning("diffusers' Wan patchify not importable; using the local copy")
        return _patchify_fallback
    return patchify


def _encoder_cache_size(vae: AutoencoderKLWan) -> int:
    """Slots in the encoder's causal-conv cache, as diffusers sizes it in `clear_cache`."""
    counts = getattr(vae, "_cached_conv_counts", None)
    if isinstance(counts, Mapping) and "encoder" in counts:
        return int(counts["encoder"])
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())


class StreamingVAEEncoder:
    """Causal streaming encode with the Wan VAE: the conv cache persists across `encode` calls.

    After `reset()`, the first call takes 1 frame (-> 1 latent frame); each later call takes 4k frames
    (-> k latent frames). Concatenating the outputs equals diffusers' whole-clip `_encode` of
    1 + 4k frames, which walks the clip in exactly this 1, 4, 4, ... pattern with the same cache.
    Output: the posterior mean, normalized `(mu - latents_mean) / latents_std`, in `dtype`.

    Only the parts the encode runs (`vae.encoder`, `vae.quant_conv`) are moved to `device` / `dtype`
    (in place); the decoder stays where it is (CPU after `loading.load_vae`), so the Wan2.2 VAE costs
    its ~150M encoder parameters on the GPU, not all ~705M. The state of a stream is only `feat_cache`:
    several encoders may share one `vae` module (the robotwin T-shape runs two streams on one set of
    weights) as long as they use the same device and dtype.
    """

    def __init__(
        self,
        vae: AutoencoderKLWan,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        # Plain nn.Module.to on the submodules: no diffusers dtype warnings, no decoder copy.
        for part in (vae.encoder, vae.quant_conv):
            part.to(device=self.device, dtype=dtype)
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.z_dim = int(cfg.z_dim)
        self.patch_size = int(cfg.patch_size or 1)
        self.in_channels = int(cfg.in_channels) // (self.patch_size * self.patch_size)
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", None) or 8)
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", None) or 4)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=self.device)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=self.device)
        if mean.numel() != self.z_dim or std.numel() != self.z_dim:
            raise ValueError(
                f"vae.config: latents_mean/latents_std need {self.z_dim} values, "
                f"got {mean.numel()}/{std.numel()}"
            )
        self._mean = mean.view(1, -1, 1, 1, 1)
        self._std = std.view(1, -1, 1, 1, 1)
        self._patchify = _wan_patchify()
        self._cache_size = _encoder_cache_size(vae)
        self.feat_cache: list[Any] = []
        self.reset()

    def reset(self) -> None:
        """Start a new stream (episode): clear the causal conv cache."""
        self.feat_cache = [None] * self._cache_size
        self.frames_seen = 0
        self._stream_shape: tuple[int, int, int] | None = None  # (N, H, W) fixed within a stream

    def _check(self, video: torch.Tensor) -> None:
        if not isinstance(video, torch.Tensor):
            raise TypeError(
                f"video: expected a torch.Tensor [N, {self.in_channels}, T, H, W], got {type(video)}"
            )
        shape = list(video.shape)
        if video.ndim != 5 or shape[1] != self.in_channels:
            raise ValueError(f"video: expected shape [N, {self.in_channels}, T, H, W], got {shape}")
        n, _, t, h, w = shape
        if self.frames_seen == 0 and t != 1:
            raise ValueError(
                f"video: expected [N, {self.in_channels}, 1, H, W] on the first call after reset(), "
                f"got {shape}"
            )
        if self.frames_seen > 0 and (t == 0 or t % self.temporal_factor != 0):
            raise ValueError(
                f"video: expected [N, {self.in_channels}, {self.temporal_factor}k, H, W] (k >= 1) "
                f"after the first call, got {shape}"
            )
        if h % self.spatial_factor != 0 or w % self.spatial_factor != 0:
            raise ValueError(f"video: expected H and W divisible by {self.spatial_factor}, got {shape}")
        if self._stream_shape is not None and (n, h, w) != self._stream_shape:
            sn, sh, sw = self._stream_shape
            raise ValueError(
                f"video: expected [{sn}, {self.in_channels}, T, {sh}, {sw}] within one stream "
                f"(call reset() to change), got {shape}"
            )

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [N, 3, T, H, W] in [-1, 1] -> normalized latents [N, z_dim, T', H/16, W/16] in `dtype`."""
        self._check(video)
        x = self._patchify(video.to(device=self.device, dtype=self.dtype), self.patch_size)
        # feat_idx restarts at 0 every call: it is the slot cursor, the slots themselves persist.
        h = self.vae.encoder(x, feat_cache=self.feat_cache, feat_idx=[0])
        h = self.vae.quant_conv(h)
        mu = h[:, : self.z_dim].float()  # DiagonalGaussianDistribution: mean = first half of channels
        latents = (mu - self._mean) / self._std
        self._stream_shape = (video.shape[0], video.shape[3], video.shape[4])
        self.frames_seen += video.shape[2]
        return latents.to(self.dtype)


LAYOUTS = ("width_concat", "robotwin_tshape")


class VAEObservationEncoder:
    """Camera frames -> one latent observation [1, z_dim, T', h, w] in the configured camera layout.

    Every camera is resized (bilinear) and scaled to [-1, 1], then encoded as one batch row of a
    streaming VAE (the causal conv cache persists until `reset()`):

    - `width_concat` (LIBERO, SO-100): all cameras at (height, width) through one stream, latents
      concatenated along width in camera order: h = height/16, w = (width/16) * num_cams.
    - `robotwin_tshape` (RoboTwin; exactly 3 cameras: head, left wrist, right wrist): the head at
      (height, width) through `vae_encoder`, the two wrists at (height/2, width/2) as two batch rows of
      a second stream `wrist_encoder` (its own causal cache; by default a second `StreamingVAEEncoder`
      on the same VAE weights). The wrist latents side by side on width are stacked on top of the head
      latent along height: h = (height/16) * 3 / 2, w = width/16 (upstream `_encode_obs`).
    """

    def __init__(
        self,
        vae_encoder: StreamingVAEEncoder,
        camera_keys: Sequence[str],
        height: int,
        width: int,
        layout: str = "width_concat",
        wrist_encoder: StreamingVAEEncoder | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
        if not camera_keys:
            raise ValueError("camera_keys: expected at least one camera key")
        if len(set(camera_keys)) != len(camera_keys):
            raise ValueError(f"camera_keys: expected unique keys, got {list(camera_keys)}")
        tshape = layout == "robotwin_tshape"
        if tshape and len(camera_keys) != 3:
            raise ValueError(
                f"camera_keys: robotwin_tshape expects 3 keys (head, left wrist, right wrist), got {list(camera_keys)}"
            )
        f = vae_encoder.spatial_factor * (2 if tshape else 1)  # wrists at half size must still be /16
        if height <= 0 or width <= 0 or height % f or width % f:
            raise ValueError(f"height/width: expected positive multiples of {f} for {layout}, got {height}x{width}")
        if tshape and wrist_encoder is None:
            wrist_encoder = StreamingVAEEncoder(vae_encoder.vae, device=vae_encoder.device, dtype=vae_encoder.dtype)
        if wrist_encoder is not None and (wrist_encoder is vae_encoder or not tshape):
            raise ValueError("wrist_encoder: expected a separate StreamingVAEEncoder, and only for robotwin_tshape")
        self.vae_encoder = vae_encoder
        self.wrist_encoder = wrist_encoder
        self.camera_keys = list(camera_keys)
        self.height = height
        self.width = width
        self.layout = layout

    @property
    def vae(self) -> AutoencoderKLWan:
        return self.vae_encoder.vae

    @property
    def latent_hw(self) -> tuple[int, int]:
        f = self.vae_encoder.spatial_factor
        if self.layout == "robotwin_tshape":
            return (self.height // f) * 3 // 2, self.width // f
        return self.height // f, (self.width // f) * len(self.camera_keys)

    def reset(self) -> None:
        self.vae_encoder.reset()
        if self.wrist_encoder is not None:
            self.wrist_encoder.reset()

    def _to_video(self, key: str, frames: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 [T, H_in, W_in, 3] (or [H_in, W_in, 3]) -> float32 [T, 3, *size] in [-1, 1]."""
        expected = "[T, H, W, 3] uint8"
        if isinstance(frames, np.ndarray):
            ok_dtype = frames.dtype == np.uint8
        elif isinstance(frames, torch.Tensor):
            ok_dtype = frames.dtype == torch.uint8
        else:
            raise TypeError(
                f"frames[{key!r}]: expected {expected} (numpy or torch), got {type(frames).__name__}"
            )
        shape = list(frames.shape)
        if not ok_dtype or frames.ndim not in (3, 4) or shape[-1] != 3 or 0 in shape:
            raise ValueError(f"frames[{key!r}]: expected {expected}, got shape {shape} dtype {frames.dtype}")
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        # Move the uint8 data first: 4x fewer bytes to transfer, and the resize runs on the device.
        x = frames.to(self.vae_encoder.device).permute(0, 3, 1, 2).float()
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x / 255.0 * 2.0 - 1.0

    def _videos(self, frames: Mapping[str, np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Per camera [3, T, h_i, w_i] in [-1, 1], checked: every key present, same T everywhere."""
        videos = []
        for i, key in enumerate(self.camera_keys):
            if key not in frames:
                raise ValueError(f"frames: missing camera key {key!r}; expected keys {self.camera_keys}")
            size = (self.height, self.width)
            if self.layout == "robotwin_tshape" and i > 0:
                size = (self.height // 2, self.width // 2)
            videos.append(self._to_video(key, frames[key], size).transpose(0, 1))
        lengths = {key: v.shape[1] for key, v in zip(self.camera_keys, videos, strict=True)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"frames: expected the same number of frames T for every camera, got {lengths}")
        return videos

    def encode(self, frames: Mapping[str, np.ndarray | torch.Tensor]) -> torch.Tensor:
        """{camera: uint8 [T, H, W, 3] or [H, W, 3]} -> normalized latents [1, z_dim, T', h, w].

        T = 1 on the first call after `reset()`, then multiples of 4 (see `StreamingVAEEncoder`)."""
        if self.layout != "robotwin_tshape":
            return self.encode_batch([frames])  # width_concat: one stream
        videos = self._videos(frames)
        head = self.vae_encoder.encode(videos[0].unsqueeze(0))  # [1, z, T', h, w]
        wrists = self.wrist_encoder.encode(torch.stack(videos[1:]))  # [2, z, T', h/2, w/2]
        top = torch.cat(wrists.unbind(0), dim=-1).unsqueeze(0)  # [1, z, T', h/2, w]
        return torch.cat([top, head], dim=-2)

    def encode_batch(self, frames: Sequence[Mapping[str, np.ndarray | torch.Tensor]]) -> torch.Tensor:
        """`encode` of several independent streams at once (e.g. episodes of a dataset), each its own batch rows of
        the VAE: [E, z_dim, T', h, w], row e equal to what `encode(frames[e])` gives on its own stream. On a CPU
        the VAE's 3-D convolutions run several times faster per frame on a batch than on one small frame.
        `width_concat` only; the number of streams is fixed from the first call until `reset()`."""
        if self.layout != "width_concat":
            raise ValueError(f"encode_batch: only the width_concat layout, not {self.layout!r}")
        if not frames:
            raise ValueError("frames: expected at least one stream")
        videos = [v for f in frames for v in self._videos(f)]  # stream-major, cameras in order
        lengths = {v.shape[1] for v in videos}
        if len(lengths) != 1:
            raise ValueError(f"frames: expected the same number of frames T in every stream, got {sorted(lengths)}")
        latents = self.vae_encoder.encode(torch.stack(videos))  # [E * num_cams, z, T', h, w]
        latents = latents.view(len(frames), len(self.camera_keys), *latents.shape[1:])
        return torch.cat(latents.unbind(1), dim=-1)


# --------------------------------------------------------------------------------------------------
# Predicted video (debugging): latents -> frames -> mp4
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_latents(
    vae: AutoencoderKLWan, latents: torch.Tensor, device: str | torch.device | None = None
) -> np.ndarray:
    """Normalized latents [1, z_dim, T', h, w] -> uint8 frames [1 + 4 (T' - 1), 16 h, 16 w, 3].

    Denormalizes (`latents * latents_std + latents_mean`, the inverse of the encode) and runs the VAE
    decoder (`post_quant_conv` + `decoder`, diffusers' `decode`) on `device` (default: where the
    decoder is). The decoder is moved there for the call and back afterwards, so a GPU only holds it
    while decoding. Camera layouts decode as one picture (side by side, or the T-shape).
    """
    cfg = vae.config
    z_dim = int(cfg.z_dim)
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[:2] != (1, z_dim):
        got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents: expected a tensor [1, {z_dim}, T, h, w], got {got}")
    parts = (vae.decoder, vae.post_quant_conv)
    home = next(vae.decoder.parameters())
    dev = torch.device(device) if device is not None else home.device
    try:
        for part in parts:
            part.to(dev)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=dev).view(1, -1, 1, 1, 1)
        z = (latents.to(dev, torch.float32) * std + mean).to(home.dtype)
        video = vae.decode(z, return_dict=False)[0]  # [1, 3, T, H, W] in [-1, 1]
    finally:
        for part in parts:
            part.to(home.device)
    video = (video[0].float().clamp(-1, 1) + 1.0) / 2.0 * 255.0
    return video.round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 10) -> Path:
    """uint8 frames [T, H, W, 3] -> an H.264 mp4 at `path` (imageio + imageio-ffmpeg), written to a
    temporary name first and renamed, so a crash never leaves a truncated file under `path`."""
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames: expected uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {list(frames.shape)}")
    path = Path(path)
    # macro_block_size=1: keep the exact size (the tiny presets are not multiples of 16). The temp file's
    # suffix is the path's (default .mp4): imageio picks the format by it.
    write_file(path, lambda tmp: imageio.mimwrite(tmp, list(frames), fps=fps, macro_block_size=1),
               suffix=path.suffix or ".mp4")
    logger.info("wrote %d frames (%dx%d) to %s", frames.shape[0], frames.shape[2], frames.shape[1], path)
    return path


def save_predicted_video(policy, path: str | Path, fps: int = 10, device: str | torch.device | None = None) -> Path:
    """Decode `policy`'s episode's predicted latents (all chunks so far, concatenated in time, as upstream)
    with the VAE decoder and write them to an mp4; needs `record_predicted_video=True`.

    The video shows the camera layout as one picture; `device` is where the decoder runs (default:
    where it lives: the CPU for `load_policy`)."""
    if not policy.record_predicted_video:
        raise RuntimeError("save_predicted_video: construct the policy with record_predicted_video=True "
                           "(or set policy.record_predicted_video = True before reset)")
    if not policy.predicted_latents:
        raise RuntimeError("save_predicted_video: no predicted chunk yet in this episode (call infer first)")
    vae = getattr(policy.obs_encoder, "vae", None)
    if vae is None:
        raise RuntimeError("save_predicted_video: the observation encoder has no VAE "
                           "(expected an encoders.VAEObservationEncoder)")
    frames = decode_latents(vae, torch.cat(policy.predicted_latents, dim=2), device=device)
    return write_mp4(frames, path, fps=fps)
