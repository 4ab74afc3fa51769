"""Full-size presets run through the static sampler on the meta device: every shape of the 5B
model, the LIBERO / RoboTwin / SO-100 caches and a whole chunk, with no memory allocated."""

import pytest
import torch

from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config
from lingbot_edge.core.sampler import StaticSampler
from lingbot_edge.io.checkpoint import build_meta_model


@pytest.mark.parametrize(
    ("preset", "latent_hw", "video_tokens", "action_tokens", "capacity"),
    [
        ("libero", (8, 16), 128, 16, 15 * (128 + 16)),
        ("robotwin", (24, 20), 240, 32, 36 * (240 + 32)),
        ("so100", (6, 24), 144, 16, 15 * (144 + 16)),
    ],
)
def test_full_preset_shapes_on_meta(preset, latent_hw, video_tokens, action_tokens, capacity):
    cfg = get_policy_config(preset)
    assert cfg.latent_hw == latent_hw
    assert (cfg.video_tokens_per_chunk, cfg.action_tokens_per_chunk, cfg.cache_capacity) == (
        video_tokens, action_tokens, capacity)
    model = build_meta_model(MODEL_PRESETS["full"]).to(torch.bfloat16)
    # Meta tensors run through Python shape functions (~1 s per forward): one step per stream is
    # enough to exercise every shape.
    sampler = StaticSampler(model, cfg.replace(num_inference_steps=1, action_num_inference_steps=1), compile=False)
    assert len(sampler.cache.k) == 30 and sampler.cache.k[0].shape == (2, capacity, 24, 128)
    meta = dict(device="meta", dtype=torch.bfloat16)
    sampler.reset(torch.empty(1, 512, 4096, **meta), torch.empty(1, 512, 4096, **meta))
    first = torch.empty(*sampler.latent_shape[:2], 1, *sampler.latent_shape[3:], **meta)
    out = sampler.sample_chunk(torch.empty(sampler.latent_shape, **meta), torch.empty(sampler.action_shape, **meta),
                               first)
    assert out.latents.shape == (1, 48, cfg.frame_chunk_size, *latent_hw)
    assert out.actions.shape == (1, 30, cfg.frame_chunk_size, cfg.action_per_frame, 1)
    sampler.feedback(out.latents, out.actions)
