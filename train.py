"""Train an MSD generator: EDM teacher -> (TSM) -> DM -> ADM, K students, one plain torch.distributed loop.

Stages (--stages, in this order; each resumes from the last checkpoint of the one before):
    teacher  EDM denoising loss on the data (skipped when --teacher gives a checkpoint)      EDM eq. 8
    tsm      teacher score matching, only for students smaller than the teacher            MSD sec. 3.3
    dm       distribution matching: DM gradient for the generator, denoising loss for the
             fake score, `ratio` critic updates per generator update (TTUR)                  DMD, DMD2
    adm      DM + DMD2's GAN: critic head on the fake score's bottleneck, real images of
             the student's own classes only                                                 MSD sec. 3.2

    python train.py                                         # Fashion-MNIST, 4 students, 1 process
    python train.py --preset smoke --out runs/smoke         # every stage in a minute or two
    torchrun --standalone --nproc_per_node 2 train.py --students 4 --preset smoke
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 train.py --students 4 ...

Ranks and students: with N ranks and K students, N >= K gives each student a process subgroup of N/K ranks
that average their gradients (data parallel); N < K gives rank r the students r, r+N, ... one after another.
The teacher stage is data parallel over all ranks. The run folder (on a filesystem every rank sees) holds
config.json, teacher.pt, ckpt/ (resumable state per stage and student), student{k}.pt, msd.pt, grids/, metrics.jsonl.
"""
import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist

import losses as L
import partition as P
import sample as S
from data import FASHION_DIR, ImageData, load_data
from msd import MSD, load_student, msd_checkpoint
from student import FakeScore, Student
from checkpoint import (atomic_save, load_state, load_teacher, one_line_errors, read_checkpoint, restore, save_state,
                        teacher_checkpoint)
from teacher import NetConfig, build_net, count_params

STAGES = ('teacher', 'tsm', 'dm', 'adm')


def opt(default, help):
    return field(default=default, metadata={'help': help})


@dataclass
class Config:
    # run
    out: str = opt('runs/fashion', 'run folder: config, checkpoints, grids, metrics (resumes if it exists)')
    data: str = opt('', f'Fashion-MNIST IDX folder, or EDM dataset folder/.zip of PNGs; empty: {FASHION_DIR}')
    stages: str = opt('teacher,tsm,dm,adm', 'comma-separated stages to run, from: ' + ','.join(STAGES))
    teacher: str = opt('', 'teacher checkpoint to distil; empty: the teacher.pt the teacher stage trains in --out')
    students: int = opt(4, 'K, the number of students (1 <= K <= number of classes)')
    partition: str = opt('contiguous', 'how classes are split among students: ' + ', '.join(P.STRATEGIES))
    partition_file: str = opt('', 'JSON partition: K lists of class indices (overrides --partition)')
    seed: int = opt(0, 'random seed (rank r uses seed + r)')
    only_students: str = opt('', 'train only these students here, e.g. 0,2; a later run without it writes msd.pt')
    skip_nonfinite: int = opt(0, '1: skip an update whose loss or gradient is NaN/inf instead of stopping the run')
    device: str = opt('auto', 'auto, cpu or cuda')
    # teacher network (ignored when --teacher is given: the checkpoint has its own)
    model_channels: int = opt(32, 'teacher base width')
    channel_mult: str = opt('1,2,2', 'width multiplier per resolution level')
    num_blocks: int = opt(1, 'residual blocks per level')
    attn_resolutions: str = opt('7', 'resolutions with self-attention, e.g. 32,16,8')
    channels_per_head: int = opt(64, 'attention channels per head (EDM: 64)')
    dropout: float = opt(0.1, 'teacher dropout')
    # teacher training (EDM loss)
    teacher_steps: int = opt(900, 'teacher optimiser steps')
    teacher_batch: int = opt(32, 'teacher batch per rank')
    teacher_lr: float = opt(1e-3, 'teacher Adam learning rate')
    ema: float = opt(0.995, 'teacher EMA decay per step (the EMA weights are the teacher)')
    heun_steps: int = opt(18, 'teacher Heun sampler steps N (2N-1 network evaluations; 18 -> 35 NFE)')
    # students
    student_width: float = opt(1.0, 'student channels relative to the teacher (< 1: smaller students, TSM init)')
    sigma_max: float = opt(80.0, 'the generator input noise level: G(z, y) = D(sigma_max z; sigma_max, y)')
    batch: int = opt(16, 'per-student batch per rank, for TSM, DM and ADM')
    lr: float = opt(1e-4, 'AdamW learning rate of generator and fake score (DM, and ADM unless --adm_lr)')
    adm_lr: float = opt(0.0, 'AdamW learning rate of generator and fake score in the ADM stage (0: --lr); a resumed '
                             'stage runs at the rate given now')
    tsm_lr: float = opt(5e-4, 'AdamW learning rate of TSM')
    weight_decay: float = opt(0.01, 'AdamW weight decay')
    clip: float = opt(10.0, 'gradient-norm clip')
    warmup: int = opt(50, 'linear learning-rate warm-up steps of every stage')
    tsm_steps: int = opt(300, 'TSM steps (smaller students only)')
    dm_steps: int = opt(30, 'DM generator steps per student')
    adm_steps: int = opt(12, 'ADM generator steps per student (continues DM)')
    ratio: int = opt(5, 'critic (fake score) updates per generator update (TTUR, DMD2: 5)')
    gan_gen_weight: float = opt(3e-3, 'GAN generator loss weight (DMD2: 3e-3)')
    gan_critic_weight: float = opt(1e-2, 'GAN critic loss weight (DMD2: 1e-2)')
    gan_noise: float = opt(1.0, 'the GAN re-noises at sigmas from this lowest fraction of the grid (DMD2: 1, the whole '
                                'grid; 0.4: sigma <= 0.97)')
    dm_noise: float = opt(0.98, 'DM draws sigma at grid fractions 0.02 to this (DMD2: 0.98, sigma <= 72; 0.5: sigma <= 2.5)')
    fake_noise: float = opt(1.0, 'the fake score learns at sigmas from this lowest fraction of the grid (DMD2: 1, the '
                                 'whole grid; 0.5: where --dm_noise 0.5 reads it)')
    regression_weight: float = opt(0.0, 'DM regression loss weight (DMD: 0.25 with LPIPS; L2 without; 0: off)')
    regression_pairs: int = opt(256, 'number of teacher (z -> Heun sample) pairs, over all classes')
    # logging and evaluation
    log_every: int = opt(10, 'log losses every this many steps')
    grid_every: int = opt(10, 'also a student sample grid every this many generator steps (0: stage end only)')
    ckpt_every: int = opt(50, 'save resumable state every this many steps')
    snapshot_every: int = opt(0, 'also keep the student every this many generator steps in snapshots/ (0: off)')
    fid_samples: int = opt(500, 'samples for the final FID of teacher and MSD (0: skip FID)')
    fid_ref: int = opt(500, 'training images in the FID reference statistics (cached)')
    fid_teacher: int = opt(1, 'also measure the teacher\'s FID at the end (0: skip; costly at scale)')
    compile: int = opt(0, '1: torch.compile student, fake score, teacher (minutes; measure with bench.py --train)')


