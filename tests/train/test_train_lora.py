"""LoRA post-training (`train.lora`, `train fit --base`): adapters over a frozen bf16 or int8 base, the int8
base's gradient, the merge, the trainer's parameter filter, and a short post-training run whose merged
checkpoint loads, runs and quantizes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.core.qlinear import QuantizedLinear
from lingbot_edge.io.checkpoint import build_model
from train.lora import AdapterConfig, add_adapters, frozen_quantized_linear, lora_layers, merge

CONFIG = get_policy_config("tiny").model_config


def _randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """B is zero after injection (the model unchanged); give it values so the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        w = layer.lora_B["default"].weight
        w.data = torch.randn(w.shape, generator=g) * 0.2


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 10, CONFIG.dim, generator=torch.Generator().manual_seed(seed))


def test_default_targets_are_the_block_attention_and_ffn_linears():
    model = add_adapters(build_model(CONFIG), AdapterConfig(rank=4))
    names = set(lora_layers(model))
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"}
    assert names == {f"blocks.{i}.{n}" for i in range(CONFIG.num_layers) for n in per_block}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # B = 0: the injected model computes what the base computes
    block = model.blocks[0]
    base = build_model(CONFIG).blocks[0]
    x = _tokens()
    torch.testing.assert_close(block.ffn(x), base.ffn(x))


def test_merge_matches_peft_merge_and_unload():
    """Reference: PEFT's own PeftModel merge of the same adapters into the same fp32 base."""
    from peft import get_peft_model

    from train.lora import peft_config

    base = build_model(CONFIG)
    adapters = AdapterConfig(rank=4, alpha=8.0)
    ours = add_adapters(copy.deepcopy(base), adapters)
    _randomize_adapters(ours)
    reference = get_peft_model(copy.deepcopy(base), peft_config(adapters))
    lora = {k.replace("base_model.model.", ""): v for k, v in reference.state_dict().items() if ".lora_" in k}
    ours_lora = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    assert set(lora) == set(ours_lora)
    reference.load_state_dict({"base_model.model." + k: v for k, v in ours_lora.items()}, strict=False)
    expected = reference.merge_and_unload().state_dict()
    merged = merge(ours, torch.float32).state_dict()
    assert set(merged) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=1e-5)
    assert not torch.equal(merged["blocks.0.attn1.to_q.weight"], base.state_dict()["blocks.0.attn1.to_q.weight"])


def _int8_model() -> nn.Module:
    from quantize import SCHEMES, quantize_

    model = build_model(CONFIG)
    quantize_(model, SCHEMES["int8_weight_only"])
    return model


