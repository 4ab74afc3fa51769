"""The policy: openpi-style `reset(prompt)` / `infer(obs) -> dict` / `feedback(...)`.

One episode:

    policy.reset(prompt="pick up the cube")
    chunk = policy.infer({"observation.images.image": img0, ...})  # first chunk: conditions on obs
    ... execute chunk.actions (steps x used channels), chunk.record(step, executed, images) ...
    policy.feedback(chunk)                                         # keyframes + executed actions
    chunk = policy.infer({})                                       # next chunk
    ...

The cadence (which executed steps are keyframes, how many) is `core.episode.Chunk`'s; the interface
(`Policy`, `PromptEncoder`, `ObservationEncoder`) is `core.protocols`'.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lingbot_edge.core.actions import ActionCodec
from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.episode import Chunk, chunk_keyframes
from lingbot_edge.core.model import WanVATransformer
from lingbot_edge.core.owner_thread import OwnerThread
from lingbot_edge.core.protocols import ObservationEncoder, PromptEncoder
from lingbot_edge.core.sampler import ChunkResult, ReferenceSampler, StaticSampler

log = logging.getLogger(__name__)


def orient_frames(frames: Mapping[str, Any], transform: str) -> Mapping[str, Any]:
    """Apply `PolicyConfig.image_transform` to {camera: [H, W, 3] or [T, H, W, 3]} frames (numpy or torch):
    "vflip" reverses rows, "hflip" columns, "rot180" both. Values of another kind pass through
    unchanged, for the observation encoder to reject with its own message."""
    axes = {"none": (), "vflip": (-3,), "hflip": (-2,), "rot180": (-3, -2)}[transform]
    if not axes:
        return frames
    out = {}
    for key, img in frames.items():
        if isinstance(img, np.ndarray) and img.ndim in (3, 4):
            img = np.flip(img, axis=axes)
        elif isinstance(img, torch.Tensor) and img.dim() in (3, 4):
            img = torch.flip(img, dims=axes)
        out[key] = img
    return out


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


def on_owner_thread(method):
    """Run a `LingBotPolicy` method on the policy's owner thread, when it has one."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.owner is None:
            return method(self, *args, **kwargs)
        return self.owner.run(method, self, *args, **kwargs)
    return run


class PromptMemo:
    """A `PromptEncoder` that keeps each prompt's embeddings: wraps an encoder that runs its text model at
    every call (an `io.encoders.UMT5PromptEncoder`), so a policy's next episode with the same prompt costs nothing.

    Example:
        policy = LingBotPolicy(cfg, model, obs_encoder, PromptMemo(encoders.UMT5PromptEncoder(umt5, tokenizer)))
    """

    memory_report = None  # nothing measured: the wrapped encoder stays loaded

    def __init__(self, encoder):
        self.encoder = encoder  # anything with encode_pair(prompt, use_cfg)
        self._pairs: dict[tuple[str, bool], tuple[Tensor, Tensor | None]] = {}

    def encode_pair(self, prompt: str, use_cfg: bool) -> tuple[Tensor, Tensor | None]:
        key = (prompt, use_cfg)
        if key not in self._pairs:
            self._pairs[key] = self.encoder.encode_pair(prompt, use_cfg)
        return self._pairs[key]


