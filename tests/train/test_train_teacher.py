"""The teacher-forced forward against the inference path: the model's own forward through the plain-list
reference KV cache (ListKVCache), in the sampler's order of inserts, with eviction (4 chunks through a
2-chunk cache)."""

from __future__ import annotations

import torch

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.core.kv_cache import CacheMode, ListKVCache
from lingbot_edge.core.model import action_grid_ids, video_grid_ids
from lingbot_edge.io.checkpoint import build_model
from train.teacher import SegmentInputs, episode_layout, teacher_forced_forward


def _inputs(cfg, b, k, seed=0):
    mc = cfg.model_config
    g = torch.Generator().manual_seed(seed)
    f, apf = cfg.frame_chunk_size, cfg.action_per_frame
    h, w = cfg.latent_hw
    vshape, ashape = (b, k, mc.in_channels, f, h, w), (b, k, mc.action_dim, f, apf, 1)
    t = torch.rand(k, 2, generator=g) * 1000  # per chunk, per stream; shared by the batch rows
    return dict(video_clean=torch.randn(vshape, generator=g), action_clean=torch.randn(ashape, generator=g),
                video_noisy=torch.randn(vshape, generator=g), action_noisy=torch.randn(ashape, generator=g),
                t_video=t[:, 0].view(1, k, 1).expand(b, k, f).clone(),
                t_action=t[:, 1].view(1, k, 1).expand(b, k, f).clone(),
                text=torch.randn(b, 16, mc.text_dim, generator=g))


