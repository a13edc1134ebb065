#!/usr/bin/env bash
# Stage what a bare GPU machine without a registry needs for benchmarks/gpu_check.sh, then carry it there:
#  1. .whl/: wheels of the dependencies its image lacks (datasets, hydra, ...) plus this environment's
#     transformers and peft, so the GPU runs the versions the CPU suite passed with;
#  2. .cache/chameleon_ft/tiny-v<N>-seed0-grouped: the embedded tiny checkpoint, built here. Its build is
#     single-threaded CPU work; on a lent H200 machine it ran past 5 minutes (73 s on our 2-core CPU), the
#     whole setup budget, so the check carries it (gpu_check.sh sets CHAMELEON_FT_CACHE to .cache/).
# Run it where pip reaches a registry, with the project's environment active (versions are taken from it);
# it prints the carry list.
#
#   bash benchmarks/gpu_carry.sh [PYTHON_VERSION]     # target interpreter, default 3.12 (the GPU image's)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-3.12}
PY=${PYTHON:-python}
DEST=.whl
mkdir -p "$DEST"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# Not here: pycocoevalcap (100 MB of SPICE jars; only the captioning metrics import it).
BINARY=(datasets dill multiprocess hydra-core omegaconf ijson transformers peft)
SPECS=()
for pkg in "${BINARY[@]}"; do SPECS+=("$pkg==$(version "$pkg")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${SPECS[@]}"
# Published as a source archive only; pure Python, so a wheel built here installs anywhere.
"$PY" -m pip wheel -q --no-deps -w "$DEST" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -l "$DEST"
du -sh "$DEST"
TINY=$(CHAMELEON_FT_CACHE=$PWD/.cache/chameleon_ft "$PY" -c "from chameleon_ft.tiny import tiny_checkpoint; print(tiny_checkpoint())")
du -sh "$TINY"
echo "carry: [\".whl\", \"${TINY#$PWD/}\"]"
