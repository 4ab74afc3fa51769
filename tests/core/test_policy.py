"""The tiny policy end to end: real tiny VAE / UMT5 stand-ins, feedback, errors, action codec."""

import numpy as np
import pytest
import torch

from lingbot_edge.core.actions import QUANTILE_EPS, ActionCodec
from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io.loading import load_policy
from lingbot_edge.testing.toy import ToyScene, toy_episode


def _run_episode(policy, chunks, seed=0, prompt="stack the blocks"):
    return list(toy_episode(policy, chunks, prompt, seed=seed))


@pytest.fixture(scope="module")
def episodes():
    ref = _run_episode(load_policy("tiny", sampler="reference", device="cpu", dtype="fp32"), 6)
    static = _run_episode(load_policy("tiny", sampler="static", compile=False, device="cpu", dtype="fp32"), 6)
    return ref, static


def test_static_policy_matches_reference_policy(episodes):
    ref, static = episodes
    for r, s in zip(ref, static, strict=True):
        np.testing.assert_allclose(s["actions"], r["actions"], atol=1e-5, rtol=0)


def test_outputs_shapes_frames_and_timing(episodes):
    _, static = episodes
    cfg = get_policy_config("tiny")
    n_used = len(cfg.used_action_channel_ids)
    assert static[0]["actions"].shape == ((cfg.frame_chunk_size - 1) * cfg.action_per_frame, n_used)
    assert all(o["actions"].shape == (cfg.frame_chunk_size * cfg.action_per_frame, n_used) for o in static[1:])
    assert [o["frame_start"] for o in static] == [cfg.frame_chunk_size * i for i in range(6)]
    assert all(o["actions"].dtype == np.float32 and np.isfinite(o["actions"]).all() for o in static)
    assert {"encode_obs_ms", "video_ms", "action_ms", "total_ms"} <= set(static[0]["timing"])
    assert {"encode_obs_ms", "history_ms"} <= set(static[1]["feedback_timing"])
    assert all(v >= 0 for v in static[1]["timing"].values())


def test_same_seed_same_episode_and_feedback_matters():
    policy = load_policy("tiny", sampler="static", compile=False, device="cpu", dtype="fp32")
    a = _run_episode(policy, 3)
    b = _run_episode(policy, 3)  # reset() restarts the episode (cache, frame ids, noise, VAE stream)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["actions"], y["actions"])
    c = _run_episode(policy, 3, seed=5)  # another scene: other keyframes fed back
    assert np.abs(c[1]["actions"] - a[1]["actions"]).max() > 1e-3


def test_action_noise_scale_scales_only_the_action_noise():
    """action_noise_scale multiplies the action stream's initial noise and nothing else: the video noise (drawn
    first, from the same generator) and so the chunk's video are those of scale 1; with scale 0 the actions are
    what the sampler gives from zero action noise."""
    cfg = get_policy_config("tiny")
    frames = ToyScene(cfg.obs_cam_keys).render()
    out = {}
    for scale in (1.0, 0.0):
        policy = load_policy("tiny", compile=False, device="cpu", dtype="fp32", action_noise_scale=scale)
        policy.reset(prompt="stack the blocks", seed=3)
        chunk = policy.infer(frames)
        out[scale] = (np.array(chunk.actions), policy.last_result.latents.clone())
    torch.testing.assert_close(out[0.0][1], out[1.0][1], atol=0, rtol=0)
    assert np.abs(out[0.0][0] - out[1.0][0]).max() > 1e-3
    # The same first chunk by hand: the generator's two draws, the action one replaced by zeros.
    policy.reset(prompt="stack the blocks", seed=3)
    g = torch.Generator().manual_seed(3)
    noise_video = torch.randn(policy.sampler.latent_shape, generator=g)
    first = policy.obs_encoder.encode(frames).to(policy.sampler.dtype)
    result = policy.sampler.sample_chunk(noise_video, torch.zeros(policy.sampler.action_shape), first)
    np.testing.assert_allclose(policy.codec.to_robot(result.actions, first_chunk=True), out[0.0][0], atol=1e-6)
    with pytest.raises(ValueError, match="action_noise_scale"):
        cfg.replace(action_noise_scale=-1.0)


