"""The embedded `tiny` source: a tiny DiT, Wan2.2-family VAE, UMT5 and tokenizer built in-process.

What `load_policy("tiny")` builds (docs/design.md section 4): the real
model classes at stand-in sizes, offline, so the demo, the tests and the CPU benchmarks run without a
checkpoint. diffusers / transformers / tokenizers are imported lazily.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lingbot_edge.core.config import PolicyConfig, get_policy_config
from lingbot_edge.core.policy import LingBotPolicy
from lingbot_edge.io.checkpoint import build_model
from lingbot_edge.io.encoders import ByteTokenizer, StreamingVAEEncoder, UMT5PromptEncoder, VAEObservationEncoder
from lingbot_edge.io.prompt_cache import PromptCache

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel


def build_tiny_vae(
    z_dim: int = 16,
    seed: int = 0,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
) -> AutoencoderKLWan:
    """A ~0.7M-parameter Wan2.2-style VAE (patch 2, 16x spatial, 4x temporal), weights from `seed`.

    `latents_mean` / `latents_std` default to 0 / 1 (identity normalization); tests pass other values
    to exercise the normalization.
    """
    from diffusers import AutoencoderKLWan

    mean = [0.0] * z_dim if latents_mean is None else [float(v) for v in latents_mean]
    std = [1.0] * z_dim if latents_std is None else [float(v) for v in latents_std]
    if len(mean) != z_dim or len(std) != z_dim:
        raise ValueError(
            f"latents_mean/latents_std: expected {z_dim} values each, got {len(mean)}/{len(std)}"
        )
    # Forked RNG: building the model must not disturb the caller's global torch RNG stream.
    # devices=[]: construction happens on CPU, no need to touch (or initialize) CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=8,
            decoder_base_dim=8,
            z_dim=z_dim,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=mean,
            latents_std=std,
        )
    vae.eval().requires_grad_(False)
    logger.debug(
        "built tiny VAE z_dim=%d seed=%d (%d params)", z_dim, seed, sum(p.numel() for p in vae.parameters())
    )
    return vae


def build_tiny_umt5(d_model: int = 32, seed: int = 0) -> UMT5EncoderModel:
    """A 2-layer UMT5 encoder (vocab 256) with weights from `seed`; pairs with `ByteTokenizer`."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=256,
        d_model=d_model,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    model.eval().requires_grad_(False)
    logger.debug("built tiny UMT5 d_model=%d seed=%d", d_model, seed)
    return model


_TINY_CORPUS = (
    "pick up the red block",
    "put the bowl on the plate",
    "open the top drawer and put the cup inside",
    "push the disk to the left",
    "stack the blocks",
    "close the microwave",
    "turn on the stove and put the pot on it",
    "place the hammer on the block",
)


def build_tiny_tokenizer(vocab_size: int = 128) -> Any:
    """A T5-style tokenizer trained offline (no Hub): `tokenizers` Unigram + Metaspace, `</s>` appended.

    Ids 0 / 1 / 2 are `<pad>` / `</s>` / `<unk>` like T5's; all ids are < `vocab_size` (<= 256 pairs it
    with `build_tiny_umt5`). Returns a transformers fast tokenizer; `save_pretrained` writes the
    `tokenizer/` folder that `AutoTokenizer.from_pretrained` reloads.
    """
    import string

    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    if vocab_size < 4 + len(alphabet):
        raise ValueError(f"vocab_size: expected >= {4 + len(alphabet)} (specials, '\u2581' and the ASCII alphabet), "
                         f"got {vocab_size}")
    tok = RawTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(_TINY_CORPUS) * 4, trainer)
    # The trainer picks the same pieces every run, but its EM scores (and so the id order) vary in the
    # last digits between processes. Canonicalize: re-score each piece by its smoothed frequency in the
    # corpus and order ids by (score, piece), so every build is the same tokenizer, id for id.
    specials = ["<pad>", "</s>", "<unk>"]
    pieces = sorted(set(tok.get_vocab()) - set(specials))
    text = "".join("\u2581" + line.replace(" ", "\u2581") for line in _TINY_CORPUS)
    total = sum(text.count(p) for p in pieces) + len(pieces)
    scored = sorted(((math.log((text.count(p) + 1) / total), p) for p in pieces), key=lambda sp: (-sp[0], sp[1]))
    vocab = [(sp, 0.0) for sp in specials] + [(p, sc) for sc, p in scored]
    if len(vocab) > vocab_size:  # pragma: no cover - the trainer respects the cap
        raise RuntimeError(f"tiny tokenizer: trained {len(vocab)} tokens, expected <= {vocab_size}")
    tok = RawTokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(specials)
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)



def save_tiny_frozen_parts(root: str | Path, seed: int = 0, latents_mean: Sequence[float] | None = None,
                           latents_std: Sequence[float] | None = None) -> Path:
    """The tiny frozen parts in the released layout: `vae/` (a Wan2.2-family VAE, z_dim 16, patch 2), `text_encoder/`
    (UMT5, d_model 32) and `tokenizer/`, sized for the tiny DiT; what the embedded checkpoints ship."""
    root = Path(root)
    mc = get_policy_config("tiny").model_config
    build_tiny_vae(z_dim=mc.in_channels, seed=seed, latents_mean=latents_mean,
                   latents_std=latents_std).save_pretrained(str(root / "vae"))
    build_tiny_umt5(d_model=mc.text_dim, seed=seed).save_pretrained(str(root / "text_encoder"))
    build_tiny_tokenizer().save_pretrained(str(root / "tokenizer"))
    return root


def _build_tiny_policy(sampler: str = "static", compile: bool = True, seed: int = 0,
                      device: str = "cpu", dtype: torch.dtype = torch.float32,
                      cfg: PolicyConfig | None = None) -> LingBotPolicy:
    """What `load_policy("tiny")` returns: tiny DiT + tiny VAE / UMT5 / byte tokenizer, all built in-process.
    `cfg`: a config of the tiny model (default the `tiny` preset; e.g. SO-100 cameras and channels)."""
    cfg = cfg or get_policy_config("tiny")
    if cfg.model != "tiny":
        raise ValueError(f"cfg: model {cfg.model!r} needs a checkpoint (only the tiny model is embedded)")
    mc = cfg.model_config
    model = build_model(mc, dtype=dtype, device=device, seed=seed)
    vae = StreamingVAEEncoder(build_tiny_vae(z_dim=mc.in_channels, seed=seed), device=device, dtype=torch.float32)
    obs_encoder = VAEObservationEncoder(vae, list(cfg.obs_cam_keys), cfg.height, cfg.width, layout=cfg.camera_layout)

    def umt5_factory() -> UMT5PromptEncoder:  # built on a miss, released after: same lifetime as a real UMT5
        umt5 = build_tiny_umt5(d_model=mc.text_dim, seed=seed)
        return UMT5PromptEncoder(umt5, ByteTokenizer(), cfg.max_sequence_length, device=device, dtype=dtype)

    prompts = PromptCache(umt5_factory, fingerprint=f"tiny-byte-umt5-seed{seed}", text_dim=mc.text_dim,
                          max_sequence_length=cfg.max_sequence_length, encoder_dtype=dtype, device=device,
                          dtype=dtype)
    return LingBotPolicy(cfg, model, obs_encoder, prompts, sampler=sampler, compile=compile, seed=seed)

