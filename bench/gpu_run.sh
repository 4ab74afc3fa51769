#!/usr/bin/env bash
# One prepared GPU run that brings its results home: a tiny-preset smoke pass over every scheme, then the
# full-size random-weight libero rows in priority order, each started only if it fits the time left.
#
#   bench/gpu_run.sh                 # results in $OUT when set (the device machine), else bench/results/<gpu>/
#   bench/gpu_run.sh --out DIR       # results folder
#   bench/gpu_run.sh --budget-s 300  # start no row that would not end within 300 s (default 470)
#   bench/gpu_run.sh --eager --budget-s 120  # compile nothing, skip libero: the bookkeeping in seconds (tests/bench/)
#
# Target machine: bare H100 / H200, Python 3.12 + torch + numpy + safetensors preinstalled, no package
# index; nothing else is needed (no wheels carried). On a CPU the same script is the rehearsal: the smoke
# rows run, the libero rows are skipped by the budget with their estimates.
# The results folder fills as the run goes (gpu_run.log, rows/*.json, gpu_run.json, gpu_run.md); the hard
# stop below sends SIGINT, on which the run writes what it has, marks itself interrupted and exits 130.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT=${GPU_RUN_LIMIT_S:-540}  # hard stop (s): a 600 s device call less start-up

"$PYTHON" - <<'PY'
import sys
import torch, numpy, safetensors  # noqa: F401  (the only packages the runtime path may need)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", file=sys.stderr)
PY

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Inductor's compiled kernels are cached across rows that share graphs (same shapes, same format).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/lingbot_edge_inductor}
exec timeout --signal=INT --kill-after=20 "$LIMIT" "$PYTHON" -m bench.gpu_run "$@"