class LingBotPolicy:
    """One robot policy: DiT + sampler, observation encoder (streaming VAE), prompt embeddings.

    Implements `core.protocols.Policy` (a local policy: lookahead supported, nothing to cancel).

    Args:
        cfg: the preset (`core.config.PolicyConfig`); `model.config` must be its `model_config`.
        model: the DiT (`WanVATransformer`), already on its device and in its dtype.
        obs_encoder: a `core.protocols.ObservationEncoder` (the streaming VAE, `io.encoders.VAEObservationEncoder`);
            its `latent_hw` must equal `cfg.latent_hw`.
        prompt_encoder: a `core.protocols.PromptEncoder`, called at every `reset`: an `io.prompt_cache.PromptCache`
            (UMT5 loaded on a miss only, released after; `loading.load_policy` builds one over the checkpoint's
            files), or a `PromptMemo` over an `io.encoders.UMT5PromptEncoder`.
        sampler: "static" (`StaticSampler`, fixed shapes, CUDA graphs / torch.compile) or "reference"
            (`ReferenceSampler`, the upstream code path, for parity checks).
        compile: torch.compile the static sampler's forward.
        own_thread: run `reset`, `infer`, `feedback` and `warm_up` on one thread of the policy's own, whichever
            thread calls them (`core.owner_thread.OwnerThread`); default: when the sampler is compiled, whose
            CUDA graphs must be replayed by the thread that recorded them.
        seed: seed of the noise generator (each `reset` restarts it; `reset(seed=...)` overrides it).
        record_predicted_video: keep each chunk's predicted latents (on the CPU) in `predicted_latents`, for
            `lingbot_edge.io.encoders.save_predicted_video`; off by default (it costs a host copy per chunk).

    Raises:
        ValueError: the model or the observation encoder does not match `cfg`, or `sampler` is unknown.

    Example:
        policy = load_policy("so100-grasp")  # lingbot_edge.io.load_policy builds this class
        policy.reset("pick up the cube")
        chunk = policy.infer(first_obs)  # {camera key: H x W x 3 uint8} for every camera in cfg.obs_cam_keys
        for step, action in enumerate(chunk.actions):
            executed = send_to_robot(action)
            chunk.record(step, executed, camera_frames() if chunk.is_keyframe(step) else None)
        policy.feedback(chunk)
        chunk = policy.infer({})  # the next chunk
    """

    # infer(obs, ahead=True) is available (async execution with a one-chunk lag).
    supports_lookahead = True

    def __init__(
        self,
        cfg: PolicyConfig,
        model: WanVATransformer,
        obs_encoder: ObservationEncoder,
        prompt_encoder: PromptEncoder,
        sampler: str = "static",
        compile: bool = True,
        seed: int = 0,
        record_predicted_video: bool = False,
        own_thread: bool | None = None,
    ):
        if model.config != cfg.model_config:
            raise ValueError(f"model: its config does not match preset {cfg.name!r}'s model {cfg.model!r}")
        enc_hw = obs_encoder.latent_hw
        if tuple(enc_hw) != tuple(cfg.latent_hw):
            raise ValueError(f"obs_encoder: produces latents of {tuple(enc_hw)} (h, w), expected {cfg.latent_hw} "
                             f"for preset {cfg.name!r} ({cfg.camera_layout})")
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
        self.prompt: str | None = None
        self._pending: list = []
        self.record_predicted_video = record_predicted_video
        self.predicted_latents: list[Tensor] = []
        self.load_report: dict[str, Any] = {}  # filled by loading.load_policy
        self.checkpoint = None  # the loading.CheckpointLayout the policy came from, if any
        if own_thread is None:
            own_thread = sampler == "static" and compile
        self.owner = OwnerThread("lingbot-policy") if own_thread else None

    @property
    def memory_report(self) -> dict[str, Any]:
        """GPU memory in bytes (None off CUDA):

        - `gpu_allocated` / `gpu_max_allocated` / `gpu_reserved`: `torch.cuda.memory_allocated` /
          `max_memory_allocated` / `memory_reserved` of the policy's device now;
        - `gpu_allocated_at_start` / `_after_prompts` / `_after_dit` / `_after_vae`: allocated after each
          stage of `loading.load_policy` (absent for policies built otherwise);
        - `prompt`: the prompt cache's report: `text_encoder_loads`, `text_encoder_device`,
          `gpu_allocated_before_release` / `gpu_allocated_after_release` (and `reserved`),
          `gpu_freed_bytes`, measured around the last UMT5 release (None when UMT5 never ran on a GPU).
        """
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        report: dict[str, Any] = {
            "device": str(self.device),
            "gpu_allocated": torch.cuda.memory_allocated(self.device) if cuda else None,
            "gpu_max_allocated": torch.cuda.max_memory_allocated(self.device) if cuda else None,
            "gpu_reserved": torch.cuda.memory_reserved(self.device) if cuda else None,
        }
        report.update(self.load_report)
        prompt = self.prompt_encoder.memory_report
        if prompt is not None:
            report["prompt"] = dict(prompt)
        return report

    # ------------------------------------------------------------------ episode state

    @on_owner_thread
    def warm_up(self) -> None:
        """Compile the sampler's graphs (and record their CUDA graphs) now, on the owner thread, instead of
        during the first chunks; the next `reset` starts the episode."""
        self.prompt = None
        self.sampler.warm_up()

    @on_owner_thread
    def reset(self, prompt: str, seed: int | None = None) -> None:
        """Start an episode: encode the prompt (through the prompt encoder's own cache), empty the KV cache
        and the observation encoder's stream, restart the noise generator.

        Args:
            prompt: the task, e.g. "pick up the cube".
            seed: the noise generator's seed for this episode (default: the policy's `seed`).

        Raises:
            TypeError: `prompt` is not a str.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected str, got {type(prompt).__name__}")
        cond, uncond = self.prompt_encoder.encode_pair(prompt, self.cfg.use_cfg)
        self.text_embeds = (cond, uncond)
        self.sampler.reset(cond, uncond)
        self.obs_encoder.reset()
        self.prompt = prompt
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed if seed is None else seed)
        self.chunk_index = 0  # the next chunk to feed back
        self.init_latent: Tensor | None = None
        self._pending: list = []  # ChunkResults inferred, not fed back yet (2 with one inferred ahead)
        # Whether the oldest pending chunk's temporary entries are in the cache (its own sampler's, or written
        # for the lookahead); a real write drops them.
        self._executing_written = False
        # The executing chunk's latent frames already encoded by `infer(ahead=True)`: (chunk index, latents
        # [1, C, j, h, w], keyframes per camera); `feedback` encodes only the rest.
        self._observed: tuple[int, Tensor, dict[str, np.ndarray]] | None = None
        self.predicted_latents = []

    def _noise(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.float32)

    @property
    def takes_executing_keyframes(self) -> bool:
        """Whether `infer(obs, ahead=True)` uses the executing chunk's keyframes recorded so far (grounded
        lookahead): a loop may then request the next chunk later in the chunk, with fresher images."""
        return self.cfg.async_mode == "grounded"

    @property
    def awaiting_feedback(self) -> bool:
        """A chunk was inferred and its execution not fed back yet."""
        return bool(self._pending)

    # ------------------------------------------------------------------ openpi interface

    @on_owner_thread
    @torch.no_grad()
    def infer(self, obs: Mapping[str, Any], ahead: bool = False) -> Chunk:
        """Predict the next chunk.

        Args:
            obs: for the first chunk of an episode, one frame per camera ({`cfg.obs_cam_keys` name or one of
                its `camera_aliases`: H x W x 3 uint8}). With `ahead` in grounded mode: the executing chunk's
                keyframes recorded so far, {camera: [T, H, W, 3] uint8} with T a whole number of latent frames
                (`keyframes_per_frame` each) short of the whole chunk, or `{}` for none (`feedback` must then
                get the same first T keyframes). Otherwise ignored (pass `{}`: keyframes come with `feedback`).
            ahead: predict the chunk after the one awaiting feedback, while that one executes
                (`cfg.async_mode`). Grounded: the cache holds the real history up to the chunk before the
                executing one, then the executing chunk's grounded video (its frames observed so far, the
                rest as the sampler's PREDICTED write) and its known actions as temporary entries; this chunk
                runs its action pass alone on top. Naive: it conditions on the executing chunk's own stale
                forecast (`feedback` rewrites it after each real write).

        Returns:
            An `episode.Chunk`: its actions ([steps, used channels], robot units), the keyframe rule, and
            the dict keys `actions` / `chunk` / `frame_start` / `timing` (ms per phase).

        Raises:
            RuntimeError: no `reset` yet, or the feedback/infer order is broken (`ahead=False` with a chunk
                awaiting feedback, `ahead=True` without exactly one).
            ValueError: the first chunk's `obs` lacks a camera, or the executing chunk's keyframes are not
                whole latent frames short of the chunk.
        """
        if self.prompt is None:
            raise RuntimeError("infer: call reset(prompt=...) first")
        if ahead and len(self._pending) != 1:
            raise RuntimeError("infer(ahead=True): needs exactly one chunk awaiting feedback, "
                               f"{len(self._pending)} are")
        if not ahead and self._pending:
            raise RuntimeError("infer: call feedback(...) with the executed chunk before the next infer "
                               "(or infer(..., ahead=True) to overlap it with execution)")
        timer = PhaseTimer(self.device)
        first = self.chunk_index == 0 and not self._pending
        first_latent = None
        if first:
            obs = self.cfg.canonical_cameras(obs)
            frames = orient_frames({k: obs[k] for k in self.cfg.obs_cam_keys if k in obs}, self.cfg.image_transform)
            missing = [k for k in self.cfg.obs_cam_keys if k not in obs]
            if missing:
                raise ValueError(f"obs: the first chunk needs camera images {missing} (HxWx3 uint8)")
            first_latent = self.obs_encoder.encode(frames).to(self.sampler.dtype)
            self.init_latent = first_latent
            timer.mark("encode_obs")
        shift = len(self._pending) * self.cfg.frame_chunk_size
        noise_video = self._noise(self.sampler.latent_shape)  # video first: the generator's order
        noise_action = self._noise(self.sampler.action_shape) * self.cfg.action_noise_scale
        if ahead and self.cfg.async_mode == "grounded":
            # The executing chunk's entries: chunk 0's are its own sampler's; a later one is grounded here, on
            # the history `feedback` wrote and what the cameras saw of it so far. Then the action pass alone.
            if not self._executing_written:
                observed = self._encode_executing(obs, timer)
                self._ground_executing(self._pending[0], observed, timer)
            elif obs:
                raise ValueError("obs: the executing chunk is the episode's first, whose frames come with feedback; "
                                 "pass {}")
            actions = self.sampler.sample_actions(noise_action, frame_shift=shift, timer=timer)
            result = ChunkResult(actions=actions, latents=None)
        else:
            result = self.sampler.sample_chunk(
                noise_video, noise_action, first_latent, timer=timer,
                frame_shift=shift,
            )
        actions = self.codec.to_robot(result.actions, first_chunk=first)  # host copy: syncs once
        if not ahead:  # the chunk's own PREDICTED entries are the executing chunk's until its feedback
            self._executing_written = True
        self.last_result = result
        if self.record_predicted_video and result.latents is not None:
            self.predicted_latents.append(result.latents.detach().float().cpu())
        self._pending.append(result)
        return Chunk(actions, index=self.chunk_index + len(self._pending) - 1, first=first,
                     keyframe_stride=self.cfg.keyframe_stride, cameras=self.cfg.obs_cam_keys,
                     frame_start=self.sampler.frame_start + shift, timing=timer.result())

    @on_owner_thread
    @torch.no_grad()
    def feedback(self, chunk: Chunk | Mapping[str, Any],
                 executed_actions: np.ndarray | None = None) -> dict[str, float]:
        """Write what really happened during the oldest chunk awaiting feedback into the KV cache.

        Args:
            chunk: the `Chunk` the loop recorded into (its keyframes and executed actions), or, to replay
                recorded data, the keyframes {camera: [T, H, W, 3] uint8}, T = the chunk's `num_keyframes`.
            executed_actions: with keyframes only: [steps, used channels] actions really executed.

        Returns:
            Milliseconds per phase (`encode_obs_ms`, ..., `total_ms`).

        Raises:
            RuntimeError: no chunk awaits feedback.
            TypeError: `executed_actions` given with a `Chunk`, or missing with keyframes.
            ValueError: a camera is missing or has the wrong number of keyframes.
        """
        if not self._pending:
            raise RuntimeError("feedback: no chunk to feed back (call infer first)")
        if isinstance(chunk, Chunk):
            if executed_actions is not None:
                raise TypeError("feedback(chunk): the executed actions come from the chunk's records")
            frames, executed_actions = chunk.feedback_inputs()
        else:
            if executed_actions is None:
                raise TypeError("feedback(frames, executed_actions): executed_actions is required")
            frames = chunk
        frames = self.cfg.canonical_cameras(frames)
        timer = PhaseTimer(self.device)
        first = self.chunk_index == 0
        want_t = chunk_keyframes(self.cfg, self.chunk_index)
        for key in self.cfg.obs_cam_keys:
            if key not in frames:
                raise ValueError(f"frames: missing camera {key!r}; expected {list(self.cfg.obs_cam_keys)}")
            t = np.shape(frames[key])[0] if np.ndim(frames[key]) == 4 else 1
            if t != want_t:
                raise ValueError(f"frames[{key!r}]: expected {want_t} keyframes [T, H, W, 3], got {t}")
        actions = self.codec.from_robot(executed_actions, first_chunk=first).to(self.device)
        observed = None
        if self._observed is not None and self._observed[0] == self.chunk_index:
            _, observed, seen = self._observed
            frames = {k: self._after_observed(k, frames[k], seen[k]) for k in self.cfg.obs_cam_keys}
        self._observed = None
        latents = self.obs_encoder.encode(orient_frames(frames, self.cfg.image_transform)).to(self.sampler.dtype)
        if first:  # the conditioning frame is the chunk's latent frame 0
            latents = torch.cat([self.init_latent, latents], dim=2)
        elif observed is not None:  # encoded by infer(ahead=True) while the chunk executed
            latents = torch.cat([observed, latents], dim=2)
        timer.mark("encode_obs")
        self.sampler.feedback(latents, actions, timer=timer)
        self._pending.pop(0)
        self._executing_written = False  # the real write dropped every temporary entry
        if self._pending and self.cfg.async_mode == "naive":  # the chunk inferred ahead conditions on its forecast
            self.sampler.write_predicted(self._pending[0].latents, self._pending[0].actions, timer=timer)
            self._executing_written = True
        self.chunk_index += 1
        return timer.result()

    @property
    def keyframes_per_frame(self) -> int:
        """Keyframes per camera that make one latent frame (the VAE's temporal compression)."""
        return self.cfg.action_per_frame // self.cfg.keyframe_stride

    def _encode_executing(self, obs: Mapping[str, Any], timer: PhaseTimer) -> Tensor | None:
        """The executing chunk's keyframes so far -> its first j latent frames [1, C, j, h, w] (None for
        none); kept for its `feedback`, which encodes only the keyframes after them."""
        if not obs:
            return None
        obs = self.cfg.canonical_cameras(obs)
        per, f = self.keyframes_per_frame, self.cfg.frame_chunk_size
        frames = {}
        for key in self.cfg.obs_cam_keys:
            if key not in obs:
                raise ValueError(f"obs: missing camera {key!r} of the executing chunk's keyframes; expected "
                                 f"{list(self.cfg.obs_cam_keys)}")
            img = np.asarray(obs[key])
            t = img.shape[0] if img.ndim == 4 else 0
            if img.ndim != 4 or t % per or not 0 < t < per * f:
                raise ValueError(f"obs[{key!r}]: expected the executing chunk's keyframes [T, H, W, 3] with T a "
                                 f"multiple of {per} below {per * f}, got shape {img.shape}")
            frames[key] = img
        counts = {k: v.shape[0] for k, v in frames.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"obs: every camera needs the same number of keyframes, got {counts}")
        latents = self.obs_encoder.encode(orient_frames(frames, self.cfg.image_transform)).to(self.sampler.dtype)
        self._observed = (self.chunk_index, latents, frames)
        timer.mark("encode_obs")
        return latents

    def _after_observed(self, key: str, frames: Any, seen: np.ndarray) -> np.ndarray:
        """One camera's feedback keyframes less the first ones `infer(ahead=True)` encoded (they must be
        the same frames: the VAE stream has consumed them)."""
        frames = np.asarray(frames)
        if not np.array_equal(frames[:len(seen)], seen):
            raise ValueError(f"frames[{key!r}]: the first {len(seen)} keyframes differ from those given to "
                             "infer(ahead=True) while the chunk executed")
        return frames[len(seen):]

    def _ground_executing(self, executing: ChunkResult, observed: Tensor | None, timer: PhaseTimer) -> None:
        """The executing chunk's temporary entries after the real history before it: its video with the
        observed frames pinned (`sampler.ground`), then its known actions."""
        latents = self.sampler.ground(self._noise(self.sampler.latent_shape), executing.actions, observed,
                                      timer=timer)
        self._executing_written = True
        if self.record_predicted_video:
            self.predicted_latents.append(latents.detach().float().cpu())

    def cancel(self) -> None:
        """Nothing to interrupt: a local call runs to its end (`core.protocols.Policy.cancel`)."""


