"""The training-step memory model (bench/train_memory.py) against steps measured in this process.

The model counts bytes from the code's shapes; the references here are independent of it: the bytes of the
tensors a real model holds (weights, adapters, gradients, AdamW states: exact), what autograd saves for one
block (`saved_tensors_hooks`), and the peak of live tensor bytes over a whole training step
(`LiveTensorBytes`, a dispatch-mode tracker) on narrow DiTs with the presets' real sequence layouts.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.autograd.graph as autograd_graph

from bench import train_memory as tm
from bench.memory_model import dit_param_counts
from bench.train_step_measure import (
    LiveTensorBytes,
    add_lora,
    build_random_model,
    checkpoint_blocks,
    make_objective,
    synthetic_episode,
    train_step,
)
from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config


def narrow(preset: str, layers: int = 2):
    """The preset's robot side (latents, chunks, cache, prompt) on a narrow DiT: 2 heads x 32, ffn 160."""
    return dataclasses.replace(get_policy_config(preset).model_config, num_attention_heads=2, attention_head_dim=32,
                               ffn_dim=160, num_layers=layers)


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_parameter_counts_are_the_inference_models():
    full = tm.param_counts(MODEL_PRESETS["full"])
    inference = dit_param_counts()
    assert (full.quantizable, full.quantizable_rows, full.other) == (
        inference.quantizable, inference.quantizable_rows, inference.other)
    # 30 blocks x (8 attention Linears 3072 -> 3072, FFN 3072 -> 14336 -> 3072): rank-1 adapter sizes
    assert full.lora == 30 * (8 * (3072 + 3072) + 2 * (3072 + 14336))


@pytest.mark.parametrize("base", ["int8", "bf16"])
def test_weights_adapters_gradients_and_adamw_states_exact(base):
    cfg = get_policy_config("tiny")
    mc = narrow("tiny")
    model = build_random_model(mc, base)
    setup = tm.TrainSetup("tiny", 2, base, rank=4, model=mc)
    rows = tm.step_bytes(setup)
    base_tensors = [*model.parameters(), *model.buffers()]
    assert storage_bytes(base_tensors) == rows[f"base weights ({base}, frozen)"]

    params = add_lora(model, rank=4)
    assert storage_bytes(params) == rows["LoRA adapters"]
    train_step(model, params, make_objective(cfg, 2), synthetic_episode(cfg, 2))
    assert storage_bytes([p.grad for p in params]) == rows["adapter gradients"]
    opt = torch.optim.AdamW(params)  # the step's own optimizer is local to train_step: one more step here
    opt.step()
    # AdamW's exp_avg and exp_avg_sq per adapter (its step counters are scalars, not counted)
    opt_states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert storage_bytes(opt_states) == rows["AdamW states"]


@pytest.mark.parametrize("preset,chunks", [("tiny", 3), ("so100", 3)])
def test_one_blocks_saved_tensors(preset, chunks):
    """What autograd saves in block 1 of 2 (weights, the shared RoPE tables and the prompt K/V excluded)."""
    cfg = get_policy_config(preset)
    mc = narrow(preset)
    model = build_random_model(mc, "int8")
    params = add_lora(model, rank=4)
    shared = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *params]}
    saved: dict[int, int] = {}
    block = model.blocks[1]
    forward = block.forward

    def hooked(x, mod, rope, text_kv, attention):
        exclude = shared | {t.untyped_storage().data_ptr() for t in (*rope, *text_kv)}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in exclude:
                saved[ptr] = t.untyped_storage().nbytes()
            return t

        with autograd_graph.saved_tensors_hooks(pack, lambda t: t):
            return forward(x, mod, rope, text_kv, attention)

    block.forward = hooked
    objective = make_objective(cfg, chunks)
    train_step(model, params, objective, synthetic_episode(cfg, chunks))
    n = objective.layout.chunks * objective.layout.chunk_tokens
    assert n == tm.sequence_tokens(cfg, chunks, grounded=True)
    att = tm.attention_shape(cfg, chunks, True)
    predicted = sum(tm.block_saved_bytes(mc, n, chunks, att, rank=4).values())
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.02)


@pytest.mark.parametrize("preset,chunks,base,checkpointing", [
    ("tiny", 3, "bf16", False),
    ("tiny", 4, "int8", True),
    ("so100", 4, "int8", True),
    ("libero", 3, "bf16", False),
])
def test_step_peak_matches_live_tensors(preset, chunks, base, checkpointing):
    """The whole step's peak of live tensor bytes (first step: no AdamW state before it) within 10%."""
    cfg = get_policy_config(preset)
    mc = narrow(preset)
    model = build_random_model(mc, base)
    params = add_lora(model, rank=4)
    if checkpointing:
        checkpoint_blocks(model)
    episode = synthetic_episode(cfg, chunks)
    objective = make_objective(cfg, chunks)
    tracker = LiveTensorBytes()
    tracker.track(*model.parameters(), *model.buffers(), episode.video, episode.action, episode.text,
                  objective.layout.mask, *(bias for *_, bias in objective.layout.attention.segments))
    with tracker:
        train_step(model, params, objective, episode)
    setup = tm.TrainSetup(preset, chunks, base, rank=4, checkpointing=checkpointing, model=mc)
    predicted = tm.step_bytes(setup, cpu=True, first_step=True)["allocated (tensors)"]
    assert tracker.peak == pytest.approx(predicted, rel=0.10)


def test_checkpointing_and_int8_shrink_the_full_size_step():
    """Orders the model must keep at full size: int8 halves the base, checkpointing removes most activations."""
    so100 = {(base, ckpt): tm.step_bytes(tm.TrainSetup("so100", 4, base, 16, ckpt))["total"]
             for base in ("int8", "bf16") for ckpt in (True, False)}
    counts = tm.param_counts(MODEL_PRESETS["full"])
    assert so100["bf16", True] - so100["int8", True] == pytest.approx(
        tm.base_bytes("bf16", counts) - tm.base_bytes("int8", counts), rel=0.03)  # the int8 dequant working set
    assert so100["int8", True] < so100["int8", False]


@pytest.mark.slow
def test_full_size_step_on_the_cpu(tmp_path):
    """The 5B DiT (int8 base, rank-16 adapters, checkpointing) and one step of a 4-chunk so100 episode, in a
    fresh process: its RSS peak above the pre-build RSS within 15% of the model's CPU prediction. Needs ~8 GiB
    of RAM and many CPU minutes."""
    out = tmp_path / "step.json"
    subprocess.run([sys.executable, "-m", "bench.train_step_measure", "--chunks", "4", "--json", str(out)],
                   check=True)
    measured = json.loads(out.read_text())
    assert measured["rss_over_model"] == pytest.approx(1.0, abs=0.15)
    assert measured["live_over_model"] == pytest.approx(1.0, abs=0.10)


def test_measure_cli_reports_the_models_prediction(tmp_path):
    """The measuring script end to end on the tiny model, in its own process: the live-tensor peak of its step
    against the model's prediction it writes next to it."""
    out = tmp_path / "step.json"
    subprocess.run([sys.executable, "-m", "bench.train_step_measure", "--preset", "tiny", "--chunks", "3",
                    "--rank", "4", "--json", str(out)], check=True, capture_output=True)
    measured = json.loads(out.read_text())
    assert measured["layers"] == 2 and measured["adapter_params"] == 4 * tm.param_counts(MODEL_PRESETS["tiny"]).lora
    assert measured["live_over_model"] == pytest.approx(1.0, abs=0.10)
    assert measured["step_peak_above_baseline"] > measured["live_peak_bytes"] - measured["live_start_bytes"]
