"""The tiny policy end to end: real tiny VAE / UMT5 stand-ins, feedback, errors, action codec."""

import numpy as np
import pytest
import torch

from lingbot_edge.core.actions import QUANTILE_EPS, ActionCodec
from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io.tiny import build_tiny_policy
from lingbot_edge.testing.toy import ToyScene, toy_episode


def _run_episode(policy, chunks, seed=0, prompt="stack the blocks"):
    return list(toy_episode(policy, chunks, prompt, seed=seed))


@pytest.fixture(scope="module")
def episodes():
    ref = _run_episode(build_tiny_policy(sampler="reference"), 6)
    static = _run_episode(build_tiny_policy(sampler="static", compile=False), 6)
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
    policy = build_tiny_policy(sampler="static", compile=False)
    a = _run_episode(policy, 3)
    b = _run_episode(policy, 3)  # reset() restarts the episode (cache, frame ids, noise, VAE stream)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["actions"], y["actions"])
    c = _run_episode(policy, 3, seed=5)  # another scene: other keyframes fed back
    assert np.abs(c[1]["actions"] - a[1]["actions"]).max() > 1e-3


def test_bad_calls_get_clear_errors():
    policy = build_tiny_policy(sampler="static", compile=False)
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


def test_action_codec_libero_numbers():
    cfg = get_policy_config("libero")
    codec = ActionCodec(cfg)
    model = torch.zeros(1, 30, 4, 4, 1)
    model[0, 0, :, :, 0] = -1.0  # channel 0 at -1 -> q01
    model[0, 6, :, :, 0] = 1.0  # gripper at +1 -> q99 (+ eps, as upstream)
    robot = codec.to_robot(model, first_chunk=False)
    assert robot.shape == (16, 7)
    assert robot[:, 0] == pytest.approx(-0.6589)
    assert robot[:, 6] == pytest.approx(1.0 + QUANTILE_EPS)
    # channel 1 at 0 -> midpoint of [q01, q99]
    assert robot[:, 1] == pytest.approx((-0.84375 + 0.8545) / 2, abs=1e-6)
    first = codec.to_robot(model, first_chunk=True)
    assert first.shape == (12, 7)
    # robot -> model -> robot round trip; unused channels and the first chunk's frame 0 are zero
    x = np.random.default_rng(0).uniform(-0.5, 0.5, size=(12, 7)).astype(np.float32)
    back = codec.from_robot(x, first_chunk=True)
    assert back.shape == (1, 30, 4, 4, 1)
    assert (back[:, 7:] == 0).all() and (back[:, :, :1] == 0).all()
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
