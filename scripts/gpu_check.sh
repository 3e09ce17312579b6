#!/usr/bin/env bash
# The GPU measurements, on a machine with one GPU, in under 8 minutes:
#   1. tests/integration/test_gpu.py (the equivalence check, the trainer in bf16, no host sync in loss_func);
#   2. the reweighting step-time ratio against Megatron's plain loss in a megatron-core loop
#      (benchmarks/overhead.py --device cuda, DP=1, bf16, Transformer Engine when installed);
#   3. tokens/s of pretrain_llama.py with and without reweighting on the same shape
#      (benchmarks/bench_trainer_throughput.py);
#   4. tokens/s and MFU of both, rendered by benchmarks/gpu_report.py into docs/results.md;
#   5. (GPU only) peak memory of 2 layers of the llama-1.4b and llama-7b shapes at the layout
#      planner's micro-batch against its estimate, and the step time with Megatron-LM's fusions
#      on and off (benchmarks/memory_check.py, OUT/memory.json).
# The model is LAYERS layers of the llama-1.4b shape, MICROBATCHES micro-batches of 1 x 8192
# tokens per step, vocabulary 32000.
#
# --dry-run runs the same steps on the CPU at a tiny size (the tiny preset, a few steps) and
# renders into OUT/results.md instead of docs/results.md: it checks everything but the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
usage: scripts/gpu_check.sh [--out DIR] [--layers N] [--microbatches N] [--peak-tflops X] [--dry-run]
  --out DIR          where the JSON goes (default: docs/results/gpu_check)
  --layers N         llama-1.4b layers to run (default 4)
  --microbatches N   micro-batches of 1 x 8192 tokens per step (default 8)
  --peak-tflops X    dense bf16 peak of the GPU if benchmarks/gpu_report.py does not know it
  --dry-run          run every step on the CPU at a tiny size; leave docs/results.md alone
EOF
}

OUT=docs/results/gpu_check
LAYERS=4
MICROBATCHES=8
PEAK=()
DRY_RUN=0
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: $1 needs a positive integer, got '$2'" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --layers) positive "$1" "${2:-}"; LAYERS=$2; shift 2 ;;
        --microbatches) positive "$1" "${2:-}"; MICROBATCHES=$2; shift 2 ;;
        --peak-tflops) PEAK=(--peak-tflops "${2:?--peak-tflops needs a number}"); shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    OVERHEAD_SHAPE=(--preset tiny --rounds 7 --variants plain plain-repeat uniform linupper)
    TRAINER_SHAPE=(--preset tiny --rounds 1 --train-iters 6 --skip 2 --threads 1 --extra-args "--mock-data --device cpu")
    RESULTS_MD=(--results-md "$OUT/results.md")
    PEAK=(--peak-tflops 1)  # a CPU has no table entry; any value exercises the MFU arithmetic
else
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: no CUDA GPU visible (use --dry-run on a CPU machine)")'
    DEVICE=cuda
    OVERHEAD_SHAPE=(--preset llama-1.4b --vocab-size 32000 --num-layers "$LAYERS" --micro-batch-size 1
                    --num-microbatches "$MICROBATCHES" --rounds 25)
    TRAINER_SHAPE=(--preset llama-1.4b --rounds 2 --train-iters 15 --skip 5 --extra-args
                   "--mock-data --vocab-size 32000 --num-layers $LAYERS --micro-batch-size 1 --global-batch-size $MICROBATCHES")
    RESULTS_MD=()
fi

echo "== 1/4 tests/integration/test_gpu.py"
"$PYTHON" -m pytest -q tests/integration/test_gpu.py

echo "== 2/4 reweighting step time against Megatron's plain loss ($DEVICE, DP=1)"
"$PYTHON" -m benchmarks.overhead --device "$DEVICE" --dp-sizes 1 "${OVERHEAD_SHAPE[@]}" --out "$OUT/overhead.json"

echo "== 3/4 pretrain_llama.py tokens/s, uniform and linupper"
"$PYTHON" -m benchmarks.bench_trainer_throughput "${TRAINER_SHAPE[@]}" --out "$OUT/trainer_throughput.json"

echo "== 4/4 tokens/s and MFU"
"$PYTHON" -m benchmarks.gpu_report --overhead "$OUT/overhead.json" --trainer "$OUT/trainer_throughput.json" \
    "${PEAK[@]}" "${RESULTS_MD[@]}" --out "$OUT/gpu_check.json"

if [ "$DRY_RUN" = 0 ]; then
    echo "== 5/5 peak memory against the layout planner's estimate; fusions on and off"
    "$PYTHON" -m benchmarks.memory_check --device cuda --layers 2 --out "$OUT/memory.json"
fi
