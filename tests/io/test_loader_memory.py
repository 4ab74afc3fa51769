"""No full-precision detour: `build_model` materialises in the target dtype, `load_policy` defaults to
bf16 on the CPU (tensors stay memory-mapped), and peak RSS of building / loading a few-hundred-MB DiT
stays near its size. Measured in fresh subprocesses (peak RSS is per process), growth over the RSS the
process had just before the step (Linux VmHWM, reset through /proc/self/clear_refs), after a warm-up
that imports torch's meta-device machinery (~70 MiB of Python modules, once per process)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lingbot_edge.core.config import MODEL_PRESETS, ModelConfig
from lingbot_edge.core.model import WanVATransformer
from lingbot_edge.io import loading
from lingbot_edge.io.checkpoint import build_model

REPO = Path(__file__).resolve().parents[2]
# ~155M parameters: 0.31 GB in bf16 (dim 1024, 8 blocks, ffn 4096).
MID = dict(num_attention_heads=8, attention_head_dim=128, in_channels=16, out_channels=16, action_dim=8,
           text_dim=1024, ffn_dim=4096, num_layers=8)
# Measured: build 1.08x, load + reading every weight 1.11x (the mapped file pages, counted in RSS).
# A bf16 model built the old way (fp32, then cast) peaks at 3x its size, a fp32 load of a bf16 file
# at 3x (mapped pages + the copy): the bound is ~2.5x the measured slack and far below either detour.
PEAK_FACTOR = 1.3

CHILD = r"""
import json, sys, time
import torch
from lingbot_edge.core.config import MODEL_PRESETS, ModelConfig
from lingbot_edge.io import checkpoint, loading

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def start():
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
    return status("VmRSS")

step, folder, cfg = sys.argv[1], sys.argv[2], ModelConfig(**json.loads(sys.argv[3]))
checkpoint.build_meta_model(MODEL_PRESETS["tiny"])  # warm-up: imports torch's meta machinery (~70 MiB, once)
out = {}
if step == "build":
    base = start()
    model = checkpoint.build_model(cfg, dtype=torch.bfloat16, seed=0)
    out["peak"] = status("VmHWM") - base
    out["bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    checkpoint.save_transformer(model, folder)
else:
    device, dtype, _ = loading.runtime_defaults("cpu")
    base, t0 = start(), time.perf_counter()
    model = checkpoint.load_transformer(folder, dtype=dtype, device=device)
    out["load_s"], out["after_load"] = time.perf_counter() - t0, status("VmRSS") - base
    t0 = time.perf_counter()
    total = sum(float(p.sum(dtype=torch.float32)) for p in model.parameters())  # reads every weight
    out["touch_s"], out["peak"] = time.perf_counter() - t0, status("VmHWM") - base
    out["dtype"], out["finite"] = str(dtype), total == total
print("RESULT " + json.dumps(out))
"""


def _child(step: str, folder: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, step, str(folder), json.dumps(MID)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_model_equals_the_constructor_bit_for_bit(dtype):
    cfg = MODEL_PRESETS["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ref = WanVATransformer(cfg).to(dtype)  # the old way: everything in fp32 first, then cast
    new = build_model(cfg, dtype=dtype, seed=3)
    a, b = ref.state_dict(), new.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) and b[k].dtype == dtype for k in a)
    assert not new.training and not any(p.requires_grad for p in new.parameters())


@pytest.mark.slow  # ~20 s on 2 shared cores: two fresh interpreters, a 0.3 GB model built, saved, read
def test_build_and_load_peak_rss_stays_near_the_bf16_size(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.fail("needs Linux /proc (VmHWM, clear_refs) to measure peak RSS")
    folder = tmp_path / "transformer"
    built = _child("build", folder)
    size = built["bytes"]
    assert 0.25e9 < size < 0.4e9, size
    loaded = _child("load", folder)
    print(f"bf16 DiT {size / 1e9:.2f} GB: build peak {built['peak'] / size:.2f}x; load returns in "
          f"{loaded['load_s']:.2f} s holding {loaded['after_load'] / size:.2f}x, reading every weight "
          f"takes {loaded['touch_s']:.2f} s, load peak {loaded['peak'] / size:.2f}x")
    assert loaded["dtype"] == "torch.bfloat16" and loaded["finite"]
    assert built["peak"] < PEAK_FACTOR * size
    assert loaded["peak"] < PEAK_FACTOR * size
    assert loaded["after_load"] < 0.5 * size  # returned with the weights mapped, not yet read


def test_runtime_defaults_are_bf16_and_fp32_warns_with_the_size(monkeypatch, caplog):
    assert loading.runtime_defaults("cpu") == (torch.device("cpu"), torch.bfloat16, False)
    assert loading.runtime_defaults("cpu", torch.float32) == (torch.device("cpu"), torch.float32, False)
    assert loading.runtime_defaults("cpu", "fp32", True) == (torch.device("cpu"), torch.float32, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.runtime_defaults() == (torch.device("cuda"), torch.bfloat16, True)
    with caplog.at_level(logging.WARNING, logger="lingbot_edge.io.loading"):
        loading.warn_if_float32(ModelConfig(), torch.bfloat16)
        assert not caplog.text
        loading.warn_if_float32(ModelConfig(), torch.float32)  # the released 5B model
    assert "DiT in float32 as asked: 20.36 GB of weights (10.18 GB in the default bfloat16)" in caplog.text
