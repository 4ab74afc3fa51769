"""infer(ahead=True): a chunk inferred while the previous one executes (one-chunk lag)."""

import numpy as np
import pytest

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
