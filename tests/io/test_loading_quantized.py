"""A checkpoint whose DiT went through `quantize_checkpoint` runs through the real policy loader."""

import shutil

import numpy as np
import pytest
import torch

from lingbot_edge.io.loading import load_policy
from lingbot_edge.testing.toy import ToyScene
from quantize import SCHEMES, quantize_checkpoint


def _chunks(policy, n=3):
    scene = ToyScene(policy.cfg.obs_cam_keys, seed=0)
    policy.reset(prompt="open the drawer")
    out = []
    for c in range(n):
        r = policy.infer(scene.render() if c == 0 else {})
        keyframes = len(r["actions"]) // policy.cfg.keyframe_stride
        frames = {k: np.stack([v] * keyframes) for k, v in scene.render().items()}
        policy.feedback(frames, r["actions"])
        out.append(r["actions"])
    return np.concatenate(out)


def test_quantized_transformer_override(tmp_path, tiny_checkpoint):
    qdir = tmp_path / "transformer-int8"
    quantize_checkpoint(tiny_checkpoint / "transformer", SCHEMES["int8_weight_only"], qdir, dtype=torch.float32,
                        progress=False)
    kw = dict(preset="tiny", device="cpu", dtype=torch.float32, prompt_cache_dir=False, compile=False)
    ref = _chunks(load_policy(tiny_checkpoint, **kw))
    policy = load_policy(tiny_checkpoint, transformer=qdir, **kw)
    assert any(type(m).__name__ == "QuantizedLinear" for m in policy.model.modules())
    q = _chunks(policy)
    rms = float(np.sqrt(np.mean((q - ref) ** 2)) / np.sqrt(np.mean(ref**2)))
    # int8 weight-only on the tiny model: ~1e-3 relative (quantize tests); 1e-2 leaves a wide margin
    # while a wrong scale or layout would be O(1).
    assert 0 < rms < 1e-2, rms

    # A damaged quantized folder is refused at validation, before any weight is loaded.
    bad = tmp_path / "bad"
    shutil.copytree(qdir, bad)
    weights = sorted(bad.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(ValueError, match="truncated|size"):
        load_policy(tiny_checkpoint, transformer=bad, **kw)
