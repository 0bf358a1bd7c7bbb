#!/bin/bash
# The long runs on one lent GPU, in one command of under 10 minutes (how RESULTS.md and the committed
# teacher were made; see checkpoints/fashion-teacher.md):
#   1. the Fashion-MNIST teacher (train.py --stages teacher) for TEACHER_S seconds, finished at the last
#      saved step S, so it equals `train.py --stages teacher --teacher_steps S` run from scratch;
#      meanwhile the Inception features of all 60,000 training images (FID reference);
#   2. the experiment grid (experiments.py --preset gpu), iterations sized by a timed probe;
#   3. sample.py --bench on the GPU.
# Inputs travel in .devcache/ (not committed; the working tree that travels is capped at 64 MiB):
# train images (xz), labels, torch-fidelity's Inception weights stored as float16 (restored to float32
# here; RESULTS.md states the effect) and the torch_fidelity package. Outputs go to $OUT.
#   bash gpu_results.sh            (env: TEACHER_S, TRAIN_MIN, GRID_ARGS, DEADLINE for a CPU dry run)
set -u
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
TEACHER_S=${TEACHER_S:-140}; TRAIN_MIN=${TRAIN_MIN:-2.0}; DEADLINE=${DEADLINE:-570}; GRID_ARGS=${GRID_ARGS:-}
DEV=${DEV:-cuda}
export PYTHONUNBUFFERED=1 MSD_CACHE=${MSD_CACHE:-/tmp/msdcache} PYTHONPATH=$PWD/.devcache/site
FM=/tmp/fm; mkdir -p $MSD_CACHE $FM runs
exec > >(tee -a "$OUT/log.txt") 2>&1
pack() { tar -czf "$OUT/results.tgz" --ignore-failed-read RESULTS.md checkpoints/fashion-teacher.pt runs/teacher-gpu/metrics.jsonl \
           runs/teacher-gpu/config.json runs/teacher-gpu/grids runs/grid/results.json runs/grid/grids runs/grid/logs \
           runs/grid/logs-msd $(ls runs/grid/*/metrics.jsonl runs/grid/*/config.json runs/grid/*/grids/msd.png 2>/dev/null) 2>/dev/null; }
echo "== $(date -u) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 - <<'EOF'
import io, lzma, os, shutil, torch
cache = os.environ['MSD_CACHE']
sd = torch.load(io.BytesIO(lzma.open('.devcache/inc16.pt.xz').read()), map_location='cpu', weights_only=True)   # seekable
sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
sd['fc.weight'], sd['fc.bias'] = torch.zeros(1008, 2048), torch.zeros(1008)
torch.save(sd, os.path.join(cache, 'pt_inception-2015-12-05-from-fid-helper.pth'))
with lzma.open('.devcache/train-images-idx3-ubyte.xz') as f, open('/tmp/fm/train-images-idx3-ubyte', 'wb') as g:
    shutil.copyfileobj(f, g)
shutil.copy('.devcache/train-labels-idx1-ubyte.gz', '/tmp/fm/')
print('inputs ready')
EOF
echo "== [$(el) s] teacher for ${TEACHER_S} s, reference features alongside"
TARGS="--stages teacher --out runs/teacher-gpu --data $FM --teacher_batch ${TEACHER_BATCH:-256} --ema 0.9995 --ckpt_every ${TEACHER_CKPT:-200} --log_every 100 --device $DEV"
timeout $TEACHER_S python3 train.py $TARGS --teacher_steps 1000000 > $OUT/teacher.log 2>&1 & TPID=$!
python3 experiments.py --preset gpu --parts features --data $FM --device $DEV $GRID_ARGS > $OUT/features.log 2>&1
wait $TPID   # (a bare wait would also wait for the tee above)
S=$(python3 -c "import torch; print(torch.load('runs/teacher-gpu/ckpt/teacher.pt', weights_only=True)['step'])")
echo "teacher stopped at saved step $S; finishing: train.py $TARGS --teacher_steps $S"
python3 train.py $TARGS --teacher_steps $S >> $OUT/teacher.log 2>&1 && mkdir -p checkpoints && cp runs/teacher-gpu/teacher.pt checkpoints/fashion-teacher.pt
tail -3 $OUT/teacher.log; tail -2 $OUT/features.log; pack
echo "== [$(el) s] experiment grid: training (${TRAIN_MIN} min after a probe)"
timeout $(( DEADLINE - 130 - $(el) )) python3 experiments.py --preset gpu --data $FM --device $DEV --parts train --train_minutes $TRAIN_MIN $GRID_ARGS
pack
echo "== [$(el) s] experiment grid: evaluation"
timeout $(( DEADLINE - 25 - $(el) )) python3 experiments.py --preset gpu --data $FM --device $DEV --parts eval,report $GRID_ARGS
python3 experiments.py --preset gpu --data $FM --device $DEV --parts report $GRID_ARGS
pack
echo "== [$(el) s] benchmark"
timeout $(( DEADLINE - $(el) )) python3 sample.py --ckpt runs/grid/k4/msd.pt --teacher checkpoints/fashion-teacher.pt --bench --scaling --batch 1024 --device $DEV
pack
if [ $(el) -lt $(( DEADLINE - 45 )) ]; then
echo "== [$(el) s] imagenet64 preset: time of one full-size iteration at batch 40 per GPU, bf16 (random weights and images)"
timeout $(( DEADLINE - $(el) )) python3 - <<'EOF'
import time, torch, sample as S, train
from student import Student, FakeScore
from teacher import build_net
cfg = train.PRESETS['imagenet64']
dev = torch.device('cuda')
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
data = S.ImageData(torch.randint(1000, (4096,)), 1000, (3, 64, 64), images=torch.randint(0, 256, (4096, 3, 64, 64), dtype=torch.uint8))
teacher = build_net(train.net_config(cfg, data)).to(dev).eval().requires_grad_(False)
G, fake = Student.from_teacher(teacher).to(dev), FakeScore(teacher).to(dev)
run = train.StudentRun(cfg, train.Dist(device=dev), 0, list(range(250)), data, teacher, None, 1)
for adm in (False, True):
    go, gs = train.make_optimizer(list(G.parameters()), cfg.lr, cfg, steps_per_update=cfg.ratio)
    fo, fs = train.make_optimizer(list(fake.parameters()), cfg.lr, cfg)
    iteration = lambda: train.distill_iteration(run, G, fake, go, gs, fo, fs, adm)
    iteration(); torch.cuda.synchronize(); t0 = time.time()
    for _ in range(3):
        iteration()
    torch.cuda.synchronize(); sec = (time.time() - t0) / 3
    print(f'{"ADM" if adm else "DM "} iteration (5 critic + 1 generator update), batch {cfg.batch}: {sec:.3f} s on one GPU; '
          f'{cfg.dm_steps} iterations: {cfg.dm_steps * sec / 3600:.2f} h per student; peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB', flush=True)
EOF
fi
echo "== done in $(el) s"
