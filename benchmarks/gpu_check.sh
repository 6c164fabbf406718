#!/usr/bin/env bash
# One-command GPU check (see benchmarks/gpu_check.py): RepNoise step on the 7B shape in bf16 against SFT and
# the reference loss, HF vs vLLM generation, a paper-profile pipeline run on a random ~1B model; one table.
#   benchmarks/gpu_check.sh                 # on one GPU, about 10 minutes
#   benchmarks/gpu_check.sh --cpu-smoke     # toy sizes on the CPU: tests the check itself
#   benchmarks/gpu_check.sh --dry-run       # print the commands
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" benchmarks/gpu_check.py "$@"
