"""Load a LingBot-VA checkpoint folder (or the embedded `tiny` source) into a ready `LingBotPolicy`.

`load_policy` is the one factory of the project. It validates every part first (`io.layout`), takes the
policy settings from the checkpoint (a LeRobot `config.json`, or `policy_config.json` in upstream's
names) before the preset, logs where each non-default setting came from, and loads in the order that
keeps the GPU peak lowest: prompt embeddings first (UMT5, by default on the CPU, released right after),
then the DiT, then the VAE encoder. `runtime_defaults` is the one place where device / dtype / compile
defaults are decided.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lingbot_edge.core.config import (
    MODEL_PRESETS,
    POLICY_PRESETS,
    TINY_MODELS,
    ModelConfig,
    PolicyConfig,
    get_policy_config,
    policy_fields_from_upstream,
    tiny_variant,
)
from lingbot_edge.core.policy import LingBotPolicy
from lingbot_edge.io import checkpoint
from lingbot_edge.io.checkpoint import build_meta_model
from lingbot_edge.io.device_memory import gpu_memory
from lingbot_edge.io.encoders import HFTokenizer, StreamingVAEEncoder, UMT5PromptEncoder, VAEObservationEncoder
from lingbot_edge.io.layout import (
    LEROBOT_POSTPROCESSOR,
    CheckpointError,
    CheckpointLayout,
    _meta,
    _weight_files,
    resolve_checkpoint,
    validate_vae,
)
from lingbot_edge.io.prompt_cache import (
    PromptCache,
    default_cache_dir,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from lingbot_edge.io.quantized import load_quantized
from lingbot_edge.io.tiny import _build_tiny_policy

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Loaders (each one reads weights: call after resolve_checkpoint)
# --------------------------------------------------------------------------------------------------


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The AutoencoderKLWan from a vae/ folder, in `dtype`, frozen, on `device` (default CPU:
    `StreamingVAEEncoder` moves only the encoder to the GPU).

    Built on the meta device and filled tensor by tensor in `dtype` (diffusers' `from_pretrained`
    without `accelerate` would first random-initialise all ~705M fp32 parameters)."""
    from diffusers import AutoencoderKLWan
    from safetensors import safe_open

    folder = Path(folder)
    cfg = validate_vae(folder)  # cheap (headers), and makes this loader safe to call on its own
    vae = _meta(lambda: AutoencoderKLWan.from_config(cfg))
    wanted = set(vae.state_dict())
    by_file: dict[Path, list[str]] = {}
    for name, path in _weight_files(folder, "the VAE weights").items():
        if name in wanted:
            by_file.setdefault(path, []).append(name)
    state = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                state[name] = f.get_tensor(name).to(dtype=dtype)
    vae.load_state_dict(state, strict=True, assign=True)
    vae = vae.to(device).eval().requires_grad_(False)
    log.info("loaded VAE %s (%d tensors) as %s on %s", folder, len(state), dtype, device)
    return vae


def load_text_encoder(folder: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """The UMT5EncoderModel from a text_encoder/ folder, in `dtype`, frozen, on `device`."""
    from transformers import UMT5EncoderModel

    model = UMT5EncoderModel.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    model = model.to(device).eval().requires_grad_(False)
    log.info("loaded text encoder %s as %s on %s", folder, dtype, device)
    return model


def load_tokenizer(folder: str | Path):
    """The T5 tokenizer of a tokenizer/ folder wrapped as an `encoders.Tokenizer` (pad to max length)."""
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))


def load_dit(layout: CheckpointLayout, dtype: torch.dtype, device: str | torch.device):
    """The DiT of a validated layout, tensor by tensor straight into `dtype` on `device`."""
    if layout.quantized:
        return load_quantized(layout.transformer, dtype=dtype, device=device)
    if layout.kind == "released":
        return checkpoint.load_transformer(layout.transformer, dtype=dtype, device=device)
    model = checkpoint.build_meta_model(layout.model_config)
    names = list(model.state_dict())
    from safetensors import safe_open

    path = next(iter(set(layout.transformer_files.values())))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in names:
            checkpoint._set_param(model, name, f.get_tensor(layout.transformer_prefix + name).to(device=device,
                                                                                                   dtype=dtype))
    log.info("loaded %s (%d tensors, LeRobot layout) as %s on %s", path, len(names), dtype, device)
    return model


