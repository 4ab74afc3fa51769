"""The teacher-forced forward: a whole episode in one differentiable pass, with the inference cache semantics.

At inference (docs/design.md sections 2-3) chunk k's noisy video tokens attend to the KV cache (the clean
history of the chunks before, written with t = 0) plus themselves; its noisy action tokens attend to
that history, the chunk's own clean video (its PREDICTED entries) plus themselves; feedback then writes
the observed video and the executed actions as HISTORY. Every insert sees at most `capacity` keys: the
newest ones in insertion order, itself included (oldest evicted first, token by token).

Here the caches are replaced by one sequence per episode holding, per chunk k, the observed video and
executed actions (HISTORY inserts), the noisy video, the clean video once more as the chunk's PREDICTED
video, and the noisy actions; a boolean attention mask gives every token exactly the keys the same
token sees at inference. The mask comes from replaying the cache's own bookkeeping (insert order,
oldest-first eviction, also by TRANSIENT inserts, and the drop of PREDICTED entries) symbolically in
`cache_visibility`, not from a formula, so the two cannot drift apart; `tests/train/test_train_teacher.py`
checks the outputs against the model run through `ListKVCache`.

Because a token's K/V depend on what it attended to, this reproduces the cache's K/V layer by layer
only when the sequence starts at the episode's first chunk: training always runs whole episodes.
Grid ids (RoPE) are the inference ones: chunk k sits at frames k*F.., every copy alike.

Grounded lookahead (`infer(ahead=True)`, `async_mode` "grounded") inserts in another order: chunk k's actions
are denoised while chunk k-1 executes, on top of the real history up to chunk k-2, chunk k-1's grounded video
(its latent frames observed so far, pinned at t = 0, the rest at the sampler's PREDICTED write) and chunk k-1's
known actions. `episode_layout(..., grounded=True)` adds those three segments per chunk (`GROUNDED_SEGMENTS`:
the executing chunk's grounded video and clean actions, and the chunk's noisy actions as the lookahead
denoises them), their visibility replayed in that order by `grounded_cache_visibility`. The history copies
they attend to are the synchronous ones: once the cache evicts, the two orders may have evicted a different
number of the oldest frame's tokens when those copies were written, so there the lookahead's keys are
reproduced and their K/V approximately.
The model's modules (embedders, blocks, heads) are used as they are; only the attention backend and
the per-token timesteps differ from `WanVATransformer.forward`, which runs one stream per call and
cannot take gradients through a cache write.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.core.model import WanVATransformer, action_grid_ids, rope_angles, video_grid_ids

# Per chunk, in sequence order. The clean video appears twice: as the chunk's PREDICTED entries (what its
# noisy actions attend to) and as its HISTORY entries (what later chunks attend to). Their inputs are
# the same latents, but once the cache evicts they were written with different keys visible, so their
# K/V differ from the second block on.
SEGMENTS = ("video", "action", "video_noisy", "video_predicted", "action_noisy")
# Added per chunk by grounded training: the chunk's grounded video and clean actions as the executing chunk's
# temporary entries, and its noisy actions as the grounded lookahead denoises them.
GROUNDED_SEGMENTS = ("video_grounded", "action_predicted", "action_noisy_async")


class ChunkBandAttention:
    """Self-attention backend for the episode sequence: each segment's queries (a chunk's video, actions, noisy
    video, ...) against only the keys that segment's mask can reach in some chunk, gathered per chunk by
    strided slices (offsets relative to the chunk's start, so a few chunks back at most). Exact: the mask is
    applied on those keys, keys outside it are masked in every chunk. About 3x less attention than the whole
    band of chunks a query may reach (most of it masked) and no index scatter in the backward pass."""

    def __init__(self, mask: Tensor, chunk_tokens: int, sizes: tuple[int, ...] | None = None):
        length = mask.shape[0]
        per = chunk_tokens
        self.chunks, self.per = length // per, per
        chunk_of = torch.arange(length) // per
        q, k = mask.nonzero(as_tuple=True)
        if (chunk_of[k] > chunk_of[q]).any():
            raise ValueError("mask: a token attends to a later chunk (not a cache mask)")
        self.band = int((chunk_of[q] - chunk_of[k]).max()) + 1 if len(q) else 1
        self.pad = (self.band - 1) * per  # keys before the first chunk: zeros, always masked
        bounds = [0]
        for n in sizes or (per,):
            bounds.append(bounds[-1] + n)
        if bounds[-1] != per:
            raise ValueError(f"sizes: {sizes} do not add up to the {per} tokens of a chunk")
        base = torch.arange(self.chunks) * per
        self.segments = []  # (first query, last query + 1, key runs [(offset, n)], additive mask [K, n_q, n_k])
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            rows = base[:, None] + torch.arange(lo, hi)[None]  # [K, n_q]
            visible = mask[rows.flatten()].view(self.chunks, hi - lo, length)
            cols = visible.any(1).nonzero(as_tuple=True)  # (chunk, key position)
            offsets = torch.unique(cols[1] - base[cols[0]])  # relative to the chunk start, sorted
            runs = []  # contiguous runs of offsets, at most a chunk long each (a strided slice per run)
            for off in offsets.tolist():
                if runs and off == runs[-1][0] + runs[-1][1] and runs[-1][1] < per:
                    runs[-1][1] += 1
                else:
                    runs.append([off, 1])
            pos = base[:, None] + offsets[None]  # [K, n_k] key positions per chunk
            allowed = torch.gather(visible, 2, pos.clamp(min=0)[:, None].expand(-1, hi - lo, -1)) & (pos >= 0)[:, None]
            bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
            self.segments.append((lo, hi, [tuple(r) for r in runs], bias))

    def to(self, device) -> ChunkBandAttention:
        self.segments = [(lo, hi, runs, bias.to(device)) for lo, hi, runs, bias in self.segments]
        return self

    def _keys(self, xp: Tensor, runs) -> Tensor:
        """Padded [B, pad + L + per, H, D] -> [B, K, n_k, H, D]: per chunk, the tokens at each run's offsets."""
        b, _, h, d = xp.shape
        span = self.chunks * self.per
        return torch.cat([xp[:, self.pad + off:self.pad + off + span].view(b, self.chunks, self.per, h, d)[:, :, :n]
                          for off, n in runs], dim=2)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, _, h, d = q.shape
        kc = self.chunks
        qc = q.view(b, kc, self.per, h, d)
        kp, vp = (F.pad(x, (0, 0, 0, 0, self.pad, self.per)) for x in (k, v))  # any run's slice stays inside

        def heads(x: Tensor) -> Tensor:  # [B, K, n, H, D] -> [B, K*H, n, D]: the chunks as more heads
            return x.permute(0, 1, 3, 2, 4).reshape(b, kc * h, x.shape[2], d)

        out = []
        for lo, hi, runs, bias in self.segments:
            mask = bias.to(q.dtype)[:, None].expand(-1, h, -1, -1).reshape(1, kc * h, hi - lo, -1)
            o = F.scaled_dot_product_attention(heads(qc[:, :, lo:hi]), heads(self._keys(kp, runs)),
                                               heads(self._keys(vp, runs)), attn_mask=mask)
            out.append(o.view(b, kc, h, hi - lo, d).permute(0, 1, 3, 2, 4))
        return torch.cat(out, dim=2).reshape(b, kc * self.per, h, d)


@dataclass(frozen=True)
class EpisodeLayout:
    """Token layout of a K-chunk episode: segment positions, grid ids and the attention mask."""

    chunks: int
    video_tokens: int  # per chunk
    action_tokens: int  # per chunk
    capacity: int
    grid: Tensor  # [3, L]
    mask: Tensor  # [L, L] bool, True = may attend
    segments: tuple[str, ...] = SEGMENTS  # per chunk, in sequence order

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.action_tokens if name.startswith("action") else self.video_tokens
                     for name in self.segments)

    @property
    def chunk_tokens(self) -> int:
        return sum(self.sizes)

    @functools.cached_property
    def attention(self) -> ChunkBandAttention:
        """The attention backend of this layout (built once: it scans the whole mask)."""
        return ChunkBandAttention(self.mask, self.chunk_tokens, self.sizes)

    def segment(self, name: str) -> Tensor:
        """Sequence positions [K, n] of one segment in every chunk."""
        i = self.segments.index(name)
        base = torch.arange(self.chunks)[:, None] * self.chunk_tokens
        return base + sum(self.sizes[:i]) + torch.arange(self.sizes[i])[None]


