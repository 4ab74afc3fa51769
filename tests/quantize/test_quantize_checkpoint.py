"""Quantized checkpoints: save -> load reproduces outputs exactly, corrupted / truncated / edited
folders are refused naming the file, writes are atomic; the CLI (real run, errors, dry run of the
full model on the meta device against an independent byte count)."""

import argparse
import json
import math
import re
import shutil

import pytest
import torch

from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config
from lingbot_edge.core.qlinear import UnsupportedSchemeError, quantized_linears
from lingbot_edge.io.checkpoint import build_model, load_transformer, save_transformer
from lingbot_edge.io.quantized import MANIFEST_NAME, QuantizedCheckpointError, load_quantized, save_quantized
from quantize import SCHEMES, QuantPlan, plan_summary, provenance, quantize_, quantize_checkpoint
from quantize.api import checkpoint_sha256
from quantize.commands import register
from quantize.metrics import make_episode, run_episode, synthetic_calibration
from quantize.schemes import quantize_linear

# Every runtime payload the CPU can run: int8 and float8 data, fp32 scales, calibrated input scales.
MIXED_PLAN = {
    "rules": [
        {"pattern": r"blocks\.0\.attn1\..+", "scheme": "int8_weight_only"},
        {"pattern": r"blocks\.0\.attn2\..+", "scheme": "int8_dynamic"},
        {"pattern": r"blocks\.0\.ffn\..+", "scheme": "fp8_weight_only"},
        {"pattern": r"blocks\.1\.attn1\..+", "scheme": "quanto_int8_a8"},
        {"pattern": r"blocks\.1\.attn2\..+", "scheme": "llm_int8"},
    ],
    "modules": {"blocks.1.ffn.net.0.proj": "quanto_fp8", "proj_out": "int8_weight_only"},
    "default": "keep",
}


