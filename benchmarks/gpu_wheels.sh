#!/usr/bin/env bash
# Fetch, into .whl/, the wheels of the project's dependencies that the lent GPU machines lack (their image
# has torch, lightning, transformers, peft, ... but not these, and no registry can be reached from there).
# Run it where pip reaches a registry, with the project's environment active (the versions are taken
# from it), then carry .whl to the GPU machine; benchmarks/gpu_check.sh installs them there.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # target interpreter, default 3.12 (the GPU image's)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-3.12}
PY=${PYTHON:-python}
DEST=.whl
mkdir -p "$DEST"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# Not here: pycocoevalcap (100 MB of SPICE jars; only the captioning metrics import it).
BINARY=(datasets dill multiprocess hydra-core omegaconf ijson)
SPECS=()
for pkg in "${BINARY[@]}"; do SPECS+=("$pkg==$(version "$pkg")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${SPECS[@]}"
# Published as a source archive only; pure Python, so a wheel built here installs anywhere.
"$PY" -m pip wheel -q --no-deps -w "$DEST" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -l "$DEST"
du -sh "$DEST"
