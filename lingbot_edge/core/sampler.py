"""Chunk samplers (docs/design.md section 3): the eager reference and the static compiled one.

Both compute the same thing from the same inputs (noise, prompt embeddings, observed latents,
executed actions); they differ only in how:

- `ReferenceSampler`: upstream's loop, eager, list KV cache with dynamic shapes, the prompt's
  cross-attention K/V recomputed every forward, CFG rows for every forward. It is the oracle
  and the benchmark baseline; keep it plain.
- `StaticSampler`: ring KV cache, cross-attention K/V computed once per prompt, every per-step
  input a device tensor of fixed shape (timesteps, Euler factors, frame offset, pin masks,
  cache mode), so a few `torch.compile(fullgraph=True, dynamic=False)` graphs serve the first
  chunk, the steady state and the history writes, and nothing syncs to the host. Graphs: video
  forward (CFG rows); action forward with the cond row alone (transient steps, when action
  guidance is off); action forward with every row (its last step and history writes).
  Partial video denoising (`video_exec_step`) shortens the video schedule list and lets its last
  forward keep its Euler update: the same graphs. On CUDA the graphs run as CUDA graphs by default.

Action tensors are model-normalized, in the full action_dim space: [1, A, F, apf, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.kv_cache import CacheMode, ListKVCache, RingKVCache
from lingbot_edge.core.model import WanVATransformer, action_grid_ids, video_grid_ids
from lingbot_edge.core.scheduler import FlowMatchSchedule

log = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    actions: Tensor  # [1, A, F, apf, 1] normalized, unused channels zero
    latents: Tensor | None  # [1, C, F, h, w] predicted video latents (None: an action-only pass)


class _SamplerBase:
    def __init__(self, model: WanVATransformer, cfg: PolicyConfig):
        self.model = model
        self.cfg = cfg
        mc = model.config
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.video_schedule = FlowMatchSchedule(cfg.num_inference_steps, cfg.snr_shift)
        self.action_schedule = FlowMatchSchedule(cfg.action_num_inference_steps, cfg.action_snr_shift)
        self.latent_shape = (1, mc.in_channels, cfg.frame_chunk_size, *cfg.latent_hw)
        self.action_shape = (1, mc.action_dim, cfg.frame_chunk_size, cfg.action_per_frame, 1)
        mask = torch.zeros(mc.action_dim, dtype=torch.bool)
        mask[list(cfg.used_action_channel_ids)] = True
        self.action_channel_mask = mask.to(self.device)
        self.frame_start = 0  # absolute frame id of the next chunk (host copy, for logging/tests)

    def stream_schedule(self, action: bool) -> tuple[Tensor, Tensor, bool]:
        """(timesteps, Euler factors, last_updates) of one stream's loop, as upstream's `_infer`: the
        padded list, cut to its first `video_exec_step` entries for video when that is not -1; then
        every forward, the last (PREDICTED) one included, applies its Euler step (last_updates)."""
        sched = self.action_schedule if action else self.video_schedule
        ts, ds = sched.timesteps(), sched.sigma_deltas()
        k = self.cfg.video_exec_step
        if action or k == -1:
            return ts, ds, False
        return ts[:k], ds[:k], True

    def check_inputs(self, noise_video: Tensor, noise_action: Tensor, first_latent: Tensor | None) -> None:
        _check("noise_video", noise_video, self.latent_shape)
        _check("noise_action", noise_action, self.action_shape)
        if first_latent is not None:
            _check("first_latent", first_latent, (*self.latent_shape[:2], 1, *self.latent_shape[3:]))

    def check_observed(self, observed: Tensor | None) -> None:
        """`ground`'s observed frames: [1, C, j, h, w] with 0 < j < F (a whole chunk is feedback)."""
        if observed is None:
            return
        c, f, (h, w) = self.latent_shape[1], self.cfg.frame_chunk_size, self.latent_shape[3:]
        if not isinstance(observed, Tensor) or observed.dim() != 5 or not 0 < observed.shape[2] < f:
            got = tuple(observed.shape) if isinstance(observed, Tensor) else type(observed).__name__
            raise ValueError(f"observed: expected a tensor of shape (1, {c}, j, {h}, {w}) with 0 < j < {f}, got {got}")
        _check("observed", observed, (1, c, observed.shape[2], h, w))

    def check_feedback(self, video_latents: Tensor, actions: Tensor) -> None:
        _check("video_latents", video_latents, self.latent_shape)
        _check("actions", actions, self.action_shape)

    def warm_up(self) -> None:
        """Run every graph once (nothing to do for a sampler that compiles nothing)."""

    def _cfg(self, v: Tensor, scale: float) -> Tensor:
        """Row 0 = prompt, row 1 = empty prompt: uncond + g * (cond - uncond)."""
        if self.cfg.use_cfg and scale > 1:
            return v[1:] + scale * (v[:1] - v[1:])
        return v[:1]