Insert = tuple[str, int, int, str]  # (segment, chunk, tokens, "transient" | "predicted" | "history")


def replay_cache(inserts: list[Insert], capacity: int) -> list[tuple[str, int, list[tuple[str, int]]]]:
    """Replay the KV cache's bookkeeping (docs/design.md section 2) over a sequence of inserts, symbolically.
    Returns (segment, chunk, [(segment, chunk) of every key token]) per insert, keys token by token, oldest
    first."""
    cache: list[tuple[str, int]] = []  # one entry per token, oldest first
    predicted: list[bool] = []
    seen = []
    for name, k, n, mode in inserts:
        if mode == "history":  # a real observation replaces the predicted future
            cache = [c for c, p in zip(cache, predicted, strict=True) if not p]
            predicted = [False] * len(cache)
        evict = max(0, len(cache) + n - capacity)
        cache, predicted = cache[evict:], predicted[evict:]
        keys = cache + [(name, k)] * n
        seen.append((name, k, keys))
        if mode != "transient":
            cache, predicted = keys, predicted + [mode == "predicted"] * n
    return seen


def cache_visibility(chunks: int, nv: int, na: int, capacity: int) -> list[tuple[str, int, list[tuple[str, int]]]]:
    """The synchronous sampler's inserts, replayed: per chunk the noisy video (TRANSIENT; every denoising step
    sees the same keys, since the first one already evicted what it needs), its clean video (PREDICTED, the last
    video step), the noisy actions (TRANSIENT), the last action step (PREDICTED, dropped unseen), then feedback:
    video and actions as HISTORY. Returns `replay_cache`'s entries for the segments the sequence holds."""
    inserts: list[Insert] = []
    for k in range(chunks):
        inserts += [("video_noisy", k, nv, "transient"), ("video_predicted", k, nv, "predicted"),
                    ("action_noisy", k, na, "transient"), ("action_last_step", k, na, "predicted"),
                    ("video", k, nv, "history"), ("action", k, na, "history")]
    return [s for s in replay_cache(inserts, capacity) if s[0] in SEGMENTS]


