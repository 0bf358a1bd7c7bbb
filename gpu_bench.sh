#!/bin/bash
# Speed on one lent GPU (README, BENCHMARKS), as one command of a few minutes:
#   1. sample.py --bench --scaling --compile at batch 1024, then --bench at batch 64: the teacher's Heun
#      sampler, one student, the routed MSD generator (eager and as CUDA graphs), the other ways to run
#      one student, smaller students, and how cost grows with batch, K and width;
#   2. train.py --profile: DM and ADM iterations of student 0 at batch 16 (the fashion preset) and 64,
#      host-device syncs counted, Chrome traces; then the same at batch 64 with --compile 1.
# Inputs in .devbench/ (not committed; carried to the GPU machine): Fashion-MNIST's training images
# (train-images-idx3-ubyte.xz) and labels (train-labels-idx1-ubyte.gz), and the K = 4 students of
# RESULTS.md (msd.pt, from runs/grid/k4). Outputs (log, traces) go to $OUT.
#   bash gpu_bench.sh          (env: PARTS=bench or profile; DEV=cpu BATCH=8 PROFILE=1 for a dry run on a CPU)
set -u
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEV=${DEV:-cuda}; BATCH=${BATCH:-1024}; PROFILE=${PROFILE:-5}; DEADLINE=${DEADLINE:-520}; PARTS=${PARTS:-bench,profile}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/bench-log.txt") 2>&1
echo "== $(date -u) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null) commit $(git rev-parse --short HEAD 2>/dev/null)"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
FM=/tmp/fm; mkdir -p $FM
xz -dc .devbench/train-images-idx3-ubyte.xz > $FM/train-images-idx3-ubyte && cp .devbench/train-labels-idx1-ubyte.gz $FM/
CK="--ckpt .devbench/msd.pt --teacher checkpoints/fashion-teacher.pt --device $DEV"
if [[ $PARTS == *bench* ]]; then
echo "== [$(el) s] bench, batch $BATCH"
timeout 300 python3 sample.py $CK --bench --scaling --compile --batch $BATCH
echo "== [$(el) s] bench, batch 64"
timeout 60 python3 sample.py $CK --bench --batch 64
fi
[[ $PARTS == *profile* ]] || { echo "== [$(el) s] done"; exit 0; }
for b in 16 64; do
  echo "== [$(el) s] train.py --profile $PROFILE --batch $b"
  timeout 90 python3 train.py --profile $PROFILE --batch $b --data $FM --out runs/prof$b --device $DEV
  for s in dm adm; do [ -f runs/prof$b/profile-$s.json ] && gzip -c runs/prof$b/profile-$s.json > $OUT/profile-$s-batch$b.json.gz; done
done
LEFT=$(( DEADLINE - $(el) ))
if [ $LEFT -gt 60 ]; then
  echo "== [$(el) s] train.py --profile $PROFILE --batch 64 --compile 1 (limit $LEFT s)"
  timeout $LEFT python3 train.py --profile $PROFILE --batch 64 --compile 1 --data $FM --out runs/profc --device $DEV
fi
echo "== [$(el) s] done"
