#!/usr/bin/env bash
# One-shot GPU check: the `gpu` test tier, then the GPU benchmarks; every figure in one JSON, a short table
# on stdout. About 5 minutes on one H100/H200, at most GPU_CHECK_BUDGET_S (default 450 s) plus setup.
#
#   bash benchmarks/gpu_check.sh [OUT.json]
#
# Report: OUT.json, else $OUT/gpu_check.json when $OUT is set, else benchmarks/gpu_check.json.
# Works from a fresh checkout on a bare GPU machine: it never reinstalls torch. The project runs from
# the checkout (PYTHONPATH); Python packages the machine lacks come from wheels in .whl/ when present
# (stage them, and the tiny checkpoint, where a registry is reachable: bash benchmarks/gpu_carry.sh), else
# from the registry.
#
# Environment: GPU_CHECK_BUDGET_S (overall budget), GPU_CHECK_ALLOW_CPU=1 (no GPU: run the CPU twins and
# the benchmark at a tiny shape, to check this script's plumbing), GPU_CHECK_TESTS_K (pytest -k filter),
# PYTHON (interpreter, default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
if [ $# -ge 1 ]; then
  REPORT=$1
elif [ -n "${OUT:-}" ]; then
  REPORT=$OUT/gpu_check.json
else
  REPORT=$ROOT/benchmarks/gpu_check.json
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export CHAMELEON_FT_CACHE=${CHAMELEON_FT_CACHE:-$ROOT/.cache/chameleon_ft}

# 1. torch, as installed (a CUDA build on a GPU machine).
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch; install the torch build for this machine first" >&2
  exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
MODE=()
if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')" != 1 ]; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    echo "gpu_check: no CUDA device; set GPU_CHECK_ALLOW_CPU=1 for the CPU plumbing run" >&2
    exit 2
  fi
  MODE=(--cpu)
fi

# 2. The project from this checkout; missing dependencies from carried wheels, else from the registry.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
IMPORTS="import chameleon_ft.training.train, chameleon_ft.config.store, chameleon_ft.data.pipeline, lightning, peft, pytest"
if ! "$PY" -c "$IMPORTS" 2>/dev/null && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  SITE=${TMPDIR:-/tmp}/chameleon_ft_site
  echo "gpu_check: installing $(ls "$ROOT"/.whl/*.whl | wc -l) carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if ! "$PY" -c "$IMPORTS" 2>/dev/null; then
  echo "gpu_check: dependencies missing; pip install -e .[dev] with torch pinned to the installed build"
  CONSTRAINTS=$(mktemp)
  "$PY" -c "import torch; print('torch==' + torch.__version__)" >"$CONSTRAINTS"
  timeout 300 "$PY" -m pip install -q --retries 1 --timeout 15 -c "$CONSTRAINTS" -e "$ROOT[dev]"
  rm -f "$CONSTRAINTS"
fi
if ! "$PY" -c "$IMPORTS"; then
  echo "gpu_check: the project cannot be imported (see above); no registry here? carry wheels: bash benchmarks/gpu_carry.sh" >&2
  exit 2
fi

# 3. The parts, each time-boxed inside the driver; the outer timeout only guards the driver itself.
K=()
if [ -n "${GPU_CHECK_TESTS_K:-}" ]; then K=(--tests-k "$GPU_CHECK_TESTS_K"); fi
timeout --kill-after=10 $((${BUDGET%.*} + 60)) "$PY" -m benchmarks.gpu_check --json "$REPORT" --budget-s "$BUDGET" "${MODE[@]}" "${K[@]}"