def build_prompt_cache(
    layout: CheckpointLayout,
    *,
    max_sequence_length: int = 512,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder_device: str | torch.device = "cpu",
    text_encoder_dtype: torch.dtype = torch.bfloat16,
    cache_dir: str | Path | None | bool = None,
):
    """A `PromptCache` over the layout's tokenizer + text encoder; both are loaded only on a miss.

    `cache_dir`: None -> `prompt_cache.default_cache_dir()`, False -> memory only."""
    if layout.text_encoder is None or layout.tokenizer is None:
        raise ValueError("layout: validate the text_encoder and tokenizer parts to build a prompt cache")
    te_dir, tok_dir = layout.text_encoder, layout.tokenizer
    fingerprint = f"{tokenizer_fingerprint(tok_dir)}:{weights_fingerprint(te_dir)}"

    def factory() -> UMT5PromptEncoder:
        # Module-level lookups at call time (tests replace them to prove a warm start loads nothing).
        encoder = load_text_encoder(te_dir, dtype=text_encoder_dtype, device=text_encoder_device)
        return UMT5PromptEncoder(encoder, load_tokenizer(tok_dir), max_sequence_length,
                             device=text_encoder_device, dtype=text_encoder_dtype)

    if cache_dir is None or cache_dir is True:
        cache_dir = default_cache_dir()
    return PromptCache(
        factory,
        fingerprint=fingerprint,
        text_dim=int(layout.text_encoder_config["d_model"]),
        max_sequence_length=max_sequence_length,
        encoder_dtype=text_encoder_dtype,
        device=device,
        dtype=dtype,
        cache_dir=None if cache_dir is False else cache_dir,
    )


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------


