"""The dual-stream Wan DiT of LingBot-VA (docs/design.md section 1).

Module and parameter names reproduce upstream `transformer/` state-dict keys exactly, so a
released checkpoint loads without remapping. The model does not own a KV cache: self-attention
is delegated to a backend object passed to `forward` (the plain-list reference cache, the static
ring cache, or none), so samplers differ only in the backend they pass. Every projection is a
plain `nn.Linear` called as a module: quantization can swap them and calibration can hook them
without touching this file.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lingbot_edge.core.config import ModelConfig


class SelfAttentionBackend(Protocol):
    """Attends the current tokens' queries over cached keys plus the current tokens."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v: [B, L, H, D] after QK-norm and RoPE. Returns [B, L, H, D]."""
        ...


class NoCache:
    """Self-attention over the current tokens only (a forward with an empty cache)."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sdpa(q, k, v)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """SDPA on [B, L, H, D] tensors; `mask` is a boolean key mask broadcastable to [B, H, Lq, Lk]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- embeddings


def timestep_sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep features, cos half first, frequency shift 0 (diffusers `Timesteps`
    with flip_sin_to_cos=True, downscale_freq_shift=0). t: [N] float -> [N, dim] fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    """Text embedding -> model width (PixArt-alpha style: Linear, tanh-GELU, Linear)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb, 6-way modulation); also holds the text projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimestepEmbedding(cfg.freq_dim, cfg.dim)
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = TextProjection(cfg.text_dim, cfg.dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """t: [N] timesteps -> temb [N, dim] (dtype), modulation [N, 6, dim] (dtype)."""
        feats = timestep_sinusoid(t, self.freq_dim).to(self.time_embedder.linear_1.bias.dtype)
        temb = self.time_embedder(feats).to(dtype)
        mod = self.time_proj(F.silu(temb))
        return temb, mod.unflatten(-1, (6, -1))


# ----------------------------------------------------------------------------- RoPE


def rope_angles(grid_ids: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """3-axis RoPE from per-token grid ids (frame, height, width).

    grid_ids: [3, L] (float; action tokens have fractional frame ids and h = w = -1).
    head_dim splits into frame / height / width parts (44/42/42 for 128). Angles are formed in
    float64 and rounded to fp32 like upstream, because absolute frame ids grow over an episode.
    Returns cos, sin: [L, head_dim // 2] fp32.
    """
    hw_dim = head_dim // 3
    parts = (head_dim - 2 * hw_dim, hw_dim, hw_dim)
    angles = []
    for axis, d in enumerate(parts):
        base = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=grid_ids.device)[: d // 2] / d)
        angles.append(grid_ids[axis].to(torch.float64)[:, None] * base[None])
    ang = torch.cat(angles, dim=-1).float()
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]); x: [B, L, H, D], cos/sin: [L, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return out.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------- blocks


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the parameter / input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class Attention(nn.Module):
    """Wan attention: q/k/v/out projections, RMSNorm over the full width on q and k."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])  # index 1 = upstream dropout
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)

    def project_q(self, x: Tensor) -> Tensor:
        return self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))

    def project_kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        k = self.norm_k(self.to_k(ctx)).unflatten(-1, (self.heads, -1))
        v = self.to_v(ctx).unflatten(-1, (self.heads, -1))
        return k, v

    def output(self, h: Tensor, dtype: torch.dtype) -> Tensor:
        return self.to_out[0](h.flatten(2).to(dtype))


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        # Keys ffn.net.0.proj / ffn.net.2 as in diffusers' FeedForward; index 1 was dropout.
        self.net = nn.ModuleList([GELUProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        dim = cfg.dim
        self.index = index
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: Tensor,
        mod: Tensor,
        rope: tuple[Tensor, Tensor],
        text_kv: tuple[Tensor, Tensor],
        self_attn: SelfAttentionBackend,
    ) -> Tensor:
        """x: [B, L, dim]; mod: [1 or B, L, 6, dim] per-token modulation; text_kv: cross-attn k, v."""
        dtype = x.dtype
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table[None] + mod.float()).unbind(2)

        # 1. self-attention over cache + current tokens (gated, residual in fp32)
        h = (self.norm1(x) * (1.0 + scale) + shift).to(dtype)
        q = apply_rope(self.attn1.project_q(h), *rope)
        k, v = self.attn1.project_kv(h)
        k = apply_rope(k, *rope)
        attn = self.attn1.output(self_attn.attend(self.index, q, k, v), dtype)
        x = (x.float() + attn * gate).to(dtype)

        # 2. cross-attention to the prompt (no RoPE, no cache, no gate)
        h = self.norm2(x).to(dtype)
        x = x + self.attn2.output(sdpa(self.attn2.project_q(h), *text_kv), dtype)

        # 3. feed-forward modulated by c_shift / c_scale, gated by c_gate
        h = (self.norm3(x) * (1.0 + c_scale) + c_shift).to(dtype)
        return (x.float() + self.ffn(h).float() * c_gate).to(dtype)


