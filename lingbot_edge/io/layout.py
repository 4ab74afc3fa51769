"""Checkpoint folders: find and validate every part from configs and safetensors headers (no weight read).

Two layouts (all paths local; nothing is downloaded):

- released (upstream / Hugging Face `robbyant/lingbot-va-*`)::

      <root>/transformer/   config.json + diffusion_pytorch_model.safetensors (or index + shards)
      <root>/vae/           diffusers AutoencoderKLWan: config.json + diffusion_pytorch_model.safetensors
      <root>/text_encoder/  transformers UMT5EncoderModel: config.json + model.safetensors (or index + shards)
      <root>/tokenizer/     T5 tokenizer: tokenizer.json (+ tokenizer_config.json, ...)

- LeRobot-converted policy (`lerobot/lingbot_va_*`): `<root>/config.json` (a LeRobot policy config,
  `"type": "lingbot_va"`, whose architecture fields map onto `ModelConfig`) + `<root>/model.safetensors`
  (the DiT under a `transformer.` key prefix). Its frozen parts come from the config's
  `wan_pretrained_path` when that is a local folder, else from `vae/`, `text_encoder/`, `tokenizer/`
  inside the policy folder; `vae=` / `text_encoder=` / `tokenizer=` override either.

`resolve_checkpoint` checks all four parts from their config files and safetensors headers only
(names, shapes, dtypes, file sizes: `safe_open` reads the header and checks that the data is all
there), so a missing folder, a wrong `config.json` or a truncated file fails with a message naming
the folder and what was expected before a single weight is read or any device memory is taken.
A released or user post-trained checkpoint may carry `policy_config.json` next to `transformer/`: the
policy settings in upstream's config names (`wan_va/configs/va_*_cfg.py`: `used_action_channel_ids`,
`norm_stat`, `obs_cam_keys`, `height`, `width`, steps, shifts, guidance, `attn_window`, ...).
`lingbot_edge.io.loading.load_policy` builds the policy from what is validated here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lingbot_edge.core.config import (
    VAE_SPATIAL,
    VAE_TEMPORAL,
    ModelConfig,
)
from lingbot_edge.io.checkpoint import build_meta_model, open_safetensors, tensor_files, weight_files
from lingbot_edge.io.files import read_json
from lingbot_edge.io.quantized import MANIFEST_NAME as QUANT_MANIFEST
from lingbot_edge.io.quantized import read_manifest, verify_files
from lingbot_edge.io.torchvision_compat import ensure_torchvision_importable

# transformers / diffusers import torchvision when it is installed; a LeRobot venv has a broken
# CUDA build of it. Fix that before any of our lazy imports of them (no-op without torchvision).
ensure_torchvision_importable()

log = logging.getLogger(__name__)

PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
LEROBOT_WEIGHTS = "model.safetensors"
POLICY_CONFIG = "policy_config.json"  # released / post-trained checkpoints: policy settings, upstream names
LEROBOT_PREFIX = "transformer."
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# LeRobot `LingBotVAConfig` inference fields that have the same name and meaning in `PolicyConfig`.
LEROBOT_POSTPROCESSOR = "policy_postprocessor.json"  # LeRobot's saved action unnormalizer (q01 / q99)
LEROBOT_POLICY_FIELDS = (
    "height", "width", "obs_cam_keys", "camera_layout", "action_per_frame", "frame_chunk_size", "attn_window",
    "num_inference_steps", "action_num_inference_steps", "guidance_scale", "action_guidance_scale",
    "snr_shift", "action_snr_shift", "max_sequence_length", "used_action_channel_ids",
)
_MODEL_FIELDS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "action_dim",
    "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "rope_max_seq_len",
)


class CheckpointError(ValueError):
    """A checkpoint folder is missing a part or does not hold what the policy expects."""


@dataclass(frozen=True)
class CheckpointLayout:
    """Where every part of a validated checkpoint lives, and what it holds."""

    root: Path
    kind: str  # "released", "lerobot", or "frozen" (only frozen parts were asked for and present)
    model_config: ModelConfig | None
    transformer: Path | None  # the folder with the DiT weights (released: transformer/, lerobot: root)
    transformer_files: dict[str, Path] = field(repr=False)  # checkpoint key -> safetensors file
    transformer_prefix: str
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Path | None
    vae_config: dict = field(default_factory=dict, repr=False)
    text_encoder_config: dict = field(default_factory=dict, repr=False)
    policy_fields: dict = field(default_factory=dict)  # LeRobot inference fields (PolicyConfig names)
    # policy_config.json (upstream's names), and where it was read from.
    policy_config: dict = field(default_factory=dict, repr=False)
    policy_config_path: Path | None = None
    lerobot_config: dict = field(default_factory=dict, repr=False)
    quantized: bool = False  # transformer is a `lingbot_edge.io.quantized` folder (quantization.json)
    # LeRobot folders: q01 / q99 of the used action channels from policy_postprocessor.json.
    action_quantiles: tuple[tuple[float, ...], tuple[float, ...]] | None = None


# --------------------------------------------------------------------------------------------------
# Small checks
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name} (expected {what})")
    return read_json(path, what, error=CheckpointError)


def _require_dir(path: Path, part: str, expected: str) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing {part} folder (expected {expected})")
    return path


def _weight_files(folder: Path, what: str) -> dict[str, Path]:
    """Every tensor name -> its safetensors file (a single file, or an index + shards); headers only."""
    return weight_files(folder, what, CheckpointError)


def _headers(files: Mapping[str, Path], prefix: str = "") -> dict[str, tuple[tuple[int, ...], str]]:
    """name (prefix stripped) -> (shape, safetensors dtype) from the headers of `files`."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    out = {}
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{path}: the index lists tensor {name!r} but the file does not hold it")
                    if not name.startswith(prefix):
                        continue
                    sl = f.get_slice(name)
                    out[name[len(prefix):]] = (tuple(sl.get_shape()), sl.get_dtype())
        except CheckpointError:
            raise
        except Exception as e:  # SafetensorError (truncated / corrupt header), OSError
            raise CheckpointError(
                f"{path}: unreadable safetensors file ({e}); expected a complete safetensors file "
                "(truncated download?)"
            ) from e
    return out


