"""`train fit` on a shortened schedule: the loss goes down, the run resumes exactly, and the exported
checkpoint loads with `load_policy` and drives the simulated arm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lingbot_edge.io.loading import load_policy
from train.pipeline import DataSettings, fit
from train.trainer import STATE_NAME, FlowMatchingLoss, LossSettings, TrainConfig

FRAMES = 29  # 4 chunks of the tiny so100 policy (8 k - 3 frames)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    tc = TrainConfig(steps=30, batch_size=2, lr=3e-3, warmup=3, save_every=10)
    report = fit(out, DataSettings(episodes=3, episode_frames=FRAMES), tc=tc, progress=False)
    return out, tc, report


def test_loss_goes_down(run):
    out, _, report = run
    losses = torch.load(out / STATE_NAME, weights_only=False)["losses"]
    assert len(losses) == 30
    first = np.mean([r["video"] + r["action"] for r in losses[:5]])
    last = np.mean([r["video"] + r["action"] for r in losses[-5:]])
    assert last < 0.75 * first, (first, last)
    assert (out / "loss.png").stat().st_size > 1000
    assert report["chunks"] == 4 and report["episodes"] == 3


def test_checkpoint_loads_and_runs(run):
    out, _, _ = run
    ckpt = out / "checkpoint"
    config = json.loads((ckpt / "policy_config.json").read_text())
    assert config["used_action_channel_ids"] == [0, 1, 2, 3, 4, 5] and len(config["norm_stat"]["q01"]) == 8
    policy = load_policy(ckpt, preset="so100", device="cpu", dtype="float32", compile=False, prompt_cache_dir=False)
    assert policy.cfg.guidance_scale == 1.0 and policy.cfg.height == config["height"]
    # The exported DiT is the trained one (not the skeleton's random weights).
    trained = torch.load(out / STATE_NAME, weights_only=False)["model"]
    for name, value in policy.model.state_dict().items():
        torch.testing.assert_close(value, trained[name])
    # The latents trained on are what this checkpoint's encoder gives: the dataset statistics went into
    # vae/config.json, and the policy's encoder normalizes with them.
    from train.trainer import encode_dataset

    vae = json.loads((ckpt / "vae" / "config.json").read_text())
    mean, std = torch.tensor(vae["latents_mean"]), torch.tensor(vae["latents_std"])
    assert (std != 1).all()
    raw = torch.load(out / "latents.pt")
    assert raw["identity_vae"]
    trained_on = (raw["video"] - mean.view(1, 1, -1, 1, 1, 1)) / std.view(1, 1, -1, 1, 1, 1)
    seen = encode_dataset(out / "dataset", policy, progress=False).video
    torch.testing.assert_close(seen, trained_on, atol=1e-4, rtol=1e-4)
    assert abs(float(seen.mean())) < 0.2 and 0.7 < float(seen.std()) < 1.3
    from lingbot_edge.eval.sim import run_episode

    episode = run_episode(policy, seed=123, steps=12)
    assert episode["steps"] == 12 and np.isfinite(episode["min_distance"])


def test_resume_continues_the_same_run(run, monkeypatch):
    """Interrupt a run after 7 steps (state saved at 5), resume: the weights equal an uninterrupted run's."""
    out, _, _ = run
    from lingbot_edge.io.loading import read_policy_config
    from train.trainer import read_latents, train

    data, _, _ = read_latents(out / "latents.pt")
    cfg = read_policy_config(out / "checkpoint")
    tc = TrainConfig(steps=8, batch_size=2, warmup=2, save_every=5)
    from lingbot_edge.io.checkpoint import build_model

    straight = build_model(cfg.model_config, seed=1)
    train(straight, cfg, data, out / "straight", tc, progress=False)

    calls = {"n": 0}
    original = FlowMatchingLoss.__call__

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlowMatchingLoss, "__call__", flaky)
    interrupted = build_model(cfg.model_config, seed=1)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, cfg, data, out / "resumed", tc, progress=False)
    assert torch.load(out / "resumed" / STATE_NAME, weights_only=False)["step"] == 5
    monkeypatch.setattr(FlowMatchingLoss, "__call__", original)
    resumed = build_model(cfg.model_config, seed=1)
    losses = train(resumed, cfg, data, out / "resumed", tc, progress=False)
    assert [r["step"] for r in losses] == list(range(1, 9))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="different run"):
        train(build_model(cfg.model_config), cfg, data, out / "resumed", TrainConfig(steps=9), progress=False)


