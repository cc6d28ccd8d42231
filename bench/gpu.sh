#!/usr/bin/env bash
# The GPU, ready to measure: one prepared script for a machine with CUDA (see docs/performance.md).
#   1. the CUDA tests (pytest -m cuda), then
#   2. patch-22, subspace-22, profile-22 and a 6-layer full fine-tune on --device cuda, each a whole
#      process with its wall time and peak GPU memory (bench/gpu_cases.py).
# Everything runs under LIMIT seconds (default 420: a 15-minute lease leaves room for one rerun).
# Needs python3 with torch (CUDA), safetensors, huggingface_hub, typer, rich, pyyaml, pytest and
# hypothesis; nothing is installed. Results: $RESULTS (default $OUT/RESULTS-GPU.md, else
# bench/RESULTS-GPU.md), then copied by hand into bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LIMIT=${LIMIT:-420}
RESULTS=${RESULTS:-${OUT:-bench}/RESULTS-GPU.md}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS
left() { echo $((LIMIT - (SECONDS - start))); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || exit 1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__)" || exit 1

echo "== CUDA tests"
timeout "$(left)" $PY -m pytest -q -p no:cacheprovider -m cuda tests
tests_rc=$?
echo "== GPU cases ($(left) s left)"
timeout "$(left)" $PY bench/gpu_cases.py --results "$RESULTS"
cases_rc=$?
echo "tests exit $tests_rc, cases exit $cases_rc; $((SECONDS - start)) s; results in $RESULTS"
[ -f "$RESULTS" ] && cat "$RESULTS"
exit $((tests_rc || cases_rc))
