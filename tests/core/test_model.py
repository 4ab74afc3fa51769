"""The DiT against independent implementations (diffusers' Wan modules share upstream's math and
key names) and against the upstream state-dict layout."""

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding  # independent oracles (the `frozen` extra)
from diffusers.models.transformers import transformer_wan as dwan

from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config
from lingbot_edge.core.model import NoCache, action_grid_ids, rope_angles, timestep_sinusoid, video_grid_ids
from lingbot_edge.io.checkpoint import build_meta_model, build_model

TINY = MODEL_PRESETS["tiny"]


def test_upstream_key_names():
    """Key names from docs/design.md section 1 / upstream `transformer/` (a sample of every kind)."""
    keys = set(build_meta_model(MODEL_PRESETS["full"]).state_dict())
    expected = {
        "patch_embedding_mlp.weight", "action_embedder.bias",
        "condition_embedder.time_embedder.linear_1.weight", "condition_embedder.time_embedder.linear_2.bias",
        "condition_embedder.time_proj.weight", "condition_embedder.text_embedder.linear_1.weight",
        "condition_embedder.text_embedder.linear_2.bias", "condition_embedder_action.time_proj.bias",
        "blocks.0.attn1.to_q.weight", "blocks.0.attn1.to_out.0.weight", "blocks.0.attn1.norm_q.weight",
        "blocks.0.attn1.norm_k.weight", "blocks.29.attn2.to_v.bias", "blocks.29.attn2.norm_k.weight",
        "blocks.7.norm2.weight", "blocks.7.norm2.bias", "blocks.7.ffn.net.0.proj.weight",
        "blocks.7.ffn.net.2.weight", "blocks.7.scale_shift_table", "proj_out.weight",
        "action_proj_out.weight", "scale_shift_table",
    }
    assert expected <= keys
    assert not any("norm1" in k or "norm3" in k or "norm_out" in k or "rope" in k for k in keys)
    n = sum(p.numel() for p in build_meta_model(MODEL_PRESETS["full"]).parameters())
    assert 4.9e9 < n < 5.2e9, n  # "about 5.0B params"
    shapes = dict(build_meta_model(MODEL_PRESETS["full"]).named_parameters())
    assert shapes["patch_embedding_mlp.weight"].shape == (3072, 192)
    assert shapes["blocks.0.ffn.net.0.proj.weight"].shape == (14336, 3072)
    assert shapes["condition_embedder.time_proj.weight"].shape == (6 * 3072, 3072)
    assert shapes["proj_out.weight"].shape == (192, 3072)
    assert shapes["action_proj_out.weight"].shape == (30, 3072)
    assert shapes["blocks.0.scale_shift_table"].shape == (1, 6, 3072)


def test_timestep_sinusoid_matches_diffusers():
    t = torch.tensor([0.0, 1.5, 250.0, 999.0])
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_sinusoid(t, 256), ref, atol=1e-5, rtol=1e-5)


def test_condition_embedder_matches_diffusers():
    model = build_model(TINY, seed=1)
    ref = dwan.WanTimeTextImageEmbedding(
        dim=TINY.dim, time_freq_dim=TINY.freq_dim, time_proj_dim=6 * TINY.dim, text_embed_dim=TINY.text_dim
    )
    ref.load_state_dict(model.condition_embedder.state_dict(), strict=True)
    t = torch.tensor([0.0, 10.0, 500.0])
    text = torch.randn(1, 7, TINY.text_dim)
    temb_ref, proj_ref, text_ref, _ = ref(t, text, timestep_seq_len=3)
    temb, mod = model.condition_embedder(t, torch.float32)
    torch.testing.assert_close(temb, temb_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.flatten(-2), proj_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.condition_embedder.text_embedder(text), text_ref, atol=1e-5, rtol=1e-5)


def _diffusers_rope(f, h, w, head_dim):
    rope = dwan.WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=64)
    return rope(torch.zeros(1, 1, f, 2 * h, 2 * w))


def test_block_matches_diffusers_wan_block():
    """A block with an empty cache is a Wan2.2 block: diffusers' WanTransformerBlock loads our
    state dict strictly and gives the same output for video tokens of frames 0..F-1."""
    model = build_model(TINY, seed=2)
    blk = model.blocks[1]
    ref = dwan.WanTransformerBlock(TINY.dim, TINY.ffn_dim, TINY.num_attention_heads, cross_attn_norm=True, eps=TINY.eps)
    ref.load_state_dict(blk.state_dict(), strict=True)
    f, h, w = 2, 2, 3
    x = torch.randn(2, f * h * w, TINY.dim)
    ctx = torch.randn(2, 9, TINY.dim)
    temb = torch.randn(1, f * h * w, 6, TINY.dim) * 0.1
    out_ref = ref(x, ctx, temb.expand(2, -1, -1, -1), _diffusers_rope(f, h, w, TINY.attention_head_dim))
    rope = rope_angles(video_grid_ids(f, h, w), TINY.attention_head_dim)
    out = blk(x, temb, rope, blk.attn2.project_kv(ctx), NoCache())
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=2e-5)


def test_rope_ids_and_action_ids():
    g = video_grid_ids(2, 2, 3, frame_start=5)
    assert g.shape == (3, 12) and g[:, 0].tolist() == [5, 0, 0] and g[:, -1].tolist() == [6, 1, 2]
    a = action_grid_ids(2, 4, frame_start=3)
    # action j (1..apf) of frame f: (start + f + j / (apf + 1), -1, -1)
    assert a[0].tolist() == pytest.approx([3.2, 3.4, 3.6, 3.8, 4.2, 4.4, 4.6, 4.8])
    assert (a[1:] == -1).all()
    cos, sin = rope_angles(g, 128)
    assert cos.shape == (12, 64)  # 22 frame + 21 height + 21 width frequency pairs


def test_patchify_roundtrip_and_upstream_order():
    model = build_model(TINY)
    x = torch.randn(1, 16, 2, 4, 6)
    tok = model.patchify(x)
    assert tok.shape == (1, 2 * 2 * 3, 64)
    # token (f=1, h=0, w=2), feature (c=5, ph=1, pw=0) comes from x[c, f, 2*h+ph, 2*w+pw]
    assert tok[0, 1 * 6 + 0 * 3 + 2, 5 * 4 + 1 * 2 + 0] == x[0, 5, 1, 1, 4]
    # proj_out features are ordered (ph, pw, c): `b l (n c) -> b (l n) c`
    y = torch.randn(1, 12, 4 * 16)
    lat = model.unpatchify(y, 2, 4, 6)
    assert lat[0, 7, 1, 3, 2] == y[0, 1 * 6 + 1 * 3 + 1, (1 * 2 + 0) * 16 + 7]


def test_forward_shapes_and_grad_free():
    cfg = get_policy_config("tiny")
    model = build_model(cfg.model_config)
    h, w = cfg.latent_hw
    text = torch.randn(2, 8, TINY.text_dim)
    v = model(torch.randn(2, 16, 2, h, w), torch.tensor([0.0, 500.0]), video_grid_ids(2, h // 2, w // 2), NoCache(),
              action=False, text_emb=text)
    assert v.shape == (2, 16, 2, h, w)
    a = model(torch.randn(2, 8, 2, 4, 1), torch.tensor([0.0, 500.0]), action_grid_ids(2, 4), NoCache(),
              action=True, text_emb=text)
    assert a.shape == (2, 8, 2, 4, 1)
    assert not any(p.requires_grad for p in model.parameters())