def _expected_tensors(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], list[list[str]]]:
    """(state-dict name -> shape, groups of names sharing one tensor, e.g. tied embeddings)."""
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    return {k: tuple(v.shape) for k, v in state.items()}, list(groups.values())


def _check_tensors(
    where: Path, what: str, headers: Mapping[str, tuple[tuple[int, ...], str]], model: torch.nn.Module,
    strict_unexpected: bool = True,
) -> None:
    """Every tensor of `model` present (one name per tied group suffices) with its shape and a float dtype."""
    shapes, groups = _expected_tensors(model)
    missing = [g[0] for g in groups if not any(n in headers for n in g)]
    unexpected = sorted(set(headers) - set(shapes))
    if missing or (unexpected and strict_unexpected):
        raise CheckpointError(
            f"{where}: tensors do not match {what}: missing {sorted(missing)[:8]}{'...' if len(missing) > 8 else ''}"
            f" ({len(missing)}), unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    if unexpected:
        log.warning("%s: ignoring %d tensors %s does not use, e.g. %s", where, len(unexpected), what, unexpected[:4])
    for name, (shape, dtype) in sorted(headers.items()):
        if name not in shapes:
            continue
        if shape != shapes[name]:
            raise CheckpointError(f"{where}: tensor {name} has shape {list(shape)}, expected {list(shapes[name])} "
                                  f"for {what}")
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}, expected one of {sorted(_FLOAT_DTYPES)}")


def _meta(build):
    with torch.device("meta"):
        return build()


# --------------------------------------------------------------------------------------------------
# Per-part validation (headers and config files only)
# --------------------------------------------------------------------------------------------------


def validate_transformer(files: Mapping[str, Path], cfg: ModelConfig, where: Path, prefix: str = "") -> None:
    headers = _headers(files, prefix)
    what = f"the LingBot-VA transformer of config.json ({cfg.num_layers} blocks, dim {cfg.dim})"
    _check_tensors(where, what, headers, build_meta_model(cfg))
    other = sorted(k for k in files if not k.startswith(prefix))
    if other:
        raise CheckpointError(f"{where}: tensors without the {prefix!r} prefix: {other[:8]} (expected only DiT keys)")