def _reference(model, cfg, x):
    """Per chunk: noisy video (TRANSIENT, two steps), its clean video (PREDICTED, the last video step), noisy actions
    (TRANSIENT), the last action step (PREDICTED), then feedback: video and actions as HISTORY."""
    f, apf = cfg.frame_chunk_size, cfg.action_per_frame
    h, w = cfg.latent_hw
    _, ph, pw = model.config.patch_size
    cache = ListKVCache(model.config.num_layers, cfg.cache_capacity)
    text = x["text"]
    out_v, out_a = [], []

    def fwd(inp, t, mode, action, fs):
        grid = action_grid_ids(f, apf, fs) if action else video_grid_ids(f, h // ph, w // pw, fs)
        cache.begin(mode, grid.shape[1])
        out = model(inp, t, grid, cache, action=action, text_emb=text)
        cache.end(mode)
        return out

    zeros = torch.zeros(f)
    for k in range(x["video_clean"].shape[1]):
        fs = k * f
        fwd(x["video_noisy"][:, k], x["t_video"][0, k] * 0.5, CacheMode.TRANSIENT, False, fs)  # a first step
        out_v.append(fwd(x["video_noisy"][:, k], x["t_video"][0, k], CacheMode.TRANSIENT, False, fs))
        fwd(x["video_clean"][:, k], zeros, CacheMode.PREDICTED, False, fs)
        out_a.append(fwd(x["action_noisy"][:, k], x["t_action"][0, k], CacheMode.TRANSIENT, True, fs))
        fwd(x["action_noisy"][:, k], zeros, CacheMode.PREDICTED, True, fs)  # dropped by the history write
        fwd(x["video_clean"][:, k], zeros, CacheMode.HISTORY, False, fs)
        fwd(x["action_clean"][:, k], zeros, CacheMode.HISTORY, True, fs)
    return torch.stack(out_v, 1), torch.stack(out_a, 1)


def test_teacher_forcing_matches_the_cached_inference_path():
    cfg = get_policy_config("tiny")  # attn_window 4: the cache holds 2 chunks, so chunks 2-3 evict
    model = build_model(cfg.model_config, seed=3)
    x = _inputs(cfg, b=2, k=4)
    ref_v, ref_a = _reference(model, cfg, x)
    layout = episode_layout(cfg, 4)
    with torch.no_grad():
        v, a = teacher_forced_forward(model, layout, x["video_clean"], x["action_clean"], x["video_noisy"],
                                      x["action_noisy"], x["t_video"], x["t_action"], model.text_kv(x["text"]))
    assert v.shape == ref_v.shape and a.shape == ref_a.shape
    torch.testing.assert_close(v, ref_v, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a, ref_a, atol=2e-5, rtol=1e-4)
    # The window matters: without eviction (a bigger cache) the later chunks' outputs change.
    wide = episode_layout(cfg.replace(attn_window=16), 4)
    with torch.no_grad():
        v_wide, _ = teacher_forced_forward(model, wide, x["video_clean"], x["action_clean"], x["video_noisy"],
                                           x["action_noisy"], x["t_video"], x["t_action"], model.text_kv(x["text"]))
    torch.testing.assert_close(v_wide[:, :2], ref_v[:, :2], atol=2e-5, rtol=1e-4)
    assert (v_wide[:, 3] - ref_v[:, 3]).abs().max() > 1e-3


def test_mask_counts_follow_the_cache_capacity():
    cfg = get_policy_config("tiny")
    lay = episode_layout(cfg, 5)
    keys = lay.mask.sum(1)
    nv, na, cap = lay.video_tokens, lay.action_tokens, lay.capacity
    assert cap == 2 * (nv + na)
    # Chunk 0: its noisy video sees itself, its actions their predicted video + themselves.
    assert (keys[lay.segment("video_noisy")[0]] == nv).all()
    assert (keys[lay.segment("action_noisy")[0]] == nv + na).all()
    # Steady state: the noisy video evicts the oldest chunk's video and sees the rest of the full cache;
    # the noisy actions evict that chunk's actions too. The history writes come after the predicted
    # entries were dropped, so they see one chunk less: 2 chunks of room hold the previous chunk only.
    assert (keys[lay.segment("video_noisy")[4]] == cap).all()
    assert (keys[lay.segment("video_predicted")[4]] == cap).all()
    assert (keys[lay.segment("action_noisy")[4]] == cap).all()
    assert (keys[lay.segment("video")[4]] == 2 * nv + na).all()
    assert (keys[lay.segment("action")[4]] == cap).all()
    # History tokens never see noisy or predicted ones.
    hist = torch.cat([lay.segment("video").flatten(), lay.segment("action").flatten()])
    other = torch.cat([lay.segment(s).flatten() for s in ("video_noisy", "video_predicted", "action_noisy")])
    assert not lay.mask[hist][:, other].any()


def _reference_grounded(model, cfg, x, x_async, t_async, x_grounded, t_grounded):
    """The grounded lookahead's order through the list cache: chunk 0 as the sampler writes it (its last action
    step holds the clean actions); then per chunk k: its action pass while chunk k-1 executes (TRANSIENT, then
    the last step PREDICTED), feedback of chunk k-1 (HISTORY), chunk k's grounded video (TRANSIENT, then
    PREDICTED with its per-frame timesteps: observed frames at 0) and its executing actions (PREDICTED, t = 0).
    Returns the action velocities of chunks 1.."""
    f, apf = cfg.frame_chunk_size, cfg.action_per_frame
    h, w = cfg.latent_hw
    _, ph, pw = model.config.patch_size
    cache = ListKVCache(model.config.num_layers, cfg.cache_capacity)

    def fwd(inp, t, mode, action, fs):
        grid = action_grid_ids(f, apf, fs) if action else video_grid_ids(f, h // ph, w // pw, fs)
        cache.begin(mode, grid.shape[1])
        out = model(inp, t, grid, cache, action=action, text_emb=x["text"])
        cache.end(mode)
        return out

    zeros = torch.zeros(f)
    fwd(x["video_noisy"][:, 0], x["t_video"][0, 0], CacheMode.TRANSIENT, False, 0)
    fwd(x["video_clean"][:, 0], zeros, CacheMode.PREDICTED, False, 0)
    fwd(x["action_noisy"][:, 0], x["t_action"][0, 0], CacheMode.TRANSIENT, True, 0)
    fwd(x["action_clean"][:, 0], zeros, CacheMode.PREDICTED, True, 0)
    out = []
    for k in range(1, x["video_clean"].shape[1]):
        fs = k * f
        out.append(fwd(x_async[:, k], t_async[0, k], CacheMode.TRANSIENT, True, fs))
        fwd(x_async[:, k], zeros, CacheMode.PREDICTED, True, fs)  # the last action step: dropped unseen
        fwd(x["video_clean"][:, k - 1], zeros, CacheMode.HISTORY, False, fs - f)
        fwd(x["action_clean"][:, k - 1], zeros, CacheMode.HISTORY, True, fs - f)
        fwd(x["video_noisy"][:, k], x["t_video"][0, k], CacheMode.TRANSIENT, False, fs)
        fwd(x_grounded[:, k], t_grounded[0, k], CacheMode.PREDICTED, False, fs)
        fwd(x["action_clean"][:, k], zeros, CacheMode.PREDICTED, True, fs)
    return torch.stack(out, 1)


def _grounded_case(cfg):
    """(model, inputs, the grounded copy's inputs {action_noisy_async, t_action_async, video_grounded,
    t_grounded}, the list-cache reference) of a 4-chunk, 2-row episode; the grounded video of chunks 1 and 3 has
    its frame 0 observed (t = 0), that of chunk 2 none."""
    model = build_model(cfg.model_config, seed=3)
    x = _inputs(cfg, b=2, k=4)
    g = torch.Generator().manual_seed(1)
    f = cfg.frame_chunk_size
    x_async = torch.randn(x["action_noisy"].shape, generator=g)
    t_async = (torch.rand(4, generator=g) * 1000).view(1, 4, 1).expand(2, 4, f).clone()
    x_grounded = torch.randn(x["video_clean"].shape, generator=g)
    t_grounded = torch.full((2, 4, f), 1000.0)
    t_grounded[:, 1::2, 0] = 0.0
    grounded = SegmentInputs(action_noisy_async=x_async, t_action_async=t_async, video_grounded=x_grounded,
                             t_grounded=t_grounded)
    return model, x, grounded, _reference_grounded(model, cfg, x, x_async, t_async, x_grounded, t_grounded)


def test_grounded_layout_matches_the_grounded_lookahead_order():
    """Without eviction (an 8-chunk cache) the grounded copy reproduces the lookahead exactly, and the
    synchronous outputs are those of the synchronous layout: the added segments are invisible to them."""
    cfg = get_policy_config("tiny").replace(attn_window=16)
    model, x, grounded, ref = _grounded_case(cfg)
    args = (x["video_clean"], x["action_clean"], x["video_noisy"], x["action_noisy"], x["t_video"], x["t_action"],
            model.text_kv(x["text"]))
    with torch.no_grad():
        v, a, a_async = teacher_forced_forward(model, episode_layout(cfg, 4, grounded=True), *args, grounded)
        v_sync, a_sync = teacher_forced_forward(model, episode_layout(cfg, 4), *args)
    torch.testing.assert_close(a_async[:, 1:], ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(v, v_sync, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a, a_sync, atol=2e-5, rtol=1e-4)
    # The grounded copy differs from the synchronous one: it sees the executing chunk's actions, not its video.
    assert (a_async[:, 2] - a_sync[:, 2]).abs().max() > 1e-3


def test_grounded_layout_under_eviction_stays_close():
    """With a 2-chunk cache the history copies carry the synchronous order's K/V (module docstring): the
    grounded copy's first chunk (nothing evicted yet) is exact, the later ones within a small error."""
    cfg = get_policy_config("tiny")
    model, x, grounded, ref = _grounded_case(cfg)
    with torch.no_grad():
        _, _, a_async = teacher_forced_forward(
            model, episode_layout(cfg, 4, grounded=True), x["video_clean"], x["action_clean"], x["video_noisy"],
            x["action_noisy"], x["t_video"], x["t_action"], model.text_kv(x["text"]), grounded)
    torch.testing.assert_close(a_async[:, 1], ref[:, 0], atol=2e-5, rtol=1e-4)
    rel = (a_async[:, 1:] - ref).norm() / ref.norm()
    print(f"grounded copy under eviction: relative error {rel:.2e}")
    assert rel < 1e-3
