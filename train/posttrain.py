"""Post-training from a checkpoint: `lingbot-edge train fit --base DIR|so100-grasp [--lora-rank R]`.

What differs from training from scratch (`train.pipeline.fit` runs both):

- the run's checkpoint starts as a copy of the base's frozen parts (VAE with its latent statistics, text
  encoder, tokenizer) and its policy settings, with the new dataset's action quantiles: the latents
  trained on are the ones the base's VAE gives, normalized as the base was trained;
- the DiT starts from the base's weights, frozen in bf16 or the runtime's int8 weight-only format, with
  LoRA adapters (`train.lora`) the only trained parameters (or, without `--lora-rank`, all of it in fp32);
- the export merges the adapters into a plain bf16 DiT (`train.lora.merge`) in the released layout, and
  writes the adapters alone to `<out>/adapters/`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from lingbot_edge.core.config import PolicyConfig
from lingbot_edge.io.checkpoint import build_model, load_transformer, read_model_config
from lingbot_edge.io.loading import checkpoint_folder, read_policy_config
from quantize import SCHEMES, quantize_
from train.lora import AdapterConfig, add_adapters, is_trainable, merge, save_adapters
from train.skeleton import policy_config_json, write_json

log = logging.getLogger(__name__)

FROZEN_PARTS = ("vae", "text_encoder", "tokenizer")


def base_folder(base: str | Path) -> Path:
    """A checkpoint folder or an embedded checkpoint's name (so100-grasp) -> its folder."""
    folder = Path(checkpoint_folder(str(base)))
    if not (folder / "transformer").is_dir() or not (folder / "vae").is_dir():
        raise FileNotFoundError(f"--base {base}: {folder} has no transformer/ and vae/ (expected the released layout)")
    return folder


def base_policy_config(base: Path, q01, q99) -> PolicyConfig:
    """The base checkpoint's policy settings with the new dataset's action quantiles (`q01`, `q99`: one per
    action channel of the DiT)."""
    return read_policy_config(base).replace(action_q01=tuple(q01), action_q99=tuple(q99))


def write_skeleton(folder: Path, base: Path, cfg: PolicyConfig) -> Path:
    """The run's checkpoint: the base's frozen parts and DiT (replaced by the export), the new policy_config.json.
    An existing skeleton is kept (its frozen parts made the cached latents)."""
    for part in (*FROZEN_PARTS, "transformer"):
        if not (folder / part).is_dir():
            shutil.copytree(base / part, folder / part)
    write_json(folder / "policy_config.json", policy_config_json(cfg))
    return folder


def prepare_model(base: Path, adapters: AdapterConfig | None, seed: int = 0, from_scratch: bool = False):
    """(model, trainable filter, run settings) to train: the base's DiT with adapters over its frozen weights, or
    (`adapters` None) all of it in fp32, or (`from_scratch`) a random DiT of its architecture: the baseline a
    post-training run is compared with, on the same encoded data."""
    if from_scratch:
        if adapters is not None:
            raise ValueError("from_scratch: a random DiT trains in full; adapters need the base's weights")
        config = read_model_config(base / "transformer" / "config.json")
        return build_model(config, seed=seed), None, {"base": str(base), "from_scratch": True}
    if adapters is None:
        return load_transformer(base, dtype=torch.float32), None, {"base": str(base)}
    model = load_transformer(base, dtype=torch.float32 if adapters.base_dtype == "float32" else torch.bfloat16)
    if adapters.base_dtype == "int8":
        quantize_(model, SCHEMES["int8_weight_only"])  # the block Linears, as `lingbot-edge quantize` does
    add_adapters(model, adapters, seed=seed)
    return model, is_trainable(adapters), {"base": str(base), "lora": asdict(adapters)}


def export(model, adapters: AdapterConfig | None, out: Path):
    """The DiT to save in the checkpoint: the adapters merged into a bf16 DiT (and written alone to
    `out/adapters`), or the fully trained one."""
    if adapters is None:
        return model
    save_adapters(model, adapters, out / "adapters")
    return merge(model, torch.bfloat16)
