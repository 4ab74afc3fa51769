"""Real checkpoint layouts (lingbot_edge/loading.py): the tiny checkpoint in the released layout and as a
LeRobot policy folder, loaded through the real code path; bad folders fail early with clear messages."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.core.policy import LingBotPolicy, PromptMemo
from lingbot_edge.io import checkpoint, loading
from lingbot_edge.io.checkpoint import build_model
from lingbot_edge.io.encoders import (
    HFTokenizer,
    StreamingVAEEncoder,
    UMT5PromptEncoder,
    VAEObservationEncoder,
    save_predicted_video,
)
from lingbot_edge.io.layout import CheckpointError, resolve_checkpoint
from lingbot_edge.io.loading import EncoderSettings, load_policy
from lingbot_edge.io.tiny import build_tiny_tokenizer, build_tiny_umt5, build_tiny_vae
from lingbot_edge.testing.checkpoints import save_tiny_checkpoint
from lingbot_edge.testing.toy import toy_episode

F32 = {"device": "cpu", "dtype": torch.float32, "encoders": EncoderSettings(text_encoder_dtype=torch.float32),
       "compile": False}


def run_episode(policy, chunks, seed=0, prompt="pick up the red block"):
    """Closed loop on the toy scene; returns each chunk's actions."""
    return [out["actions"] for out in toy_episode(policy, chunks, prompt, seed=seed)]


def in_process_policy(ckpt_vae_config) -> LingBotPolicy:
    """The same tiny stand-ins built in memory (not read from disk): the independent reference."""
    cfg = get_policy_config("tiny")
    mc = cfg.model_config
    vae = build_tiny_vae(z_dim=16, seed=0, latents_mean=ckpt_vae_config["latents_mean"],
                         latents_std=ckpt_vae_config["latents_std"])
    obs = VAEObservationEncoder(StreamingVAEEncoder(vae), list(cfg.obs_cam_keys), cfg.height, cfg.width)
    prompts = PromptMemo(UMT5PromptEncoder(build_tiny_umt5(d_model=mc.text_dim, seed=0),
                                       HFTokenizer(build_tiny_tokenizer()), cfg.max_sequence_length))
    return LingBotPolicy(cfg, build_model(mc, seed=0), obs, prompts, sampler="static", compile=False)


