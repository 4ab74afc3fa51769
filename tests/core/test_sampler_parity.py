"""The compiled static sampler reproduces the eager reference sampler (upstream semantics, list
cache) over a long episode with feedback and cache wrap-around, and never recompiles."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.core.sampler import ReferenceSampler, StaticSampler
from lingbot_edge.io.checkpoint import build_model

CHUNKS = 40
WARMUP = 2  # chunk 0 (first-chunk pinning) and chunk 1 (steady state): same graphs, by design
EXEC_STEP_CHUNKS = 24
TOL = 1e-5  # fp32; the samplers differ only in key order / masking inside attention (~1e-6)


def _episode_inputs(cfg, shapes, chunks, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, cfg.max_sequence_length, cfg.model_config.text_dim, generator=g)
    neg = torch.randn(1, cfg.max_sequence_length, cfg.model_config.text_dim, generator=g)
    latent_shape, action_shape = shapes
    first = torch.randn(*latent_shape[:2], 1, *latent_shape[3:], generator=g)
    steps = []
    for _ in range(chunks):
        steps.append(
            dict(
                noise_video=torch.randn(latent_shape, generator=g),
                noise_action=torch.randn(action_shape, generator=g),
                observed=torch.randn(latent_shape, generator=g),
                executed=torch.randn(action_shape, generator=g).clamp(-1, 1),
            )
        )
    return text, neg, first, steps


@pytest.fixture(scope="module")
def episode():
    return _parity_episode(get_policy_config("tiny"), CHUNKS)


@pytest.fixture(scope="module")
def partial_episode():
    """Partial video denoising on (upstream video_exec_step): 2 of the tiny preset's 4 video steps."""
    return _parity_episode(get_policy_config("tiny", video_exec_step=2), EXEC_STEP_CHUNKS)


def _parity_episode(cfg, chunks):
    model = build_model(cfg.model_config, seed=3)
    ref = ReferenceSampler(model, cfg)
    torch._dynamo.reset()
    counters.clear()
    static = StaticSampler(model, cfg, compile=True)
    text, neg, first, steps = _episode_inputs(cfg, (ref.latent_shape, ref.action_shape), chunks)
    ref.reset(text, neg)
    static.reset(text, neg)
    log = []
    for i, s in enumerate(steps):
        if i == WARMUP:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
            torch._dynamo.config.error_on_recompile = True
        try:
            pin = first if i == 0 else None
            r = ref.sample_chunk(s["noise_video"], s["noise_action"], pin)
            st = static.sample_chunk(s["noise_video"], s["noise_action"], pin)
            ref.feedback(s["observed"], r.actions)
            static.feedback(s["observed"], st.actions)
        finally:
            torch._dynamo.config.error_on_recompile = False
        log.append(
            dict(
                actions=(r.actions - st.actions).abs().max().item(),
                latents=(r.latents - st.latents).abs().max().item(),
                ref_len=len(ref.cache),
                ring_valid=int(static.cache.valid.sum()),
                ref_actions=r.actions,
                ref_latents=r.latents,
            )
        )
    return dict(cfg=cfg, log=log, graphs_after_warmup=graphs_after_warmup,
                graphs_end=counters["stats"]["unique_graphs"], static=static, first=first)


def test_static_matches_reference_over_40_chunks(episode):
    log = episode["log"]
    assert len(log) >= 40
    worst_a = max(e["actions"] for e in log)
    worst_v = max(e["latents"] for e in log)
    assert worst_a <= TOL and worst_v <= TOL, (worst_a, worst_v)
    # The outputs are not trivially small: a real signal was compared.
    assert all(e["ref_actions"].abs().max() > 0.1 and e["ref_latents"].abs().max() > 0.1 for e in log)


def test_cache_wraps_early(episode):
    cfg, log = episode["cfg"], episode["log"]
    cap = cfg.cache_capacity
    per_chunk = cfg.video_tokens_per_chunk + cfg.action_tokens_per_chunk
    assert cap == 2 * per_chunk  # attn_window 4 -> the cache holds 2 chunks
    # From chunk 2 on every insert evicts: the cache is full, in both samplers.
    assert all(e["ref_len"] == cap and e["ring_valid"] == cap for e in log[2:])
    assert CHUNKS * per_chunk > 10 * cap


def test_zero_recompiles_after_warmup(episode):
    # Three graphs cover every mode, the first chunk and the history writes: video (2 CFG rows),
    # transient action steps (cond row alone: action guidance 1), action steps keeping K/V (2 rows).
    assert episode["graphs_after_warmup"] == 3
    assert episode["graphs_end"] == episode["graphs_after_warmup"]


def test_first_chunk_pins_frame_zero(episode):
    first_log = episode["log"][0]
    torch.testing.assert_close(first_log["ref_latents"][:, :, :1], episode["first"])
    assert (first_log["ref_actions"][:, :, :1] == 0).all()
    unused = [i for i in range(8) if i not in episode["cfg"].used_action_channel_ids]
    assert all((e["ref_actions"][:, unused] == 0).all() for e in episode["log"])


def test_static_matches_reference_with_video_exec_step(partial_episode):
    log = partial_episode["log"]
    assert len(log) >= 20
    worst_a = max(e["actions"] for e in log)
    worst_v = max(e["latents"] for e in log)
    assert worst_a <= TOL and worst_v <= TOL, (worst_a, worst_v)
    cfg = partial_episode["cfg"]
    assert all(e["ref_len"] == cfg.cache_capacity for e in log[2:])  # evicting from chunk 2 on
    # Same graphs as full denoising (mode and Euler factors are data), nothing recompiles.
    assert partial_episode["graphs_after_warmup"] <= 3
    assert partial_episode["graphs_end"] == partial_episode["graphs_after_warmup"]


def test_video_exec_step_semantics():
    """Independent of the samplers' loops: with k = N every real step runs and the last one applies
    its Euler step, so the first chunk's video equals full denoising (only the cache write differs:
    it holds x at t_N-1, not the clean latents at t = 0); with k = 2 the video is 2 Euler steps."""
    cfg = get_policy_config("tiny")
    model = build_model(cfg.model_config, seed=3)
    text, neg, first, steps = _episode_inputs(cfg, ((1, 16, 2, 4, 8), (1, 8, 2, 4, 1)), 2)
    runs = {}
    for k in (-1, cfg.num_inference_steps, 2):
        ref = ReferenceSampler(model, cfg.replace(video_exec_step=k))
        ref.reset(text, neg)
        r0 = ref.sample_chunk(steps[0]["noise_video"], steps[0]["noise_action"], first)
        runs[k] = (r0, len(ref.cache))
    full, exec_all, exec_two = runs[-1][0], runs[cfg.num_inference_steps][0], runs[2][0]
    torch.testing.assert_close(exec_all.latents, full.latents, rtol=0, atol=0)
    assert not torch.equal(exec_all.actions, full.actions)  # the action stream saw a different cache
    assert runs[2][1] == runs[-1][1]  # one PREDICTED chunk written either way
    # 2 of 4 steps: still noisy, so further from the full result than the k = N run.
    assert (exec_two.latents - full.latents).abs().max() > 0.1
    with pytest.raises(ValueError, match="video_exec_step"):
        cfg.replace(video_exec_step=cfg.num_inference_steps + 1)
    with pytest.raises(ValueError, match="video_exec_step"):
        cfg.replace(video_exec_step=0)
