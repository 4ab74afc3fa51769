"""The prepared GPU run (bench/gpu_run.sh), rehearsed on the CPU with the tiny preset: the script
runs end to end, writes its JSON + markdown, the samplers agree with the eager reference, nothing
recompiles after warm-up, and it loads no package a bare Python 3.12 + torch machine lacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# A bare machine: torch (and what torch itself installs), numpy, safetensors; plus this repository.
# Measured importers of the non-obvious ones: setuptools (+ its vendored jaraco, more_itertools,
# backports, packaging) by inductor's CPU C++ builder (torch.utils.cpp_extension); tqdm by torch.hub
# inside a try/except (absent on a bare machine, and torch carries on).
ALLOWED = {"torch", "torchgen", "functorch", "numpy", "safetensors", "lingbot_edge", "bench", "filelock",
           "typing_extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "triton",
           "setuptools", "pkg_resources", "jaraco", "more_itertools", "backports", "packaging", "tqdm"}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--tiny", "--chunks", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_run.json").read_text()), (out / "gpu_run.md").read_text()


def test_rehearsal_runs_every_variant(rehearsal):
    data, md = rehearsal
    rows = {r["variant"]: r for r in data["rows"]}
    for name in ("reference_eager_bf16", "static_compiled_bf16", "static_cudagraphs_bf16",
                 "cudagraphs_int8_weight_only", "cudagraphs_int8_w8a8", "cudagraphs_fp8_weight_only",
                 "cudagraphs_int8_weight_only_exec2_action10", "cudagraphs_int8_weight_only_exec2_action10_grounded"):
        assert name in rows and rows[name]["p50_ms"] > 0 and rows[name]["p99_ms"] >= rows[name]["p50_ms"]
    # float8 W8A8 needs sm >= 8.9: refused by name on the CPU, not silently dropped.
    assert any("fp8_w8a8" in s and "compute capability" in s for s in data["skipped"])
    env = data["environment"]
    assert env["torch"] and env["python"] and env["date"] and "gpu" in env
    assert "| tiny | static_cudagraphs_bf16 |" in md
    grounded = rows["cudagraphs_int8_weight_only_exec2_action10_grounded"]
    assert grounded["loop"] == "grounded" and "action_rms" not in grounded  # its own episode: not compared


def test_rehearsal_numbers(rehearsal):
    rows = {r["variant"]: r for r in rehearsal[0]["rows"]}
    # fp32 tiny model: the static samplers reproduce the reference (same seeds, same episode).
    for name in ("static_compiled_bf16", "static_cudagraphs_bf16"):
        assert rows[name]["action_rms"] < 1e-5
    compiled = rows["static_cudagraphs_bf16"]  # the one compiled variant of the rehearsal
    assert compiled["chunks"] == 3 and 1 <= compiled["graphs"] <= 3 and compiled["recompiles_after_warmup"] == 0
    # 8-bit weights and fewer steps move the actions, by bounded amounts.
    assert 0 < rows["cudagraphs_int8_weight_only"]["action_rms"] < 0.05
    exec2 = rows["cudagraphs_int8_weight_only_exec2_action10"]
    assert exec2["video_exec_step"] == 2 and exec2["action_rms"] > rows["cudagraphs_int8_weight_only"]["action_rms"]


def test_rehearsal_needs_only_a_bare_machine(rehearsal):
    loaded = set(rehearsal[0]["environment"]["third_party_modules"])
    assert loaded - ALLOWED == set(), loaded - ALLOWED
    assert {"torch", "lingbot_edge", "bench"} <= loaded
