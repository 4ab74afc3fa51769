"""Frozen encoders (lingbot_edge/io/encoders.py) against independent references: diffusers' own whole-clip
`AutoencoderKLWan.encode` for the VAE and a direct UMT5 forward for the prompt encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lingbot_edge.io.encoders import (
    ByteTokenizer,
    HFTokenizer,
    StreamingVAEEncoder,
    UMT5PromptEncoder,
    VAEObservationEncoder,
    clean_prompt,
    decode_latents,
    write_mp4,
)
from lingbot_edge.io.tiny import build_tiny_tokenizer, build_tiny_umt5, build_tiny_vae

Z = 16
# Streaming vs whole-clip runs the very same kernels on the same chunk shapes (diffusers' `_encode`
# also walks 1, 4, 4 frames), so they agree exactly in practice on CPU; 1e-5 leaves room for a backend
# that picks a different conv algorithm per call while still catching any cache or layout bug
# (latents here are O(0.1..1)).
ATOL = 1e-5


@pytest.fixture(scope="module")
def vae():
    # Non-trivial normalization so (mu - mean) / std is actually exercised.
    g = torch.Generator().manual_seed(123)
    mean = (torch.randn(Z, generator=g) * 0.1).tolist()
    std = (torch.rand(Z, generator=g) * 0.5 + 0.1).tolist()
    return build_tiny_vae(z_dim=Z, seed=0, latents_mean=mean, latents_std=std)


def reference_latents(vae, video: torch.Tensor) -> torch.Tensor:
    """Whole-clip encode through diffusers' public API, normalized from the config."""
    with torch.no_grad():
        mu = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (mu - mean) / std


