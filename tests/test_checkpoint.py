"""Tiny checkpoints in upstream's folder layout round-trip through the real loader."""

import json

import pytest
import torch

from lingbot_edge.core.config import get_policy_config
from lingbot_edge.core.model import NoCache, action_grid_ids, video_grid_ids
from lingbot_edge.io.checkpoint import build_model, load_transformer, save_transformer


@pytest.fixture(scope="module")
def tiny():
    cfg = get_policy_config("tiny")
    return cfg, build_model(cfg.model_config, seed=7)


def _outputs(model, cfg):
    g = torch.Generator().manual_seed(0)
    h, w = cfg.latent_hw
    text = torch.randn(2, 16, cfg.model_config.text_dim, generator=g)
    x = torch.randn(2, 16, 2, h, w, generator=g)
    a = torch.randn(2, 8, 2, 4, 1, generator=g)
    t = torch.tensor([0.0, 700.0])
    dt = model.dtype
    v = model(x.to(dt), t, video_grid_ids(2, h // 2, w // 2), NoCache(), action=False, text_emb=text.to(dt))
    u = model(a.to(dt), t, action_grid_ids(2, 4), NoCache(), action=True, text_emb=text.to(dt))
    return v.float(), u.float()


@pytest.mark.parametrize("shard", [None, 20_000])
def test_roundtrip_upstream_layout(tmp_path, tiny, shard):
    cfg, model = tiny
    save_transformer(model, tmp_path / "ckpt" / "transformer", max_shard_bytes=shard)
    files = sorted(p.name for p in (tmp_path / "ckpt" / "transformer").iterdir())
    conf = json.loads((tmp_path / "ckpt" / "transformer" / "config.json").read_text())
    assert conf["_class_name"] == "WanTransformer3DModel" and conf["num_layers"] == 2
    if shard:
        assert "diffusion_pytorch_model.safetensors.index.json" in files and len(files) > 3
    else:
        assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = load_transformer(tmp_path / "ckpt", dtype=torch.float32)  # checkpoint root works too
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    for a, b in zip(_outputs(model, cfg), _outputs(loaded, cfg), strict=True):
        assert torch.equal(a, b)


def test_load_into_bf16_directly(tmp_path, tiny):
    cfg, model = tiny
    save_transformer(model, tmp_path / "transformer")
    loaded = load_transformer(tmp_path / "transformer", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters())
    v32, _ = _outputs(model, cfg)
    v16, _ = _outputs(loaded, cfg)
    cos = torch.nn.functional.cosine_similarity(v32.flatten(), v16.flatten(), dim=0)
    assert cos > 0.999  # bf16 weights + activations on a 2-block model


def test_lerobot_prefix(tmp_path, tiny):
    from safetensors.torch import save_file

    cfg, model = tiny
    d = tmp_path / "policy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({f"transformer.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    loaded = load_transformer(d, dtype=torch.float32, prefix="transformer.")
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight)


def test_bad_folders(tmp_path, tiny):
    _, model = tiny
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_transformer(tmp_path)
    folder = save_transformer(model, tmp_path / "transformer")
    weights = folder / "diffusion_pytorch_model.safetensors"
    # truncated weights
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        load_transformer(folder)
    # a config that does not describe this model
    save_transformer(model, folder, replace=True)
    conf = json.loads((folder / "config.json").read_text())
    conf["num_layers"] = 3
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"missing \['blocks.2"):
        load_transformer(folder)
    conf["num_layers"], conf["bogus_key"] = 2, 1
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="bogus_key"):
        load_transformer(folder)
    conf.pop("bogus_key")
    conf["ffn_dim"] = 128
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"ffn.net.0.proj.(weight|bias) has shape"):
        load_transformer(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_transformer(folder)