def test_committed_checkpoint_loads():
    from pathlib import Path

    ckpt = Path(__file__).resolve().parents[2] / "lingbot_edge" / "assets" / "so100-grasp-tiny"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert size <= 5 * 2**20, size
    policy = load_policy(ckpt, preset="so100", device="cpu", dtype="bfloat16", compile=False, prompt_cache_dir=False)
    # The settings `train fit` writes today (the committed checkpoint is that command's output).
    from train.skeleton import POLICY_SETTINGS

    assert policy.cfg.model == "tiny" and (policy.cfg.height, policy.cfg.width) == (128, 256)
    assert policy.cfg.obs_cam_keys == POLICY_SETTINGS["obs_cam_keys"] == ("observation.images.camera_top",)
    assert policy.cfg.video_exec_step == POLICY_SETTINGS["video_exec_step"] == 1
    from lingbot_edge.eval.sim import run_episode

    assert run_episode(policy, seed=7, steps=4)["steps"] == 4


def test_augmentations_touch_only_the_model_inputs(monkeypatch):
    """History-action noise goes into the HISTORY copy only (used channels, the given std); the noisy
    PREDICTED copy is the clean video at its own sigma / timestep (the first chunk's frame 0 stays pinned);
    the loss targets stay the clean episode's."""
    import train.trainer as trainer
    from lingbot_edge.io.checkpoint import build_model
    from train.skeleton import base_policy_config

    cfg = base_policy_config()
    b, k, f, h, w = 2, 3, cfg.frame_chunk_size, *cfg.latent_hw
    a_dim, apf = cfg.model_config.action_dim, cfg.action_per_frame
    video = torch.randn(b, k, cfg.model_config.in_channels, f, h, w)
    action = torch.randn(b, k, a_dim, f, apf, 1)
    seen = {}

    def capture(model, layout, video_clean, action_clean, xv, xa, tv, ta, text_kv, segments):
        seen.update(action=action_clean, xp=segments.video_predicted, tp=segments.t_predicted, xv=xv)
        return torch.zeros_like(video_clean), torch.zeros_like(action_clean)

    monkeypatch.setattr(trainer, "teacher_forced_forward", capture)
    model = build_model(cfg.model_config)
    objective = FlowMatchingLoss(cfg, k, LossSettings(noisy_predicted=True, history_action_noise=0.5))
    text = torch.zeros(b, 4, cfg.model_config.text_dim)
    _, parts = objective(model, video, action, text, torch.Generator().manual_seed(0))
    used = list(cfg.used_action_channel_ids)
    unused = [c for c in range(a_dim) if c not in used]
    delta = seen["action"] - action
    assert (seen["action"][:, :, unused] == 0).all()  # unused channels: zero, and no noise on them
    assert 0.4 < float(delta[:, :, used].std()) < 0.6
    assert (seen["tp"][:, 0, 0] == 0).all() and (seen["tp"][:, 1:] > 0).all()
    torch.testing.assert_close(seen["xp"][:, 0, :, 0], video[:, 0, :, 0])
    sigma = seen["tp"][:, 1:, 0] / 1000  # the PREDICTED copy at its sigma: x = (1 - s) x0 + s n
    residual = (seen["xp"][:, 1:] - (1 - sigma.view(b, k - 1, 1, 1, 1, 1)) * video[:, 1:]) / sigma.view(b, k - 1, 1,
                                                                                                         1, 1, 1)
    assert 0.8 < float(residual.std()) < 1.2
    # Zero predictions: the losses are those of the clean targets noise - x0 (> 1 per element on average).
    assert parts["action"] > 1.0 and parts["video"] > 1.0


@pytest.mark.parametrize("exec_step", [1, 2])
def test_predicted_copy_at_the_samplers_sigma(monkeypatch, exec_step):
    """`predicted_at_sampler_sigma`: the PREDICTED copy holds x at the sigma of the sampler's write, the input of its
    video_exec_step-th forward (shifted linspace(1, 0, N + 1)[exec_step - 1]); at video_exec_step 1 that is pure
    noise (the same whatever the video)."""
    import train.trainer as trainer
    from lingbot_edge.io.checkpoint import build_model
    from train.skeleton import base_policy_config

    cfg = base_policy_config().replace(video_exec_step=exec_step)
    b, k, f, h, w = 2, 3, cfg.frame_chunk_size, *cfg.latent_hw
    seen = []

    def capture(model, layout, video_clean, action_clean, xv, xa, tv, ta, text_kv, segments):
        seen.append((segments.video_predicted, segments.t_predicted))
        return torch.zeros_like(video_clean), torch.zeros_like(action_clean)

    monkeypatch.setattr(trainer, "teacher_forced_forward", capture)
    model = build_model(cfg.model_config)
    objective = FlowMatchingLoss(cfg, k, LossSettings(noisy_predicted=True, predicted_at_sampler_sigma=True))
    text = torch.zeros(b, 4, cfg.model_config.text_dim)
    action = torch.randn(b, k, cfg.model_config.action_dim, f, cfg.action_per_frame, 1)
    for scale in (1.0, 3.0):
        video = scale * torch.ones(b, k, cfg.model_config.in_channels, f, h, w)
        objective(model, video, action, text, torch.Generator().manual_seed(0))
    s = 1 - (exec_step - 1) / cfg.num_inference_steps
    sigma = cfg.snr_shift * s / (1 + (cfg.snr_shift - 1) * s)
    (xp1, tp), (xp3, _) = seen
    torch.testing.assert_close(tp[:, 1:], torch.full_like(tp[:, 1:], 1000 * sigma))
    assert (tp[:, 0, 0] == 0).all()  # the first chunk's pinned frame
    torch.testing.assert_close(xp3[:, 1:] - xp1[:, 1:], torch.full_like(xp1[:, 1:], 2 * (1 - sigma)))