def grounded_cache_visibility(chunks: int, nv: int, na: int,
                              capacity: int) -> list[tuple[str, int, list[tuple[str, int]]]]:
    """The grounded lookahead's inserts, replayed: chunk 0 as the synchronous sampler writes it (its last action
    step is the executing chunk's actions, `action_predicted`); then, while chunk k-1 executes, chunk k's
    action pass (`action_noisy_async`, its last step PREDICTED and dropped unseen); feedback of chunk k-2 (video
    and actions as HISTORY); the grounding of chunk k-1... in steady state: feedback(k-1), the executing chunk
    k's grounded video (TRANSIENT steps, PREDICTED last: `video_grounded`) and its actions (PREDICTED), then
    chunk k+1's action pass. Returns `replay_cache`'s entries for `GROUNDED_SEGMENTS`."""
    inserts: list[Insert] = [("video_noisy", 0, nv, "transient"), ("video_predicted", 0, nv, "predicted"),
                             ("action_noisy", 0, na, "transient"), ("action_predicted", 0, na, "predicted")]
    for k in range(1, chunks):
        inserts += [("action_noisy_async", k, na, "transient"), ("action_last_step", k, na, "predicted"),
                    ("video", k - 1, nv, "history"), ("action", k - 1, na, "history"),
                    ("video_noisy", k, nv, "transient"), ("video_grounded", k, nv, "predicted"),
                    ("action_predicted", k, na, "predicted")]
    return [s for s in replay_cache(inserts, capacity) if s[0] in GROUNDED_SEGMENTS]