@pytest.fixture
def no_loading(monkeypatch):
    """Every weight loader raises: a failing validation must come before any of them."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a weight loader ran before validation finished")

    for name in ("load_dit", "load_vae", "load_text_encoder", "load_tokenizer"):
        monkeypatch.setattr(loading, name, forbidden)
    monkeypatch.setattr(checkpoint, "load_transformer", forbidden)


# ------------------------------------------------------------------------------------------- layouts


def test_resolve_released_layout(tiny_checkpoint):
    layout = resolve_checkpoint(tiny_checkpoint)
    assert layout.kind == "released" and layout.transformer_prefix == ""
    assert layout.model_config == get_policy_config("tiny").model_config
    assert layout.vae == tiny_checkpoint / "vae" and layout.tokenizer == tiny_checkpoint / "tokenizer"
    assert layout.vae_config["z_dim"] == 16 and layout.text_encoder_config["d_model"] == 32
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["text_encoder", "tokenizer", "transformer", "vae"]


def test_frozen_parts_load_bit_identical(tiny_checkpoint):
    layout = resolve_checkpoint(tiny_checkpoint)
    vae = loading.load_vae(layout.vae)
    ref = build_tiny_vae(z_dim=16, seed=0, latents_mean=layout.vae_config["latents_mean"],
                         latents_std=layout.vae_config["latents_std"]).state_dict()
    assert vae.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in vae.state_dict().items())
    assert list(vae.config.latents_std) == layout.vae_config["latents_std"]

    umt5 = loading.load_text_encoder(layout.text_encoder, dtype=torch.float32)
    ref = build_tiny_umt5(d_model=32, seed=0).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in umt5.state_dict().items())

    tok = loading.load_tokenizer(layout.tokenizer)
    ids, mask = tok(["pick up the red block", ""], max_length=512)
    ref_ids, ref_mask = HFTokenizer(build_tiny_tokenizer())(["pick up the red block", ""], max_length=512)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert ids.shape == (2, 512) and int(ids.max()) < 256  # within the tiny UMT5's vocabulary
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and mask[1].sum() == 1  # eos, pad; "" -> eos only


def test_loaded_vae_streams_like_whole_clip(tiny_checkpoint):
    """1 + 4k frames (k = 3) streamed in chunks of 1, 4, 8 frames through the VAE read from vae/ equal
    diffusers' whole-clip encode. Tolerance 1e-5: the same kernels run on the same chunk shapes (exact in
    practice on CPU); the slack only allows a backend to pick another conv algorithm per call."""
    vae = loading.load_vae(tiny_checkpoint / "vae")
    x = torch.rand(2, 3, 13, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    enc = StreamingVAEEncoder(vae)
    out = torch.cat([enc.encode(x[:, :, a:b]) for a, b in ((0, 1), (1, 5), (5, 13))], dim=2)
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    ref = (mu - mean) / std
    assert out.shape == ref.shape == (2, 16, 4, 2, 3)
    assert (out - ref).abs().max().item() <= 1e-5


def test_policy_runs_10_chunks_from_released_layout(tiny_checkpoint, tmp_path):
    policy = load_policy(tiny_checkpoint, preset="tiny", prompt_cache_dir=tmp_path / "prompts", **F32)
    actions = run_episode(policy, 10)
    cfg = policy.cfg
    assert [a.shape for a in actions] == [(4, 6)] + [(8, 6)] * 9
    assert all(np.isfinite(a).all() for a in actions)
    assert policy.sampler.frame_start == 10 * cfg.frame_chunk_size
    # Independent reference: the same stand-ins built in memory. Same weights, same fp32 CPU kernels:
    # the loaded policy must produce exactly the same actions (any loading, layout or tokenizer slip
    # would change them).
    ref = run_episode(in_process_policy(policy.checkpoint.vae_config), 10)
    for a, b in zip(actions, ref, strict=True):
        np.testing.assert_array_equal(a, b)
    report = policy.memory_report
    assert report["device"] == "cpu" and report["gpu_allocated_after_dit"] is None
    assert report["prompt"]["text_encoder_loads"] == 1 and report["prompt"]["gpu_freed_bytes"] is None


def test_lerobot_layout_matches_released(tiny_checkpoint, tmp_path):
    policy_dir = save_tiny_checkpoint(tmp_path / "lerobot_policy", seed=0, layout="lerobot",
                                      frozen_from=tiny_checkpoint)
    conf = json.loads((policy_dir / "config.json").read_text())
    assert conf["type"] == "lingbot_va" and conf["num_layers"] == 2
    assert sorted(p.name for p in policy_dir.iterdir()) == [
        "config.json", "model.safetensors", "policy_postprocessor.json",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors"]
    layout = resolve_checkpoint(policy_dir)
    assert layout.kind == "lerobot" and layout.transformer_prefix == "transformer."
    assert layout.vae == tiny_checkpoint / "vae"
    assert layout.policy_fields["obs_cam_keys"] == get_policy_config("tiny").obs_cam_keys

    dit = loading.load_dit(layout, torch.float32, "cpu")
    ref = checkpoint.load_transformer(tiny_checkpoint / "transformer", dtype=torch.float32)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in dit.state_dict().items())

    a = run_episode(load_policy(policy_dir, preset="tiny", prompt_cache_dir=False, **F32), 3)
    b = run_episode(load_policy(tiny_checkpoint, preset="tiny", prompt_cache_dir=False, **F32), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)

    # A relative wan_pretrained_path is relative to the policy folder.
    conf["wan_pretrained_path"] = "../" + tiny_checkpoint.name
    shutil.copytree(policy_dir, tiny_checkpoint.parent / "rel_policy", dirs_exist_ok=True)
    (tiny_checkpoint.parent / "rel_policy" / "config.json").write_text(json.dumps(conf))
    assert resolve_checkpoint(tiny_checkpoint.parent / "rel_policy").vae == tiny_checkpoint.parent / "rel_policy" / (
        "../" + tiny_checkpoint.name) / "vae"


def test_lerobot_config_fields_override_preset(tiny_checkpoint, tmp_path):
    policy_dir = save_tiny_checkpoint(tmp_path / "p", layout="lerobot", frozen_from=tiny_checkpoint)
    conf = json.loads((policy_dir / "config.json").read_text())
    conf.update(num_inference_steps=3, used_action_channel_ids=[0, 1, 2])
    (policy_dir / "config.json").write_text(json.dumps(conf))
    _write_action_quantiles(policy_dir, [-2.0, -3.0, -4.0], [2.0, 3.0, 4.0])  # LeRobot: used channels only
    policy = load_policy(policy_dir, preset="tiny", prompt_cache_dir=False, **F32)
    assert policy.cfg.num_inference_steps == 3 and policy.cfg.used_action_channel_ids == (0, 1, 2)
    tiny = get_policy_config("tiny")
    assert policy.cfg.action_q01 == (-2.0, -3.0, -4.0) + tiny.action_q01[3:]
    assert policy.cfg.action_q99 == (2.0, 3.0, 4.0) + tiny.action_q99[3:]
    assert run_episode(policy, 1)[0].shape == (4, 3)
    # Overrides (the CLIs' --set) come last: they beat the checkpoint's own settings.
    kept = load_policy(policy_dir, preset="tiny", prompt_cache_dir=False, num_inference_steps=4, **F32)
    assert kept.cfg.num_inference_steps == 4 and kept.cfg.used_action_channel_ids == (0, 1, 2)


def _write_action_quantiles(policy_dir, q01, q99):
    from safetensors.torch import save_file

    state = next(policy_dir.glob("policy_postprocessor_step_*_unnormalizer_processor.safetensors"))
    save_file({"action.q01": torch.tensor(q01), "action.q99": torch.tensor(q99)}, str(state))


def test_lerobot_action_quantiles_are_checked(tiny_checkpoint, tmp_path):
    policy_dir = save_tiny_checkpoint(tmp_path / "p", layout="lerobot", frozen_from=tiny_checkpoint)
    # The post-processor written like LeRobot's reproduces the preset's quantiles exactly.
    policy = load_policy(policy_dir, preset="tiny", prompt_cache_dir=False, **F32)
    assert policy.cfg.action_q01 == pytest.approx(get_policy_config("tiny").action_q01)
    _write_action_quantiles(policy_dir, [0.0] * 4, [1.0] * 4)  # 4 values for 6 used channels
    with pytest.raises(CheckpointError, match=r"policy_postprocessor.json: action q01/q99 have 4 values, expected 6"):
        load_policy(policy_dir, preset="tiny", prompt_cache_dir=False, **F32)
    _write_action_quantiles(policy_dir, [1.0] * 6, [0.0] * 6)
    with pytest.raises(CheckpointError, match="q99 >= q01"):
        load_policy(policy_dir, preset="tiny", prompt_cache_dir=False, **F32)


def test_lerobot_frozen_parts_inside_policy_folder(tmp_path):
    # Default wan_pretrained_path is a Hub id: the parts bundled in the policy folder are used instead.
    policy_dir = save_tiny_checkpoint(tmp_path / "bundled", layout="lerobot")
    layout = resolve_checkpoint(policy_dir)
    assert layout.vae == policy_dir / "vae" and layout.tokenizer == policy_dir / "tokenizer"
    shutil.rmtree(policy_dir / "vae")
    with pytest.raises(CheckpointError, match=r"wan_pretrained_path 'robbyant/lingbot-va-base' is not a local folder"):
        resolve_checkpoint(policy_dir)
    # Explicit folders for the frozen parts need no wan_pretrained_path.
    layout = resolve_checkpoint(policy_dir, vae=tmp_path / "elsewhere_vae", text_encoder=policy_dir / "text_encoder",
                                tokenizer=policy_dir / "tokenizer", parts=("transformer", "text_encoder", "tokenizer"))
    assert layout.kind == "lerobot" and layout.vae is None


def test_robotwin_tshape_policy_runs(tiny_checkpoint):
    keys = ("observation.images.cam_high", "observation.images.cam_left_wrist", "observation.images.cam_right_wrist")
    policy = load_policy(tiny_checkpoint, preset="tiny", prompt_cache_dir=False,
                         camera_layout="robotwin_tshape", obs_cam_keys=keys, **F32)
    assert policy.cfg.latent_hw == (6, 4) and policy.obs_encoder.latent_hw == (6, 4)
    assert policy.obs_encoder.wrist_encoder is not None
    assert policy.obs_encoder.wrist_encoder.vae is policy.obs_encoder.vae_encoder.vae  # one set of weights
    actions = run_episode(policy, 3)
    assert [a.shape for a in actions] == [(4, 6), (8, 6), (8, 6)] and all(np.isfinite(a).all() for a in actions)


def test_save_predicted_video(tiny_checkpoint, tmp_path):
    import imageio.v2 as imageio

    policy = load_policy(tiny_checkpoint, preset="tiny", prompt_cache_dir=False, **F32)
    assert not policy.record_predicted_video  # off by default
    run_episode(policy, 1)
    with pytest.raises(RuntimeError, match="record_predicted_video=True"):
        save_predicted_video(policy, tmp_path / "x.mp4")

    policy = load_policy(tiny_checkpoint, preset="tiny", prompt_cache_dir=False, record_predicted_video=True, **F32)
    run_episode(policy, 3)
    assert [tuple(x.shape) for x in policy.predicted_latents] == [(1, 16, 2, 4, 8)] * 3
    path = save_predicted_video(policy, tmp_path / "pred" / "episode.mp4", fps=5)
    frames = np.stack(imageio.mimread(path))
    # 6 latent frames -> 1 + 4 * 5 video frames; 2 cameras side by side at 64x64.
    assert frames.shape == (21, 64, 128, 3) and frames.dtype == np.uint8
    assert not list((tmp_path / "pred").glob(".*"))  # no temporary file left behind


# -------------------------------------------------------------------------------------- bad folders


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "ckpt")


def _truncate(path, keep=0.9):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _add_token_300(root):
    path = root / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["added_tokens"].append({"id": 300, "content": "<x>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(tok))


BAD = {
    "missing vae": (lambda r: shutil.rmtree(r / "vae"), r"ckpt/vae: missing vae/ folder \(expected a diffusers "
                    r"AutoencoderKLWan folder: config.json \+ diffusion_pytorch_model.safetensors\)"),
    "missing tokenizer": (lambda r: shutil.rmtree(r / "tokenizer"), r"ckpt/tokenizer: missing tokenizer/ folder"),
    "missing text_encoder weights": (lambda r: (r / "text_encoder" / "model.safetensors").unlink(),
                                     r"ckpt/text_encoder: no \*.safetensors weights"),
    "transformer config not JSON": (lambda r: (r / "transformer" / "config.json").write_text("{oops"),
                                    r"transformer/config.json: not valid JSON"),
    "transformer config unknown key": (lambda r: _edit_json(r / "transformer" / "config.json", num_blocks=2),
                                       r"transformer/config.json: unknown transformer config keys \['num_blocks'\]"),
    "transformer config wrong size": (lambda r: _edit_json(r / "transformer" / "config.json", ffn_dim=128),
                                      r"ckpt/transformer: tensor blocks.0.ffn.net.0.proj.bias has shape \[64\], "
                                      r"expected \[128\] for the LingBot-VA transformer of config.json"),
    "vae config wrong z_dim": (lambda r: _edit_json(r / "vae" / "config.json", z_dim=48),
                               r"vae/config.json: z_dim is 48, expected 16 \(the DiT's in_channels\)"),
    "vae config wrong class": (lambda r: _edit_json(r / "vae" / "config.json", _class_name="AutoencoderKL"),
                               r"_class_name is 'AutoencoderKL', expected 'AutoencoderKLWan'"),
    "text encoder is T5": (lambda r: _edit_json(r / "text_encoder" / "config.json", model_type="t5"),
                           r"text_encoder/config.json: model_type is 't5', expected 'umt5'"),
    "text encoder d_model": (lambda r: _edit_json(r / "text_encoder" / "config.json", d_model=64),
                             r"d_model is 64, expected 32 \(the DiT's text_dim\)"),
    "tokenizer too big for encoder": (_add_token_300, r"tokenizer.json: produces token ids up to 300, but the "
                                      r"text encoder's vocab_size is 256"),
    "truncated transformer": (lambda r: _truncate(r / "transformer" / "diffusion_pytorch_model.safetensors"),
                              r"diffusion_pytorch_model.safetensors: unreadable safetensors file .*truncated"),
    "truncated vae": (lambda r: _truncate(r / "vae" / "diffusion_pytorch_model.safetensors", 0.999),
                      r"vae/diffusion_pytorch_model.safetensors: unreadable safetensors file"),
    "truncated text encoder": (lambda r: _truncate(r / "text_encoder" / "model.safetensors", 0.5),
                               r"text_encoder/model.safetensors: unreadable safetensors file"),
    "not a checkpoint": (lambda r: [shutil.rmtree(r / p) for p in ("transformer", "vae")],
                         r"ckpt: neither a transformer/ folder nor a config.json \(expected the released layout"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folder_fails_before_loading(case, tiny_checkpoint, tmp_path, no_loading):
    root = _copy(tiny_checkpoint, tmp_path)
    damage, message = BAD[case]
    damage(root)
    with pytest.raises(CheckpointError, match=message):
        load_policy(root, preset="tiny", prompt_cache_dir=False, **F32)


def test_bad_lerobot_config(tiny_checkpoint, tmp_path, no_loading):
    policy_dir = save_tiny_checkpoint(tmp_path / "p", layout="lerobot", frozen_from=tiny_checkpoint)
    _edit_json(policy_dir / "config.json", type="pi0")
    with pytest.raises(CheckpointError, match=r"p/config.json: \"type\" is 'pi0', expected \"lingbot_va\""):
        load_policy(policy_dir, preset="tiny", **F32)
    _edit_json(policy_dir / "config.json", type="lingbot_va", attention_head_dim=25)
    with pytest.raises(CheckpointError, match="invalid LingBot-VA architecture fields.*attention_head_dim"):
        load_policy(policy_dir, preset="tiny", **F32)
    _edit_json(policy_dir / "config.json", attention_head_dim=24, height=50)
    with pytest.raises(CheckpointError, match="config.json: the policy settings do not fit preset 'tiny'.*height"):
        load_policy(policy_dir, preset="tiny", **F32)
    _edit_json(policy_dir / "config.json", height=64)
    (policy_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"p: no model.safetensors \(expected the LeRobot policy weights"):
        load_policy(policy_dir, preset="tiny", **F32)


def test_tiny_checkpoint_takes_a_full_presets_robot_side(tiny_checkpoint):
    # A tiny checkpoint takes a full-model preset's robot side on its own DiT (config.tiny_variant).
    policy = load_policy(tiny_checkpoint, preset="libero", prompt_cache_dir=False, **F32)
    assert policy.cfg.model == "tiny" and policy.cfg.obs_cam_keys == get_policy_config("libero").obs_cam_keys
    assert policy.cfg.used_action_channel_ids == tuple(range(7))  # 0-5 + 28 packed into the tiny 8


def test_preset_must_match_checkpoint(tiny_checkpoint, tmp_path, no_loading):
    # A full-size DiT under the tiny preset: refused with both architectures named (from the layout only).
    from dataclasses import replace

    from lingbot_edge.core.config import MODEL_PRESETS
    from lingbot_edge.io.loading import policy_config_for

    layout = replace(resolve_checkpoint(tiny_checkpoint), model_config=MODEL_PRESETS["full"])
    with pytest.raises(CheckpointError, match=r"does not match preset 'tiny' \(model 'tiny'\).*"
                                              r"it is model preset 'full'"):
        policy_config_for(layout, "tiny")
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_policy(tiny_checkpoint / "nope", preset="tiny", **F32)


@pytest.mark.gpu  # without CUDA this fails (tests/conftest.py): never a green skip
def test_bad_folder_takes_no_gpu_memory(tiny_checkpoint, tmp_path):
    root = _copy(tiny_checkpoint, tmp_path)
    _truncate(root / "text_encoder" / "model.safetensors", 0.5)
    before = torch.cuda.memory_allocated()
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_policy(root, preset="tiny", device="cuda", prompt_cache_dir=False)
    assert torch.cuda.memory_allocated() == before


@pytest.mark.parametrize("kwargs", [{"transformer": "dit"}, {"encoders": EncoderSettings(vae_dtype=torch.float32)},
                                    {"record_predicted_video": True}, {"prompt_cache_dir": "prompts"}],
                         ids=["transformer", "encoders", "record_predicted_video", "prompt_cache_dir"])
def test_the_tiny_source_refuses_what_it_would_ignore(kwargs):
    with pytest.raises(ValueError, match=f"^{next(iter(kwargs))}: the embedded tiny source builds its parts"):
        load_policy("tiny", device="cpu", compile=False, **kwargs)
    assert load_policy("tiny", device="cpu", compile=False, prompt_cache_dir=False).cfg.name.startswith("tiny")