def test_grounded_copy_is_noised_like_the_actions_and_skips_the_first_chunk(monkeypatch):
    """grounded_weight > 0: the lookahead's copy of the actions is x = (1 - s) a + s n at t = 1000 s (its own draw),
    its loss (zero predictions: the clean target noise - a) is added to the action loss times the weight, and the
    first chunk, never inferred ahead, has none."""
    import train.trainer as trainer
    from lingbot_edge.io.checkpoint import build_model
    from train.skeleton import base_policy_config

    cfg = base_policy_config()
    b, k, f, h, w = 2, 3, cfg.frame_chunk_size, *cfg.latent_hw
    video = torch.randn(b, k, cfg.model_config.in_channels, f, h, w)
    action = torch.zeros(b, k, cfg.model_config.action_dim, f, cfg.action_per_frame, 1)
    seen = {}

    def capture(model, layout, video_clean, action_clean, xv, xa, tv, ta, text_kv, segments):
        seen.update(layout=layout, xg=segments.action_noisy_async, tg=segments.t_action_async, xa=xa,
                    xgv=segments.video_grounded, tgv=segments.t_grounded)
        return torch.zeros_like(video_clean), torch.zeros_like(action_clean), torch.zeros_like(action_clean)

    monkeypatch.setattr(trainer, "teacher_forced_forward", capture)
    model = build_model(cfg.model_config)
    text = torch.zeros(b, 4, cfg.model_config.text_dim)
    _, parts = FlowMatchingLoss(cfg, k, LossSettings(grounded_weight=2.0))(model, video, action, text,
                                                                           torch.Generator().manual_seed(0))
    assert "action_noisy_async" in seen["layout"].segments
    sigma = seen["tg"][..., 0] / 1000  # [B, K]
    assert ((sigma > 0) & (sigma <= 1)).all() and (seen["tg"] == seen["tg"][..., :1]).all()
    used = list(cfg.used_action_channel_ids)
    noise = seen["xg"][:, :, used] / sigma.view(b, k, 1, 1, 1, 1)  # a = 0: x = s n
    assert 0.8 < float(noise.std()) < 1.2
    assert not torch.allclose(seen["xg"], seen["xa"])  # its own draw, not the synchronous copy's
    assert parts["action_grounded"] > 0.5
    total = parts["action"] + 2.0 * parts["action_grounded"]
    assert abs(float(parts["_action"]) - total) < 1e-4


def test_grounded_video_holds_the_observed_frames_clean_and_the_rest_as_the_sampler_writes_them():
    """The executing chunk's grounded video: per episode and chunk its first j frames (j uniform in 0 .. F-1) are
    the clean latents at t = 0, the others the sampler's PREDICTED write (pure noise at t = 1000 under
    video_exec_step 1)."""
    from train.skeleton import base_policy_config

    cfg = base_policy_config()
    assert cfg.video_exec_step == 1 and cfg.frame_chunk_size == 2
    b, k, f, h, w = 64, 5, cfg.frame_chunk_size, *cfg.latent_hw
    video = torch.randn(b, k, cfg.model_config.in_channels, f, h, w) + 10.0  # far from the noise
    objective = FlowMatchingLoss(cfg, k, LossSettings(grounded_weight=1.0))
    x, t = objective.grounded_video(video, torch.Generator().manual_seed(0))
    observed = t == 0  # [B, K, F]
    assert ((t == 0) | (t == 1000)).all() and not observed[..., -1].any()  # the last frame is never observed
    assert (observed[..., 1:] <= observed[..., :-1]).all()  # observed frames come first
    frac = observed[..., 0].float().mean()
    assert 0.35 < float(frac) < 0.65  # j = 0 or 1 with F = 2
    per_frame = x.transpose(2, 3)  # [B, K, F, C, h, w]
    torch.testing.assert_close(per_frame[observed], video.transpose(2, 3)[observed], rtol=0, atol=0)
    noise = per_frame[~observed]
    assert abs(float(noise.mean())) < 0.05 and 0.95 < float(noise.std()) < 1.05  # sigma 1: no trace of the video