# ----------------------------------------------------------------------------- model


class WanVATransformer(nn.Module):
    """LingBot-VA `WanTransformer3DModel`: shared blocks, separate video / action embedders and heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding_mlp = nn.Linear(cfg.patch_dim, dim)
        self.action_embedder = nn.Linear(cfg.action_dim, dim)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.condition_embedder_action = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([TransformerBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.action_proj_out = nn.Linear(dim, cfg.action_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding_mlp.bias.dtype

    # -- inputs / outputs ---------------------------------------------------------------

    def patchify(self, latents: Tensor) -> Tensor:
        """[B, C, F, H, W] -> [B, F*(H/ph)*(W/pw), C*ph*pw] (`b c (f 1)(h 2)(w 2) -> b (f h w)(c 1 2 2)`)."""
        b, c, f, h, w = latents.shape
        _, ph, pw = self.config.patch_size
        x = latents.reshape(b, c, f, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(b, f * (h // ph) * (w // pw), c * ph * pw)

    def unpatchify(self, tokens: Tensor, f: int, h: int, w: int) -> Tensor:
        """proj_out tokens [B, L, ph*pw*C] -> [B, C, F, H, W] (upstream `b l (n c)` order)."""
        b = tokens.shape[0]
        _, ph, pw = self.config.patch_size
        c = self.config.out_channels
        x = tokens.reshape(b, f, h // ph, w // pw, ph, pw, c)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, c, f, h, w)

    def text_kv(self, text_emb: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys/values of every block for a prompt embedding [B, Lt, text_dim].

        They depend only on the prompt, so the static sampler computes them once per episode.
        """
        ctx = self.condition_embedder.text_embedder(text_emb.to(self.dtype))
        return [blk.attn2.project_kv(ctx) for blk in self.blocks]

    # -- forward --------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t_frames: Tensor,
        grid_ids: Tensor,
        self_attn: SelfAttentionBackend,
        *,
        action: bool,
        text_emb: Tensor | None = None,
        text_kv: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """One denoising forward of one stream.

        x: video latents [B, C, F, H, W] or actions [B, action_dim, F, apf, 1].
        t_frames: [F] timestep of each latent frame (shared by the CFG rows).
        grid_ids: [3, L] RoPE ids of the tokens. Give `text_emb` [B, Lt, text_dim] or precomputed
        `text_kv`. Returns the velocity with the shape of x.
        """
        dtype = self.dtype
        b, _, f, h, w = x.shape
        if action:
            tokens = self.action_embedder(x.to(dtype).flatten(2).transpose(1, 2))  # b c f n 1 -> b (f n) c
            embedder = self.condition_embedder_action
        else:
            tokens = self.patch_embedding_mlp(self.patchify(x.to(dtype)))
            embedder = self.condition_embedder
        tokens_per_frame = tokens.shape[1] // f
        # Timesteps are per frame; embed each frame once and repeat over its tokens.
        temb, mod = embedder(t_frames, dtype)
        temb = temb.repeat_interleave(tokens_per_frame, dim=0)[None]
        mod = mod.repeat_interleave(tokens_per_frame, dim=0)[None]
        rope = rope_angles(grid_ids, self.config.attention_head_dim)
        if text_kv is None:
            if text_emb is None:
                raise ValueError("forward: pass text_emb [B, Lt, text_dim] or precomputed text_kv")
            text_kv = self.text_kv(text_emb)

        for blk in self.blocks:
            tokens = blk(tokens, mod, rope, text_kv[blk.index], self_attn)

        shift, scale = (self.scale_shift_table[None] + temb[:, :, None]).float().unbind(2)
        tokens = (self.norm_out(tokens) * (1.0 + scale) + shift).to(dtype)
        if action:
            out = self.action_proj_out(tokens)  # [B, F*apf, action_dim]
            return out.transpose(1, 2).reshape(b, -1, f, h, w)
        return self.unpatchify(self.proj_out(tokens), f, h, w)


def video_grid_ids(frames: int, h_tokens: int, w_tokens: int, frame_start: int = 0) -> Tensor:
    """Grid ids [3, F*h*w] of video tokens: (frame_start + f, h, w)."""
    f, hh, ww = torch.meshgrid(
        torch.arange(frames, dtype=torch.float32) + frame_start,
        torch.arange(h_tokens, dtype=torch.float32),
        torch.arange(w_tokens, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([f.flatten(), hh.flatten(), ww.flatten()])


def action_grid_ids(frames: int, action_per_frame: int, frame_start: int = 0) -> Tensor:
    """Grid ids [3, F*apf] of action tokens: action j (1..apf) of frame f sits at
    (frame_start + f + j / (apf + 1), -1, -1)."""
    f = torch.arange(frames, dtype=torch.float32)[:, None] + frame_start
    j = torch.arange(1, action_per_frame + 1, dtype=torch.float32)[None] / (action_per_frame + 1)
    ff = (f + j).flatten()
    return torch.stack([ff, torch.full_like(ff, -1.0), torch.full_like(ff, -1.0)])
