#!/usr/bin/env bash
# GPU check, one script, under 10 minutes on a machine with a CUDA GPU:
#   1. the synthetic cohort → crop store (preprocess);
#   2. a 2-job `run -m seed=0,1` sweep with trainer=gpu (and, with 2+ GPUs, one with trainer=ddp);
#   3. a short `pretrain` (SimCLR) with trainer=gpu;
#   4. training images/s at res 32/64/128 (attention off/on) and the projected wall time of
#      experiment=paper_grid on this GPU (benchmarks/train_throughput.py).
# Every figure is printed; the sweep's own summary lines too. Nothing is written in the repository:
# everything goes to $WORK (a fresh temporary folder unless set).
#
#   benchmarks/gpu_check.sh          # on the GPU machine
#   benchmarks/gpu_check.sh --cpu    # smoke test of this script on CPU: tiny settings, same steps
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d -t crc-gpu-check-XXXXXX)}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONHASHSEED=0
START=$SECONDS
ROOT=(paths.root_dir="$WORK")

if [[ "${1:-}" == "--cpu" ]]; then
  # the same commands, small enough for a CPU in a few minutes
  TRAINER=cpu GPUS=0
  RUN=(res=32 trainer.max_epochs=1 trainer.limit_train_batches=3 trainer.limit_val_batches=2)
  PRE=(res=32 epochs=1 batch_size=16 trainer.limit_train_batches=2)
  BENCH=(--res 32,64 --epochs 2 --max-batches 3 --num-workers 0)
else
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
  if [[ "$GPUS" -lt 1 ]]; then
    echo "gpu_check: no CUDA GPU visible (torch.cuda.device_count() = 0); --cpu runs a smoke test" >&2
    exit 1
  fi
  TRAINER=gpu
  RUN=(res=64 trainer.max_epochs=5 datamodule.num_workers=4)
  PRE=(res=64 epochs=5 batch_size=128 data.num_workers=4)
  BENCH=(--res 32,64,128 --epochs 3 --num-workers 4)
  $PY -c "import torch; print('CUDA', torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
fi
echo "gpu_check: trainer=$TRAINER, $GPUS GPU(s), work folder $WORK"

step() { echo; echo "== $1 ($((SECONDS - START)) s so far)"; }

step "1. preprocess: the synthetic cohort (48 patients) → crop store"
$PY -m crc_lightning.preprocess progress=false "${ROOT[@]}" hydra.run.dir="$WORK/logs/preprocess"
STORE="$WORK/data/crops/synthetic"

step "2. run -m seed=0,1 trainer=$TRAINER (2 jobs, one after another)"
T0=$SECONDS
$PY -m crc_lightning.run -m seed=0,1 trainer=$TRAINER split=holdout model.backbone.weights=none \
  logger=none "${RUN[@]}" "${ROOT[@]}" hydra.sweep.dir="$WORK/sweep_$TRAINER"
SWEEP_S=$((SECONDS - T0))
test "$(find "$WORK/sweep_$TRAINER" -name metrics.json | wc -l)" -eq 2
echo "sweep: 2 jobs in $SWEEP_S s"

if [[ "$GPUS" -ge 2 ]]; then
  step "2b. run -m seed=0,1 trainer=ddp (2 GPUs per job)"
  $PY -m crc_lightning.run -m seed=0,1 trainer=ddp datamodule.batch_size=8 split=holdout \
    model.backbone.weights=none logger=none "${RUN[@]}" "${ROOT[@]}" hydra.sweep.dir="$WORK/sweep_ddp"
  test "$(find "$WORK/sweep_ddp" -name metrics.json | wc -l)" -eq 2
fi

step "3. pretrain (SimCLR, synthetic OOD pool) trainer=$TRAINER"
$PY -m crc_lightning.pretrain trainer=$TRAINER "${PRE[@]}" "${ROOT[@]}" \
  weights_file="$WORK/weights/simclr_check.ckpt" hydra.run.dir="$WORK/logs/pretrain" \
  trainer.enable_progress_bar=false
test -s "$WORK/weights/simclr_check.ckpt"

step "4. training images/s per resolution, projected experiment=paper_grid"
# a job's start-up (imports, setup, test) = the sweep's time per job beyond its epochs: measured
# below as the sweep's seconds per job; an upper bound, it includes that sweep's short epochs
$PY benchmarks/train_throughput.py --store "$STORE" --trainer $TRAINER "${BENCH[@]}" \
  --job-overhead "$((SWEEP_S / 2))"

echo
echo "gpu_check: done in $((SECONDS - START)) s (work folder $WORK)"