def test_bad_calls_get_clear_errors():
    policy = load_policy("tiny", sampler="static", compile=False, device="cpu", dtype="fp32")
    cfg = policy.cfg
    with pytest.raises(RuntimeError, match="reset"):
        policy.infer({})
    policy.reset(prompt="x")
    with pytest.raises(ValueError, match="observation.images.image2"):
        policy.infer({"observation.images.image": np.zeros((64, 64, 3), np.uint8)})
    with pytest.raises(RuntimeError, match="infer"):
        policy.feedback({}, np.zeros((4, 6)))
    obs = ToyScene(cfg.obs_cam_keys).render()
    out = policy.infer(obs)
    with pytest.raises(RuntimeError, match="feedback"):
        policy.infer({})
    frames = {k: np.stack([v] * 4) for k, v in obs.items()}
    with pytest.raises(ValueError, match=r"executed_actions: expected shape \(4, 6\)"):
        policy.feedback(frames, np.zeros((8, 6)))
    with pytest.raises(ValueError, match="NaN"):
        policy.feedback(frames, np.full((4, 6), np.nan))
    with pytest.raises(ValueError, match="expected 4 keyframes"):
        policy.feedback({k: v[:2] for k, v in frames.items()}, out["actions"])
    with pytest.raises(ValueError, match="missing camera"):
        policy.feedback({"observation.images.image": frames["observation.images.image"]}, out["actions"])
    policy.feedback(frames, out["actions"])  # the episode goes on after the bad calls
    assert policy.infer({})["actions"].shape == (8, 6)


def test_libero_preset_is_upstreams_config():
    """Pinned to upstream's published LIBERO config: Robbyant/lingbot-va `wan_va/configs/va_libero_cfg.py`
    (the released LIBERO checkpoint's config; docs/design.md section 4). LeRobot's port uses 0-6 and 0.05."""
    cfg = get_policy_config("libero")
    assert cfg.used_action_channel_ids == (0, 1, 2, 3, 4, 5, 28)
    assert cfg.action_snr_shift == 1.0 and cfg.snr_shift == 5.0
    assert (cfg.height, cfg.width, cfg.action_per_frame, cfg.frame_chunk_size, cfg.attn_window) == (128, 128, 4, 4, 30)
    assert (cfg.num_inference_steps, cfg.action_num_inference_steps) == (20, 50)
    assert (cfg.guidance_scale, cfg.action_guidance_scale) == (5.0, 1.0)
    assert cfg.obs_cam_keys == ("observation.images.agentview_rgb", "observation.images.eye_in_hand_rgb")
    q01 = [-0.6589285731315613, -0.84375, -0.9375, -0.12107142806053162, -0.15964286029338837,
           -0.26571428775787354] + [0.0] * 22 + [-1.0, 0.0]
    q99 = [0.8999999761581421, 0.8544642925262451, 0.9375, 0.17142857611179352, 0.1842857152223587,
           0.34392857551574707] + [0.0] * 22 + [1.0, 0.0]
    assert list(cfg.action_q01) == q01 and list(cfg.action_q99) == q99
    # LeRobot's camera names are accepted for upstream's.
    assert cfg.camera_key("observation.images.image") == "observation.images.agentview_rgb"
    assert cfg.camera_key("observation.images.image2") == "observation.images.eye_in_hand_rgb"


def test_action_codec_libero_numbers():
    cfg = get_policy_config("libero")
    codec = ActionCodec(cfg)
    model = torch.zeros(1, 30, 4, 4, 1)
    model[0, 0, :, :, 0] = -1.0  # channel 0 at -1 -> q01
    model[0, 28, :, :, 0] = 1.0  # gripper (channel 28) at +1 -> q99 (+ eps, as upstream)
    robot = codec.to_robot(model, first_chunk=False)
    assert robot.shape == (16, 7)
    assert robot[:, 0] == pytest.approx(-0.6589285731315613)
    assert robot[:, 6] == pytest.approx(1.0 + QUANTILE_EPS)
    # channel 1 at 0 -> midpoint of [q01, q99]
    assert robot[:, 1] == pytest.approx((-0.84375 + 0.8544642925262451) / 2, abs=1e-6)
    first = codec.to_robot(model, first_chunk=True)
    assert first.shape == (12, 7)
    # robot -> model -> robot round trip; unused channels and the first chunk's frame 0 are zero
    x = np.random.default_rng(0).uniform(-0.5, 0.5, size=(12, 7)).astype(np.float32)
    back = codec.from_robot(x, first_chunk=True)
    assert back.shape == (1, 30, 4, 4, 1)
    unused = [c for c in range(30) if c not in cfg.used_action_channel_ids]
    assert (back[:, unused] == 0).all() and (back[:, :, :1] == 0).all()
    np.testing.assert_allclose(codec.to_robot(back, first_chunk=True), x, atol=1e-5)


def test_robotwin_channel_map():
    cfg = get_policy_config("robotwin")
    codec = ActionCodec(cfg)
    model = torch.zeros(1, 30, 2, 16, 1)
    model[0, 28] = 1.0  # left gripper lives in model channel 28 -> robot column 7
    robot = codec.to_robot(model, first_chunk=False)
    assert robot.shape == (32, 16)
    assert robot[0, 7] == pytest.approx(1.0 + QUANTILE_EPS, abs=1e-6)  # channel 28: q01=0, q99=1
    assert robot[0, 0] == pytest.approx((-0.06172713458538055 + 0.3462600058317184) / 2, abs=1e-6)
