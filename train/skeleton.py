"""The trained checkpoint's skeleton: its policy settings (`policy_config.json` in upstream's names) and the
tiny frozen parts (VAE, UMT5, tokenizer) a run from scratch trains its DiT against."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lingbot_edge.core.config import PolicyConfig, get_policy_config, tiny_variant
from lingbot_edge.io.checkpoint import build_model, read_model_config, save_transformer
from lingbot_edge.io.files import write_text
from lingbot_edge.io.tiny import save_tiny_frozen_parts
from lingbot_edge.robot.so100 import camera_keys

# Policy settings of the trained checkpoint, on top of the so100 preset's tiny variant (2-frame chunks, a
# 2-chunk cache): the top camera only at 128x256 (finer tokens for about the same count), no CFG (one prompt,
# trained without prompt dropout), the action flow from zero noise, and the chunk's PREDICTED video written at
# the first video step's input (`video_exec_step` 1), so the actions act on the observed history alone. Why each:
# bench/results/train_recipes.md.
POLICY_SETTINGS = {"obs_cam_keys": ("observation.images.camera_top",), "height": 128, "width": 256,
                   "guidance_scale": 1.0, "action_guidance_scale": 1.0, "num_inference_steps": 4,
                   "video_exec_step": 1, "action_num_inference_steps": 10, "max_sequence_length": 32,
                   "action_noise_scale": 0.0}


# The embedded LIBERO policy (libero-tiny): the libero preset's structure (two 128x128 cameras, 4-frame chunks of
# 4 actions, LeRobot's frame orientation turned into upstream's by hflip) on the tiny DiT, its 7 used channels
# packed into the tiny model's 8, with the so100 checkpoint's sampler choices above. The cameras keep LeRobot's
# names (what its LIBERO datasets and env hand over); a 2-chunk cache.
LIBERO_POLICY_SETTINGS = {"obs_cam_keys": ("observation.images.image", "observation.images.image2"),
                          "camera_aliases": (("observation.images.agentview_rgb", "observation.images.image"),
                                             ("observation.images.eye_in_hand_rgb", "observation.images.image2")),
                          "height": 128, "width": 128, "frame_chunk_size": 4, "attn_window": 8,
                          "guidance_scale": 1.0, "action_guidance_scale": 1.0, "num_inference_steps": 4,
                          "video_exec_step": 1, "action_num_inference_steps": 10, "max_sequence_length": 32,
                          "action_noise_scale": 0.0}


def libero_policy_config(model: str = "tiny", **settings) -> PolicyConfig:
    """The LIBERO checkpoint's policy settings (LIBERO_POLICY_SETTINGS over the libero preset's tiny variant)."""
    return tiny_variant(get_policy_config("libero"), model).replace(**{**LIBERO_POLICY_SETTINGS, **settings})


def base_policy_config(model: str = "tiny", cameras: Sequence[str] | None = None, **settings) -> PolicyConfig:
    """The trained checkpoint's policy settings; `cameras` (robot camera names, e.g. camera_top): POLICY_SETTINGS'
    (the top camera) when None."""
    cfg = tiny_variant(get_policy_config("so100"), model)
    if cameras is not None:
        settings["obs_cam_keys"] = camera_keys(cameras)
    return cfg.replace(**{**POLICY_SETTINGS, **settings})


def policy_config_json(cfg: PolicyConfig) -> dict:
    """A policy config in upstream's names (`wan_va/configs/va_*_cfg.py`), plus PolicyConfig's own names
    where upstream has none (max_sequence_length, state_dim, action_noise_scale)."""
    used = list(cfg.used_action_channel_ids)
    dim = cfg.model_config.action_dim
    inverse = [len(used)] * dim
    for i, ch in enumerate(used):
        inverse[ch] = i
    return {
        "env_type": "none", "height": cfg.height, "width": cfg.width, "obs_cam_keys": list(cfg.obs_cam_keys),
        "action_dim": dim, "action_per_frame": cfg.action_per_frame, "frame_chunk_size": cfg.frame_chunk_size,
        "attn_window": cfg.attn_window, "num_inference_steps": cfg.num_inference_steps,
        "video_exec_step": cfg.video_exec_step,
        "action_num_inference_steps": cfg.action_num_inference_steps, "guidance_scale": cfg.guidance_scale,
        "action_guidance_scale": cfg.action_guidance_scale, "snr_shift": cfg.snr_shift,
        "action_snr_shift": cfg.action_snr_shift, "used_action_channel_ids": used,
        "inverse_used_action_channel_ids": inverse, "action_norm_method": "quantiles",
        "norm_stat": {"q01": list(cfg.action_q01), "q99": list(cfg.action_q99)},
        "max_sequence_length": cfg.max_sequence_length, "state_dim": cfg.state_dim,
        "action_noise_scale": cfg.action_noise_scale,
        # the frames' orientation and the cameras' other names, where there are (e.g. LIBERO's)
        **({"image_transform": cfg.image_transform} if cfg.image_transform != "none" else {}),
        **({"camera_aliases": dict(cfg.camera_aliases)} if cfg.camera_aliases else {}),
    }


def write_checkpoint_skeleton(folder: Path, cfg: PolicyConfig, seed: int = 0) -> Path:
    """Released layout with the tiny frozen parts and `policy_config.json`; transformer/ random until
    `export` replaces it. An existing skeleton is kept (its frozen parts made the cached latents)."""
    if not (folder / "vae").is_dir():
        save_tiny_frozen_parts(folder, seed=seed)
    dit = folder / "transformer" / "config.json"
    if not dit.is_file() or read_model_config(dit) != cfg.model_config:
        save_transformer(build_model(cfg.model_config, seed=seed), folder / "transformer", replace=True)
    write_json(folder / "policy_config.json", policy_config_json(cfg))
    return folder


def write_json(path: Path, obj) -> None:
    """Indented JSON, no final newline (the bytes of the committed checkpoint's files), atomically."""
    write_text(path, json.dumps(obj, indent=2))