def _mark(timer, phase: str) -> None:
    if timer is not None:
        timer.mark(phase)


def _check(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(x, Tensor) or tuple(x.shape) != tuple(shape):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor of shape {tuple(shape)}, got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")


class ReferenceSampler(_SamplerBase):
    """Upstream semantics, eagerly, with the plain list cache."""

    def reset(self, text_cond: Tensor, text_uncond: Tensor | None) -> None:
        mc = self.model.config
        self.cache = ListKVCache(mc.num_layers, self.cfg.cache_capacity)
        text = [text_cond] + ([text_uncond] if self.cfg.use_cfg else [])
        self.text_emb = torch.cat(text).to(self.device, self.dtype)
        self.frame_start = 0

    def _forward(self, x: Tensor, t: Tensor, mode: CacheMode, action: bool, frame_start: int) -> Tensor:
        cfg = self.cfg
        f = x.shape[2]
        if action:
            grid = action_grid_ids(f, cfg.action_per_frame, frame_start)
        else:
            _, ph, pw = self.model.config.patch_size
            grid = video_grid_ids(f, x.shape[3] // ph, x.shape[4] // pw, frame_start)
        xb = x.repeat(self.cfg.cfg_batch, 1, 1, 1, 1)
        self.cache.begin(mode, grid.shape[1])
        out = self.model(xb, t, grid.to(self.device), self.cache, action=action, text_emb=self.text_emb)
        self.cache.end(mode)
        return out

    def _video_pass(self, noise_video: Tensor, pinned: Tensor | None, frame_start: int) -> Tensor:
        """Denoise one chunk's video at `frame_start` (TRANSIENT steps, the last one PREDICTED); `pinned`
        [1, C, j, h, w]: its first j latent frames are observed (pinned, t = 0)."""
        cfg, f = self.cfg, self.cfg.frame_chunk_size
        j = 0 if pinned is None else pinned.shape[2]
        latents = noise_video.to(self.device, self.dtype).clone()
        ts, ds, last_updates = self.stream_schedule(action=False)
        for i in range(len(ts)):
            last = i == len(ts) - 1
            t_frames = torch.full((f,), float(ts[i]), device=self.device)
            if j:
                latents[:, :, :j] = pinned
                t_frames[:j] = 0
            mode = CacheMode.PREDICTED if last else CacheMode.TRANSIENT
            v = self._forward(latents, t_frames, mode, False, frame_start)
            if not last or last_updates:
                latents = latents + self._cfg(v, cfg.guidance_scale) * ds[i]
        if j:
            latents[:, :, :j] = pinned
        return latents

    def _action_pass(self, noise_action: Tensor, first: bool, frame_start: int) -> Tensor:
        """Denoise one chunk's actions at `frame_start` (TRANSIENT steps, the last one PREDICTED)."""
        cfg, f = self.cfg, self.cfg.frame_chunk_size
        actions = noise_action.to(self.device, self.dtype).clone()
        ts, ds, _ = self.stream_schedule(action=True)
        for i in range(len(ts)):
            last = i == len(ts) - 1
            t_frames = torch.full((f,), float(ts[i]), device=self.device)
            actions[:, ~self.action_channel_mask] = 0
            if first:  # frame 0's actions are pinned to zeros, t = 0
                actions[:, :, :1] = 0
                t_frames[0] = 0
            mode = CacheMode.PREDICTED if last else CacheMode.TRANSIENT
            v = self._forward(actions, t_frames, mode, True, frame_start)
            if not last:
                actions = actions + self._cfg(v, cfg.action_guidance_scale) * ds[i]
        if first:
            actions[:, :, :1] = 0
        actions[:, ~self.action_channel_mask] = 0
        return actions

    @torch.no_grad()
    def sample_chunk(
        self, noise_video: Tensor, noise_action: Tensor, first_latent: Tensor | None = None, timer=None,
        frame_shift: int = 0,
    ) -> ChunkResult:
        """frame_shift: latent frames between frame_start and this chunk (a chunk inferred ahead of
        the one awaiting feedback sits frame_chunk_size frames later)."""
        self.check_inputs(noise_video, noise_action, first_latent)
        frame_start = self.frame_start + frame_shift
        latents = self._video_pass(noise_video, first_latent, frame_start)
        _mark(timer, "video")
        actions = self._action_pass(noise_action, first_latent is not None, frame_start)
        _mark(timer, "action")
        return ChunkResult(actions=actions, latents=latents)

    @torch.no_grad()
    def sample_actions(self, noise_action: Tensor, frame_shift: int, timer=None) -> Tensor:
        """The action pass alone at frame_start + frame_shift: the grounded lookahead's next chunk, which
        attends to the history and the executing chunk's grounded entries (`ground`)."""
        _check("noise_action", noise_action, self.action_shape)
        actions = self._action_pass(noise_action, False, self.frame_start + frame_shift)
        _mark(timer, "action")
        return actions

    @torch.no_grad()
    def ground(self, noise_video: Tensor, executing_actions: Tensor, observed: Tensor | None = None,
               timer=None) -> Tensor:
        """Temporary entries for the chunk now executing (at frame_start), right after the real history
        before it was written: its video from that history (the policy's video steps, the last one
        PREDICTED), its first latent frames pinned to `observed` ([1, C, j, h, w], 0 < j < F: what the
        cameras saw of it so far; None: nothing yet), then its executing actions as PREDICTED (t = 0).
        The next real write drops both. Returns the grounded latents."""
        _check("noise_video", noise_video, self.latent_shape)
        _check("executing_actions", executing_actions, self.action_shape)
        self.check_observed(observed)
        latents = self._video_pass(noise_video, observed, self.frame_start)
        _mark(timer, "video")
        self._write_action(executing_actions, CacheMode.PREDICTED)
        _mark(timer, "grounded")
        return latents

    def _write_action(self, actions: Tensor, mode: CacheMode) -> None:
        """Clean (t = 0) action tokens at frame_start into the cache as `mode`, unused channels zeroed."""
        t0 = torch.zeros(actions.shape[2], device=self.device)
        actions = actions.to(self.device, self.dtype).clone()
        actions[:, ~self.action_channel_mask] = 0
        self._forward(actions, t0, mode, True, self.frame_start)

    def _write_clean(self, video_latents: Tensor, actions: Tensor, mode: CacheMode) -> None:
        """Clean (t = 0) video then action tokens at frame_start into the cache as `mode`."""
        self.check_feedback(video_latents, actions)
        t0 = torch.zeros(video_latents.shape[2], device=self.device)
        self._forward(video_latents.to(self.device, self.dtype), t0, mode, False, self.frame_start)
        self._write_action(actions, mode)

    @torch.no_grad()
    def feedback(self, video_latents: Tensor, actions: Tensor, timer=None) -> None:
        """Write observed latents then executed actions as HISTORY (t = 0); advance the frame ids."""
        self._write_clean(video_latents, actions, CacheMode.HISTORY)
        _mark(timer, "history")
        self.frame_start += video_latents.shape[2]

    @torch.no_grad()
    def write_predicted(self, video_latents: Tensor, actions: Tensor, timer=None) -> None:
        """Insert a chunk's own prediction as PREDICTED (t = 0) at frame_start, like the last forward of
        `sample_chunk`: restores a chunk inferred ahead after `feedback` dropped the predicted entries."""
        self._write_clean(video_latents, actions, CacheMode.PREDICTED)
        _mark(timer, "predicted")


CUDA_GRAPHS_MODE = "reduce-overhead"


def default_compile_mode(device: torch.device | str) -> str | None:
    """torch.compile mode of the sampler's step: CUDA graphs on CUDA (50 of the ~72 forwards of a
    chunk are launch-bound 16-token action forwards), inductor's default elsewhere."""
    return CUDA_GRAPHS_MODE if torch.device(device).type == "cuda" else None


class StaticSampler(_SamplerBase):
    """Fixed shapes, ring cache, per-prompt cross-attention K/V, compiled step per stream.

    compile_mode "auto" = `default_compile_mode(device)`: "reduce-overhead" (CUDA graphs) on CUDA.
    The compiled step reads only tensors that keep their address for the sampler's life: the cache,
    the prompt K/V, the frame offset, the pin values, and the step inputs (timestep, Euler factor,
    cache mode, pin mask), into which each step's values are copied before the call. Under CUDA
    graphs these are marked as static addresses, so a replay neither copies them nor skips the graph
    for a mutated input, and each graph is recorded once (a static input at a new address would
    record it again). Each step's output is cloned before the next replay reuses the graph's output
    memory."""

    _compiled_instances = 0

    def __init__(self, model: WanVATransformer, cfg: PolicyConfig, compile: bool = True,
                 compile_mode: str | None = "auto"):
        super().__init__(model, cfg)
        mc, dev, f, b = model.config, self.device, cfg.frame_chunk_size, cfg.cfg_batch
        heads, head_dim = mc.num_attention_heads, mc.attention_head_dim
        self.cache = RingKVCache(mc.num_layers, b, cfg.cache_capacity, heads, head_dim, self.dtype, dev)
        # Prompt cross-attention K/V: one buffer per block, refilled in place by reset().
        kv_shape = (b, cfg.max_sequence_length, heads, head_dim)
        self.text_kv = [
            (torch.zeros(kv_shape, dtype=self.dtype, device=dev), torch.zeros(kv_shape, dtype=self.dtype, device=dev))
            for _ in range(mc.num_layers)
        ]
        # Grid ids split as (integer frame, fractional offset, h, w) so adding the episode's frame
        # offset rounds exactly like building the ids from scratch.
        _, ph, pw = mc.patch_size
        h, w = cfg.latent_hw
        self.grids = {}
        for action, grid in ((False, video_grid_ids(f, h // ph, w // pw)),
                             (True, action_grid_ids(f, cfg.action_per_frame))):
            frame_int = grid[0].floor()
            self.grids[action] = (frame_int.to(dev), (grid[0] - frame_int).to(dev), grid[1:].to(dev))
        self.frame_offset = torch.zeros((), dtype=torch.float32, device=dev)
        # Per-step values as device tensors (nothing syncs to the host), copied into `step_inputs` per step.
        self.modes = {m: torch.tensor(int(m), device=dev) for m in CacheMode}
        self.schedules, self.last_updates = {}, {}
        for action in (False, True):
            ts, ds, self.last_updates[action] = self.stream_schedule(action)
            ts = [t.to(dev).clone() for t in ts]
            ds = [d.to(dev).clone() for d in ds]
            self.schedules[action] = list(zip(ts, ds, strict=True))
        # History writes: t = 0, no Euler update.
        self.history_t = torch.zeros((), device=dev)
        self.history_dsigma = torch.zeros((), device=dev)
        # Pinning as data: the first j frames forced to pin_values[stream] with t = 0 (pins[j]; j = 1 at the
        # first chunk, whose frame 0 is the observation, and for `ground` with one observed frame).
        self.pins = [torch.arange(f, device=dev) < j for j in range(f + 1)]
        self.no_pin, self.pin_first = self.pins[0], self.pins[1]
        self.pin_values = {
            False: torch.zeros(self.latent_shape, dtype=self.dtype, device=dev),
            True: torch.zeros(*self.action_shape[:2], 1, *self.action_shape[3:], dtype=self.dtype, device=dev),
        }
        # What the compiled step reads as (timestep, Euler factor, cache mode, pin mask): fixed buffers, so
        # every call passes the same tensors (distinct ones: aliased inputs would be another graph).
        self.step_inputs = (torch.zeros((), device=dev), torch.zeros((), device=dev),
                            torch.zeros((), dtype=torch.long, device=dev), torch.zeros(f, dtype=torch.bool, device=dev))
        self.step = self._step
        if compile_mode == "auto":
            compile_mode = default_compile_mode(dev)
        self.cuda_graphs = compile and compile_mode == CUDA_GRAPHS_MODE
        if self.cuda_graphs:
            for t in self._persistent_tensors():
                torch._dynamo.mark_static_address(t)
        if compile:
            # Dynamo caches graphs per code object, so every StaticSampler in the process shares
            # `_step`'s cache (at most 3 graphs each, see the module docstring). Make room for them
            # instead of hitting the default limit of 8 with a third sampler (benchmarks, servers).
            StaticSampler._compiled_instances += 1
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 3 * StaticSampler._compiled_instances + 2)
            self.step = torch.compile(self._step, fullgraph=True, dynamic=False, mode=compile_mode)

    def _persistent_tensors(self) -> list[Tensor]:
        """Every tensor the compiled step reads or mutates except `x`: each keeps its address."""
        tensors = list(self.cache.buffers()) + [t for kv in self.text_kv for t in kv]
        tensors += [self.frame_offset, self.action_channel_mask, *self.step_inputs, *self.pin_values.values()]
        tensors += [t for grid in self.grids.values() for t in grid]
        return tensors

    def _run_step(self, x: Tensor, t: Tensor, dsigma: Tensor, mode: Tensor, pin: Tensor, action: bool,
                  rows: int) -> Tensor:
        """One compiled step on this step's values, copied into the fixed step inputs (four tiny device
        copies); under CUDA graphs a new replay generation, output copied out of the pool."""
        for buf, value in zip(self.step_inputs, (t, dsigma, mode, pin), strict=True):
            buf.copy_(value)
        if not self.cuda_graphs:
            return self.step(x, *self.step_inputs, action, rows)
        torch.compiler.cudagraph_mark_step_begin()
        return self.step(x, *self.step_inputs, action, rows).clone()

    def reset(self, text_cond: Tensor, text_uncond: Tensor | None) -> None:
        text = [text_cond] + ([text_uncond] if self.cfg.use_cfg else [])
        text = torch.cat(text).to(self.device, self.dtype)
        with torch.no_grad():
            for (k_buf, v_buf), (k, v) in zip(self.text_kv, self.model.text_kv(text), strict=True):
                k_buf.copy_(k)
                v_buf.copy_(v)
        self.cache.reset()
        self.frame_offset.zero_()
        self.frame_start = 0

    def _step(
        self, x: Tensor, t: Tensor, dsigma: Tensor, mode: Tensor, pin: Tensor, action: bool, rows: int
    ) -> Tensor:
        """One forward of one stream (cache insert in `mode`) + CFG + Euler update.
        pin: [F] bool, frames forced to pin_values[action] with timestep 0.
        rows: CFG rows to run (1 = the cond row alone, when guidance is off and nothing is kept)."""
        pin5, pin_value = pin.view(1, 1, -1, 1, 1), self.pin_values[action]
        if action:
            x = x * self.action_channel_mask.view(1, -1, 1, 1, 1)
        x = torch.where(pin5, pin_value, x)
        t_frames = torch.where(pin, 0.0, t)
        frame_int, frame_frac, hw = self.grids[action]
        grid = torch.cat([((frame_int + self.frame_offset) + frame_frac)[None], hw])
        xb = x.expand(rows, -1, -1, -1, -1)
        text_kv = self.text_kv if rows == self.cfg.cfg_batch else [(k[:rows], v[:rows]) for k, v in self.text_kv]
        self.cache.begin(mode, grid.shape[1])
        v = self.model(xb, t_frames, grid, self.cache, action=action, text_kv=text_kv)
        self.cache.end(mode)
        scale = self.cfg.action_guidance_scale if action else self.cfg.guidance_scale
        x = x + self._cfg(v, scale if rows > 1 else 1.0) * dsigma
        return torch.where(pin5, pin_value, x)

    def transient_rows(self, action: bool) -> int:
        """CFG rows of a transient forward. Without guidance only the cond row's output matters and
        rows never mix, so it may skip the uncond row: half the KV-cache reads of a memory-bound
        forward. Forwards that keep their K/V (PREDICTED, HISTORY) fill every row."""
        guided = self.cfg.action_guidance_scale if action else self.cfg.guidance_scale
        return self.cfg.cfg_batch if guided > 1 else 1

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile (and under CUDA graphs record) every graph on zero inputs: a first chunk, its feedback,
        a lookahead action pass. Leaves an empty cache; `reset` with the episode's prompt comes next."""
        text_shape = (1, self.cfg.max_sequence_length, self.model.config.text_dim)
        text = torch.zeros(text_shape, device=self.device, dtype=self.dtype)
        latents = torch.zeros(self.latent_shape, device=self.device, dtype=self.dtype)
        actions = torch.zeros(self.action_shape, device=self.device, dtype=self.dtype)
        self.reset(text, text)
        out = self.sample_chunk(latents, actions, latents[:, :, :1])
        self.feedback(out.latents, out.actions)
        self.sample_actions(actions, frame_shift=self.cfg.frame_chunk_size)
        self.reset(text, text)

    def graph_keys(self) -> set[tuple[bool, int]]:
        """The (action, rows) pairs the step is compiled for over an episode: one graph, and under CUDA
        graphs one recording, each (3 with video guidance on and action guidance off)."""
        b = self.cfg.cfg_batch
        return {(action, rows) for action in (False, True) for rows in (self.transient_rows(action), b)}

    def _denoise(self, x: Tensor, action: bool, pin: Tensor) -> Tensor:
        steps = self.schedules[action]
        transient_rows = self.transient_rows(action)
        for i, (t, ds) in enumerate(steps):
            last = i == len(steps) - 1
            mode = self.modes[CacheMode.PREDICTED if last else CacheMode.TRANSIENT]
            out = self._run_step(x, t, ds, mode, pin, action, self.cfg.cfg_batch if last else transient_rows)
            if not last or self.last_updates[action]:  # else the last forward only writes the cache
                x = out
        return x

    @torch.no_grad()
    def sample_chunk(
        self, noise_video: Tensor, noise_action: Tensor, first_latent: Tensor | None = None, timer=None,
        frame_shift: int = 0,
    ) -> ChunkResult:
        self.check_inputs(noise_video, noise_action, first_latent)
        pin = self.no_pin
        if first_latent is not None:
            self.pin_values[False][:, :, :1].copy_(first_latent)
            pin = self.pin_first
        # The frame offset is a graph input: shifting it in place changes values, not graphs.
        self.frame_offset.add_(frame_shift)
        try:
            latents = self._denoise(noise_video.to(self.device, self.dtype), False, pin)
            _mark(timer, "video")
            actions = self._denoise(noise_action.to(self.device, self.dtype), True, pin)
        finally:
            self.frame_offset.sub_(frame_shift)
        actions = actions * self.action_channel_mask.view(1, -1, 1, 1, 1)
        _mark(timer, "action")
        return ChunkResult(actions=actions, latents=latents)

    @torch.no_grad()
    def sample_actions(self, noise_action: Tensor, frame_shift: int, timer=None) -> Tensor:
        """See ReferenceSampler.sample_actions (the action graphs, the frame offset shifted in place)."""
        _check("noise_action", noise_action, self.action_shape)
        self.frame_offset.add_(frame_shift)
        try:
            actions = self._denoise(noise_action.to(self.device, self.dtype), True, self.no_pin)
        finally:
            self.frame_offset.sub_(frame_shift)
        _mark(timer, "action")
        return actions * self.action_channel_mask.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def ground(self, noise_video: Tensor, executing_actions: Tensor, observed: Tensor | None = None,
               timer=None) -> Tensor:
        """See ReferenceSampler.ground (the video graph, its pins set to the observed frames, then the
        clean-write action graph)."""
        _check("noise_video", noise_video, self.latent_shape)
        _check("executing_actions", executing_actions, self.action_shape)
        self.check_observed(observed)
        pin = self.no_pin
        if observed is not None:
            self.pin_values[False][:, :, :observed.shape[2]].copy_(observed)
            pin = self.pins[observed.shape[2]]
        latents = self._denoise(noise_video.to(self.device, self.dtype), False, pin)
        _mark(timer, "video")
        self._write_action(executing_actions, CacheMode.PREDICTED)
        _mark(timer, "grounded")
        return latents

    def _write_action(self, actions: Tensor, mode: CacheMode) -> None:
        t, ds, b = self.history_t, self.history_dsigma, self.cfg.cfg_batch
        self._run_step(actions.to(self.device, self.dtype), t, ds, self.modes[mode], self.no_pin, True, b)

    def _write_clean(self, video_latents: Tensor, actions: Tensor, mode: CacheMode) -> None:
        """Clean (t = 0) video then action tokens into the cache as `mode`, both CFG rows, through the same
        graphs as the denoising steps."""
        self.check_feedback(video_latents, actions)
        t, ds, b = self.history_t, self.history_dsigma, self.cfg.cfg_batch
        self._run_step(video_latents.to(self.device, self.dtype), t, ds, self.modes[mode], self.no_pin, False, b)
        self._write_action(actions, mode)

    @torch.no_grad()
    def feedback(self, video_latents: Tensor, actions: Tensor, timer=None) -> None:
        self._write_clean(video_latents, actions, CacheMode.HISTORY)
        _mark(timer, "history")
        self.frame_offset.add_(video_latents.shape[2])
        self.frame_start += video_latents.shape[2]

    @torch.no_grad()
    def write_predicted(self, video_latents: Tensor, actions: Tensor, timer=None) -> None:
        """See ReferenceSampler.write_predicted (same graphs as the history writes, PREDICTED mode)."""
        self._write_clean(video_latents, actions, CacheMode.PREDICTED)
        _mark(timer, "predicted")
