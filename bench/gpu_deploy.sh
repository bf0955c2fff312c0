#!/usr/bin/env bash
# GPU checks of the deploy runtime (bench/gpu_deploy.py): 2:4 semi-structured linear layers, the
# codebook conv held as codes on CUDA, and the autotune on CUDA. Under 8 minutes on one GPU; needs a
# Python with torch, pyyaml and numpy (a device machine's system Python has them). Writes
# $OUT/gpu-deploy.json (bench/results/gpu-deploy.json without $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 "$PY" bench/gpu_deploy.py