# The committed Fashion-MNIST teacher (model card: checkpoints/fashion-teacher.md).
FASHION_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'checkpoints', 'fashion-teacher.pt')

PRESETS = {
    # The main job: 4 same-size students of the committed Fashion-MNIST teacher, `make run` on a 2-core CPU (2 ranks)
    # in 30 minutes, its numbers picked on the FID-1k of the main job's students. Runs in RESULTS.md ("The main job's
    # recipe"): 200 ADM updates (120: 51.0 vs 46.4, Intel Xeon, 992137d); batch 8 (batch 16 at 70 DM + 55 ADM: 59.7);
    # GAN generator weight 3e-2 (0.1: 49.9 vs 45.8); 5 critic updates (200 DM updates at 2: 48.4); regression loss off
    # (0.25, pixel L2: 45.6). From FID curves not kept: lr 1e-4 beat 3e-4 and 1e-3; 3e-2 gained more per ADM update
    # than DMD2's 3e-3; ratio 1 diverged in DM and 2 in ADM; a batch-8 iteration costs 0.55-0.6x one at batch 16.
    # 40 DM + 265 ADM updates: 48.8; the preset with --seed 1, 2: 48.3, 46.8 (SD 1.3: none of these resolved).
    # The GAN re-noised at sigma <= 0.97 only (--gan_noise 0.4): 43.7, 46.7, 47.1 against 45.8, 48.3, 46.8 at seeds 0-2
    # from the same DM states (1.2 lower on average, not resolved), and K = 1 at 1,250 updates 28.6 against 23.7: DMD2's
    # whole grid kept. DM's sigmas capped at grid fraction 0.5 (sigma <= 2.5; DMD2: 0.98, sigma <= 72): 40.8, 41.3, 41.2 at
    # seeds 0-2 against 45.8, 48.3, 46.8; at 0.6 (sigma <= 5.9) 41.5, at 0.4 (sigma <= 0.97) 44.1 (seed 0). The fake
    # score's own loss at grid fractions 0-0.5 too (--fake_noise 0.5; DMD2: the whole grid): 39.8, 41.0, 39.5 against
    # 40.8, 41.3, 41.2. Not kept (seed 0, fake score over the whole grid): the GAN at sigma <= 0.97 45.0; ADM at lr 2e-4
    # 41.6; 200 DM + 140 ADM 43.1; 80 DM + 230 ADM 40.6; 260 ADM updates 39.3 but 3.4 min more.
    # --teacher '' trains a teacher first (1.37M parameters).
    'fashion': Config(stages='teacher,dm,adm', teacher=FASHION_TEACHER, batch=8, dm_steps=120, adm_steps=200, warmup=20,
                      gan_gen_weight=3e-2, dm_noise=0.5, fake_noise=0.5, fid_samples=1000, fid_ref=1000),
    # Every stage, smaller students included, tiny sizes: the CI / torchrun check.
    'smoke': Config(out='runs/smoke', stages='teacher,tsm,dm,adm', model_channels=16, channel_mult='1,2', num_blocks=1,
                    attn_resolutions='14', channels_per_head=16, teacher_steps=30, teacher_batch=16, teacher_lr=2e-3,
                    heun_steps=4, student_width=0.5, batch=8, tsm_steps=6, dm_steps=3, adm_steps=2, ratio=2, warmup=2,
                    log_every=2, ckpt_every=2, fid_samples=0, regression_weight=0.25, regression_pairs=8),
    # MSD's ImageNet-64 setting for NVIDIA's edm-imagenet-64x64-cond-adm.pkl (give --teacher and --data): 4 contiguous
    # students of 250 classes, DMD2's hyper-parameters (the defaults: AdamW, weight decay 0.01, clip 10, ratio 5, GAN
    # weights 3e-3 / 1e-2), batch 40 per GPU, bf16; 4000 generator steps = 20k iterations. ADM at 5e-7: DMD2's best
    # ImageNet run (FID 1.28) resumed its 2e-6 DM run with the GAN at 5e-7 (MSD gives none). Smaller students:
    # --student_width 0.67 (128 channels, 55.5% fewer parameters) --stages tsm,dm,adm.
    'imagenet64': Config(out='runs/imagenet64', stages='dm,adm', model_channels=192, channel_mult='1,2,3,4',
                         num_blocks=3, attn_resolutions='32,16,8', batch=40, lr=2e-6, adm_lr=5e-7, tsm_lr=2e-5,
                         warmup=500, tsm_steps=20000, dm_steps=4000, adm_steps=4000, log_every=100, grid_every=1000,
                         ckpt_every=500, heun_steps=256, fid_samples=50000, fid_ref=50000, fid_teacher=0),
}


