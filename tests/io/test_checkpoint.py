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


# ----------------------------------------------------------------------------- output folders


def test_save_transformer_replaces_only_its_own_folders(tmp_path, tiny):
    from lingbot_edge.io.files import OutputPathError

    _, model = tiny
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    for replace in (False, True):
        with pytest.raises(OutputPathError, match=r"not empty \(notes.txt\) and not a transformer/ checkpoint"):
            save_transformer(model, own, replace=replace)
    assert [p.name for p in own.iterdir()] == ["notes.txt"] and (own / "notes.txt").read_text() == "mine"
    folder = save_transformer(model, tmp_path / "transformer")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(OutputPathError, match="already holds a transformer/ checkpoint folder"):
        save_transformer(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(OutputPathError, match="the output is inside the input"):
        save_transformer(model, folder / "sub", inputs=[folder])
    save_transformer(model, folder, replace=True, max_shard_bytes=20_000)  # sharded now
    assert len(list(folder.glob("*.safetensors"))) > 1 and not (folder / "diffusion_pytorch_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own", "transformer"]  # no temp folder left


def test_prompt_cache_folder_holds_only_its_entries(tmp_path):
    from lingbot_edge.io.prompt_cache import PromptCache

    foreign = tmp_path / "ckpt"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds files that are not prompt-cache entries \(config.json\)"):
        PromptCache(lambda: None, fingerprint="x", text_dim=4, cache_dir=foreign)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        PromptCache(lambda: None, fingerprint="x", text_dim=4, cache_dir=tmp_path / "file")
    ok = tmp_path / "prompts"
    ok.mkdir()
    (ok / f"{'a' * 64}.safetensors").write_bytes(b"")
    (ok / f".{'a' * 64}.safetensors.lingbot-edge-tmp.1.00ff").write_bytes(b"")
    PromptCache(lambda: None, fingerprint="x", text_dim=4, cache_dir=ok)


def test_write_file_sweeps_stale_temp_files_only(tmp_path):
    import os
    import subprocess
    import sys

    from lingbot_edge.io.files import is_temp_path, write_file

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".f.json.lingbot-edge-tmp.{dead.pid}.00aa"
    live = tmp_path / f".f.json.lingbot-edge-tmp.{os.getpid()}.00bb"
    other = tmp_path / f".g.json.lingbot-edge-tmp.{dead.pid}.00cc"  # another target's: not this write's
    for p in (stale, live, other):
        p.write_text("partial")
    write_file(tmp_path / "f.json", lambda tmp: tmp.write_text("{}"))
    assert (tmp_path / "f.json").read_text() == "{}"
    assert not stale.exists() and live.exists() and other.exists() and is_temp_path(other)