def validate_vae(folder: Path, z_dim: int | None = None) -> dict:
    """vae/: a diffusers `AutoencoderKLWan` of the Wan2.2 family (patch 2, 16x / 4x compression)."""
    expected = "a diffusers AutoencoderKLWan folder: config.json + diffusion_pytorch_model.safetensors"
    folder = _require_dir(folder, "vae/", expected)
    cfg = _read_json(folder / "config.json", "the AutoencoderKLWan config")
    name = cfg.get("_class_name", "AutoencoderKLWan")
    if name != "AutoencoderKLWan":
        raise CheckpointError(f"{folder / 'config.json'}: _class_name is {name!r}, expected 'AutoencoderKLWan'")
    zd = cfg.get("z_dim")
    if z_dim is not None and zd != z_dim:
        raise CheckpointError(f"{folder / 'config.json'}: z_dim is {zd}, expected {z_dim} (the DiT's in_channels)")
    for key, want in (("scale_factor_spatial", VAE_SPATIAL), ("scale_factor_temporal", VAE_TEMPORAL)):
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{folder / 'config.json'}: {key} is {cfg.get(key)}, expected {want} (Wan2.2 VAE)")
    for key in ("latents_mean", "latents_std"):
        v = cfg.get(key)
        if not isinstance(v, list) or len(v) != zd or not all(isinstance(x, int | float) for x in v):
            got = f"{len(v)} values" if isinstance(v, list) else type(v).__name__
            raise CheckpointError(f"{folder / 'config.json'}: {key} must be a list of {zd} numbers (one per latent "
                                  f"channel), got {got}")
    if key_std := [x for x in cfg["latents_std"] if x <= 0]:
        raise CheckpointError(f"{folder / 'config.json'}: latents_std must be > 0, got {key_std[:4]}")
    from diffusers import AutoencoderKLWan

    try:
        model = _meta(lambda: AutoencoderKLWan.from_config(cfg))
    except Exception as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a valid AutoencoderKLWan config ({e})") from e
    _check_tensors(folder, "the AutoencoderKLWan of this config.json", _headers(_weight_files(folder, expected)),
                   model, strict_unexpected=False)
    return cfg


def validate_text_encoder(folder: Path, d_model: int | None = None) -> dict:
    """text_encoder/: a transformers `UMT5EncoderModel` whose d_model is the DiT's text_dim."""
    expected = "a transformers UMT5EncoderModel folder: config.json + model.safetensors (or index + shards)"
    folder = _require_dir(folder, "text_encoder/", expected)
    cfg = _read_json(folder / "config.json", "a UMT5 config (model_type 'umt5')")
    if cfg.get("model_type") != "umt5":
        raise CheckpointError(f"{folder / 'config.json'}: model_type is {cfg.get('model_type')!r}, expected 'umt5' "
                              "(the UMT5 text encoder)")
    if d_model is not None and cfg.get("d_model") != d_model:
        raise CheckpointError(f"{folder / 'config.json'}: d_model is {cfg.get('d_model')}, expected {d_model} "
                              "(the DiT's text_dim)")
    from transformers import UMT5Config, UMT5EncoderModel

    try:
        model = _meta(lambda: UMT5EncoderModel(UMT5Config.from_dict(cfg)))
    except Exception as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a valid UMT5 config ({e})") from e
    # Unexpected tensors are tolerated (a full T5 checkpoint also holds the decoder).
    _check_tensors(folder, "the UMT5 encoder of this config.json", _headers(_weight_files(folder, expected)),
                   model, strict_unexpected=False)
    return cfg


def validate_tokenizer(folder: Path, vocab_size: int | None = None) -> None:
    """tokenizer/: T5 tokenizer files; every id it can produce must be < the text encoder's vocab_size."""
    expected = "the T5 tokenizer files: tokenizer.json (+ tokenizer_config.json)"
    folder = _require_dir(folder, "tokenizer/", expected)
    tok_json = folder / "tokenizer.json"
    if not tok_json.is_file():
        if (folder / "spiece.model").is_file():
            try:
                import sentencepiece  # noqa: F401
            except ImportError as e:
                raise CheckpointError(f"{folder}: no tokenizer.json, and spiece.model needs the sentencepiece "
                                      f"package (not installed); expected {expected}") from e
            return
        raise CheckpointError(f"{folder}: no tokenizer.json or spiece.model (expected {expected})")
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        _read_json(cfg_path, "the tokenizer config")
    try:
        tok = json.loads(tok_json.read_text())
        vocab = tok["model"]["vocab"]
        ids = [len(vocab) - 1] if isinstance(vocab, list) else list(vocab.values())
        ids += [int(t["id"]) for t in tok.get("added_tokens") or []]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{tok_json}: not a valid tokenizers file ({e}); expected {expected}") from e
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise CheckpointError(f"{tok_json}: produces token ids up to {max(ids)}, but the text encoder's vocab_size "
                              f"is {vocab_size} (tokenizer and text_encoder do not belong together)")


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------