def parse_args(argv=None) -> Config:
    """argparse generated from the Config dataclass; --preset picks the defaults, flags override."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--preset', default='fashion', choices=PRESETS, help='starting defaults (default: fashion)')
    for f in fields(Config):
        ap.add_argument('--' + f.name, type=f.type, default=None,
                        help=f'{f.metadata["help"]} (fashion: {getattr(PRESETS["fashion"], f.name)!r})')
    args = vars(ap.parse_args(argv))
    return replace(PRESETS[args.pop('preset')], **{k: v for k, v in args.items() if v is not None})


def net_config(cfg: Config, data: ImageData) -> NetConfig:
    ints = lambda s: tuple(int(v) for v in s.split(',') if v)
    return NetConfig(img_resolution=data.shape[-1], img_channels=data.shape[0], label_dim=data.num_classes,
                     model_channels=cfg.model_channels, channel_mult=ints(cfg.channel_mult),
                     num_blocks=cfg.num_blocks, attn_resolutions=ints(cfg.attn_resolutions),
                     dropout=cfg.dropout, channels_per_head=cfg.channels_per_head)


# ---- Distributed plumbing: one code path for 1 or N processes.

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device('cpu')
    main = property(lambda self: self.rank == 0)            # rank 0 prints and writes the run's files


def init_dist(cfg: Config) -> Dist:
    """This process's rank, world size and device; torchrun's environment starts a process group (NCCL or gloo)."""
    cuda = torch.cuda.is_available() if cfg.device == 'auto' else cfg.device == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise ValueError('--device cuda but no CUDA device is visible')
    d = Dist()
    if 'RANK' in os.environ:            # torchrun; a rank with fewer students waits at barriers: allow long stages
        dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(days=1))
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
    if cuda:
        d.device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(d.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return d


def student_plan(d, k):
    """(students this rank trains, ranks per student, each student's process subgroup). N >= K ranks: K
    data-parallel subgroups of N/K ranks; N < K: rank r trains students r, r+N, ... one after another."""
    if d.world < k:
        return list(range(d.rank, k, d.world)), 1, [None] * k
    if d.world % k:
        raise ValueError(f'{d.world} ranks cannot be split evenly among {k} students '
                         '(use a multiple of K, or fewer ranks than K)')
    n = d.world // k        # every rank creates every subgroup, in the same order (torch.distributed requires it)
    groups = [dist.new_group(list(range(s * n, (s + 1) * n))) for s in range(k)] if n > 1 else [None] * k
    return [d.rank // n], n, groups


def average_gradients(params, group, n):
    """Data parallelism by hand: one flat all-reduce of the gradients over the subgroup, divided by its size, so
    n ranks at batch B step as 1 rank at batch nB. (Not DDP: its hooks refuse the critic's forwards per backward.)"""
    if n > 1:
        grads = [p.grad for p in params if p.grad is not None]     # the same set on every rank (same code path)
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=group)
        for g, avg in zip(grads, flat.div_(n).split([g.numel() for g in grads])):
            g.copy_(avg.view_as(g))


def upload(t, device):
    """Host to device through pinned memory, asynchronously (.to('cuda') from pageable memory waits for the GPU)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else t


def autocast(device):
    """bf16 autocast on CUDA (DMD2: fp16 diverged), plain float32 on CPU."""
    return torch.autocast('cuda', dtype=torch.bfloat16, enabled=device.type == 'cuda')


# ---- Metrics (metrics.jsonl). Resumable states (ckpt/) are written and read by checkpoint.py.

def log_metrics(cfg, record):
    with open(os.path.join(cfg.out, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def log_throughput(cfg, stage, k, steps, sec, images_per_step):
    """Steps/s and images/s of one stage (one student), in metrics.jsonl and on stdout."""
    rec = dict(stage=stage, student=k, throughput=True, steps=steps, sec=round(sec, 2),
               steps_per_s=round(steps / sec, 4), images_per_s=round(steps * images_per_step / sec, 2))
    log_metrics(cfg, rec)
    print(f'{stage}{"" if k == "-" else f" (student {k})"}: {rec["steps_per_s"]} steps/s, '
          f'{rec["images_per_s"]} images/s')


# ---- The optimiser step, shared by every stage.

def make_optimizer(params, lr, cfg, adam=False, steps_per_update=1):
    """AdamW (Adam for the teacher) with a linear warm-up over cfg.warmup iterations; an optimiser that steps
    once every `steps_per_update` iterations (the generator under TTUR) warms up over as many iterations (DMD2)."""
    # fused: one kernel for all parameters, CUDA and CPU (here 4 ms per AdamW step, per-tensor 21 ms, foreach 14 ms)
    o = (torch.optim.Adam if adam else torch.optim.AdamW)(params, lr=lr, betas=(0.9, 0.999), fused=True,
                                                          weight_decay=0 if adam else cfg.weight_decay)
    return o, torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) * steps_per_update / max(cfg.warmup, 1)))


def step_optimizer(opt, sched, params, cfg, group=None, n=1, losses=None, where=''):
    """Average gradients over the group, clip, step; returns (grad norm, {loss: value}) as floats, in the update's
    one host-device sync. A non-finite loss or gradient (any rank of the group) stops the run, naming `where`
    (the last checkpoint stays the last good state), or with --skip_nonfinite 1 skips the update."""
    average_gradients(params, group, n)
    losses = losses or {}
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    vals = torch.stack([norm.float()] + [v.detach().float() for v in losses.values()])
    bad = (~torch.isfinite(vals)).any().float().reshape(1)
    if n > 1:
        dist.all_reduce(bad, group=group)
    gn, *vals, bad = torch.cat([vals, bad]).tolist()                 # the one sync
    losses = dict(zip(losses, vals))
    if bad:
        opt.zero_grad(set_to_none=True)
        msg = f'{where}: non-finite ' + ', '.join([f'loss {k} = {v:.4g}' for k, v in losses.items()]
                                                  + [f'grad norm {gn:.4g}'])
        if not cfg.skip_nonfinite:
            raise FloatingPointError(msg + ' (last good checkpoint kept; --skip_nonfinite 1 skips such steps)')
        print(f'skipped update: {msg}', file=sys.stderr, flush=True)
        return float('nan'), losses
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return gn, losses


# ---- Stage: teacher (EDM denoising loss, data parallel over all ranks, EMA weights are the teacher).

def train_teacher(cfg, d: Dist, data: ImageData):
    """EDM's denoising loss (EDM eq. 8) with Adam; the EMA of the weights is the teacher, written to
    teacher.pt with a grid of its Heun samples. Resumes from ckpt/teacher.pt."""
    path = os.path.join(cfg.out, 'teacher.pt')
    if os.path.exists(path):
        return
    torch.manual_seed(cfg.seed + d.rank)
    gen = torch.Generator().manual_seed(cfg.seed + d.rank)
    net = build_net(net_config(cfg, data)).to(d.device).train()
    ema = build_net(net.cfg).to(d.device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    params = list(net.parameters())
    o, sched = make_optimizer(params, cfg.teacher_lr, cfg, adam=True)
    parts = dict(net=net, ema=ema, opt=o, sched=sched)          # data parallel over all ranks: group None
    state_path, step = os.path.join(cfg.out, 'ckpt', 'teacher.pt'), 0
    if (state := load_state(state_path)) is not None:                       # the bar shows the step it resumes at
        step = restore(state_path, state, parts, gen, d.rank, rank0_if_new=True)
    if d.main:
        print(f'teacher: {count_params(net) / 1e6:.2f}M parameters, {cfg.teacher_steps} steps, '
              f'batch {cfg.teacher_batch} x {d.world} ranks', flush=True)
        if cfg.ema ** cfg.teacher_steps > 0.01:      # the EMA starts at the random init and forgets it as ema^steps
            print(f'warning: the EMA teacher keeps {100 * cfg.ema ** cfg.teacher_steps:.0f}% of its random init after '
                  f'{cfg.teacher_steps} steps (--ema {cfg.ema}): lower --ema or train longer', file=sys.stderr)
    bar, t0, step0 = S.progress(cfg.teacher_steps, 'teacher', step, d.main), time.time(), step
    while step < cfg.teacher_steps:
        x, y = data.get(torch.randint(len(data), (cfg.teacher_batch,), generator=gen))
        with autocast(d.device):
            loss = L.edm_loss(net, upload(x, d.device), upload(y, d.device), sigma_data=net.sigma_data).mean()
        loss.backward()
        where = f'teacher stage, step {step + 1}'
        _, vals = step_optimizer(o, sched, params, cfg, None, d.world, dict(edm=loss), where)
        with torch.no_grad():                                             # EMA of the weights
            torch._foreach_lerp_(list(ema.parameters()), params, 1 - cfg.ema)
        step += 1
        bar.set_postfix_str(f'loss {vals["edm"]:.4f}', refresh=False)
        bar.update()
        if d.main and (step % cfg.log_every == 0 or step == cfg.teacher_steps):
            log_metrics(cfg, dict(stage='teacher', step=step, loss=vals['edm']))
        if step % cfg.ckpt_every == 0 or step == cfg.teacher_steps:
            save_state(state_path, parts, gen, None, d.world, d.main, step=step, config=asdict(cfg))
    bar.close()
    if d.main and step > step0:
        log_throughput(cfg, 'teacher', '-', step - step0, time.time() - t0, cfg.teacher_batch * d.world)
    if d.main:
        atomic_save(teacher_checkpoint(ema, config=asdict(cfg), steps=step), path)
        S.save_grid(S.class_grid(lambda z, y: S.heun(ema, z, y, cfg.heun_steps), ema.label_dim, 8, ema.cfg,
                                 device=d.device), os.path.join(cfg.out, 'grids', 'teacher.png'))
    if d.world > 1:
        dist.barrier()


# ---- Student stages: one `StudentRun` holds what one student needs; each update returns a small dict of floats.

class StudentRun:
    """Noise, labels and sigmas come from the device's global RNG (saved in each checkpoint), which real images from
    `gen` (host). The teacher is D_real: frozen and in eval mode (no dropout)."""

    def __init__(self, cfg, d, k, classes, data, teacher, group, n_ranks):
        self.cfg, self.d, self.k, self.classes = cfg, d, k, torch.tensor(classes, device=d.device)
        self.data, self.teacher, self.group, self.n = data, teacher.eval().requires_grad_(False), group, n_ranks
        self.pool = torch.nonzero(torch.isin(data.labels, torch.tensor(classes))).squeeze(1)   # own classes only
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + k * 10 + d.rank)
        self.grid = L.sigma_grid(1000, sigma_max=cfg.sigma_max).to(d.device)

    stage, step, lpips = '', 0, None

    def where(self, what):
        return f'{self.stage} stage, student {self.k}, step {self.step + 1} ({what} update)'

    def labels(self, n):
        return self.classes[torch.randint(len(self.classes), (n,), device=self.d.device)]

    def real(self, n):
        x, y = self.data.get(self.pool[torch.randint(len(self.pool), (n,), generator=self.gen)])
        return upload(x, self.d.device), upload(y, self.d.device)

    def noise(self, n):
        return torch.randn((n,) + tuple(self.data.shape), device=self.d.device)


def critic_step(run, G, fake, opt, sched, adm):
    """Fake-score update (and, in ADM, the GAN critic): the generator is held fixed."""
    cfg, n = run.cfg, run.cfg.batch
    y = run.labels(n)
    with torch.no_grad(), autocast(run.d.device):
        x_fake = G(run.noise(n), y).float()
    with autocast(run.d.device):
        # lambda ||D_fake(x_t) - sg(x)||^2, sigma at grid fractions 0..fake_noise
        out = dict(fake_score=L.fake_score_loss(fake, x_fake, y, run.grid, cfg.fake_noise).mean())
        loss = out['fake_score']
        if adm:     # softplus(critic(fake)) + softplus(-critic(real)), real images of its own classes (MSD sec. 3.2)
            out['gan_critic'] = L.gan_critic_loss(fake.critic, *run.real(n), x_fake, y, run.grid, cfg.gan_noise).mean()
            loss = loss + cfg.gan_critic_weight * out['gan_critic']
    loss.backward()
    gn, out = step_optimizer(opt, sched, list(fake.parameters()), cfg, run.group, run.n, out, run.where('critic'))
    return dict(out, grad_critic=gn)


def generator_step(run, G, fake, opt, sched, adm, pairs=None):
    """Generator update: DM gradient (+ GAN generator loss in ADM, + optional regression). The fake
    score is only read here; its parameters are frozen and its gradients stay untouched."""
    cfg, n = run.cfg, run.cfg.batch
    y = run.labels(n)
    fake.requires_grad_(False)
    with autocast(run.d.device):
        x = G(run.noise(n), y).float()
        # d/dx = (D_fake - D_real) / w (DMD eq. 8), sigma at grid fractions 0.02..dm_noise
        out = dict(dm=L.dm_loss(run.teacher, fake, x, y, run.grid, hi=cfg.dm_noise).mean())
        loss = out['dm']
        if adm:                                                                 # softplus(-critic(G(z))) (DMD2)
            out['gan_gen'] = L.gan_generator_loss(fake.critic, x, y, run.grid, cfg.gan_noise).mean()
            loss = loss + cfg.gan_gen_weight * out['gan_gen']
        if pairs is not None and cfg.regression_weight > 0:                     # d(G(z), teacher ODE sample) (DMD)
            i = torch.randint(len(pairs['z']), (n,), device=run.d.device)          # pairs live on the device
            x_reg = G(pairs['z'][i], pairs['y'][i]).float()
            out['regression'] = L.regression_loss(x_reg, pairs['x'][i], run.lpips).mean()
            loss = loss + cfg.regression_weight * out['regression']
    loss.backward()
    fake.requires_grad_(True)
    gn, out = step_optimizer(opt, sched, list(G.parameters()), cfg, run.group, run.n, out, run.where('generator'))
    return dict(out, grad_gen=gn)


def distill_iteration(run, G, fake, go, gsched, fo, fsched, adm, pairs=None):
    """One DM / ADM iteration (TTUR): `ratio` critic updates, then one generator update."""
    for _ in range(run.cfg.ratio):
        info = critic_step(run, G, fake, fo, fsched, adm)
    return dict(info, **generator_step(run, G, fake, go, gsched, adm, pairs))


def tsm_step(run, G, opt, sched):
    """Teacher score matching (MSD sec. 3.3): lambda(sigma) ||D_student(x_t) - D_teacher(x_t)||^2 on real images."""
    x, y = run.real(run.cfg.batch)
    with autocast(run.d.device):
        loss = L.tsm_loss(G.net, run.teacher, x, y, sigma_data=G.net.sigma_data).mean()
    loss.backward()
    gn, out = step_optimizer(opt, sched, list(G.parameters()), run.cfg, run.group, run.n, dict(tsm=loss),
                             run.where('tsm'))
    return dict(out, grad_gen=gn)


def build_pair(cfg, teacher, device):
    """The student G and its fake score, in training mode; --compile 1 compiles in place (same state_dict keys)."""
    G = Student.from_teacher(teacher, cfg.student_width, cfg.sigma_max).to(device).train()
    fake = FakeScore(teacher).to(device).train()
    if cfg.compile:
        G.net.compile(); fake.net.compile(); fake.head.compile()
    return G, fake


def stage_path(cfg, stage, k):
    return os.path.join(cfg.out, 'ckpt', f'{stage}-student{k}.pt')


def regression_pairs(cfg, d, teacher, num_classes, shape):
    """DMD's paired set: (z, y, teacher Heun sample from z) over ALL classes (MSD Fig. 8), cached."""
    path, n = os.path.join(cfg.out, 'ckpt', 'regression_pairs.pt'), cfg.regression_pairs
    if os.path.exists(path):
        pairs = read_checkpoint(path, None)
        if {k: tuple(getattr(v, 'shape', ())) for k, v in pairs.items()} != dict(z=(n, *shape), y=(n,), x=(n, *shape)):
            raise ValueError(f'{path} does not fit this run (not {n} pairs of {shape} images)')
        return pairs
    z, y = S.seeded_noise(list(range(10 ** 6, 10 ** 6 + n)), shape), torch.arange(n) % num_classes
    pairs = dict(z=z, y=y, x=torch.cat([S.heun(teacher, z[i:i + 64].to(d.device), y[i:i + 64].to(d.device),
                                               cfg.heun_steps, cfg.sigma_max).cpu() for i in range(0, n, 64)]))
    atomic_save(pairs, path + f'.rank{d.rank}')                  # each rank its own file, then one rename
    os.replace(path + f'.rank{d.rank}', path)
    return pairs


# ---- One student: its stages in order, each a loop that starts or resumes, steps, logs and saves.

def train_student(cfg, d, k, groups, data, teacher, stages, group, n_ranks):
    """Student k's stages in order, each from the last one's final weights (TSM only for a student smaller
    than the teacher), then student{k}.pt. `group`: the process subgroup of the n_ranks ranks training it."""
    run = StudentRun(cfg, d, k, groups[k], data, teacher, group, n_ranks)
    # The GAN head (and a smaller student) start from random weights: every student draws them from the state the
    # rank was seeded with, not from what the students before it on this rank left, whose draws depend on how far
    # they trained. So a finished run continued to more steps ends where an uninterrupted run ends.
    torch.manual_seed(cfg.seed + d.rank)
    G, fake = build_pair(cfg, teacher, d.device)
    smaller = G.net.cfg.model_channels < teacher.cfg.model_channels
    d.main and print(f'student {k}: classes {groups[k]}, {count_params(G) / 1e6:.2f}M parameters'
                     f'{" (smaller: TSM first)" if smaller else " (copy of the teacher)"}', flush=True)
    pairs = None
    if cfg.regression_weight > 0 and 'dm' in stages:
        pairs = {a: b.to(d.device) for a, b in regression_pairs(cfg, d, teacher, data.num_classes, data.shape).items()}
        run.lpips, how = L.lpips_if_present(d.device)
        if d.main and k == 0:
            print(f'regression loss: {how}, on {len(pairs["z"])} teacher pairs over all classes', flush=True)
    for stage in [s for s in stages if s != 'tsm' or smaller]:
        train_stage(run, G, fake, stage, groups, pairs if stage == 'dm' else None)      # regression: DM only
    if d.rank % n_ranks == 0:
        atomic_save(student_record(G, k, groups, cfg), os.path.join(cfg.out, f'student{k}.pt'))


def start_stage(run, stage, parts):
    """Seed from (seed, student, stage, rank) alone, then resume from ckpt/ (`parts`, RNG states: the numbers an
    uninterrupted run draws), or start from the latest earlier stage's weights, fresh optimisers. Returns the step."""
    seed = run.cfg.seed * 10 ** 6 + run.k * 10 ** 4 + STAGES.index(stage) * 100 + run.d.rank
    torch.manual_seed(seed)
    run.gen.manual_seed(seed)
    path = stage_path(run.cfg, stage, run.k)
    if (state := load_state(path)) is not None:
        return restore(path, state, parts, run.gen, run.d.rank % run.n)
    for earlier in reversed(STAGES[1:STAGES.index(stage)]):                  # student stages before this one
        if os.path.exists(path := stage_path(run.cfg, earlier, run.k)):
            restore(path, load_state(path), dict(G=parts['G'], fake=parts['fake']))
            break
    return 0


def train_stage(run, G, fake, stage, groups, pairs=None):
    """One stage of one student: TSM steps or DM / ADM iterations (TTUR); logs, ckpt/, snapshots/ and grids/."""
    cfg, d, k, leader = run.cfg, run.d, run.k, run.d.rank % run.n == 0
    steps, tsm, adm = getattr(cfg, f'{stage}_steps'), stage == 'tsm', stage == 'adm'
    lr = (cfg.adm_lr or cfg.lr) if adm else cfg.lr
    glr = cfg.tsm_lr if tsm else lr
    go, gsched = make_optimizer(list(G.parameters()), glr, cfg, steps_per_update=1 if tsm else cfg.ratio)
    fo, fsched = make_optimizer(list(fake.parameters()), lr, cfg)
    parts = dict(G=G, fake=fake, opt_G=go, sched_G=gsched, opt_fake=fo, sched_fake=fsched)
    run.stage, run.step = stage, start_stage(run, stage, parts)
    # A resumed stage keeps its optimiser moments but runs at the learning rates given now: continuing a finished
    # ADM stage with a lower --adm_lr is a step decay (DMD2's best ImageNet-64 run resumed at a lower rate).
    for o, sched, base in ((go, gsched, glr), (fo, fsched, lr)):
        sched.base_lrs = [base] * len(o.param_groups)
        for g, f in zip(o.param_groups, sched.lr_lambdas):
            g['initial_lr'], g['lr'] = base, base * f(sched.last_epoch)
    step = step0 = run.step
    bar, t0 = S.progress(steps, f'{stage} s{k}', step, d.main), time.time()
    while step < steps:
        info = (tsm_step(run, G, go, gsched) if tsm
                else distill_iteration(run, G, fake, go, gsched, fo, fsched, adm, pairs))
        step = run.step = step + 1
        bar.set_postfix_str(' '.join(f'{a} {b:.4g}' for a, b in info.items() if a[:4] != 'grad'), refresh=False)
        bar.update()
        if leader and (step % cfg.log_every == 0 or step == steps):
            log_metrics(cfg, dict(stage=stage, student=k, step=step, sec=round(time.time() - t0, 2), **info))
        if step % cfg.ckpt_every == 0 or step == steps:
            save_state(stage_path(cfg, stage, k), parts, run.gen, run.group, run.n, leader,
                       stage=stage, student=k, step=step, partition=groups, config=asdict(cfg))
        if leader and cfg.snapshot_every and step % cfg.snapshot_every == 0 and not tsm:
            os.makedirs(os.path.join(cfg.out, 'snapshots'), exist_ok=True)
            atomic_save(student_record(G, k, groups, cfg),
                        os.path.join(cfg.out, 'snapshots', f'{stage}-student{k}-step{step}.pt'))
        if leader and cfg.grid_every and step % cfg.grid_every == 0:
            S.save_grid(S.class_grid(G, run.data.num_classes, 4, G.net.cfg, classes=groups[k], device=d.device),
                        os.path.join(cfg.out, 'grids', f'{stage}-student{k}-step{step}.png'))
    bar.close()
    if leader and step > step0:     # throughput: a generator step generates batch x (ratio + 1) images
        log_throughput(cfg, stage, k, step - step0, time.time() - t0, cfg.batch * run.n * (1 if tsm else cfg.ratio + 1))
    if leader:
        S.save_grid(S.class_grid(G, run.data.num_classes, 8, G.net.cfg, classes=groups[k], device=d.device),
                    os.path.join(cfg.out, 'grids', f'{stage}-student{k}.png'))


def student_record(G, k, groups, cfg):
    """One trained student as a plain checkpoint (weights on the CPU, its classes, the run's config)."""
    return dict(kind='student', student=k, classes=list(groups[k]), partition=groups, net=asdict(G.net.cfg),
                state_dict={n: t.detach().cpu() for n, t in G.state_dict().items()}, config=asdict(cfg))


# ---- main: set-up, the teacher, the partition, the students, msd.pt, evaluation; each step below it.

def main(cfg: Config):
    """The whole run on this rank; the same command reruns it, resuming wherever it stopped."""
    stages, only = check_config(cfg)
    S.keep_freed_memory()                               # CPU: no page faults for every activation (sample.py)
    data = load_data(cfg.data)
    if not 1 <= cfg.students <= data.num_classes:
        raise ValueError(f'--students must be between 1 and the number of classes ({data.num_classes}), '
                         f'got {cfg.students}')
    teacher = load_teacher(cfg.teacher, data=data) if cfg.teacher else None    # a bad --teacher: fail before writing
    d = init_dist(cfg)
    mine, n_ranks, pgs = student_plan(d, cfg.students)
    start_run_folder(cfg, d, data, stages)
    t_start = time.time()
    teacher_path = cfg.teacher or os.path.join(cfg.out, 'teacher.pt')
    if teacher is None:                                 # the teacher stage's, trained now or by an earlier run
        if 'teacher' in stages:
            train_teacher(cfg, d, data)
        if not os.path.exists(teacher_path):
            raise FileNotFoundError(f'no teacher at {teacher_path}: give --teacher or include the teacher stage')
        teacher = load_teacher(teacher_path, data=data)
    teacher = teacher.to(d.device)
    if cfg.compile:
        teacher.compile()
    stages = [s for s in stages if s != 'teacher']
    if stages:
        groups = P.class_groups(cfg.partition, data.num_classes, cfg.students, cfg.seed, teacher, cfg.partition_file)
        d.main and print(f'partition ({cfg.partition}): {groups}', flush=True)
        train_students(cfg, d, [k for k in mine if k in only], n_ranks, pgs, groups, data, teacher, stages)
        msd = assemble_msd(cfg, d, groups, data, teacher_path, stages)
        if msd is not None:
            print(f'wrote {os.path.join(cfg.out, "msd.pt")} ({cfg.students} student{"s" * (cfg.students > 1)}, '
                  f'{(time.time() - t_start) / 60:.1f} min)', flush=True)
            final_eval(cfg, d, teacher, msd, data)
    if d.world > 1:               # no barrier: the other ranks leave while rank 0 evaluates (a waiting rank spins)
        dist.destroy_process_group()


def check_config(cfg):
    """The checks that need no data; returns the stages in STAGES order and the students this run may train."""
    stages = [s.strip() for s in cfg.stages.split(',') if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f'unknown stage {",".join(bad) or "(none)"}: choose from {", ".join(STAGES)}')
    if cfg.partition not in P.STRATEGIES:
        raise ValueError(f'unknown partition {cfg.partition!r}: choose one of {", ".join(P.STRATEGIES)}')
    for name in ('batch', 'ratio', 'teacher_batch', 'heun_steps'):
        if getattr(cfg, name) < 1:
            raise ValueError(f'--{name} must be at least 1')
    if not 0 < cfg.student_width <= 1:
        raise ValueError('--student_width must be in (0, 1]')
    for name, lo in (('dm_noise', 0.02), ('gan_noise', 0), ('fake_noise', 0)):      # grid fractions; DM above its floor
        if not lo < getattr(cfg, name) <= 1:
            raise ValueError(f'--{name} must be in ({lo:g}, 1]')
    only = [int(v) for v in cfg.only_students.split(',') if v.strip()] or list(range(cfg.students))
    if any(not 0 <= v < cfg.students for v in only):
        raise ValueError(f'--only_students {cfg.only_students}: students are numbered 0..{cfg.students - 1}')
    return [s for s in STAGES if s in stages], only


# Settings that give saved state its meaning: a run folder resumes only with the same ones.
RUN_IDENTITY = ('data', 'teacher', 'students', 'partition', 'partition_file', 'seed', 'student_width',
                'model_channels', 'channel_mult', 'num_blocks', 'attn_resolutions', 'channels_per_head', 'sigma_max')


def start_run_folder(cfg, d, data, stages):
    """ckpt/ and grids/; refuse a folder whose config.json differs from this run in a RUN_IDENTITY setting;
    then config.json and a one-line summary (rank 0)."""
    os.makedirs(os.path.join(cfg.out, 'ckpt'), exist_ok=True)
    os.makedirs(os.path.join(cfg.out, 'grids'), exist_ok=True)
    path = os.path.join(cfg.out, 'config.json')
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f'--{k} {old.get(k)!r} -> {getattr(cfg, k)!r}' for k in RUN_IDENTITY if old.get(k) != getattr(cfg, k)]
        if diff:
            raise ValueError(f'{cfg.out} holds a run with other settings ({"; ".join(diff)}): use another --out')
    if d.world > 1:
        dist.barrier()                 # every rank has read an existing config.json before rank 0 rewrites it
    if d.main:
        with open(path, 'w') as f:
            json.dump(asdict(cfg), f, indent=1)
        print(f'data: {len(data)} images {data.shape}, {data.num_classes} classes | {d.world} rank(s) on {d.device} | '
              f'stages {",".join(stages)} | run folder {cfg.out}', flush=True)


