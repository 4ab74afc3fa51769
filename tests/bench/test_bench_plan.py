"""The latency model (bench/plan.py) against independent counts: forwards counted on a running
sampler, FLOPs by torch's FlopCounterMode, bytes by the meta model's parameters; and the CLI."""

import pytest
import torch

from bench import plan
from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config
from lingbot_edge.core.kv_cache import CacheMode
from lingbot_edge.core.sampler import StaticSampler
from lingbot_edge.io.checkpoint import build_meta_model, build_model


@pytest.mark.parametrize("exec_step", [-1, 2])
def test_chunk_forwards_match_a_running_sampler(exec_step):
    cfg = get_policy_config("tiny", video_exec_step=exec_step)
    sampler = StaticSampler(build_model(cfg.model_config, seed=0), cfg, compile=False)
    calls = []
    step = sampler.step
    sampler.step = lambda x, t, ds, mode, pin, action, rows: calls.append((x.shape[2:], rows, action)) or step(
        x, t, ds, mode, pin, action, rows)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, cfg.max_sequence_length, cfg.model_config.text_dim, generator=g)
    sampler.reset(text, torch.zeros_like(text))
    noise = torch.randn(sampler.latent_shape, generator=g), torch.randn(sampler.action_shape, generator=g)
    r = sampler.sample_chunk(*noise)
    sampler.feedback(r.latents, r.actions)
    model = plan.chunk_forwards(cfg)
    assert [(f.rows, f.action) for f in model] == [(rows, action) for _, rows, action in calls]
    video = cfg.num_inference_steps + 1 if exec_step == -1 else exec_step
    assert len(model) == video + cfg.action_num_inference_steps + 1 + 2


def _flops(cfg, action, rows):
    from torch.utils.flop_counter import FlopCounterMode

    meta = build_meta_model(MODEL_PRESETS["full"]).to(torch.bfloat16)
    sampler = StaticSampler(meta, cfg.replace(num_inference_steps=1, action_num_inference_steps=1), compile=False)
    sampler.cache.valid.fill_(True)
    shape = sampler.action_shape if action else sampler.latent_shape
    x = torch.zeros(shape, device="meta", dtype=torch.bfloat16)
    t, ds = sampler.schedules[action][0]
    with FlopCounterMode(display=False) as counter:
        sampler.step(x, t, ds, sampler.modes[CacheMode.TRANSIENT], sampler.no_pin, action, rows)
    return counter.get_total_flops()


@pytest.mark.parametrize(("action", "rows"), [(False, 2), (True, 1)])
def test_forward_flops_match_flop_counter(action, rows):
    cfg = get_policy_config("libero")
    tokens = cfg.action_tokens_per_chunk if action else cfg.video_tokens_per_chunk
    _, linear, other = plan.forward_cost(cfg, plan.Forward(tokens, rows, action), 2.0)
    assert linear + other == pytest.approx(_flops(cfg, action, rows), rel=0.02)


def test_forward_bytes_match_the_meta_model():
    """bf16 weights one forward reads = all parameters minus the prompt-only ones (text embedder,
    cross-attention K/V projections) and the other stream's embedders; plus the K/V read."""
    cfg = get_policy_config("libero")
    meta = build_meta_model(MODEL_PRESETS["full"])
    skip = ("text_embedder", "attn2.to_k", "attn2.to_v", "condition_embedder_action", "action_embedder",
            "action_proj_out", "norm", "scale_shift_table", "bias")
    read = sum(p.numel() for n, p in meta.named_parameters() if not any(s in n for s in skip)) * 2
    nbytes, _, _ = plan.forward_cost(cfg, plan.Forward(cfg.video_tokens_per_chunk, 2, False), 2.0)
    mc = cfg.model_config
    kv = mc.num_layers * 2 * (cfg.cache_capacity + 512) * mc.dim * 2 * 2
    assert nbytes - kv == pytest.approx(read, rel=0.001)


def test_plan_numbers_and_cli(capsys):
    libero, gpu = get_policy_config("libero"), plan.GPUS["rtx4090"]
    # The arithmetic: full steps at the roofline ~0.9 s bf16, ~0.65 s int8 weight-only: over 533 ms.
    assert 0.75 < plan.chunk_roofline_s(libero, gpu, "bf16") < 1.0
    assert 0.55 < plan.chunk_roofline_s(libero, gpu, "int8_weight_only") < 0.7
    fast = libero.replace(video_exec_step=2, action_num_inference_steps=10)
    assert plan.chunk_roofline_s(fast, gpu, "int8_weight_only") < 0.533 / plan.EFFICIENCY
    rows = plan.rows_for(plan.GPUS["rtx3090"], ("libero",))
    schemes = {r["scheme"] for r in rows}
    assert "fp8_w8a8" not in schemes and "fp8_weight_only" in schemes  # no fp8 tensor cores on sm86
    import argparse

    from bench.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))  # as lingbot-edge's entry-point group does
    args = parser.parse_args(["bench", "--plan", "--gpu", "rtx4090", "--preset", "libero"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "RTX 4090 (1008 GB/s, 165 TFLOP/s bf16" in out and "Most denoising that meets 30 Hz" in out
    with pytest.raises(ValueError, match="--gpu"):
        plan.run("rtx9090")
