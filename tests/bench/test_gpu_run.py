"""The prepared GPU run (bench/gpu_run.sh) on the CPU, compiling nothing (--eager): it writes its log, one JSON
per finished row and the run's JSON + markdown as it goes, and when interrupted (SIGINT, what the script's own
timeout sends) the finished rows are there and the run says it was interrupted. The smoke rows check the static
sampler against the eager reference on every scheme; the libero rows are skipped by the time budget, with their
estimates. It loads no package a bare Python + torch + numpy + safetensors machine lacks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_run.sh"
# A bare machine: torch (and what torch itself installs), numpy, safetensors; plus this repository. tqdm is
# imported by torch.hub inside a try/except (absent on a bare machine, and torch carries on).
ALLOWED = {"torch", "torchgen", "functorch", "numpy", "safetensors", "lingbot_edge", "bench", "filelock",
           "typing_extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "triton",
           "setuptools", "pkg_resources", "jaraco", "more_itertools", "backports", "packaging", "tqdm"}
SCHEMES = ("bf16", "int8_weight_only", "int8_w8a8", "fp8_weight_only", "fp8_w8a8")


# Smoke rows take seconds here; every libero row's estimate (the full model on this CPU) is minutes: all skipped.
BUDGET = ["--budget-s", "120"]


def _env():
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OUT": ""}


def _rows_on_disk(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run")
    proc = subprocess.run(["bash", str(SCRIPT), "--eager", *BUDGET, "--out", str(out)], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "gpu_run.json").read_text())


def test_smoke_rows_for_every_scheme(eager_run):
    out, run = eager_run
    assert run["status"] == "done" and run["budget_s"] == 120
    smoke = {r["scheme"]: r for r in run["rows"] if r["phase"] == "smoke"}
    assert set(smoke) == set(SCHEMES) - {"fp8_w8a8"}
    for r in smoke.values():  # the static sampler vs the eager reference on the same bf16 model
        assert r["ok"] and 0 <= r["action_rms"] < 2e-2 and r["p90_ms"] >= r["p50_ms"] > 0
        assert r["cudagraph_recordings"] == r["expected_recordings"] == 0  # no CUDA here
    # float8 W8A8 needs sm >= 8.9: refused by name on the CPU, not silently dropped.
    fp8 = [s for s in run["skipped"] if s["variant"] == "smoke_fp8_w8a8"]
    assert len(fp8) == 1 and "compute capability" in fp8[0]["reason"]


def test_libero_rows_skipped_by_the_budget_with_estimates(eager_run):
    _, run = eager_run
    libero = [s for s in run["skipped"] if s["preset"] == "libero"]
    assert [s["variant"] for s in libero][:4] == ["reference_eager_bf16", "cudagraphs_bf16", "cudagraphs_int8_w8a8",
                                                  "cudagraphs_fp8_w8a8"]
    assert all(s["reason"].startswith("estimated ") and " s left" in s["reason"] for s in libero)


def test_every_row_on_disk_and_the_log(eager_run):
    out, run = eager_run
    assert _rows_on_disk(out) == run["rows"]
    md = (out / "gpu_run.md").read_text()
    assert "| smoke | tiny | smoke_int8_w8a8 |" in md and "Status: done" in md
    log = (out / "gpu_run.log").read_text()
    assert "tiny/smoke_bf16: compile - s" in log and "skipped libero/reference_eager_bf16" in log


def test_needs_only_a_bare_machine(eager_run):
    loaded = set(eager_run[1]["environment"]["third_party_modules"])
    assert loaded - ALLOWED == set(), loaded - ALLOWED
    assert {"torch", "lingbot_edge", "bench"} <= loaded


def test_sigint_leaves_the_finished_rows(tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--eager", *BUDGET, "--out", str(out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "rows").glob("01-*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no row written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # to `timeout`, which passes it on to the run (as when it times out)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    run = json.loads((out / "gpu_run.json").read_text())
    assert run["status"].startswith("interrupted")
    assert len(run["rows"]) >= 1 and _rows_on_disk(out) == run["rows"]
    assert len(run["rows"]) + len(run["skipped"]) < 5 + 10  # it stopped before the end
    assert "interrupted during" in (out / "gpu_run.log").read_text()