@pytest.fixture(scope="module")
def tiny():
    cfg = get_policy_config("tiny")
    return cfg, build_model(cfg.model_config, seed=3)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny model quantized with the mixed plan, its assignment, and its saved folder."""
    cfg, model = tiny
    root = tmp_path_factory.mktemp("quantized")
    quantized = build_model(cfg.model_config, seed=3)
    assignment = quantize_(quantized, QuantPlan.from_dict(MIXED_PLAN), calibrate=synthetic_calibration(cfg, 2, seed=5))
    folder = save_quantized(quantized, root / "q", provenance(assignment), max_shard_bytes=50_000)
    return quantized, assignment, folder


def _outputs(model, cfg):
    episode = make_episode(cfg, chunks=3, seed=1)
    return [t for r in run_episode(model, cfg, episode) for t in (r.actions, r.latents)]


def test_roundtrip_reproduces_outputs_exactly(tiny, saved):
    cfg, _ = tiny
    quantized, assignment, folder = saved
    assert len([p for p in folder.iterdir() if p.suffix == ".safetensors"]) > 1  # sharded
    loaded = load_quantized(folder, dtype=torch.float32)
    a, b = quantized.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert {q.fmt for q in quantized_linears(loaded).values()} == {s.runtime_format() for s in assignment.values()}
    assert not any(t.is_meta for t in b.values())
    for x, y in zip(_outputs(quantized, cfg), _outputs(loaded, cfg), strict=True):
        assert torch.equal(x, y)


def test_bf16_roundtrip_and_checkpoint_pipeline(tiny, tmp_path):
    """quantize_checkpoint on an upstream transformer/ folder == quantize_ in memory, exactly."""
    cfg, model = tiny
    save_transformer(model, tmp_path / "ckpt" / "transformer")
    plan = QuantPlan.from_dict(MIXED_PLAN)
    calibrate = synthetic_calibration(cfg, 2, seed=5)
    result = quantize_checkpoint(tmp_path / "ckpt", plan, tmp_path / "out", dtype=torch.bfloat16,
                                 calibrate=calibrate, progress=False)
    in_memory = load_transformer(tmp_path / "ckpt", dtype=torch.bfloat16)
    quantize_(in_memory, plan, calibrate=calibrate)
    loaded = load_quantized(result.folder, dtype=torch.bfloat16)
    for x, y in zip(_outputs(in_memory, cfg), _outputs(loaded, cfg), strict=True):
        assert torch.equal(x, y)

    manifest = json.loads((result.folder / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 2 and manifest["dtype"] == "bfloat16"
    assert manifest["backend"] == "bitsandbytes+quanto+torchao"
    assert manifest["source"]["sha256"] == checkpoint_sha256(tmp_path / "ckpt" / "transformer")
    assert manifest["modules"]["blocks.1.attn1.to_q"]["scheme"] == "quanto_int8_a8"
    assert manifest["modules"]["blocks.1.attn1.to_q"]["format"] == {"weight": "int8", "activation": "static",
                                                                     "outlier_threshold": 0.0}
    assert manifest["modules"]["proj_out"]["backend"] == "torchao" and "action_proj_out" in manifest["kept_linears"]
    assert {"torch", "torchao", "optimum-quanto", "bitsandbytes"} <= {k for k, v in manifest["versions"].items() if v}
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    by_group = {r.group: r for r in result.summary}
    assert by_group["blocks.*.attn1"].schemes == "int8_weight_only, quanto_int8_a8"
    assert by_group["action_proj_out"].bytes_after == by_group["action_proj_out"].bytes_before


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _first_shard(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")[0]


def test_corrupted_file_is_refused(saved, tmp_path):
    folder = _copy(saved[2], tmp_path)
    shard = _first_shard(folder)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(QuantizedCheckpointError, match=rf"{shard.name}: sha256 mismatch"):
        load_quantized(folder, dtype=torch.float32)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_or_missing_file_is_refused(saved, tmp_path, verify):
    folder = _copy(saved[2], tmp_path)
    shard = _first_shard(folder)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    truncated = rf"{shard.name}: truncated or modified: {len(data) - 100} bytes"
    with pytest.raises(QuantizedCheckpointError, match=truncated):
        load_quantized(folder, dtype=torch.float32, verify=verify)
    shard.unlink()
    with pytest.raises(QuantizedCheckpointError, match=rf"{shard.name}: missing"):
        load_quantized(folder, dtype=torch.float32, verify=verify)


def test_edited_config_or_manifest_is_refused(saved, tmp_path):
    folder = _copy(saved[2], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(QuantizedCheckpointError, match=r"config.json: (truncated|sha256)"):
        load_quantized(folder)

    folder = _copy(saved[2], tmp_path / "b")
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    # One module's activation format edited (would load silently with the wrong kernel), a module
    # dropped, a version bumped: each is caught by the manifest hash in the weight files' metadata,
    # from the headers, with or without the file checksums.
    edited = json.loads(json.dumps(manifest))
    edited["modules"]["blocks.0.attn2.to_q"]["format"]["activation"] = "none"
    edits = [edited, {**manifest, "modules": {k: v for k, v in manifest["modules"].items() if k != "proj_out"}},
             {**manifest, "dtype": "bfloat16"}]
    for edit in edits:
        path.write_text(json.dumps(edit, indent=2))
        for verify in (True, False):
            with pytest.raises(QuantizedCheckpointError, match=rf"{MANIFEST_NAME}: edited after it was written"):
                load_quantized(folder, verify=verify)
    path.write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(QuantizedCheckpointError, match="format_version 1 is not supported"):
        load_quantized(folder)
    path.write_text("{oops")
    with pytest.raises(QuantizedCheckpointError, match="not valid JSON"):
        load_quantized(folder)
    path.unlink()
    with pytest.raises(QuantizedCheckpointError, match=f"no {MANIFEST_NAME}"):
        load_quantized(folder)


def test_fp8_w8a8_checkpoint_is_refused_on_cpu(tiny, tmp_path):
    cfg, model = tiny
    quantized = build_model(cfg.model_config, seed=3)
    name = "blocks.0.ffn.net.2"
    scheme = SCHEMES["fp8_dynamic"]
    quantized.set_submodule(name, quantize_linear(scheme, quantized.get_submodule(name)))  # as if made on a GPU
    folder = save_quantized(quantized, tmp_path / "fp8", provenance({name: scheme}))
    with pytest.raises(UnsupportedSchemeError, match=r"fp8_dynamic \(blocks.0.ffn.net.2\) needs a CUDA GPU with "
                                                     r"compute capability >= 8\.9"):
        load_quantized(folder, device="cpu")


def test_writes_are_atomic(saved, tmp_path, monkeypatch):
    import safetensors.torch

    quantized, assignment, folder = saved
    folder = _copy(folder, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_quantized(quantized, folder, provenance(assignment), replace=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # old checkpoint untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp folder left behind


# ----------------------------------------------------------------------------- CLI


def _cli(argv):
    parser = argparse.ArgumentParser(prog="lingbot-edge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["quantize", *argv])
    return args.func(args)


def _independent_full_count():
    """Parameter and int8-weight-only byte counts of the full model from its config, by hand."""
    mc = MODEL_PRESETS["full"]
    d, ffn, layers = mc.dim, mc.ffn_dim, mc.num_layers
    out = mc.out_channels * math.prod(mc.patch_size)
    block_weights = layers * (8 * d * d + 2 * d * ffn)  # attn1/attn2 q,k,v,out (d x d) + ffn up/down
    block_outputs = layers * (8 * d + ffn + d)  # their biases (bf16) and per-channel scales (fp32)
    block_rest = layers * (4 * d + 2 * d + 6 * d)  # norm_q/norm_k of both attns, norm2 affine, modulation table
    condition = (mc.freq_dim * d + d) + (d * d + d) + (d * 6 * d + 6 * d) + (mc.text_dim * d + d) + (d * d + d)
    rest = (mc.patch_dim * d + d) + (mc.action_dim * d + d) + 2 * condition + (d * out + out) + (d * mc.action_dim
                                                                                               + mc.action_dim) + 2 * d
    params = block_weights + block_outputs + block_rest + rest
    int8_bytes = block_weights + 4 * block_outputs + 2 * (params - block_weights)
    return params, block_weights, int8_bytes


def test_dry_run_full_int8_counts_on_meta(capsys):
    params, block_weights, int8_bytes = _independent_full_count()
    assert 4.85e9 < block_weights < 4.95e9 and 5.0e9 < params < 5.2e9  # docs/design.md: ~4.9B of ~5.0B
    rows, assignment = plan_summary(MODEL_PRESETS["full"], SCHEMES["int8_weight_only"])
    assert len(assignment) == 30 * 10
    assert sum(r.params for r in rows) == params
    assert sum(r.bytes_before for r in rows) == 2 * params
    assert sum(r.bytes_after for r in rows) == int8_bytes  # ~5.28 GB: 4.91 GB int8 + scales + kept bf16

    assert _cli(["--arch", "full", "--scheme", "int8_weight_only", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{2 * params:,} bytes before, {int8_bytes:,} bytes after" in out
    assert "quantized Linears: 300, kept Linears: 14" in out
    assert "blocks.*.ffn" in out and "int8_weight_only" in out


def test_cli_quantizes_a_checkpoint(tiny, tmp_path, capsys):
    cfg, model = tiny
    save_transformer(model, tmp_path / "ckpt" / "transformer")
    (tmp_path / "plan.json").write_text(json.dumps(MIXED_PLAN))
    assert _cli(["--checkpoint", str(tmp_path / "ckpt"), "--plan", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "quantized Linears: 20, kept Linears: 14" in out and f"wrote {tmp_path / 'out'}" in out
    loaded = load_quantized(tmp_path / "out")
    assert len(quantized_linears(loaded)) == 20 and loaded.dtype == torch.bfloat16

    assert _cli(["--checkpoint", str(tmp_path / "ckpt"), "--scheme", "int8_dynamic", "--dry-run"]) == 0
    assert "dry run: " in capsys.readouterr().out


def test_dry_run_of_the_embedded_tiny_model_counts_its_architecture(capsys):
    """`--checkpoint tiny` means the embedded tiny model, as in every command; `--arch tiny` names the same
    architecture: the two byte tables agree, and match plan_summary on the tiny model config."""
    rows, _ = plan_summary(MODEL_PRESETS["tiny"], SCHEMES["int8_weight_only"])
    before, after = sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows)
    assert _cli(["--checkpoint", "tiny", "--scheme", "int8_weight_only", "--dry-run"]) == 0
    by_checkpoint = capsys.readouterr().out
    assert _cli(["--arch", "tiny", "--scheme", "int8_weight_only", "--dry-run"]) == 0
    by_arch = capsys.readouterr().out
    assert f"{before:,} bytes before, {after:,} bytes after" in by_checkpoint
    assert by_checkpoint.splitlines()[1:] == by_arch.splitlines()[1:]


@pytest.mark.parametrize(("argv", "error"), [
    (["--scheme", "fp8_dynamic", "--out", "OUT"], r"fp8 dynamic W8A8 \(torchao\) needs a CUDA GPU with compute "
                                                  r"capability >= 8\.9 \(Ada/Hopper\); this machine has"),
    (["--scheme", "int4_weight_only", "--out", "OUT"], "unknown scheme 'int4_weight_only'"),
    (["--scheme", "int8_weight_only"], "--checkpoint DIR and --out DIR are required"),
    (["--scheme", "int8_weight_only", "--arch", "tiny", "--dry-run"], "--arch tiny: the architecture of --checkpoint"),
    (["--scheme", "int8_weight_only", "--arch", "tiny", "--out", "OUT"], "--arch tiny: only for --dry-run"),
])
def test_cli_errors(tiny, tmp_path, capsys, argv, error):
    _, model = tiny
    save_transformer(model, tmp_path / "ckpt" / "transformer")
    out = tmp_path / "out"
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu", *(str(out) if a == "OUT" else a for a in argv)]
    assert _cli(args) == 2
    assert re.search(error, capsys.readouterr().err)
    assert not out.exists()


def test_cli_flags_mean_what_they_mean_everywhere(tmp_path, capsys):
    """--dtype takes the shared values only (short or long names); --checkpoint tiny has no weights folder to
    quantize."""
    with pytest.raises(SystemExit):
        _cli(["--checkpoint", "tiny", "--scheme", "int8_weight_only", "--dtype", "float64", "--dry-run"])
    assert "expected one of bf16 (bfloat16)" in capsys.readouterr().err
    assert _cli(["--checkpoint", "tiny", "--scheme", "int8_weight_only", "--dtype", "bfloat16", "--dry-run"]) == 0
    with pytest.raises(SystemExit):
        _cli(["--preset", "full", "--scheme", "int8_weight_only", "--dry-run"])  # the old model-preset flag
    assert "unrecognized arguments: --preset" in capsys.readouterr().err
    out = tmp_path / "out"
    assert _cli(["--checkpoint", "tiny", "--scheme", "int8_weight_only", "--out", str(out), "--device", "cpu"]) == 2
    assert "--checkpoint tiny: the embedded tiny model has no weights folder" in capsys.readouterr().err
    assert not out.exists()
