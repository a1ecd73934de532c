#!/usr/bin/env bash
# Issue 7's GPU checks in one bounded run, from the repo root of a CUDA host:
#   1. the Triton kernel tests, compiled for the device (no interpreter), against the torch references;
#   2. benchmarks/kernels.py at serving shapes after the tune_kernels pass's autotuner has run on this
#      device (--tune): default and tuned configs, eager and torch.compile baselines.
# Works without installing planc (a GPU image's python3 with torch and triton is enough): if planc is not
# importable, its folders are linked into planc/ as pyproject maps them (links .gitignore'd), and wheels
# in .whl/ (pydantic and its needs) are installed to /tmp when pydantic is missing.
# Logs and JSON go to $OUT (default benchmarks/out/gpu). Stages share one deadline: DEADLINE_S (560).
#
#     bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-benchmarks/out/gpu}
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-560}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }

if ! $PY -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/planc-site .whl/*.whl
  export PYTHONPATH=/tmp/planc-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import planc.kernels.dispatch" 2>/dev/null; then
  for d in passes backends kernels templates; do [ -e "planc/$d" ] || ln -s "../$d" "planc/$d"; done
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|',
          torch.cuda.get_device_name(), '|', torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. kernel tests on the device ($(left) s left)"
timeout "${TEST_TIMEOUT_S:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
  tests/test_pass_tune_kernels.py tests/test_kernels.py >"$OUT/pytest.txt" 2>&1
echo "pytest exit $?"; tail -n 15 "$OUT/pytest.txt"

echo "== 2. kernels.py: tune on this device, then default and tuned configs against the baselines ($(left) s left)"
timeout "$(( $(left) > 20 ? $(left) - 10 : 10 ))" $PY benchmarks/kernels.py --quick --tune --compile headline \
  --out "$OUT/kernels.json" 2>&1 | grep -v "^W1" | tee "$OUT/bench.txt"
echo "done in $(( $(date +%s) - START )) s"