def train_students(cfg, d, mine, n_ranks, pgs, groups, data, teacher, stages):
    """This rank's students `mine`, each with the n_ranks ranks of its process subgroup pgs[k]; a student whose
    student{k}.pt exists and whose last stage reached its final step is done and skipped."""
    for k in mine:
        last = load_state(stage_path(cfg, stages[-1], k)) or {}
        done = isinstance(last.get('step'), int) and last['step'] >= getattr(cfg, stages[-1] + '_steps')
        if not (done and os.path.exists(os.path.join(cfg.out, f'student{k}.pt'))):
            train_student(cfg, d, k, groups, data, teacher, stages, pgs[k], n_ranks)
    if d.world > 1:
        dist.barrier()


def assemble_msd(cfg, d, groups, data, teacher_path, stages):
    """msd.pt from every student{k}.pt, written by rank 0 once all exist; returns the MSD generator there."""
    paths = [os.path.join(cfg.out, f'student{k}.pt') for k in range(cfg.students)]
    missing = [k for k, path in enumerate(paths) if not os.path.exists(path)]
    if missing and d.main:                       # --only_students: the others are trained elsewhere
        print(f'students {missing} not trained yet: msd.pt is written by a run that finds all of them', flush=True)
    if missing or not d.main:
        return None
    students = [load_student(read_checkpoint(path, 'student'), cfg.sigma_max, data.num_classes, path) for path in paths]
    atomic_save(msd_checkpoint(students, groups, data.num_classes, asdict(cfg),
                               teacher=os.path.abspath(teacher_path), stages=stages), os.path.join(cfg.out, 'msd.pt'))
    return MSD(students, groups, data.num_classes).to(d.device).eval()


