"""Grounded lookahead in the samplers: the executing chunk's temporary entries (grounded video, known actions)
never survive a real write, and the compiled static sampler with its ring cache reproduces the eager reference
with the list cache through that insert order, across eviction, without recompiling."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.core.sampler import ReferenceSampler, StaticSampler
from lingbot_edge.io.checkpoint import build_model

CHUNKS = 8  # the tiny preset's cache holds 2 chunks: every chunk from the third on evicts
TOL = 1e-5  # fp32


def _inputs(cfg, latent_shape, action_shape, chunks, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, cfg.max_sequence_length, cfg.model_config.text_dim, generator=g)
    neg = torch.randn(1, cfg.max_sequence_length, cfg.model_config.text_dim, generator=g)
    first = torch.randn(*latent_shape[:2], 1, *latent_shape[3:], generator=g)
    steps = [dict(noise_video=torch.randn(latent_shape, generator=g),
                  noise_action=torch.randn(action_shape, generator=g),
                  observed=torch.randn(latent_shape, generator=g)) for _ in range(chunks)]
    return text, neg, first, steps


def _predicted_tokens(sampler) -> int:
    cache = sampler.cache
    if isinstance(sampler, ReferenceSampler):
        return 0 if cache.predicted is None else int(cache.predicted.sum())
    return int((cache.predicted & cache.valid).sum())


def _run(sampler, cfg, inputs, check=None):
    """infer(0); infer(1, ahead); per chunk k: feedback(k), ground(k + 1) (with its first latent frame observed
    at every other boundary, as a late request has it), infer(k + 2, ahead). Returns the actions of every chunk
    and, per boundary, the predicted-token counts after the real write and after the grounding."""
    text, neg, first, steps = inputs
    f = cfg.frame_chunk_size
    sampler.reset(text, neg)
    chunk0 = sampler.sample_chunk(steps[0]["noise_video"], steps[0]["noise_action"], first)
    actions = [chunk0.actions, sampler.sample_actions(steps[1]["noise_action"], frame_shift=f)]
    counts = []
    for k in range(len(steps) - 2):
        if check is not None:
            check(k)
        sampler.feedback(steps[k]["observed"], actions[k])
        after_real = _predicted_tokens(sampler)
        observed = steps[k + 1]["observed"][:, :, :1] if k % 2 == 0 else None
        grounded = sampler.ground(steps[k + 1]["noise_video"], actions[k + 1], observed)
        if observed is not None:  # the observed frame is pinned, as the first chunk's observation is
            torch.testing.assert_close(grounded[:, :, :1], observed.to(grounded.dtype), rtol=0, atol=0)
        counts.append((after_real, _predicted_tokens(sampler)))
        actions.append(sampler.sample_actions(steps[k + 2]["noise_action"], frame_shift=f))
    return actions, counts


@pytest.fixture(scope="module")
def grounded_runs():
    cfg = get_policy_config("tiny", video_exec_step=1)
    model = build_model(cfg.model_config, seed=3)
    ref = ReferenceSampler(model, cfg)
    inputs = _inputs(cfg, ref.latent_shape, ref.action_shape, CHUNKS)
    ref_actions, ref_counts = _run(ref, cfg, inputs)
    eager_actions, eager_counts = _run(StaticSampler(model, cfg, compile=False), cfg, inputs)
    torch._dynamo.reset()
    counters.clear()
    graphs = {}

    def no_recompile_after_warmup(k):
        if k == 1:
            graphs["after_warmup"] = counters["stats"]["unique_graphs"]
            torch._dynamo.config.error_on_recompile = True

    try:
        compiled_actions, _ = _run(StaticSampler(model, cfg, compile=True), cfg, inputs, no_recompile_after_warmup)
    finally:
        torch._dynamo.config.error_on_recompile = False
    graphs["end"] = counters["stats"]["unique_graphs"]
    return dict(cfg=cfg, ref=(ref_actions, ref_counts), eager=(eager_actions, eager_counts),
                compiled=compiled_actions, graphs=graphs, final_len=len(ref.cache))


def test_temporary_entries_never_survive_a_real_write(grounded_runs):
    cfg = grounded_runs["cfg"]
    nv, na = cfg.video_tokens_per_chunk, cfg.action_tokens_per_chunk
    for counts in (grounded_runs["ref"][1], grounded_runs["eager"][1]):
        assert len(counts) == CHUNKS - 2
        # The history write drops every predicted entry (the previous grounding and the lookahead's last step);
        # the grounding then holds exactly the executing chunk's imagined video and its actions.
        assert all(after_real == 0 for after_real, _ in counts)
        assert all(grounded == nv + na for _, grounded in counts)
    assert grounded_runs["final_len"] == cfg.cache_capacity  # the list cache evicted all along
    assert CHUNKS * (nv + na) > 3 * cfg.cache_capacity


def test_ring_cache_matches_the_list_cache_in_grounded_order(grounded_runs):
    ref = grounded_runs["ref"][0]
    for static in (grounded_runs["eager"][0], grounded_runs["compiled"]):
        assert len(static) == len(ref) == CHUNKS
        for r, s in zip(ref, static, strict=True):
            torch.testing.assert_close(s, r, atol=TOL, rtol=0)
    assert all(a.abs().max() > 0.1 for a in ref)  # a real signal was compared


def test_grounded_order_compiles_to_the_synchronous_graphs(grounded_runs):
    # video (2 CFG rows), transient action steps (cond row alone), action steps keeping K/V (2 rows): the
    # grounding and the action-only pass reuse them, and nothing recompiles after the first boundary.
    assert grounded_runs["graphs"]["after_warmup"] == 3
    assert grounded_runs["graphs"]["end"] == grounded_runs["graphs"]["after_warmup"]


def test_cli_async_modes_are_the_configs():
    from lingbot_edge.core.config import ASYNC_MODES
    from lingbot_edge.flags import ASYNC_MODES as CLI_MODES

    assert CLI_MODES == ASYNC_MODES
