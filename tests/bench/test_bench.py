"""Benchmark tooling: the memory model against independent counts, the report against known input."""

import math

import pytest
import torch

from bench import ladder, memory_model, report
from lingbot_edge.core import actions
from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config
from lingbot_edge.core.sampler import ChunkResult


def test_memory_model_kv_and_dit_bytes():
    libero, robotwin = get_policy_config("libero"), get_policy_config("robotwin")
    # layers x CFG rows x capacity x dim x (K, V) x bf16
    assert memory_model.kv_cache_bytes(libero) == 30 * 2 * (15 * (128 + 16)) * 3072 * 2 * 2
    assert memory_model.kv_cache_bytes(robotwin) == 30 * 2 * (36 * (240 + 32)) * 3072 * 2 * 2
    counts = memory_model.dit_param_counts()
    assert 4.8e9 < counts.quantizable < 4.95e9  # "~4.9B of 5.0B params" (docs/design.md section 1)
    # The int8 estimate agrees with quantize's dry run, built independently from the runtime format.
    from quantize import SCHEMES, plan_summary

    rows, _ = plan_summary(MODEL_PRESETS["full"], SCHEMES["int8_weight_only"])
    after = sum(r.bytes_after for r in rows)
    assert memory_model.dit_bytes("int8", counts) == pytest.approx(after, rel=0.01)
    assert memory_model.dit_bytes("bf16", counts) == pytest.approx(sum(r.bytes_before for r in rows), rel=1e-6)


def test_memory_model_table_says_what_fits():
    text = memory_model.render(memory_model.dit_param_counts())
    for preset in ("libero", "robotwin", "so100"):
        assert f"## {preset}" in text
    assert text.count("fits 8 GiB?") == 3 and text.count("fits 24 GiB?") == 3
    libero = memory_model.budget("libero", "int8", memory_model.dit_param_counts())
    assert libero["total"] < 8  # the mission's LIBERO target with an 8-bit DiT
    assert memory_model.budget("libero", "bf16", memory_model.dit_param_counts())["total"] > 8


def _result(a, v):
    return ChunkResult(actions=a, latents=torch.tensor(v, dtype=torch.float32))


def test_action_error_counts_used_channels_of_executed_steps_only():
    cfg = get_policy_config("tiny")  # 8 channels, used 0-3, 5, 6; F = 2, apf = 4
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(1, 8, 2, 4, 1, generator=g) for _ in range(3)]
    noise = [r.clone() for r in ref]
    noise[0][0, :, 0] += 5.0  # the first chunk's pinned frame 0: not executed
    for n in noise:
        n[0, [4, 7]] += 5.0  # unused channels
    assert actions.action_error(ref, noise, cfg) == {"action_rms": 0.0, "action_rel_rms": 0.0,
                                                      "action_cos": pytest.approx(1.0)}
    hit = [r.clone() for r in ref]
    hit[1][0, 5, 1, 2, 0] += 0.3  # one used channel at one executed step
    counted = 6 * (4 + 8 + 8)  # used channels x executed steps (4 in the first chunk, 8 after)
    err = actions.action_error(ref, hit, cfg)
    assert err["action_rms"] == pytest.approx(math.sqrt(0.09 / counted))
    ref_rms = math.sqrt(sum(float(r[0, [0, 1, 2, 3, 5, 6], 1 if i == 0 else 0:].pow(2).sum())
                            for i, r in enumerate(ref)) / counted)
    assert err["action_rel_rms"] == pytest.approx(err["action_rms"] / ref_rms)
    with pytest.raises(ValueError, match="3 reference chunks but 2 test chunks"):
        actions.action_error(ref, hit[:2], cfg)


def test_accuracy_uses_the_action_error_and_latent_sqnr_by_hand():
    cfg = get_policy_config("tiny")
    a = torch.zeros(1, 8, 2, 4, 1)
    a[0, 0] = 1.0
    ref = [_result(a, [2.0, 0.0])]
    same = ladder.accuracy(ref, ref, cfg)
    assert same["action_rms"] == 0.0 and same["latent_sqnr_db"] == math.inf
    assert same["action_cos"] == pytest.approx(1.0, abs=1e-6)
    b = a.clone()
    b[0, 0, 1] = 0.8  # channel 0, the 4 executed steps of frame 1
    acc = ladder.accuracy([_result(b, [2.0, 0.2])], ref, cfg)
    assert acc["action_rms"] == pytest.approx(math.sqrt(4 * 0.04 / (6 * 4)))
    assert acc["latent_sqnr_db"] == pytest.approx(10 * math.log10((4 / 2) / (0.04 / 2)))


def test_report_ratios_from_one_run():
    def chunk(name, median, rms):
        return {"group": "chunk", "stats": {"median": median}, "extra_info": {
            "variant": name, "description": name, "device": "CPU test", "preset": "tiny", "torch": "x",
            "peak_memory_bytes": 2**20, "weight_bytes": 2**20, "actions_per_chunk": 8,
            "action_rms": rms, "action_cos": 1.0, "latent_sqnr_db": 40.0}}

    data = {"benchmarks": [chunk("a_reference", 0.5, 0.0), chunk("c_static_compiled", 0.05, 1e-3)]}
    text = report.render(data)
    assert "| a_reference | 1.000 | 1.00x |" in text
    assert "| c_static_compiled | 0.100 | 10.00x |" in text
    with pytest.raises(ValueError, match="no 'chunk' benchmarks"):
        report.render({"benchmarks": []})
