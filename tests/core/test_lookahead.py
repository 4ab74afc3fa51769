"""infer(ahead=True): a chunk inferred while the previous one executes (one-chunk lag)."""

import numpy as np
import pytest
import torch

from lingbot_edge.io.loading import load_policy
from lingbot_edge.testing.toy import ToyScene


def _lookahead_episode(policy, chunks, prompt="stack the blocks"):
    """infer(0); infer(1, ahead); then per chunk k: feedback(k), infer(k + 2, ahead)."""
    cfg = policy.cfg
    scene = ToyScene(cfg.obs_cam_keys, seed=0)
    policy.reset(prompt=prompt)
    outs = [policy.infer(scene.render()), policy.infer({}, ahead=True)]
    for k in range(chunks - 2):
        frames = {c: [] for c in cfg.obs_cam_keys}
        for step, a in enumerate(outs[k]["actions"]):
            scene.step(a)
            if (step + 1) % cfg.keyframe_stride == 0:
                for c, img in scene.render().items():
                    frames[c].append(img)
        policy.feedback({c: np.stack(v) for c, v in frames.items()}, outs[k]["actions"])
        outs.append(policy.infer({}, ahead=True))
    return outs


def test_lookahead_static_matches_reference_and_positions():
    ref = _lookahead_episode(load_policy("tiny", sampler="reference", device="cpu", dtype="fp32"), 6)
    static = _lookahead_episode(load_policy("tiny", sampler="static", compile=False, device="cpu", dtype="fp32"), 6)
    f = load_policy("tiny", sampler="reference", device="cpu", dtype="fp32").cfg.frame_chunk_size
    for r, s in zip(ref, static, strict=True):
        np.testing.assert_allclose(s["actions"], r["actions"], atol=1e-5, rtol=0)
    assert [o["chunk"] for o in static] == list(range(6))
    assert [o["frame_start"] for o in static] == [f * i for i in range(6)]


def test_lookahead_differs_from_sync_and_guards():
    policy = load_policy("tiny", sampler="static", compile=False, device="cpu", dtype="fp32")
    policy.reset(prompt="x")
    with pytest.raises(RuntimeError, match="ahead"):
        policy.infer({}, ahead=True)  # nothing pending yet
    scene = ToyScene(policy.cfg.obs_cam_keys, seed=0)
    first = policy.infer(scene.render())
    ahead = policy.infer({}, ahead=True)
    with pytest.raises(RuntimeError, match="exactly one"):
        policy.infer({}, ahead=True)
    with pytest.raises(RuntimeError, match="feedback"):
        policy.infer({})
    assert ahead["chunk"] == 1 and policy.awaiting_feedback
    # the same episode synchronously (same seed, same noise): chunk 1 now conditions on chunk 0's real
    # keyframes and executed actions instead of the model's own prediction of them
    policy.reset(prompt="x")
    out0 = policy.infer(scene.render())
    np.testing.assert_array_equal(out0["actions"], first["actions"])
    cfg = policy.cfg
    t = 4 * (cfg.frame_chunk_size - 1)
    policy.feedback({c: np.stack([scene.render()[c]] * t) for c in cfg.obs_cam_keys}, out0["actions"])
    sync1 = policy.infer({})
    assert sync1["chunk"] == 1 and sync1["frame_start"] == ahead["frame_start"]
    assert not np.allclose(sync1["actions"], ahead["actions"])


def _keyframes(rng, cfg, n):
    return {c: rng.integers(0, 255, (n, cfg.height, cfg.width, 3), dtype=np.uint8) for c in cfg.obs_cam_keys}


def test_late_lookahead_encodes_each_keyframe_once_and_pins_what_it_saw():
    """infer(ahead=True) given the executing chunk's first latent frame of keyframes grounds it with that frame
    pinned; its feedback then writes the history latents one encoder stream over every keyframe gives (the
    reference: a fresh stream), though part of them was encoded earlier."""
    policy = load_policy("tiny", sampler="reference", device="cpu", dtype="fp32", async_mode="grounded")
    cfg, per = policy.cfg, policy.keyframes_per_frame
    assert policy.takes_executing_keyframes and cfg.frame_chunk_size == 2
    written, observed = [], []
    feedback, ground = policy.sampler.feedback, policy.sampler.ground

    def spy_feedback(latents, actions, timer=None):
        written.append(latents.clone())
        return feedback(latents, actions, timer=timer)

    def spy_ground(noise, actions, seen=None, timer=None):
        out = ground(noise, actions, seen, timer=timer)
        observed.append((seen, out))
        return out

    policy.sampler.feedback, policy.sampler.ground = spy_feedback, spy_ground
    rng = np.random.default_rng(0)
    first = {c: v[0] for c, v in _keyframes(rng, cfg, 1).items()}
    frames0, frames1 = _keyframes(rng, cfg, per), _keyframes(rng, cfg, 2 * per)
    policy.reset("x")
    c0 = policy.infer(first)
    c1 = policy.infer({}, ahead=True)
    assert observed == []  # chunk 0's entries are its own sampler's
    policy.feedback(frames0, c0["actions"])
    assert observed == []  # grounding waits for the request (and what it brings)
    with pytest.raises(ValueError, match="multiple of"):
        policy.infer({c: v[:per - 1] for c, v in frames1.items()}, ahead=True)
    policy.infer({c: v[:per] for c, v in frames1.items()}, ahead=True)
    altered = {c: v.copy() for c, v in frames1.items()}
    next(iter(altered.values()))[0] ^= 1
    with pytest.raises(ValueError, match="differ"):
        policy.feedback(altered, c1["actions"])
    policy.feedback(frames1, c1["actions"])

    enc = policy.obs_encoder
    enc.reset()
    enc.encode(first)
    ref = enc.encode({c: np.concatenate([frames0[c], frames1[c]]) for c in cfg.obs_cam_keys})  # [1, C, 3, h, w]
    torch.testing.assert_close(written[0][:, :, 1:], ref[:, :, :1], atol=1e-5, rtol=0)
    torch.testing.assert_close(written[1], ref[:, :, 1:], atol=1e-5, rtol=0)
    (seen, grounded), = observed
    torch.testing.assert_close(seen, ref[:, :, 1:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(grounded[:, :, :1], seen, atol=0, rtol=0)  # pinned
