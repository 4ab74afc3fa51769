"""Peak memory of one ladder variant in isolation: a fresh process per variant, so no variant's
allocations (or the order they ran in) show up in another's number.

    python -m bench.peak_memory c_static_compiled --preset tiny --chunks 6 --device cpu

The process builds the bf16 model, the variant's sampler (quantizing that model in place, compiling
when the variant does) and runs one episode of the ladder's inputs. What it counts (`counts` in the
JSON it prints):
- CUDA: `torch.cuda.max_memory_allocated` of the process (tensors only: weights, caches, activations;
  not the CUDA context or the allocator's reserve);
- CPU: peak RSS above the RSS the process had after its imports (VmHWM, Linux): weights, caches,
  activations, compiled code and allocator slack; the interpreter and the modules a variant uses
  (quantize, the quantization libraries, dynamo / inductor: imported before the baseline) excluded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench import ladder
from lingbot_edge.core.config import MODEL_PRESETS, get_policy_config

COUNTS = {
    "cuda": "CUDA max_memory_allocated, one fresh process per variant",
    "cpu": "peak RSS above the process's RSS after imports, one fresh process per variant",
}


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}: peak RSS needs Linux")


def _import_everything_a_variant_uses() -> None:
    """Modules count as the interpreter's, not as a variant's memory: import them before the baseline."""
    import contextlib
    import importlib

    for name in ("quantize", "torch._dynamo", "torch._inductor.compile_fx", "torchao", "optimum.quanto",
                 "bitsandbytes"):
        with contextlib.suppress(ImportError):  # a variant needing it fails later with its own message
            importlib.import_module(name)


def measure(variant_name: str, preset: str, chunks: int, device: str) -> dict:
    """In this process: peak memory of building `variant_name` and running one episode."""
    dev = torch.device(device)
    variant = next((v for v in ladder.all_variants() if v.name == variant_name), None)
    if variant is None:
        raise ValueError(f"variant: {variant_name!r} is not one of {[v.name for v in ladder.all_variants()]}")
    cfg = get_policy_config(preset)
    _import_everything_a_variant_uses()
    ladder.build_meta_model(MODEL_PRESETS[cfg.model])  # warm-up: imports torch's meta machinery once
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        baseline = _status_bytes("VmRSS")
    model = ladder.build_model(MODEL_PRESETS[cfg.model], dtype=torch.bfloat16, device=dev, seed=0)
    sampler = variant.build(model, cfg)
    inputs = ladder.episode_inputs(cfg, chunks)
    ladder.run_episode(sampler, inputs, lambda: ladder.sync(dev))
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _status_bytes("VmHWM") - baseline
    return {"variant": variant_name, "device": dev.type, "peak_bytes": int(peak),
            "weight_bytes": ladder.weight_bytes(sampler.model), "counts": COUNTS[dev.type]}


def isolated(variant_name: str, preset: str, chunks: int, device: str | torch.device, timeout_s: float = 1800) -> dict:
    """`measure` in a fresh interpreter (same Python, same environment)."""
    dev = torch.device(device).type
    cmd = [sys.executable, "-m", "bench.peak_memory", variant_name, "--preset", preset, "--chunks", str(chunks),
           "--device", dev]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=Path(__file__).parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.variant, args.preset, args.chunks, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