def _config_diff(a: ModelConfig, b: ModelConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {da[k]} vs {db[k]}" for k in da if da[k] != db[k])


def _model_preset_of(mc: ModelConfig) -> str | None:
    return next((name for name, m in MODEL_PRESETS.items() if m == mc), None)


def _set_fields(cfg: PolicyConfig, changes: Mapping[str, Any], source: str, where: str) -> PolicyConfig:
    """cfg with `changes`, logging each field that changes and where it came from."""
    if "norm_stat" in changes or "env_type" in changes:  # upstream's names inside --set
        upstream = {k: changes[k] for k in ("norm_stat", "env_type") if k in changes}
        changes = {**{k: v for k, v in changes.items() if k not in upstream},
                   **policy_fields_from_upstream(upstream, where, cfg.model_config)}
    if "obs_cam_keys" in changes and "camera_aliases" not in changes:  # aliases of cameras still there
        keys = tuple(changes["obs_cam_keys"])
        changes = {**changes, "camera_aliases": tuple((a, k) for a, k in cfg.camera_aliases if k in keys)}
    for k, v in changes.items():
        if getattr(cfg, k, object()) != v:
            log.info("policy setting %s = %r from %s (was %r)", k, v, source, getattr(cfg, k, None))
    try:
        return cfg.replace(**changes) if changes else cfg
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the policy settings do not fit preset {cfg.name!r} ({e})") from e


def policy_config_for(layout: CheckpointLayout, preset: str | None = None,
                      overrides: Mapping[str, Any] | None = None) -> PolicyConfig:
    """The checkpoint's policy settings over the preset's: the preset (default: the one matching the DiT
    with the checkpoint's own settings on top, which must then say everything a preset would), the
    LeRobot config's inference fields and saved quantiles, or `policy_config.json` (upstream's names),
    then `overrides` (PolicyConfig names, e.g. from `--set`). Its model must be the checkpoint's DiT."""
    if layout.model_config is None:
        raise CheckpointError(f"{layout.root}: no DiT (transformer/ or a LeRobot config.json) to build a policy from")
    model = _model_preset_of(layout.model_config)
    has_own = bool(layout.policy_config or layout.policy_fields)
    if preset is None:
        if not has_own:
            raise CheckpointError(
                f"{layout.root}: no policy settings in the checkpoint (no {layout.root / 'policy_config.json'}, "
                f"no LeRobot config.json); pass a preset: one of {sorted(POLICY_PRESETS)}")
        # A base that matches the DiT: its sizes are defaults the checkpoint's own file replaces.
        preset = next((n for n, c in POLICY_PRESETS.items() if c.model == model), None)
        if preset is None and model in TINY_MODELS:  # a larger tiny: the tiny preset's sizes as the base
            preset = "tiny"
        if preset is None:
            raise CheckpointError(f"{layout.transformer or layout.root}: the DiT matches no model preset "
                                  f"({sorted(MODEL_PRESETS)}); pass a preset")
    cfg = get_policy_config(preset)
    if model is not None and cfg.model != model:
        # e.g. preset "libero" on a tiny checkpoint: the preset's robot side on the checkpoint's DiT.
        if model not in TINY_MODELS:
            raise CheckpointError(
                f"{layout.transformer or layout.root}: the checkpoint's DiT does not match preset {preset!r} "
                f"(model {cfg.model!r}): {_config_diff(layout.model_config, cfg.model_config)}; it is model "
                f"preset {model!r}")
        cfg = tiny_variant(cfg, model)
    if layout.policy_config:
        where = str(layout.policy_config_path)
        try:
            changes = policy_fields_from_upstream(layout.policy_config, where, layout.model_config)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        cfg = _set_fields(cfg, changes, where, where)
    if layout.policy_fields:
        where = str(layout.root / "config.json")
        cfg = _set_fields(cfg, layout.policy_fields, where, where)
        _warn_lerobot_libero(cfg, preset, where)
    if layout.action_quantiles is not None:
        # LeRobot stores q01 / q99 of the used channels only; the model space is action_dim wide.
        used = cfg.used_action_channel_ids
        q01, q99 = layout.action_quantiles
        if len(q01) != len(used):
            raise CheckpointError(f"{layout.root / LEROBOT_POSTPROCESSOR}: action q01/q99 have {len(q01)} values, "
                                  f"expected {len(used)} (one per used_action_channel_ids {list(used)})")
        full01, full99 = list(cfg.action_q01), list(cfg.action_q99)
        for i, ch in enumerate(used):
            full01[ch], full99[ch] = q01[i], q99[i]
        cfg = _set_fields(cfg, {"action_q01": tuple(full01), "action_q99": tuple(full99)},
                          str(layout.root / LEROBOT_POSTPROCESSOR), str(layout.root / LEROBOT_POSTPROCESSOR))
    if overrides:
        cfg = _set_fields(cfg, dict(overrides), "overrides", "overrides")
    if cfg.model_config != layout.model_config:
        where = layout.transformer or layout.root
        raise CheckpointError(
            f"{where}: the checkpoint's DiT does not match preset {preset!r} (model {cfg.model!r}): "
            f"{_config_diff(layout.model_config, cfg.model_config)}"
            + (f"; it is model preset {model!r}" if model else "; it matches no model preset")
        )
    return cfg


def _warn_lerobot_libero(cfg: PolicyConfig, preset: str, where: str) -> None:
    """A LeRobot-converted LIBERO checkpoint keeps its config.json values; say where they leave upstream's."""
    if preset != "libero":
        return
    upstream = get_policy_config("libero")
    for k in ("used_action_channel_ids", "action_snr_shift"):
        if getattr(cfg, k) != getattr(upstream, k):
            log.warning("%s: %s = %r differs from upstream's LIBERO config (%r); keeping the checkpoint's",
                        where, k, getattr(cfg, k), getattr(upstream, k))


def runtime_defaults(device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                     compile: bool | None = None) -> tuple[torch.device, torch.dtype, bool]:
    """The one place where device / dtype / compile defaults are decided, for every command and loader.

    device: CUDA when available, else the CPU. dtype: bf16 everywhere (a 5B DiT in fp32 is 20 GB: fp32 only
    when asked, with a warning). compile: on CUDA only (on a CPU the cold compile outweighs the gain)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}
        if dtype not in names:
            raise ValueError(f"dtype: expected one of {sorted(names)}, got {dtype!r}")
        dtype = names[dtype]
    dtype = dtype if dtype is not None else torch.bfloat16
    if compile is None:
        compile = device.type == "cuda"
    return device, dtype, bool(compile)


def warn_if_float32(cfg: ModelConfig, dtype: torch.dtype) -> None:
    """fp32 only when asked: say what it costs (the released 5B DiT: 20 GB instead of 10)."""
    if dtype == torch.float32:
        params = sum(p.numel() for p in build_meta_model(cfg).parameters())
        log.warning("DiT in float32 as asked: %.2f GB of weights (%.2f GB in the default bfloat16)",
                    params * 4 / 1e9, params * 2 / 1e9)


TINY = "tiny"  # load_policy's embedded source: the tiny model with random weights, built in-process
# Embedded checkpoint folders, by name: the tiny DiT trained on the SO-100 grasp task (`lingbot-edge train`,
# measured by `lingbot-edge demo`). A name wins over a folder of the same name in the working directory.
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
# so100-grasp: the trained tiny SO-100 grasp policy; so100-grasp-2step: its student with 2 action steps
# (`lingbot-edge train distill`, docs/distillation.md).
EMBEDDED_CHECKPOINTS = {"so100-grasp": _ASSETS / "so100-grasp-tiny",
                        "so100-grasp-2step": _ASSETS / "so100-grasp-2step-tiny",
                        "libero-tiny": _ASSETS / "libero-tiny"}


def checkpoint_folder(source: str | Path) -> str | Path:
    """`source` with an embedded checkpoint's name replaced by its folder (anything else unchanged)."""
    return EMBEDDED_CHECKPOINTS.get(source, source) if isinstance(source, str) else source


def read_policy_config(source: str | Path, preset: str | None = None,
                       overrides: Mapping[str, Any] | None = None) -> PolicyConfig:
    """The policy settings of a checkpoint folder or embedded name, read from its headers and JSON files as
    `load_policy` reads them (`policy_config_for`), without building the policy or reading a weight."""
    return policy_config_for(resolve_checkpoint(checkpoint_folder(source)), preset, overrides)


@dataclass(frozen=True)
class EncoderSettings:
    """How `load_policy` builds a checkpoint's frozen encoders (the embedded tiny source builds its own)."""

    prompts: tuple[str, ...] = ()  # encoded now, before the DiT is loaded (later episodes with them never load UMT5)
    text_encoder_device: str | torch.device = "cpu"  # where UMT5 runs on a prompt cache miss
    text_encoder_dtype: torch.dtype = torch.bfloat16  # UMT5's dtype (the prompt cache key includes it)
    vae_dtype: torch.dtype | None = None  # the VAE encoder's dtype (None: the DiT's)
    vae: str | Path | None = None  # another VAE folder in place of the checkpoint's
    text_encoder: str | Path | None = None  # another UMT5 folder in place of the checkpoint's
    tokenizer: str | Path | None = None  # another tokenizer folder in place of the checkpoint's


def load_policy(
    source: str | Path,
    *,
    preset: str | None = None,
    transformer: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    compile: bool | None = None,
    sampler: str = "static",
    seed: int = 0,
    prompt_cache_dir: str | Path | None | bool = None,
    encoders: EncoderSettings = EncoderSettings(),
    record_predicted_video: bool | None = None,
    **overrides: Any,
):
    """The one policy factory: a `LingBotPolicy` from a checkpoint folder, an embedded checkpoint or "tiny".

    A checkpoint is validated from its headers and configs before any weight is read; then the prompt
    embeddings are computed (UMT5 is released before the DiT is loaded, so the two are never in memory
    together), then the DiT, then the VAE encoder. `policy.memory_report` holds the GPU bytes allocated
    after each stage and the text encoder's release numbers.

    Args:
        source: a checkpoint folder (released layout, LeRobot layout, a user's post-trained checkpoint),
            the name of an embedded checkpoint (`EMBEDDED_CHECKPOINTS`: "so100-grasp"), or "tiny" (the
            embedded tiny model with random weights, built in-process; it takes only `preset`, `device`,
            `dtype`, `compile`, `sampler`, `seed` and `overrides`, and refuses the others).
        preset: the default policy settings (`core.config` presets); a checkpoint's own settings come first.
            For "tiny": the preset's robot side on the tiny model (`config.tiny_variant`).
        transformer: another DiT folder in place of the checkpoint's, e.g. a quantized one written by
            `lingbot-edge quantize`.
        device: see `runtime_defaults` (default: CUDA when available, else the CPU).
        dtype: the DiT's dtype, a torch dtype or a name ("bf16", "fp32", ...); see `runtime_defaults`
            (default bf16).
        compile: torch.compile the sampler's forward, on the policy's own thread, and warm it up there (every graph
            compiled before the first episode); see `runtime_defaults` (default: on CUDA only).
        sampler: "static" (fixed shapes, the fast path) or "reference" (the upstream code path).
        seed: the noise generator's seed (`LingBotPolicy.reset` restarts it).
        prompt_cache_dir: the prompt cache's disk tier: None -> `prompt_cache.default_cache_dir()`,
            False -> memory only, else that folder.
        encoders: the frozen encoders' settings and folders (`EncoderSettings`).
        record_predicted_video: keep predicted latents for `io.encoders.save_predicted_video` (default: the
            LeRobot config's `save_predicted_video`, else off).
        **overrides: `PolicyConfig` fields, applied last (`--set key=value` in the CLIs).

    Returns:
        The `LingBotPolicy`, with `load_report` (GPU bytes per stage) and `checkpoint` (the resolved
        `CheckpointLayout`); for "tiny" these are empty and None.

    Raises:
        CheckpointError: the checkpoint folder or one of its parts is missing or inconsistent.
        ValueError: an unknown preset, override or dtype name, or `transformer` with the "tiny" source.

    Example:
        policy = load_policy("so100-grasp", device="cpu", compile=False)
        policy = load_policy("/ckpt/lingbot-va-libero", preset="libero", transformer="/ckpt/libero-int8")
        policy = load_policy("tiny", preset="so100", num_inference_steps=2)  # an override
    """
    device, dtype, compile = runtime_defaults(device, dtype, compile)
    if isinstance(source, str) and source == TINY:
        ignored = {"transformer": transformer is not None, "encoders": encoders != EncoderSettings(),
                   "record_predicted_video": record_predicted_video is not None,
                   "prompt_cache_dir": prompt_cache_dir not in (None, False)}
        if refused := [name for name, given in ignored.items() if given]:
            raise ValueError(f"{', '.join(refused)}: the embedded tiny source builds its parts in-process and takes "
                             "only preset, device, dtype, compile, sampler, seed and policy settings; save it first "
                             "(lingbot_edge.testing.checkpoints.save_tiny_checkpoint) and load that folder")
        cfg = tiny_variant(get_policy_config(preset or TINY))
        cfg = _set_fields(cfg, overrides, "overrides", "overrides") if overrides else cfg
        log.info("policy: embedded tiny model, settings %r on %s/%s (compile=%s)", cfg.name, device,
                 str(dtype).removeprefix("torch."), compile)
        policy = _build_tiny_policy(sampler=sampler, compile=compile, seed=seed, device=str(device), dtype=dtype,
                                    cfg=cfg)
        if compile:  # on the policy's owner thread, which runs every later call
            policy.warm_up()
        return policy

    source = checkpoint_folder(source)
    # 1. Everything validated from headers and configs: no weight read, no device memory.
    layout = resolve_checkpoint(source, vae=encoders.vae, text_encoder=encoders.text_encoder,
                                tokenizer=encoders.tokenizer,
                                transformer=transformer)
    cfg = policy_config_for(layout, preset, overrides)
    vae_dtype = encoders.vae_dtype or dtype
    if record_predicted_video is None:
        record_predicted_video = bool(layout.lerobot_config.get("save_predicted_video", False))
    log.info("policy: %s (%s layout%s), settings %r on %s/%s (compile=%s)", layout.root, layout.kind,
             ", quantized DiT" if layout.quantized else "", cfg.name, device, str(dtype).removeprefix("torch."),
             compile)

    report: dict[str, Any] = {"gpu_allocated_at_start": gpu_memory(device)["allocated"]}
    # 2. Prompt embeddings first: UMT5 (if it runs at all) is gone before the DiT arrives.
    prompt_cache = build_prompt_cache(
        layout, max_sequence_length=cfg.max_sequence_length, device=device, dtype=dtype,
        text_encoder_device=encoders.text_encoder_device, text_encoder_dtype=encoders.text_encoder_dtype,
        cache_dir=prompt_cache_dir,
    )
    if encoders.prompts:
        prompt_cache.precompute(encoders.prompts, negative=cfg.use_cfg)
    report["gpu_allocated_after_prompts"] = gpu_memory(device)["allocated"]
    # 3. The DiT, tensor by tensor.
    if not layout.quantized:
        warn_if_float32(layout.model_config, dtype)
    model = load_dit(layout, dtype, device)
    report["gpu_allocated_after_dit"] = gpu_memory(device)["allocated"]
    # 4. The VAE: read on the CPU, only encoder + quant_conv go to the device (one copy for both streams).
    vae_model = load_vae(layout.vae, dtype=vae_dtype, device="cpu")
    obs_encoder = VAEObservationEncoder(
        StreamingVAEEncoder(vae_model, device=device, dtype=vae_dtype), list(cfg.obs_cam_keys), cfg.height,
        cfg.width, layout=cfg.camera_layout,
    )
    report["gpu_allocated_after_vae"] = gpu_memory(device)["allocated"]
    policy = LingBotPolicy(cfg, model, obs_encoder, prompt_cache, sampler=sampler, compile=compile, seed=seed,
                           record_predicted_video=record_predicted_video)
    policy.load_report = report
    policy.checkpoint = layout
    if compile:  # on the policy's owner thread, which runs every later call
        policy.warm_up()
    return policy
