#!/usr/bin/env bash
# One prepared GPU run: the full-size random-weight libero and so100 presets, every
# sampler / precision / step variant, per-chunk p50/p99, roofline fraction, peak memory, recompiles.
#
#   bench/gpu_run.sh                 # on the GPU machine, from anywhere; <= 8 minutes
#   bench/gpu_run.sh --tiny          # CPU rehearsal of the same script (tests/test_gpu_run.py)
#   bench/gpu_run.sh --out DIR       # results folder (default bench/results/<gpu>/)
#
# Target machine: bare H100 / H200, Python 3.12 + torch 2.11 + numpy + safetensors preinstalled, no
# package index. The runtime path needs nothing else, so no wheels are carried (were one ever needed:
# put it under bench/wheels/ and install it here with `pip install --no-index --find-links bench/wheels`).
# Writes <out>/gpu_run.json and <out>/gpu_run.md after every variant, so a run cut short still leaves
# its results; the Python side also stops starting variants after --budget-s (default 420 s).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT=${GPU_RUN_LIMIT_S:-470}  # hard stop (s): 8 minutes minus start-up

"$PYTHON" - <<'PY'
import sys
import torch, numpy, safetensors  # noqa: F401  (the only packages the runtime path may need)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", file=sys.stderr)
PY

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Inductor's compiled kernels are cached across variants that share graphs (same shapes, same format).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/lingbot_edge_inductor}
exec timeout --signal=INT --kill-after=20 "$LIMIT" "$PYTHON" -m bench.gpu_run "$@"