def _lerobot_model_config(cfg: dict, where: Path) -> ModelConfig:
    kwargs = {k: cfg[k] for k in _MODEL_FIELDS if k in cfg}
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid LingBot-VA architecture fields ({e})") from e


def resolve_checkpoint(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
    transformer: str | Path | None = None,
    parts: Iterable[str] = PARTS,
) -> CheckpointLayout:
    """Find and validate the parts of a checkpoint (released or LeRobot layout) without loading weights.

    `vae` / `text_encoder` / `tokenizer` / `transformer` override where those parts are taken from (e.g.
    `transformer=` a folder written by `lingbot-edge quantize`); `parts` limits the validation (e.g.
    `encode-prompt` needs only the tokenizer and the text encoder)."""
    parts = tuple(parts)
    if unknown := sorted(set(parts) - set(PARTS)):
        raise ValueError(f"parts: unknown {unknown}; expected a subset of {list(PARTS)}")
    root = Path(path).expanduser()
    layout_help = ("the released layout (transformer/ vae/ text_encoder/ tokenizer/) or a LeRobot policy folder "
                   f"(config.json with \"type\": \"lingbot_va\" + {LEROBOT_WEIGHTS})")
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder not found (expected {layout_help})")

    lerobot: dict = {}
    quantized = False
    if transformer is not None or (root / "transformer").is_dir():
        kind, frozen_root, prefix = "released", root, ""
        tdir = Path(transformer).expanduser() if transformer is not None else root / "transformer"
        quantized = (tdir / QUANT_MANIFEST).is_file()  # written by `lingbot-edge quantize`
        model_cfg, files = _model_config_from_json(tdir), {}
        if "transformer" in parts and not quantized:
            files = _weight_files(tdir, "the transformer weights: diffusion_pytorch_model.safetensors or an index")
    elif (root / "config.json").is_file():
        kind, prefix, tdir = "lerobot", LEROBOT_PREFIX, root
        lerobot = _read_json(root / "config.json", f"a LeRobot LingBot-VA policy config, or {layout_help}")
        if lerobot.get("type") != "lingbot_va":
            raise CheckpointError(
                f"{root / 'config.json'}: \"type\" is {lerobot.get('type')!r}, expected \"lingbot_va\" "
                f"(a LeRobot LingBot-VA policy); or use {layout_help}"
            )
        model_cfg = _lerobot_model_config(lerobot, root / "config.json")
        files = {}
        if "transformer" in parts:
            weights = root / LEROBOT_WEIGHTS
            if not weights.is_file():
                raise CheckpointError(f"{root}: no {LEROBOT_WEIGHTS} (expected the LeRobot policy weights, "
                                      f"DiT keys prefixed {LEROBOT_PREFIX!r})")
            files = _all_keys(weights)
        overridden = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
        needed = any(overridden[p] is None for p in parts if p in overridden)
        frozen_root = _lerobot_frozen_root(root, lerobot) if needed else root
    elif "transformer" not in parts and any((root / part).is_dir() for part in parts):
        # Only frozen parts asked for (encode-prompt) from a folder that holds just those.
        kind, frozen_root, prefix, tdir, model_cfg, files = "frozen", root, "", None, None, {}
    else:
        raise CheckpointError(f"{root}: neither a transformer/ folder nor a config.json (expected {layout_help})")

    vae_dir = Path(vae).expanduser() if vae is not None else frozen_root / "vae"
    te_dir = Path(text_encoder).expanduser() if text_encoder is not None else frozen_root / "text_encoder"
    tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else frozen_root / "tokenizer"

    # Validate in the order of the cheapest failure first; nothing below reads a weight.
    if "transformer" in parts and quantized:
        verify_files(tdir, read_manifest(tdir), checksums=False)  # sizes now; sha256 when loading
    elif "transformer" in parts:
        validate_transformer(files, model_cfg, tdir, prefix)
    vae_cfg = validate_vae(vae_dir, model_cfg and model_cfg.in_channels) if "vae" in parts else {}
    te_cfg = validate_text_encoder(te_dir, model_cfg and model_cfg.text_dim) if "text_encoder" in parts else {}
    if "tokenizer" in parts:
        validate_tokenizer(tok_dir, te_cfg.get("vocab_size"))

    policy_fields = {k: lerobot[k] for k in LEROBOT_POLICY_FIELDS if k in lerobot}
    for k in ("obs_cam_keys", "used_action_channel_ids"):
        if k in policy_fields and isinstance(policy_fields[k], list):
            policy_fields[k] = tuple(policy_fields[k])
    quantiles = _lerobot_action_quantiles(root) if kind == "lerobot" else None
    if isinstance(lerobot.get("image_hflip"), bool):
        # LeRobot's flag undoes its LIBERO env's extra horizontal flip on LeRobot-oriented frames: the
        # same frames our presets expect, so it maps one to one onto image_transform.
        policy_fields["image_transform"] = "hflip" if lerobot["image_hflip"] else "none"
    policy_config_path = root / POLICY_CONFIG if (root / POLICY_CONFIG).is_file() else None
    policy_config = _read_json(policy_config_path, "policy settings in upstream's config names") \
        if policy_config_path else {}
    layout = CheckpointLayout(
        root=root, kind=kind, model_config=model_cfg, policy_config=policy_config,
        policy_config_path=policy_config_path,
        transformer=tdir if "transformer" in parts else None, transformer_files=files, transformer_prefix=prefix,
        vae=vae_dir if "vae" in parts else None,
        text_encoder=te_dir if "text_encoder" in parts else None,
        tokenizer=tok_dir if "tokenizer" in parts else None,
        vae_config=vae_cfg, text_encoder_config=te_cfg, policy_fields=policy_fields, lerobot_config=lerobot,
        quantized=quantized, action_quantiles=quantiles,
    )
    log.info("checkpoint %s (%s layout) validated: %s", root, kind, ", ".join(parts))
    return layout