def final_eval(cfg, d, teacher, msd, data):
    """Grids of both generators; FID of the teacher (Heun, 2N-1 NFE) and of MSD (1 NFE)."""
    if d.device.type == 'cpu' and d.world > 1:
        torch.set_num_threads(os.cpu_count() or 1)     # the other ranks have left: every core is free
    S.save_grid(S.class_grid(msd, data.num_classes, 10, teacher.cfg, device=d.device),
                os.path.join(cfg.out, 'grids', 'msd.png'))
    if cfg.fid_samples <= 0:
        return
    nfe, results = 2 * cfg.heun_steps - 1, []
    heun = lambda z, y: S.heun(teacher, z, y, cfg.heun_steps)
    models = [('teacher', heun, nfe, f'teacher (Heun, {nfe} NFE)')] if cfg.fid_teacher else []
    for name, fn, n, label in models + [('msd', msd, 1, f'MSD, {cfg.students} student{"s" * (cfg.students > 1)} (1 NFE)')]:
        print(f'FID of {label}: {cfg.fid_samples} samples, then their Inception features', flush=True)
        t0 = time.time()
        fid, _ = S.fid(fn, data, cfg.fid_samples, cfg.fid_ref, d.device)
        log_metrics(cfg, dict(stage='eval', model=name, fid=fid, samples=cfg.fid_samples, ref=cfg.fid_ref, nfe=n,
                              sec=round(time.time() - t0, 1)))
        results.append(f'{label} {fid:.2f}')
    print(f'FID ({cfg.fid_samples} samples vs {cfg.fid_ref} training images): ' + ' | '.join(results), flush=True)


def cli(argv=None):
    try:
        with one_line_errors((ValueError, OSError, FloatingPointError)):     # OSError: missing files, full disk, ...
            main(parse_args(argv))
    except KeyboardInterrupt:
        print('\ninterrupted: rerun the same command to resume from the last checkpoint', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    cli()
