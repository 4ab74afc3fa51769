"""Tiny checkpoints in the real folder layouts (released, LeRobot) with stand-in weights, for tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.io.checkpoint import build_model, save_transformer
from lingbot_edge.io.layout import (
    _MODEL_FIELDS,
    LEROBOT_POLICY_FIELDS,
    LEROBOT_POSTPROCESSOR,
    LEROBOT_PREFIX,
    LEROBOT_WEIGHTS,
)
from lingbot_edge.io.tiny import save_tiny_frozen_parts


def save_tiny_checkpoint(
    root: str | Path, seed: int = 0, layout: str = "released", frozen_from: str | Path | None = None,
    latents_mean: Sequence[float] | None = None, latents_std: Sequence[float] | None = None,
) -> Path:
    """Write a `tiny`-preset checkpoint: the DiT, a tiny Wan2.2-family VAE (z_dim 16, patch 2), a tiny
    UMT5 (d_model 32) and a tokenizer trained offline, in the released layout (`layout="released"`), or
    a LeRobot policy folder (`layout="lerobot"`) whose `wan_pretrained_path` is `frozen_from` (a
    released-layout folder; default: the frozen parts are written inside the policy folder)."""
    from safetensors.torch import save_file

    if layout not in ("released", "lerobot"):
        raise ValueError(f"layout: expected 'released' or 'lerobot', got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = get_policy_config("tiny")
    mc = cfg.model_config
    model = build_model(mc, seed=seed)
    if layout == "released":
        save_transformer(model, root / "transformer")
    else:
        state = {LEROBOT_PREFIX + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(root / LEROBOT_WEIGHTS), metadata={"format": "pt"})
        lerobot = {"type": "lingbot_va", **{k: v for k, v in mc.to_dict().items() if k in _MODEL_FIELDS},
                   **{k: list(v) if isinstance(v, tuple) else v
                      for k, v in ((f, getattr(cfg, f)) for f in LEROBOT_POLICY_FIELDS)},
                   "wan_pretrained_path": str(frozen_from) if frozen_from is not None else "robbyant/lingbot-va-base",
                   "dtype": "float32", "text_encoder_device": "cpu", "save_predicted_video": False}
        (root / "config.json").write_text(json.dumps(lerobot, indent=2))
        # LeRobot's post-processor: a QUANTILES unnormalizer whose state holds the used channels' q01 / q99.
        used = list(cfg.used_action_channel_ids)
        state_file = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
        save_file({"action.q01": torch.tensor([cfg.action_q01[i] for i in used], dtype=torch.float64),
                   "action.q99": torch.tensor([cfg.action_q99[i] for i in used], dtype=torch.float64)},
                  str(root / state_file))
        pipeline = {"name": "policy_postprocessor", "steps": [
            {"registry_name": "unnormalizer_processor", "config": {"norm_map": {"ACTION": "QUANTILES"}},
             "state_file": state_file},
            {"registry_name": "device_processor", "config": {"device": "cpu"}}]}
        (root / LEROBOT_POSTPROCESSOR).write_text(json.dumps(pipeline, indent=2))
        if frozen_from is not None:
            return root
    return save_tiny_frozen_parts(root, seed, latents_mean, latents_std)

