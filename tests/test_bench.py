"""Benchmark tooling: the memory model against independent counts, the report against known input."""

import math

import pytest
import torch

from bench import ladder, memory_model, report
from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config
from lingbot_edge.core.sampler import ChunkResult


def test_memory_model_kv_and_dit_bytes():
    libero, robotwin = get_policy_config("libero"), get_policy_config("robotwin")
    # layers x CFG rows x capacity x dim x (K, V) x bf16
    assert memory_model.kv_cache_bytes(libero) == 30 * 2 * (15 * (128 + 16)) * 3072 * 2 * 2
    assert memory_model.kv_cache_bytes(robotwin) == 30 * 2 * (36 * (240 + 32)) * 3072 * 2 * 2
    counts = memory_model.dit_param_counts()
    assert 4.8e9 < counts.quantizable < 4.95e9  # "~4.9B of 5.0B params" (DESIGN.md section 1)
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
    return ChunkResult(actions=torch.tensor(a, dtype=torch.float32), latents=torch.tensor(v, dtype=torch.float32))


def test_accuracy_metrics_by_hand():
    ref = [_result([1.0, -1.0], [2.0, 0.0])]
    same = ladder.accuracy(ref, ref)
    assert same["action_rms"] == 0.0 and same["latent_sqnr_db"] == math.inf
    assert same["action_cos"] == pytest.approx(1.0, abs=1e-6)
    acc = ladder.accuracy([_result([1.0, -0.8], [2.0, 0.2])], ref)
    assert acc["action_rms"] == pytest.approx(math.sqrt(0.04 / 2))
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
