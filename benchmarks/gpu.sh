#!/usr/bin/env bash
# The GPU figures of the README, in one short run on a CUDA machine (about 6 minutes on one H100/H200):
# a default-settings training run on a cleaned real-image folder (when DATA is given), a torchrun launch on
# NCCL, and the benchmark suite's GPU mode. Logs and results go to OUT (default: gpu-results/), the runs'
# checkpoints to a scratch folder. With CV=1 also a default 5-fold cross-validation of DATA and the 5-model
# ensemble's prediction of DATA/test, both timed end to end (#13; budget the time of five default trainings).
# With DATA, also predict.py on one process and on two sharing the GPU (torchrun; outputs compared: issue 34).
#   bash benchmarks/gpu.sh [DATA] [OUT]
#   CV=1 bash benchmarks/gpu.sh data/clean gpu-results
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-}
OUT=${2:-gpu-results}
WORK=$(mktemp -d)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"
if [ -n "$DATA" ]; then
  start=$(date +%s)
  python3 train.py --data-dir "$DATA" --runs-dir "$WORK/runs" --run-name real --model-path "$WORK/real.pt" \
    --pictures "$WORK" --quiet 2>&1 | tee "$OUT/train_real.log"
  echo "default-settings run: $(( $(date +%s) - start )) s" | tee -a "$OUT/train_real.log"
  cp "$WORK/runs/real/metrics.csv" "$OUT/real_metrics.csv"
  cp "$WORK/training_curves.png" "$OUT/real_training_curves.png"
  torchrun --standalone --nproc_per_node=1 train.py --data-dir "$DATA" --runs-dir "$WORK/runs" --run-name ddp \
    --model-path "$WORK/ddp.pt" --pictures "$WORK/ddp" --max-epochs 3 --quiet 2>&1 | tail -4 | tee "$OUT/torchrun_nccl.log"
  python3 benchmarks/predict_processes.py --checkpoint "$WORK/real.pt" --input "$DATA/test" --work "$WORK/processes" \
    --device cuda --only one,two 2>&1 | tail -4 | tee "$OUT/predict_processes.log"
fi
if [ -n "$DATA" ] && [ -n "${CV:-}" ]; then
  start=$(date +%s)
  python3 train.py --data-dir "$DATA" --folds 5 --runs-dir "$WORK/runs" --run-name cv --model-path "$WORK/cv.pt" \
    --pictures "$WORK/cv" --quiet 2>&1 | tail -14 | tee "$OUT/train_cv.log"
  echo "5-fold cross-validation, default settings: $(( $(date +%s) - start )) s" | tee -a "$OUT/train_cv.log"
  start=$(date +%s)
  python3 predict.py --checkpoint "$WORK/cv.pt" --input "$DATA/test" --output "$WORK/cv-predictions" \
    --pictures "$WORK/cv" --quiet 2>&1 | tail -2 | tee "$OUT/predict_ensemble.log"
  echo "5-model ensemble prediction of $DATA/test: $(( $(date +%s) - start )) s" | tee -a "$OUT/predict_ensemble.log"
fi
timeout ${BENCH_SECONDS:-330} python3 benchmarks/run.py --gpu-quick --out "$OUT" 2>&1 | tail -40 | tee "$OUT/benchmark.log"