def rand_video(n: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rand_frames(t: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- VAE


def test_tiny_vae_deterministic_and_frozen(vae):
    other = build_tiny_vae(
        z_dim=Z, seed=0, latents_mean=vae.config.latents_mean, latents_std=vae.config.latents_std
    )
    different = build_tiny_vae(z_dim=Z, seed=1).state_dict()
    other = other.state_dict()
    assert all(torch.equal(v, other[k]) for k, v in vae.state_dict().items())
    assert any(not torch.equal(v, different[k]) for k, v in vae.state_dict().items())
    assert not vae.training and all(not p.requires_grad for p in vae.parameters())
    # The build must not consume the caller's RNG stream.
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_vae(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_streaming_matches_whole_clip(vae):
    x = rand_video(2, 9, 32, 48)  # 1 + 4k frames, k = 2
    ref = reference_latents(vae, x)
    assert ref.shape == (2, Z, 3, 2, 3)

    enc = StreamingVAEEncoder(vae)
    outs = [enc.encode(x[:, :, :1]), enc.encode(x[:, :, 1:5]), enc.encode(x[:, :, 5:9])]
    assert [o.shape[2] for o in outs] == [1, 1, 1]
    assert (torch.cat(outs, dim=2) - ref).abs().max().item() <= ATOL

    # reset() starts a new stream: first frame again -> same latent as the first time.
    enc.reset()
    again = enc.encode(x[:, :, :1])
    assert (again - outs[0]).abs().max().item() <= ATOL
    # 8 frames in one call (k = 2) continue the stream the same way as two 4-frame calls.
    assert (enc.encode(x[:, :, 1:9]) - ref[:, :, 1:]).abs().max().item() <= ATOL


def test_streaming_bf16_close_to_fp32(vae):
    import copy

    x = rand_video(1, 5, 32, 32, seed=3)
    ref = reference_latents(vae, x)
    enc = StreamingVAEEncoder(copy.deepcopy(vae), dtype=torch.bfloat16)
    out = torch.cat([enc.encode(x[:, :, :1]), enc.encode(x[:, :, 1:])], dim=2)
    assert out.dtype == torch.bfloat16
    # The noise floor: diffusers' own whole-clip encode with the VAE in bf16, against the same fp32
    # reference. Measured over 4 clips (latents up to |3.8|): ours max 0.009-0.018 / RMS 0.0023-0.0038,
    # diffusers' bf16 max 0.009-0.020 / RMS 0.0022-0.0038; ratios ours / theirs <= 1.54 (max) and
    # <= 1.13 (RMS). Bounds: 3x their max and 1.5x their RMS; a cast or normalization bug is O(0.1..1).
    bf16_vae = copy.deepcopy(vae).to(torch.bfloat16)
    with torch.no_grad():
        mu = bf16_vae.encode(x.bfloat16()).latent_dist.mode().float()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    theirs, ours = (mu - mean) / std - ref, out.float() - ref
    assert ours.abs().max() <= 3 * theirs.abs().max(), (ours.abs().max(), theirs.abs().max())
    assert ours.pow(2).mean().sqrt() <= 1.5 * theirs.pow(2).mean().sqrt()


def test_patchify_fallback_matches_diffusers():
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

    from lingbot_edge.io.encoders import _patchify_fallback

    x = torch.randn(2, 3, 5, 8, 12)
    assert torch.equal(_patchify_fallback(x, 2), patchify(x, 2))


def test_streaming_rejects_bad_shapes(vae):
    enc = StreamingVAEEncoder(vae)
    with pytest.raises(ValueError, match=r"video.*\[N, 3, 1, H, W\]"):
        enc.encode(rand_video(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"video.*\[N, 3, T, H, W\]"):
        enc.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"video.*\[N, 3, T, H, W\]"):
        enc.encode(torch.zeros(1, 4, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by 16"):
        enc.encode(torch.zeros(1, 3, 1, 24, 32))
    enc.encode(rand_video(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"video.*\[N, 3, 4k, H, W\]"):
        enc.encode(rand_video(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"video.*\[N, 3, 4k, H, W\]"):
        enc.encode(rand_video(1, 1, 32, 32))
    with pytest.raises(ValueError, match="within one stream"):
        enc.encode(rand_video(2, 4, 32, 32))


# -------------------------------------------------------------------------------------- observations


def test_observation_encoder_matches_reference(vae):
    keys = ["image", "image2"]
    h, w = 32, 32
    # Camera 0 is resized (40x56 -> 32x32), camera 1 already has the target size.
    cam0 = [rand_frames(1, 40, 56, seed=0)[0], rand_frames(4, 40, 56, seed=1)]  # single frame as [H, W, 3]
    cam1 = [rand_frames(1, h, w, seed=2), rand_frames(4, h, w, seed=3)]

    obs = VAEObservationEncoder(StreamingVAEEncoder(vae), keys, h, w)
    out = torch.cat(
        [obs.encode({"image": a, "image2": b, "state": None}) for a, b in zip(cam0, cam1, strict=True)], dim=2
    )
    assert out.shape == (1, Z, 2, h // 16, 2 * (w // 16))

    # Independent reference: resize + scale by hand, whole-clip diffusers encode, width concat.
    def prep(frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return (x / 255 * 2 - 1).transpose(0, 1).unsqueeze(0)  # [1, 3, T, H, W]

    clip0 = prep(np.concatenate([cam0[0][None], cam0[1]]))
    clip1 = prep(np.concatenate(cam1))
    ref = torch.cat([reference_latents(vae, clip0), reference_latents(vae, clip1)], dim=-1)
    assert (out - ref).abs().max().item() <= ATOL

    # Batch rows are independent in the VAE: camera 0 alone through a fresh encoder = the left half.
    single = VAEObservationEncoder(StreamingVAEEncoder(vae), ["image"], h, w)
    alone = torch.cat([single.encode({"image": f}) for f in cam0], dim=2)
    assert alone.shape[-1] * 2 == out.shape[-1]
    assert (out[..., : alone.shape[-1]] - alone).abs().max().item() <= ATOL

    # reset() restarts the stream.
    obs.reset()
    first = obs.encode({"image": cam0[0], "image2": cam1[0]})
    assert (first - out[:, :, :1]).abs().max().item() <= ATOL


def test_observation_encoder_rejects_bad_input(vae):
    obs = VAEObservationEncoder(StreamingVAEEncoder(vae), ["image", "image2"], 32, 32)
    good = rand_frames(1, 32, 32, seed=0)
    with pytest.raises(ValueError, match=r"'image2'.*expected keys \['image', 'image2'\]"):
        obs.encode({"image": good})
    with pytest.raises(ValueError, match=r"'image2'.*\[T, H, W, 3\] uint8.*float32"):
        obs.encode({"image": good, "image2": good.astype(np.float32) / 255})
    with pytest.raises(ValueError, match=r"'image'.*\[T, H, W, 3\] uint8.*\[1, 32, 32, 4\]"):
        obs.encode({"image": np.zeros((1, 32, 32, 4), np.uint8), "image2": good})
    with pytest.raises(ValueError, match=r"'image'.*\[T, H, W, 3\] uint8"):
        obs.encode({"image": torch.zeros(2, 1, 32, 32, 3, dtype=torch.uint8), "image2": good})
    with pytest.raises(ValueError, match="same number of frames"):
        obs.encode({"image": good, "image2": rand_frames(2, 32, 32, seed=1)})
    with pytest.raises(ValueError, match="multiples of 16"):
        VAEObservationEncoder(StreamingVAEEncoder(vae), ["image"], 24, 32)


# ------------------------------------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def umt5():
    return build_tiny_umt5(d_model=32, seed=0)


def test_clean_prompt():
    assert clean_prompt("  pick &amp;amp; place\n\tthe  &lt;red&gt; block ") == "pick & place the <red> block"


def test_byte_tokenizer():
    ids, mask = ByteTokenizer()(["ab", "", "é"], max_length=4)
    # 'a' = 97 -> 97 % 253 + 3 = 100; 'é' = c3 a9 -> 195 + 3, 169 + 3; eos = 1; pad = 0.
    assert ids.tolist() == [[100, 101, 1, 0], [1, 0, 0, 0], [198, 172, 1, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = ByteTokenizer()(["abcdef"], max_length=4)  # truncated, eos kept last
    assert ids.tolist() == [[100, 101, 102, 1]] and mask.tolist() == [[1, 1, 1, 1]]


def test_prompt_encoder_matches_direct_umt5(umt5):
    enc = UMT5PromptEncoder(umt5, ByteTokenizer(), max_sequence_length=512)
    prompt = "  put the &amp; bowl\non the plate "
    out = enc.encode(prompt)
    assert out.shape == (1, 512, 32) and out.dtype == torch.float32

    ids, mask = ByteTokenizer()([clean_prompt(prompt)], max_length=512)
    n = int(mask.sum())
    assert n == len("put the & bowl on the plate") + 1
    assert torch.count_nonzero(out[:, n:]) == 0  # exactly zero past the real length
    with torch.no_grad():
        direct = umt5(input_ids=ids, attention_mask=mask).last_hidden_state
        unpadded = umt5(input_ids=ids[:, :n]).last_hidden_state  # no padding at all
    assert torch.equal(out[:, :n], direct[:, :n])
    # Masked padding must not influence the real positions.
    assert (out[:, :n] - unpadded).abs().max().item() <= 1e-5
    assert out[:, :n].abs().amin(dim=-1).gt(0).all()  # real positions are not zeroed

    assert torch.equal(enc.encode(prompt), out)  # deterministic, bit-identical


def test_prompt_encoder_pair_and_dtype(umt5):
    enc = UMT5PromptEncoder(umt5, ByteTokenizer(), max_sequence_length=64, dtype=torch.bfloat16)
    cond, uncond = enc.encode_pair("open the drawer", use_cfg=False)
    assert uncond is None and cond.shape == (1, 64, 32) and cond.dtype == torch.bfloat16

    cond2, uncond = enc.encode_pair("open the drawer", use_cfg=True)
    assert torch.equal(cond, cond2)
    assert torch.equal(uncond, enc.encode(""))
    # Empty prompt = just eos: one real position, zeros after.
    assert torch.count_nonzero(uncond[:, 0]) > 0 and torch.count_nonzero(uncond[:, 1:]) == 0


def test_hf_tokenizer_adapter(umt5):
    hf = build_tiny_tokenizer()
    ids, mask = HFTokenizer(hf)(["pick up the block", ""], max_length=12)
    assert ids.shape == mask.shape == (2, 12)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and ids[1, 0] == 1 and mask[1].sum() == 1

    out = UMT5PromptEncoder(umt5, HFTokenizer(hf), max_sequence_length=12).encode("pick up the block")
    assert torch.count_nonzero(out[:, n:]) == 0 and out[:, :n].abs().amin(dim=-1).gt(0).all()
    # encode_trimmed = the real positions of encode, nothing else.
    trimmed = UMT5PromptEncoder(umt5, HFTokenizer(hf), max_sequence_length=12).encode_trimmed("pick up the block")
    assert trimmed.shape == (n, 32) and torch.equal(trimmed, out[0, :n])


def test_tiny_tokenizer_offline_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tiny_tokenizer()
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    text = ["turn on the stove, then Pick UP the #7 block!", ""]
    a = HFTokenizer(tok)(text, max_length=32)
    b = HFTokenizer(again)(text, max_length=32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int(a[0].max()) < 128 and (a[0][0] != 2).all()  # in the tiny vocabulary, no <unk> for ASCII
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()  # deterministic training
    # Truncation keeps eos as the last real token, like T5.
    ids, mask = HFTokenizer(tok)(["pick up the red block " * 10], max_length=8)
    assert mask.sum() == 8 and ids[0, -1] == 1


# ------------------------------------------------------------------------------ robotwin T-shape


def test_tshape_matches_reference(vae):
    keys = ["head", "left", "right"]
    h, w = 64, 96
    enc = VAEObservationEncoder(StreamingVAEEncoder(vae), keys, h, w, layout="robotwin_tshape")
    assert enc.latent_hw == (6, 6)
    assert enc.wrist_encoder is not None and enc.wrist_encoder.vae is vae
    # Inputs at other sizes than the targets (every camera is resized), 1 + 4 + 4 frames.
    clips = {k: rand_frames(9, 48, 80, seed=i) for i, k in enumerate(keys)}
    chunks = [slice(0, 1), slice(1, 5), slice(5, 9)]
    out = torch.cat([enc.encode({k: v[c] for k, v in clips.items()}) for c in chunks], dim=2)
    assert out.shape == (1, Z, 3, 6, 6)

    def prep(frames, size):
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x / 255 * 2 - 1).transpose(0, 1).unsqueeze(0)

    # Independent reference: whole clips through diffusers, assembled by hand as upstream `_encode_obs`.
    head = reference_latents(vae, prep(clips["head"], (h, w)))  # [1, z, 3, 4, 6]
    left = reference_latents(vae, prep(clips["left"], (h // 2, w // 2)))  # [1, z, 3, 2, 3]
    right = reference_latents(vae, prep(clips["right"], (h // 2, w // 2)))
    ref = torch.cat([torch.cat([left, right], dim=-1), head], dim=-2)
    assert (out - ref).abs().max().item() <= ATOL

    # The two streams have separate causal caches: reset() restarts both.
    enc.reset()
    assert (enc.encode({k: v[:1] for k, v in clips.items()}) - ref[:, :, :1]).abs().max().item() <= ATOL


def test_tshape_rejects_bad_setup(vae):
    with pytest.raises(ValueError, match="robotwin_tshape expects 3 keys"):
        VAEObservationEncoder(StreamingVAEEncoder(vae), ["a", "b"], 64, 64, layout="robotwin_tshape")
    with pytest.raises(ValueError, match="multiples of 32 for robotwin_tshape"):
        VAEObservationEncoder(StreamingVAEEncoder(vae), ["a", "b", "c"], 48, 64, layout="robotwin_tshape")
    with pytest.raises(ValueError, match="layout: expected one of"):
        VAEObservationEncoder(StreamingVAEEncoder(vae), ["a"], 64, 64, layout="stacked")


def test_streaming_encoder_moves_only_the_encoder():
    import copy

    vae = build_tiny_vae(z_dim=Z)
    StreamingVAEEncoder(copy.deepcopy(vae))  # fp32 -> fp32: nothing changes
    enc = StreamingVAEEncoder(vae, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.encoder.parameters()} == {p.dtype for p in vae.quant_conv.parameters()} == {
        torch.bfloat16}
    # The decoder (4/5 of the full Wan2.2 VAE) stays where and as it was.
    assert {p.dtype for p in vae.decoder.parameters()} == {torch.float32}
    assert enc.encode(rand_video(1, 1, 32, 32)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------ predicted video


def test_decode_latents_matches_diffusers_decode(vae, tmp_path):
    import imageio.v2 as imageio

    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, Z, 3, 2, 4, generator=g)
    frames = decode_latents(vae, latents)
    assert frames.shape == (9, 32, 64, 3) and frames.dtype == np.uint8
    # Independent reference: denormalize by hand, diffusers' public decode, to uint8.
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents * std + mean).sample
    ref = ((video[0].clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(frames, ref)
    assert frames.std() > 1  # not a constant picture

    path = write_mp4(frames, tmp_path / "v.mp4", fps=4)
    assert np.stack(imageio.mimread(path)).shape == frames.shape
    # A smooth moving picture survives H.264 (lossy, 4:2:0) closely: the frames are written in order.
    yy, xx = np.mgrid[0:32, 0:64]
    smooth = np.stack([np.stack([(xx * 4 + 20 * t) % 256, yy * 8, np.full_like(xx, 128)], -1) for t in range(6)])
    back = np.stack(imageio.mimread(write_mp4(smooth.astype(np.uint8), tmp_path / "s.mp4")))
    assert back.shape == smooth.shape and np.abs(back.astype(np.float32) - smooth).mean() < 8
    with pytest.raises(ValueError, match=r"frames: expected uint8 \[T, H, W, 3\]"):
        write_mp4(frames.astype(np.float32), tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match=r"latents: expected a tensor \[1, 16, T, h, w\]"):
        decode_latents(vae, latents[:, :8])