def _model_config_from_json(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    data = _read_json(path, "the transformer config (upstream's transformer/config.json)")
    try:
        return ModelConfig.from_dict(data, source=str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _all_keys(path: Path) -> dict[str, Path]:
    return tensor_files(path, CheckpointError)


def _lerobot_action_quantiles(root: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """q01 / q99 of the actions from LeRobot's saved post-processor (its unnormalizer step's state
    file, keys `action.q01` / `action.q99`); None (with a warning) when the folder has none."""
    path = root / LEROBOT_POSTPROCESSOR
    if not path.is_file():
        log.warning("%s: no %s; using the preset's action quantiles", root, LEROBOT_POSTPROCESSOR)
        return None
    pipeline = _read_json(path, "a LeRobot processor pipeline (\"steps\" with state files)")
    steps = pipeline.get("steps") if isinstance(pipeline, dict) else None
    state_files = [st.get("state_file") for st in steps or [] if isinstance(st, dict)
                   and "unnormalizer" in str(st.get("registry_name", "")) and st.get("state_file")]
    if not state_files:
        raise CheckpointError(f"{path}: no unnormalizer step with a state_file (expected LeRobot's QUANTILES "
                              "unnormalizer holding action.q01 / action.q99)")

    with open_safetensors(root / state_files[0], CheckpointError) as f:
        keys = set(f.keys())
        if not {"action.q01", "action.q99"} <= keys:
            raise CheckpointError(f"{root / state_files[0]}: no action.q01 / action.q99 (has {sorted(keys)[:8]})")
        q01, q99 = (f.get_tensor(k).double().flatten() for k in ("action.q01", "action.q99"))
    if q01.shape != q99.shape or not bool((q99 >= q01).all()):
        raise CheckpointError(f"{root / state_files[0]}: action.q01 / action.q99 must have one shape and q99 >= q01")
    return tuple(q01.tolist()), tuple(q99.tolist())


def _lerobot_frozen_root(root: Path, cfg: dict) -> Path:
    """Where a LeRobot policy's vae/ text_encoder/ tokenizer/ live: wan_pretrained_path if local
    (relative paths are relative to the policy folder), else the policy folder itself."""
    wan = cfg.get("wan_pretrained_path")
    if isinstance(wan, str) and wan:
        candidate = Path(wan).expanduser()
        if not candidate.is_absolute():
            candidate = root / candidate
        if candidate.is_dir():
            return candidate
        if not (root / "vae").is_dir():
            raise CheckpointError(
                f"{root / 'config.json'}: wan_pretrained_path {wan!r} is not a local folder and {root} has no "
                "vae/ text_encoder/ tokenizer/ of its own; download the frozen parts (e.g. the released "
                "checkpoint) and point wan_pretrained_path, or vae= / text_encoder= / tokenizer=, at them"
            )
    return root
