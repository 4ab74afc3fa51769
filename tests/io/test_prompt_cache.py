"""Prompt cache (lingbot_edge/prompt_cache.py): UMT5 runs once per prompt ever, is released after, and a
warm start loads nothing and returns bit-identical embeddings."""

from __future__ import annotations

import argparse
import gc
import shutil
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lingbot_edge.cli import encode_prompt as cli_encode_prompt
from lingbot_edge.io import loading
from lingbot_edge.io.encoders import ByteTokenizer, UMT5PromptEncoder, clean_prompt
from lingbot_edge.io.layout import resolve_checkpoint
from lingbot_edge.io.loading import EncoderSettings, build_prompt_cache, load_policy
from lingbot_edge.io.prompt_cache import (
    CACHE_ENV,
    PromptCache,
    default_cache_dir,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from lingbot_edge.io.tiny import build_tiny_umt5

PROMPT = "pick up the red block"
F32 = {"device": "cpu", "dtype": torch.float32, "encoders": EncoderSettings(text_encoder_dtype=torch.float32),
       "compile": False}


@pytest.fixture
def count_umt5(monkeypatch):
    """Count real UMT5 loads and keep weak references to the loaded models."""
    loads = []
    real = loading.load_text_encoder

    def counting(*args, **kwargs):
        model = real(*args, **kwargs)
        loads.append(weakref.ref(model))
        return model

    monkeypatch.setattr(loading, "load_text_encoder", counting)
    return loads


def direct_umt5_embedding(ckpt, prompt: str, max_len: int = 512) -> torch.Tensor:
    """Independent reference: transformers' tokenizer + UMT5EncoderModel run directly, zeros past the length."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
    enc = tok([clean_prompt(prompt)], padding="max_length", max_length=max_len, truncation=True,
              add_special_tokens=True, return_tensors="pt")
    model = UMT5EncoderModel.from_pretrained(str(ckpt / "text_encoder"), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    n = int(enc.attention_mask.sum())
    hidden[:, n:] = 0
    return hidden


# ------------------------------------------------------------------------------------ the must-show


def test_second_start_never_loads_umt5(tiny_checkpoint, tmp_path, count_umt5, monkeypatch):
    cache_dir = tmp_path / "prompts"
    first = load_policy(tiny_checkpoint, preset="tiny", prompt_cache_dir=cache_dir, **F32)
    first.reset(PROMPT)
    cond1, uncond1 = first.text_embeds
    assert len(count_umt5) == 1  # one load served both the prompt and the negative ""
    assert first.prompt_encoder.stats["misses"] == 2 and first.prompt_encoder._encoder is None
    gc.collect()
    assert count_umt5[0]() is None  # released: no reference to the UMT5 module is left anywhere
    assert len(list(cache_dir.glob("*.safetensors"))) == 2

    # The first run's embedding is UMT5's own output (fp32: bit-identical).
    assert cond1.shape == (1, 512, 32) and uncond1.shape == (1, 512, 32)
    assert torch.equal(cond1, direct_umt5_embedding(tiny_checkpoint, PROMPT))
    assert torch.equal(uncond1, direct_umt5_embedding(tiny_checkpoint, ""))

    # Second start (new policy, same cache folder): the loaders would fail the test if called.
    def forbidden(*args, **kwargs):
        raise AssertionError("the text encoder / tokenizer was loaded on a warm start")

    monkeypatch.setattr(loading, "load_text_encoder", forbidden)
    monkeypatch.setattr(loading, "load_tokenizer", forbidden)
    second = load_policy(tiny_checkpoint, preset="tiny", prompt_cache_dir=cache_dir, **F32)
    second.reset(PROMPT)
    cond2, uncond2 = second.text_embeds
    assert torch.equal(cond1, cond2) and torch.equal(uncond1, uncond2)
    assert second.prompt_encoder.stats == {"memory_hits": 0, "disk_hits": 2, "misses": 0, "disk_writes": 0,
                                           "disk_rejects": 0}
    assert second.memory_report["prompt"]["text_encoder_loads"] == 0
    second.reset(PROMPT)  # the next episode: memory tier
    assert second.prompt_encoder.stats["memory_hits"] == 2


def test_bf16_encoder_round_trips_bit_identical(tiny_checkpoint, tmp_path, monkeypatch):
    layout = resolve_checkpoint(tiny_checkpoint, parts=("text_encoder", "tokenizer"))
    cold = build_prompt_cache(layout, cache_dir=tmp_path, dtype=torch.bfloat16)  # default encoder dtype: bf16
    a = cold.get(PROMPT)
    warm = build_prompt_cache(layout, cache_dir=tmp_path, dtype=torch.bfloat16)
    monkeypatch.setattr(loading, "load_text_encoder", lambda *a, **k: pytest.fail("UMT5 loaded on a warm start"))
    b = warm.get(PROMPT)
    assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b) and warm.stats["disk_hits"] == 1
    with safe_open(str(cold.path(PROMPT)), "pt") as f:
        stored = f.get_tensor("embeds")
        meta = f.metadata()
    n = stored.shape[0]  # only the real positions are stored
    assert stored.dtype == torch.bfloat16 and 1 < n < 512 and torch.count_nonzero(a[0, n:]) == 0
    assert meta["prompt"] == PROMPT and meta["key"] == cold.key(PROMPT) and meta["encoder_dtype"] == "torch.bfloat16"


def test_precompute_prompts_before_the_dit(tiny_checkpoint, tmp_path, count_umt5):
    f32 = {**F32, "encoders": EncoderSettings(prompts=(PROMPT, "open the drawer"), text_encoder_dtype=torch.float32)}
    policy = load_policy(tiny_checkpoint, preset="tiny", prompt_cache_dir=tmp_path, **f32)
    assert len(count_umt5) == 1 and policy.prompt_encoder.stats["misses"] == 3  # 2 prompts + ""
    policy.reset("open the drawer")
    assert len(count_umt5) == 1  # already in memory
    policy.reset("close the microwave")  # a new prompt later: UMT5 comes back once, and goes again
    assert len(count_umt5) == 2 and policy.prompt_encoder._encoder is None


# -------------------------------------------------------------------------------------------- keys


def test_key_depends_on_everything_that_changes_the_embedding(tiny_checkpoint, tmp_path):
    layout = resolve_checkpoint(tiny_checkpoint, parts=("text_encoder", "tokenizer"))
    base = build_prompt_cache(layout, cache_dir=False)
    k = base.key(PROMPT)
    assert len(k) == 64 and k == base.key("  pick up   the red\nblock ")  # cleaned text is what counts
    assert k != base.key("pick up the blue block")
    assert k != build_prompt_cache(layout, cache_dir=False, max_sequence_length=256).key(PROMPT)
    assert k != build_prompt_cache(layout, cache_dir=False, text_encoder_dtype=torch.float32).key(PROMPT)
    # The policy dtype / device is not part of the key (the stored tensor is the encoder's output).
    assert k == build_prompt_cache(layout, cache_dir=False, dtype=torch.bfloat16).key(PROMPT)

    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    assert weights_fingerprint(copy / "text_encoder") == weights_fingerprint(tiny_checkpoint / "text_encoder")
    assert tokenizer_fingerprint(copy / "tokenizer") == tokenizer_fingerprint(tiny_checkpoint / "tokenizer")

    # Same architecture, other weights (a fine-tune): another key.
    other = build_tiny_umt5(d_model=32, seed=1)
    other.save_pretrained(str(copy / "text_encoder"))
    assert weights_fingerprint(copy / "text_encoder") != weights_fingerprint(tiny_checkpoint / "text_encoder")
    # One tensor changed in its last bytes only: still another key (each tensor's head and tail are sampled).
    path = tiny_checkpoint / "text_encoder" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        state = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    state["encoder.final_layer_norm.weight"][-1] += 1.0
    save_file(state, str(copy / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    assert weights_fingerprint(copy / "text_encoder") != weights_fingerprint(tiny_checkpoint / "text_encoder")
    # Another tokenizer file content: another key.
    cfg = copy / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "x": 1}', 1))
    assert tokenizer_fingerprint(copy / "tokenizer") != tokenizer_fingerprint(tiny_checkpoint / "tokenizer")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert str(default_cache_dir()).endswith(".cache/lingbot_edge/prompts")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path / "prompts"


# ------------------------------------------------------------------------------------ bad entries


def _tiny_cache(tmp_path, loads, **kw):
    def factory():
        loads.append(1)
        return UMT5PromptEncoder(build_tiny_umt5(d_model=32), ByteTokenizer(), 64, dtype=torch.float32)

    return PromptCache(factory, fingerprint="test", text_dim=32, max_sequence_length=64,
                       encoder_dtype=torch.float32, cache_dir=tmp_path, **kw)


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "wrong_dtype", "renamed", "nan"])
def test_bad_disk_entry_is_re_encoded(tmp_path, damage, caplog):
    loads = []
    good = _tiny_cache(tmp_path, loads).get(PROMPT)
    path = _tiny_cache(tmp_path, loads).path(PROMPT)
    other_key = _tiny_cache(tmp_path, loads).key("other")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "renamed":  # a valid entry for another key under this key's name
        save_file({"embeds": torch.zeros(3, 32)}, str(path), metadata={"format": "lingbot_edge.prompt_embeds/1",
                                                                       "key": other_key})
    else:
        bad = {"wrong_shape": torch.zeros(3, 16), "wrong_dtype": torch.zeros(3, 32, dtype=torch.float16),
               "nan": torch.full((3, 32), float("nan"))}[damage]
        save_file({"embeds": bad}, str(path), metadata={"format": "lingbot_edge.prompt_embeds/1",
                                                       "key": path.stem})
    cache = _tiny_cache(tmp_path, loads)
    with caplog.at_level("WARNING", logger="lingbot_edge.io.prompt_cache"):
        again = cache.get(PROMPT)
    assert "re-encoding" in caplog.text and str(path) in caplog.text
    assert cache.stats["disk_rejects"] == 1 and cache.stats["misses"] == 1 and len(loads) == 2
    assert torch.equal(again, good)
    assert _tiny_cache(tmp_path, loads).get(PROMPT) is not None and len(loads) == 2  # overwritten: valid now
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_in_memory_only_and_wrapped_encoder(tmp_path):
    loads = []
    cache = _tiny_cache(None, loads)
    cond, uncond = cache.encode_pair(PROMPT, use_cfg=False)
    assert uncond is None and cond.shape == (1, 64, 32) and cache.path(PROMPT) is None
    enc = UMT5PromptEncoder(build_tiny_umt5(d_model=32), ByteTokenizer(), 64)
    wrapped = PromptCache.from_encoder(enc)
    assert torch.equal(wrapped.get(PROMPT), enc.encode(PROMPT)) and torch.equal(wrapped.get(PROMPT), cond)
    assert wrapped._encoder is enc  # an encoder it cannot rebuild is kept, not released


def test_memory_report_on_cpu(tmp_path):
    loads = []
    cache = _tiny_cache(tmp_path, loads)
    cache.encode_pair(PROMPT, use_cfg=True)
    r = cache.memory_report
    assert r["text_encoder_loads"] == 1 and r["text_encoder_device"] == "cpu"
    assert r["gpu_allocated_before_release"] is None and r["gpu_freed_bytes"] is None


@pytest.mark.gpu  # without CUDA this fails (tests/conftest.py): never a green skip
def test_umt5_on_gpu_is_released(tiny_checkpoint, tmp_path):
    policy = load_policy(tiny_checkpoint, preset="tiny", device="cuda", prompt_cache_dir=tmp_path,
                         encoders=EncoderSettings(text_encoder_device="cuda"), compile=False)
    before_reset = torch.cuda.memory_allocated()
    policy.reset(PROMPT)
    r = policy.memory_report["prompt"]
    assert r["text_encoder_loads"] == 1 and r["text_encoder_device"].startswith("cuda")
    assert r["gpu_allocated_before_release"] > r["gpu_allocated_after_release"]
    # Everything UMT5 held is back (the policy keeps only the two [1, 512, 32] embeddings).
    assert torch.cuda.memory_allocated() - before_reset <= 2 * 512 * 32 * 2 + 4096


# -------------------------------------------------------------------------------------------- CLI


def _cli(argv):
    parser = argparse.ArgumentParser(prog="lingbot-edge")
    cli_encode_prompt.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_encode_prompt_cli_then_warm_start(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    cache_dir = tmp_path / "prompts"
    argv = ["encode-prompt", "--checkpoint", str(tiny_checkpoint), "--prompt", PROMPT, "--prompt", "open the drawer",
            "--cache-dir", str(cache_dir), "--device", "cpu"]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert out.count("encoded ") == 3 and "3 encoded, 0 cached" in out
    assert _cli(argv) == 0 and "0 encoded, 3 cached" in capsys.readouterr().out

    # A policy with default text-encoder settings (bf16, like the CLI's default) finds them: no UMT5 load.
    monkeypatch.setattr(loading, "load_text_encoder", lambda *a, **k: pytest.fail("UMT5 loaded after encode-prompt"))
    policy = load_policy(tiny_checkpoint, preset="tiny", device="cpu", compile=False, prompt_cache_dir=cache_dir)
    policy.reset("open the drawer")
    assert policy.prompt_encoder.stats["disk_hits"] == 2

    # The CLI validates the folders it needs, with the same messages.
    shutil.copytree(tiny_checkpoint / "tokenizer", tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").unlink()
    assert _cli(argv + ["--tokenizer", str(tmp_path / "tok")]) == 2


def test_encode_prompt_cli_on_frozen_only_folder(tiny_checkpoint, tmp_path, capsys):
    frozen = tmp_path / "frozen"
    for part in ("tokenizer", "text_encoder"):
        shutil.copytree(tiny_checkpoint / part, frozen / part)
    assert _cli(["encode-prompt", "--checkpoint", str(frozen), "--prompt", PROMPT, "--no-negative",
                 "--cache-dir", str(tmp_path / "c"), "--dtype", "fp32", "--device", "cpu"]) == 0
    assert "1 encoded, 0 cached" in capsys.readouterr().out