def episode_layout(cfg: PolicyConfig, chunks: int, grounded: bool = False) -> EpisodeLayout:
    """The token layout of a `chunks`-chunk episode; `grounded` adds `GROUNDED_SEGMENTS` to every chunk."""
    mc = cfg.model_config
    f, apf = cfg.frame_chunk_size, cfg.action_per_frame
    h, w = cfg.latent_hw
    _, ph, pw = mc.patch_size
    nv, na = cfg.video_tokens_per_chunk, cfg.action_tokens_per_chunk
    segments = SEGMENTS + (GROUNDED_SEGMENTS if grounded else ())
    sizes = tuple(na if name.startswith("action") else nv for name in segments)
    per = sum(sizes)
    grids = []
    for k in range(chunks):
        vgrid, agrid = video_grid_ids(f, h // ph, w // pw, k * f), action_grid_ids(f, apf, k * f)
        grids += [agrid if name.startswith("action") else vgrid for name in segments]

    def positions(name: str, k: int) -> Tensor:
        i = segments.index(name)
        return k * per + sum(sizes[:i]) + torch.arange(sizes[i])

    visibility = cache_visibility(chunks, nv, na, cfg.cache_capacity)
    if grounded:
        visibility += grounded_cache_visibility(chunks, nv, na, cfg.cache_capacity)
    mask = torch.zeros(chunks * per, chunks * per, dtype=torch.bool)
    for k in range(chunks):  # every token sees itself (the grounded segments of chunk 0 are never used)
        for name in segments:
            rows = positions(name, k)
            mask[rows[:, None], rows[None]] = True
    for name, k, keys in visibility:
        rows = positions(name, k)
        # Keys come in whole inserts except the oldest, which may be partly evicted: keep its newest tokens.
        i = 0
        while i < len(keys):
            j = i
            while j < len(keys) and keys[j] == keys[i]:
                j += 1
            cols = positions(*keys[i])
            mask[rows[:, None], cols[len(cols) - (j - i):][None]] = True
            i = j
    return EpisodeLayout(chunks, nv, na, cfg.cache_capacity, torch.cat(grids, dim=1), mask, segments)


def _embed_time(embedder, t: Tensor, tokens_per_frame: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """t: [B, K, F] per-frame timesteps -> temb [B, K, F*n, dim], mod [B, K, F*n, 6, dim]."""
    b, k, f = t.shape
    temb, mod = embedder(t.reshape(-1), dtype)
    temb = temb.view(b, k, f, 1, -1).expand(-1, -1, -1, tokens_per_frame, -1).reshape(b, k, f * tokens_per_frame, -1)
    mod = mod.view(b, k, f, 1, 6, -1).expand(-1, -1, -1, tokens_per_frame, -1, -1)
    return temb, mod.reshape(b, k, f * tokens_per_frame, 6, -1)


@dataclass
class SegmentInputs:
    """What a layout's optional segments hold, where `teacher_forced_forward` does not derive it itself."""

    # [B, K, C, F, h, w] what the chunk's PREDICTED entries hold (default: the clean video at t = 0, the full-step
    # sampler's last write; under `video_exec_step` the sampler writes a partly denoised latent there instead)
    video_predicted: Tensor | None = None
    t_predicted: Tensor | None = None  # [B, K, F] their timesteps
    # [B, K, A, F, apf, 1] the grounded lookahead's noisy action copy (layouts with `GROUNDED_SEGMENTS`: required)
    action_noisy_async: Tensor | None = None
    t_action_async: Tensor | None = None  # [B, K, F] its timesteps
    # [B, K, C, F, h, w] the executing chunk's grounded video (grounded layouts; default: what video_predicted holds)
    video_grounded: Tensor | None = None
    t_grounded: Tensor | None = None  # [B, K, F] its timesteps


def teacher_forced_forward(
    model: WanVATransformer,
    layout: EpisodeLayout,
    video_clean: Tensor,
    action_clean: Tensor,
    video_noisy: Tensor,
    action_noisy: Tensor,
    t_video: Tensor,
    t_action: Tensor,
    text_kv: list[tuple[Tensor, Tensor]],
    segments: SegmentInputs | None = None,
) -> tuple[Tensor, ...]:
    """Velocities of the noisy tokens of every chunk.

    video_*: [B, K, C, F, h, w]; action_*: [B, K, A, F, apf, 1] (normalized, unused channels zero);
    t_video / t_action: [B, K, F] timesteps of the noisy copies (the clean ones are at t = 0);
    text_kv: the prompt's cross-attention K/V per block ([B, Lt, H, D] each).
    segments: the PREDICTED entries, the grounded lookahead's action copy (its executing-chunk copy holds
    `action_clean` at t = 0) and grounded video (`SegmentInputs`; default: none of them given).
    Returns (video velocity [B, K, C, F, h, w], action velocity [B, K, A, F, apf, 1]), plus the grounded
    copy's action velocity for a grounded layout.
    """
    s = segments or SegmentInputs()
    video_predicted, t_predicted, video_grounded, t_grounded = s.video_predicted, s.t_predicted, s.video_grounded, \
        s.t_grounded
    action_noisy_async, t_action_async = s.action_noisy_async, s.t_action_async
    dtype = model.dtype
    b, k, c, f, h, w = video_clean.shape
    a_shape = action_clean.shape
    grounded = "action_noisy_async" in layout.segments
    if grounded and action_noisy_async is None:
        raise ValueError("action_noisy_async: a grounded layout needs the lookahead copy's noisy actions")

    def video_tokens(x: Tensor) -> Tensor:
        return model.patch_embedding_mlp(model.patchify(x.reshape(b * k, c, f, h, w).to(dtype))).view(b, k, -1,
                                                                                                    model.config.dim)

    def action_tokens(x: Tensor) -> Tensor:  # b c f n 1 -> b (f n 1) c, per chunk
        x = x.reshape(b * k, a_shape[2], -1).transpose(1, 2).to(dtype)
        return model.action_embedder(x).view(b, k, -1, model.config.dim)

    nv, na = layout.video_tokens // f, layout.action_tokens // f  # tokens per frame
    zeros = torch.zeros(b, k, f, device=t_video.device)
    clean_video = (video_tokens(video_clean), *_embed_time(model.condition_embedder, zeros, nv, dtype))
    clean_action = (action_tokens(action_clean), *_embed_time(model.condition_embedder_action, zeros, na, dtype))
    parts = {
        "video": clean_video,
        "action": clean_action,
        "video_noisy": (video_tokens(video_noisy), *_embed_time(model.condition_embedder, t_video, nv, dtype)),
        "video_predicted": clean_video if video_predicted is None else
        (video_tokens(video_predicted), *_embed_time(model.condition_embedder, t_predicted, nv, dtype)),
        "action_noisy": (action_tokens(action_noisy),
                         *_embed_time(model.condition_embedder_action, t_action, na, dtype)),
    }
    if grounded:
        parts["video_grounded"] = parts["video_predicted"] if video_grounded is None else (
            video_tokens(video_grounded), *_embed_time(model.condition_embedder, t_grounded, nv, dtype))
        parts["action_predicted"] = clean_action
        parts["action_noisy_async"] = (action_tokens(action_noisy_async),
                                       *_embed_time(model.condition_embedder_action, t_action_async, na, dtype))
    ordered = [parts[name] for name in layout.segments]
    tokens = torch.cat([p[0] for p in ordered], dim=2).flatten(1, 2)  # [B, L, dim], chunk-major
    temb = torch.cat([p[1] for p in ordered], dim=2).flatten(1, 2)
    mod = torch.cat([p[2] for p in ordered], dim=2).flatten(1, 2)
    rope = rope_angles(layout.grid.to(tokens.device), model.config.attention_head_dim)
    attention = layout.attention.to(tokens.device)
    for blk in model.blocks:
        tokens = blk(tokens, mod, rope, text_kv[blk.index], attention)

    shift, scale = (model.scale_shift_table[None] + temb[:, :, None]).float().unbind(2)
    tokens = (model.norm_out(tokens) * (1.0 + scale) + shift).to(dtype)

    def action_velocity(segment: str) -> Tensor:
        act = tokens[:, layout.segment(segment).flatten().to(tokens.device)]
        return model.action_proj_out(act).reshape(b * k, layout.action_tokens, -1).transpose(1, 2).reshape(a_shape)

    vid = tokens[:, layout.segment("video_noisy").flatten().to(tokens.device)]  # [B, K*nv*f, dim]
    v_video = model.unpatchify(model.proj_out(vid).reshape(b * k, layout.video_tokens, -1), f, h, w)
    out = (v_video.view(b, k, c, f, h, w), action_velocity("action_noisy"))
    return out + (action_velocity("action_noisy_async"),) if grounded else out
