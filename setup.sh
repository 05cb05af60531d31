#!/usr/bin/env bash
# Create .venv and install simpo-ray with its test dependencies.
# torch: when the venv has none, install torch==2.13.0 first (on a CPU machine this takes the
# local CPU wheel instead of several GB of CUDA packages). A torch already present (a CUDA
# build on a GPU machine, e.g. created with `python -m venv --system-site-packages .venv`) is
# kept: the project's requirement `torch>=2.4` is satisfied and pip installs nothing more.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
echo "simpo-ray installed in .venv ($(.venv/bin/python -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")'))"