def test_int8_base_gets_peft_adapters_and_passes_gradients_through_its_frozen_weights():
    model = add_adapters(_int8_model(), AdapterConfig(rank=4, alpha=4.0, base_dtype="int8"))
    _randomize_adapters(model)
    layer = model.blocks[0].ffn.net[0].proj
    base = layer.get_base_layer()
    assert isinstance(base, QuantizedLinear) and type(layer).__name__ == "LoraQuantizedLinear"
    # Reference: the same layer as a dense fp32 Linear of the dequantized weight plus B A, through autograd.
    w = base.dequantized_weight(torch.float32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = _tokens().requires_grad_(True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y_ref = nn.functional.linear(x_ref, w, base.bias) + x_ref @ a_ref.T @ b_ref.T * layer.scaling["default"]
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.grad, a_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad, b_ref.grad, atol=1e-5, rtol=1e-5)
    assert base.weight_qdata.grad is None and base.weight_qdata.dtype == torch.int8


def test_frozen_int8_matmul_in_bf16_is_the_runtime_kernel():
    """bf16 activations on the CPU take the runtime's int8 GEMM (weight_only_matmul); the frozen wrapper gives
    the layer's own output and a gradient of the dequantized weight."""
    layer = _int8_model().to(torch.bfloat16).blocks[1].attn1.to_v
    x = _tokens().to(torch.bfloat16).requires_grad_(True)
    y = frozen_quantized_linear(layer, x)
    torch.testing.assert_close(y, layer(x.detach()))
    y.float().sum().backward()
    expected = layer.dequantized_weight(torch.float32).sum(0).expand_as(x)
    torch.testing.assert_close(x.grad.float(), expected, atol=2e-2, rtol=1e-2)


def test_merged_int8_model_computes_what_the_adapted_one_does():
    model = add_adapters(_int8_model(), AdapterConfig(rank=4, base_dtype="int8"))
    _randomize_adapters(model)
    merged = merge(model, torch.float32)
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    x = _tokens()
    torch.testing.assert_close(merged.blocks[0].ffn(x), model.blocks[0].ffn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.blocks[1].attn2.to_out[0](x), model.blocks[1].attn2.to_out[0](x),
                               atol=1e-5, rtol=1e-5)


def test_checkpointed_blocks_give_the_same_gradients():
    from train.lora import checkpoint_blocks

    model = add_adapters(build_model(CONFIG), AdapterConfig(rank=4))
    _randomize_adapters(model)
    checkpointed = copy.deepcopy(model)
    checkpoint_blocks(checkpointed)
    from lingbot_edge.core.model import NoCache, rope_angles, video_grid_ids

    x = _tokens()
    mod = torch.randn(1, x.shape[1], 6, CONFIG.dim, generator=torch.Generator().manual_seed(4))
    rope = rope_angles(video_grid_ids(1, 2, 5), CONFIG.attention_head_dim)
    text = torch.randn(2, 3, CONFIG.num_attention_heads, CONFIG.attention_head_dim)

    grads = []
    for m in (model, checkpointed):
        out = x
        for blk in m.blocks:
            out = blk(out, mod, rope, (text, text), NoCache())
        out.pow(2).sum().backward()
        # (the cross-attention k/v adapters see the prompt through text_kv, given here: no gradient)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * 8
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_trainer_trains_only_the_adapters(tmp_path):
    from train.pipeline import load_checkpoint_policy
    from train.trainer import EpisodeTensors, TrainConfig, train

    policy = load_checkpoint_policy("so100-grasp")
    cfg = policy.cfg
    model = copy.deepcopy(policy.model).float()
    adapters = AdapterConfig(rank=4)
    add_adapters(model, adapters)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    g = torch.Generator().manual_seed(0)
    mc = cfg.model_config
    h, w = cfg.height // 16, cfg.width // 16
    data = EpisodeTensors(torch.randn(2, 2, mc.in_channels, cfg.frame_chunk_size, h, w, generator=g),
                          torch.randn(2, 2, mc.action_dim, cfg.frame_chunk_size, cfg.action_per_frame, 1, generator=g),
                          torch.randn(2, cfg.max_sequence_length, mc.text_dim, generator=g))
    from train.lora import is_trainable

    tc = TrainConfig(steps=2, batch_size=2, warmup=1, save_every=2)
    train(model, cfg, data, tmp_path, tc, progress=False, trainable=is_trainable(adapters), run={"lora": 4})
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            torch.testing.assert_close(p, frozen[name], atol=0, rtol=0)
    assert any(layer.lora_B["default"].weight.abs().sum() > 0 for layer in lora_layers(model).values())
    with pytest.raises(ValueError, match="different run"):  # a resumed state must be the same run
        train(model, cfg, data, tmp_path, tc, progress=False, trainable=is_trainable(adapters), run={"lora": 8})


@pytest.fixture(scope="module")
def posttrained(tmp_path_factory):
    from train.pipeline import DataSettings, ModelSettings, fit
    from train.trainer import TrainConfig

    out = tmp_path_factory.mktemp("posttrain")
    tc = TrainConfig(steps=3, batch_size=2, warmup=1, save_every=3)
    report = fit(out, DataSettings(scene="place", episodes=2, episode_frames=21),
                 ModelSettings(base="so100-grasp", adapters=AdapterConfig(rank=4, base_dtype="int8")), tc,
                 progress=False)
    return out, report


@pytest.mark.slow
def test_posttrained_checkpoint_loads_runs_and_quantizes(posttrained, tmp_path):
    from lingbot_edge.io.loading import checkpoint_folder, load_policy
    from lingbot_edge.io.quantized import is_quantized_checkpoint
    from quantize import SCHEMES, quantize_checkpoint

    out, report = posttrained
    ckpt = out / "checkpoint"
    base = checkpoint_folder("so100-grasp")
    assert report["scene"] == "place" and report["lora"]["rank"] == 4
    # The frozen parts and the VAE's latent statistics are the base's; the quantiles are the new dataset's.
    assert (ckpt / "vae" / "config.json").read_text() == (base / "vae" / "config.json").read_text()
    stats = json.loads((out / "dataset" / "meta" / "stats.json").read_text())["action"]
    config = json.loads((ckpt / "policy_config.json").read_text())
    assert config["norm_stat"]["q01"][:6] == pytest.approx(stats["q01"])
    tasks = (out / "dataset" / "meta" / "tasks.jsonl").read_text()
    assert "green cube" in tasks
    # The merged DiT is bf16 and is the adapted model's: base weight dequantized + B A.
    policy = load_policy(ckpt, device="cpu", dtype="float32", compile=False, prompt_cache_dir=False)
    state = torch.load(out / "train_state.pt", weights_only=False)["model"]
    key = "blocks.0.ffn.net.2"
    deq = state[f"{key}.base_layer.weight_qdata"].float() * state[f"{key}.base_layer.weight_scale"][:, None]
    delta = state[f"{key}.lora_B.default.weight"] @ state[f"{key}.lora_A.default.weight"]
    expected = (deq + delta * report["lora"]["alpha"] / 4).to(torch.bfloat16).float()
    torch.testing.assert_close(policy.model.state_dict()[f"{key}.weight"], expected)
    assert (out / "adapters" / "adapter_model.safetensors").is_file()
    from lingbot_edge.eval.sim import run_episode

    episode = run_episode(policy, 100_000, steps=20, scene="place")
    assert episode["steps"] >= 20
    result = quantize_checkpoint(ckpt, SCHEMES["int8_weight_only"], tmp_path / "int8", progress=False)
    assert is_quantized_checkpoint(result.folder)
