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
    python train.py --profile 3 --out runs/profile          # time and profile DM / ADM iterations
    torchrun --standalone --nproc_per_node 2 train.py --students 4 --preset smoke
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 train.py --students 4 ...

Ranks and students: with N ranks and K students, N >= K gives each student N/K ranks that average
their gradients over the student's own process subgroup (data parallel); N < K gives rank r the
students r, r+N, ... one after another. The teacher stage is data parallel over all ranks.
The run folder (on a filesystem every rank sees) holds config.json, teacher.pt, ckpt/ (resumable
per-stage, per-student state), student{k}.pt, msd.pt, grids/ and metrics.jsonl.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

import losses as L
import partition as P
import sample as S
from msd import MSD, load_student, msd_checkpoint
from student import FakeScore, Student
from teacher import NetConfig, build_net, count_params, load_teacher, read_checkpoint, reason, teacher_checkpoint

STAGES = ('teacher', 'tsm', 'dm', 'adm')


def opt(default, help):
    return field(default=default, metadata={'help': help})


@dataclass
class Config:
    # run
    out: str = opt('runs/fashion', 'run folder: config, checkpoints, grids, metrics (resumes if it exists)')
    data: str = opt('', 'Fashion-MNIST IDX folder, or an EDM dataset (folder or .zip of PNGs + dataset.json); '
                        f'empty: {S.FASHION_DIR}')
    stages: str = opt('teacher,tsm,dm,adm', 'comma-separated stages to run, from: ' + ','.join(STAGES))
    teacher: str = opt('', 'teacher checkpoint to distil; empty: the run folder\'s teacher.pt, trained by the teacher stage')
    students: int = opt(4, 'K, the number of students (1 <= K <= number of classes)')
    partition: str = opt('contiguous', 'how classes are split among students: ' + ', '.join(P.STRATEGIES))
    partition_file: str = opt('', 'JSON file with the partition as a list of K lists of class indices (overrides --partition)')
    seed: int = opt(0, 'random seed (rank r uses seed + r)')
    only_students: str = opt('', 'train only these students here, e.g. 0,2 (several processes sharing one GPU); '
                                 'a later run without it finds them done and writes msd.pt')
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
    adm_lr: float = opt(0.0, 'AdamW learning rate of generator and fake score in the ADM stage (0: --lr)')
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
    regression_weight: float = opt(0.0, 'DM-stage regression loss weight on teacher pairs (DMD: 0.25 with LPIPS; here a pixel L2, so retune; 0 = off)')
    regression_pairs: int = opt(256, 'number of teacher (z -> Heun sample) pairs, over all classes')
    # logging and evaluation
    log_every: int = opt(10, 'log losses every this many steps')
    grid_every: int = opt(10, 'also write a student sample grid every this many generator steps (0: end of each stage only)')
    ckpt_every: int = opt(50, 'save resumable state every this many steps')
    snapshot_every: int = opt(0, 'also keep the student every this many generator steps in snapshots/ (0: off)')
    fid_samples: int = opt(500, 'samples for the final FID of teacher and MSD (0: skip FID)')
    fid_ref: int = opt(500, 'training images in the FID reference statistics (cached)')
    fid_teacher: int = opt(1, 'also measure the teacher\'s FID at the end (0: skip; costly at scale)')
    compile: int = opt(0, '1: torch.compile the student, fake-score and teacher networks (compiles for minutes first; '
                          'measure the gain with --profile before a long run)')
    profile: int = opt(0, 'instead of training: time N DM and N ADM iterations of student 0, profile one of each '
                          '(top operations; on CUDA host-device syncs counted) and write OUT/profile-{dm,adm}.json')


# The committed Fashion-MNIST teacher (model card: checkpoints/fashion-teacher.md).
FASHION_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'checkpoints', 'fashion-teacher.pt')

PRESETS = {
    # The default main job: Fashion-MNIST, 4 same-size students distilled from the committed teacher
    # (sizes set by a 2-core CPU budget: lr 1e-4 for the tiny students; see README). --teacher '' trains
    # a teacher first (the teacher stage, with this network: 1.4M parameters).
    'fashion': Config(stages='teacher,dm,adm', teacher=FASHION_TEACHER),
    # Every stage, smaller students included, tiny sizes: the CI / torchrun check.
    'smoke': Config(out='runs/smoke', stages='teacher,tsm,dm,adm', model_channels=16, channel_mult='1,2',
                    num_blocks=1, attn_resolutions='14', channels_per_head=16, teacher_steps=30,
                    teacher_batch=16, teacher_lr=2e-3, heun_steps=4, student_width=0.5, batch=8, tsm_steps=6,
                    dm_steps=3, adm_steps=2, ratio=2, warmup=2, log_every=2, ckpt_every=2, fid_samples=0,
                    regression_weight=0.25, regression_pairs=8),
    # The paper's ImageNet-64 setting (method.md sections 2-3; DMD2's hyper-parameters) for NVIDIA's
    # edm-imagenet-64x64-cond-adm.pkl: give --teacher and --data. 4 contiguous students of 250 classes,
    # AdamW lr 2e-6, wd 0.01, clip 10, 5 critic updates per generator update, GAN weights 3e-3 / 1e-2,
    # batch 40 per GPU, bf16 on CUDA. dm_steps counts generator updates: 4000 = DMD2/MSD's 20k iterations.
    # ADM resumes from the DM checkpoint at adm_lr 5e-7, the learning rate of DMD2's best ImageNet run (FID 1.28),
    # which resumed its 2e-6 DM run with the GAN at 5e-7 for generator and critic; no ADM learning rate of MSD's
    # own was found in its paper, so DMD2's is taken.
    # Smaller students: --student_width 0.67 (128 channels, 55.5% fewer parameters) --stages tsm,dm,adm.
    'imagenet64': Config(out='runs/imagenet64', stages='dm,adm', students=4, partition='contiguous',
                         model_channels=192, channel_mult='1,2,3,4', num_blocks=3, attn_resolutions='32,16,8',
                         channels_per_head=64, dropout=0.1, sigma_max=80.0, batch=40, lr=2e-6, adm_lr=5e-7, tsm_lr=2e-5,
                         weight_decay=0.01, clip=10.0, warmup=500, ratio=5, gan_gen_weight=3e-3,
                         gan_critic_weight=1e-2, tsm_steps=20000, dm_steps=4000, adm_steps=4000, log_every=100,
                         grid_every=1000, ckpt_every=500, heun_steps=256, fid_samples=50000, fid_ref=50000,
                         fid_teacher=0),
}


def parse_args(argv=None) -> Config:
    """argparse generated from the Config dataclass; --preset picks the defaults, flags override."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--preset', default='fashion', help=f'starting defaults: {", ".join(PRESETS)} (default: fashion)')
    for f in fields(Config):
        ap.add_argument('--' + f.name, type=f.type, default=None,
                        help=f'{f.metadata["help"]} (fashion: {getattr(PRESETS["fashion"], f.name)!r})')
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        ap.error(f'unknown preset {args.preset!r}: choose one of {", ".join(PRESETS)}')
    cfg = PRESETS[args.preset]
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    return dataclasses.replace(cfg, **overrides)


def net_config(cfg: Config, data: S.ImageData) -> NetConfig:
    ints = lambda s: tuple(int(v) for v in s.split(',') if v)
    return NetConfig(img_resolution=data.shape[-1], img_channels=data.shape[0], label_dim=data.num_classes,
                     model_channels=cfg.model_channels, channel_mult=ints(cfg.channel_mult),
                     num_blocks=cfg.num_blocks, attn_resolutions=ints(cfg.attn_resolutions),
                     dropout=cfg.dropout, channels_per_head=cfg.channels_per_head)


# ----------------------------------------------------------------------------------------------
# Distributed plumbing: one code path for 1 or N processes.

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def main(self):
        return self.rank == 0


def init_dist(cfg: Config) -> Dist:
    cuda = torch.cuda.is_available() if cfg.device == 'auto' else cfg.device == 'cuda'
    if cfg.device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda but no CUDA device is visible')
    d = Dist()
    if 'RANK' in os.environ:                                   # launched by torchrun
        dist.init_process_group('nccl' if cuda else 'gloo')
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get('LOCAL_RANK', 0))
        torch.cuda.set_device(local)
        d.device = torch.device('cuda', local)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return d


def student_plan(rank, world, k):
    """(students this rank trains, ranks per student). N >= K: K groups of N/K ranks; N < K: round robin."""
    if world >= k:
        if world % k:
            raise ValueError(f'{world} ranks cannot be split evenly among {k} students (use a multiple of K, or fewer ranks than K)')
        per = world // k
        return [rank // per], per
    return list(range(rank, k, world)), 1


def average_gradients(params, group, n):
    """Data parallelism by hand: one flat all-reduce of all gradients over the student's subgroup,
    divided by its size, so n ranks at batch B take the same step as 1 rank at batch nB. (Done
    explicitly rather than with DistributedDataParallel because the critic runs several forwards
    per backward, which DDP's reducer hooks do not allow.)"""
    if n == 1:
        return
    params = [p for p in params if p.grad is not None]        # the same set on every rank (same code path)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat, group=group)
    flat /= n
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def upload(t, device):
    """A host tensor to the device without stalling the host: staged in pinned memory and copied
    asynchronously. (A plain .to('cuda') from pageable memory synchronises the stream, i.e. waits for
    all queued GPU work, once per call.)"""
    return t.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else t


def autocast(device):
    """bf16 autocast on CUDA (DMD2: fp16 diverged), plain float32 on CPU."""
    return torch.autocast('cuda', dtype=torch.bfloat16, enabled=device.type == 'cuda')


# ----------------------------------------------------------------------------------------------
# Logging, progress, checkpoints.

def log_metrics(cfg, record):
    with open(os.path.join(cfg.out, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def log_throughput(cfg, stage, k, steps, sec, images_per_step):
    """Steps/s and images/s of one stage (one student), in metrics.jsonl and on stdout."""
    rec = dict(stage=stage, student=k, throughput=True, steps=steps, sec=round(sec, 2),
               steps_per_s=round(steps / sec, 4), images_per_s=round(steps * images_per_step / sec, 2))
    log_metrics(cfg, rec)
    who = stage if k == '-' else f'{stage} (student {k})'
    print(f'{who}: {rec["steps_per_s"]} steps/s, {rec["images_per_s"]} images/s', flush=True)


def atomic_save(obj, path):
    """Write to a temporary file, fsync, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:                  # e.g. a full disk: keep the previous file
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f'could not save {path} ({e}); the previous file is kept') from None


def load_state(path):
    """A resumable state saved by this script (kind 'state'), or None if there is none."""
    return read_checkpoint(path, 'state') if os.path.exists(path) else None


@contextlib.contextmanager
def resuming(path):
    """Restoring saved state: contents that do not fit this run end in a one-line error."""
    try:
        yield
    except (KeyError, IndexError, AttributeError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f'{path} does not fit this run ({reason(e)})') from None


def load_optimizer(o, state):
    """Optimizer.load_state_dict, which leaves the moments' shapes unchecked (a fused step would fail)."""
    o.load_state_dict(state)
    if any(torch.is_tensor(v) and v.ndim and v.shape != p.shape for p, s in o.state.items() for v in s.values()):
        raise ValueError('optimizer state of other shapes than the parameters')


def rng_state(gen):
    return dict(torch=torch.get_rng_state(), data=gen.get_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8))


def set_rng_state(state, gen):
    torch.set_rng_state(state['torch'])
    gen.set_state(state['data'])
    if torch.cuda.is_available() and state['cuda'].numel():
        torch.cuda.set_rng_state(state['cuda'])


def make_optimizer(params, lr, cfg, adam=False, steps_per_update=1):
    """AdamW (Adam for the teacher) with a linear warm-up over cfg.warmup iterations; an optimiser that
    steps once every `steps_per_update` iterations (the generator under TTUR) warms up over the same
    number of iterations, as in DMD2, where every scheduler steps once per iteration."""
    # fused: one kernel for all parameters, on CUDA and on the CPU (measured here: 4 ms per AdamW step of
    # the 1.4M-parameter network, against 21 ms for the per-tensor loop and 14 ms for foreach).
    if adam:
        o = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
    else:
        o = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) * steps_per_update / max(cfg.warmup, 1)))
    return o, sched


def step_optimizer(opt, sched, params, cfg, group=None, n=1, losses=None, where=''):
    """Average gradients over the group, clip, step; returns (grad norm, {loss name: value}) as floats.
    A non-finite loss or gradient stops the run with a message naming where it happened (nothing is
    saved after it, so the last checkpoint is the last good state), or, with --skip_nonfinite 1, skips
    this update. The decision is taken jointly by all ranks of the group, so they never diverge.
    Losses come in as device tensors: their values, the norm and the verdict reach the host in one
    transfer, the only host-device synchronisation of an update."""
    average_gradients(params, group, n)
    losses = losses or {}
    vals = torch.stack([torch.nn.utils.clip_grad_norm_(params, cfg.clip).float()] + [v.detach().float() for v in losses.values()])
    bad = (~torch.isfinite(vals)).any().float().reshape(1)
    if n > 1:
        dist.all_reduce(bad, group=group)
    *vals, bad = torch.cat([vals, bad]).tolist()                 # the one sync
    gn, losses = vals[0], dict(zip(losses, vals[1:]))
    if bad:
        opt.zero_grad(set_to_none=True)
        msg = f'{where}: non-finite ' + ', '.join(f'loss {k} = {v:.4g}' for k, v in losses.items()) + f', grad norm {gn:.4g}'
        if not cfg.skip_nonfinite:
            raise FloatingPointError(msg + ' (last good checkpoint kept; --skip_nonfinite 1 skips such steps)')
        print(f'skipped update: {msg}', file=sys.stderr, flush=True)
        return float('nan'), losses
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return gn, losses


# ----------------------------------------------------------------------------------------------
# Stage: teacher (EDM denoising loss, data parallel over all ranks, EMA weights are the teacher).

def train_teacher(cfg, d: Dist, data: S.ImageData):
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
    state_path = os.path.join(cfg.out, 'ckpt', 'teacher.pt')
    step, state = 0, load_state(state_path)
    if state is not None:
        with resuming(state_path):
            net.load_state_dict(state['net']); ema.load_state_dict(state['ema'])
            load_optimizer(o, state['opt']); sched.load_state_dict(state['sched'])
            step = int(state['step']); set_rng_state(state['rng'][d.rank] if d.rank < len(state['rng']) else state['rng'][0], gen)
        d.main and print(f'resuming teacher at step {step}', flush=True)
    if d.main:
        print(f'teacher: {count_params(net) / 1e6:.2f}M parameters, {cfg.teacher_steps} steps, batch {cfg.teacher_batch} x {d.world} ranks', flush=True)
        if cfg.ema ** cfg.teacher_steps > 0.01:      # the EMA starts at the random init and forgets it as ema^steps
            print(f'warning: after {cfg.teacher_steps} steps the EMA teacher still holds {100 * cfg.ema ** cfg.teacher_steps:.0f}% '
                  f'of the random initial weights (--ema {cfg.ema}); lower --ema or train longer', file=sys.stderr, flush=True)
    group = dist.group.WORLD if d.world > 1 else None
    bar = S.progress(cfg.teacher_steps, 'teacher', step, d.main)
    loss_avg, t0, step0 = 0.0, time.time(), step
    while step < cfg.teacher_steps:
        x, y = data.get(torch.randint(len(data), (cfg.teacher_batch,), generator=gen))
        with autocast(d.device):
            loss = L.edm_loss(net, upload(x, d.device), upload(y, d.device), sigma_data=net.sigma_data).mean()
        loss.backward()
        _, vals = step_optimizer(o, sched, params, cfg, group, d.world, {'edm': loss}, f'teacher stage, step {step + 1}')
        with torch.no_grad():                                             # EMA of the weights
            torch._foreach_lerp_(list(ema.parameters()), params, 1 - cfg.ema)
        step += 1
        loss_avg = 0.98 * loss_avg + 0.02 * vals['edm'] if step > 1 else vals['edm']
        bar.set_postfix_str(f'loss {loss_avg:.4f}', refresh=False)
        bar.update()
        if d.main and (step % cfg.log_every == 0 or step == cfg.teacher_steps):
            log_metrics(cfg, dict(stage='teacher', step=step, loss=vals['edm']))
        if step % cfg.ckpt_every == 0 or step == cfg.teacher_steps:
            rngs = gather_rng(rng_state(gen), dist.group.WORLD if d.world > 1 else None, d.world)
            if d.main:
                atomic_save(dict(kind='state', net=net.state_dict(), ema=ema.state_dict(), opt=o.state_dict(),
                                 sched=sched.state_dict(), step=step, rng=rngs, config=asdict(cfg)), state_path)
    bar.close()
    if d.main and step > step0:
        log_throughput(cfg, 'teacher', '-', step - step0, time.time() - t0, cfg.teacher_batch * d.world)
    if d.main:
        atomic_save(teacher_checkpoint(ema, config=asdict(cfg), steps=step), path)
        S.save_grid(S.class_grid(lambda z, y: S.heun(ema, z, y, cfg.heun_steps), ema.label_dim, 8, ema.cfg,
                                 device=d.device), os.path.join(cfg.out, 'grids', 'teacher.png'))
    if d.world > 1:
        dist.barrier()


def gather_rng(state, group, n):
    """The RNG states of the n ranks of `group`, in rank order, on every one of them (the leader saves them)."""
    if n == 1:
        return [state]
    out = [None] * n
    dist.all_gather_object(out, state, group=group)
    return out


# ----------------------------------------------------------------------------------------------
# Student stages. One `StudentRun` holds what one student needs; the critic step and the generator
# step are separate functions that return small dicts of floats.

class StudentRun:
    """Noise, labels and sigmas are drawn on the device (global RNG, saved with each checkpoint), so a
    step copies nothing from the host but its real images; `gen` (host) draws which images. (So a
    run resumed on another kind of device continues with other random numbers.) The teacher is D_real:
    frozen and in eval mode (no dropout), whatever mode it came in."""

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
        loss_fake = L.fake_score_loss(fake, x_fake, y, run.grid).mean()
        loss = loss_fake
        out = dict(fake_score=loss_fake)
        if adm:
            x_real, y_real = run.real(n)
            loss_gan = L.gan_critic_loss(fake.critic, x_real, y_real, x_fake, y, run.grid).mean()
            loss = loss + cfg.gan_critic_weight * loss_gan
            out['gan_critic'] = loss_gan
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
        loss_dm = L.dm_loss(run.teacher, fake, x, y, run.grid).mean()
        loss = loss_dm
        out = dict(dm=loss_dm)
        if adm:
            loss_gan = L.gan_generator_loss(fake.critic, x, y, run.grid).mean()
            loss = loss + cfg.gan_gen_weight * loss_gan
            out['gan_gen'] = loss_gan
        if pairs is not None and cfg.regression_weight > 0:
            i = torch.randint(len(pairs['z']), (n,), device=run.d.device)          # pairs live on the device
            x_reg = G(pairs['z'][i], pairs['y'][i]).float()
            loss_reg = L.regression_loss(x_reg, pairs['x'][i], run.lpips).mean()
            loss = loss + cfg.regression_weight * loss_reg
            out['regression'] = loss_reg
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
    x, y = run.real(run.cfg.batch)
    with autocast(run.d.device):
        loss = L.tsm_loss(G.net, run.teacher, x, y, sigma_data=G.net.sigma_data).mean()
    loss.backward()
    grad, out = step_optimizer(opt, sched, list(G.parameters()), run.cfg, run.group, run.n, {'tsm': loss}, run.where('tsm'))
    return dict(out, grad_gen=grad)


def build_pair(cfg, teacher, device):
    """The student G and its fake score, in training mode; compiled in place with --compile 1 (the
    state_dict keys do not change, so checkpoints are the same either way)."""
    G = Student.from_teacher(teacher, cfg.student_width, cfg.sigma_max).to(device).train()
    fake = FakeScore(teacher).to(device).train()
    if cfg.compile:
        G.net.compile(); fake.net.compile(); fake.head.compile()
    return G, fake


def profile_iterations(cfg, d, groups, data, teacher):
    """--profile N: the cost of one DM and one ADM iteration (`ratio` critic updates + one generator
    update) of student 0, on fresh optimisers: N timed iterations after a warm-up, then one under
    torch.profiler, whose busiest operations are printed and whose trace is written for
    chrome://tracing or Perfetto. On CUDA, torch's sync debug mode counts host-device
    synchronisations; the design has one per optimiser update (step_optimizer). The DM iteration is
    timed without the optional regression loss (--regression_weight). One process only."""
    import warnings
    from torch.profiler import ProfilerActivity, profile
    cuda = d.device.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run = StudentRun(cfg, d, 0, groups[0], data, teacher, None, 1)
    G, fake = build_pair(cfg, teacher, d.device)
    go, gsched = make_optimizer(list(G.parameters()), cfg.lr, cfg, steps_per_update=cfg.ratio)
    fo, fsched = make_optimizer(list(fake.parameters()), cfg.lr, cfg)
    for stage in ('dm', 'adm'):
        def iteration(adm=stage == 'adm'):
            distill_iteration(run, G, fake, go, gsched, fo, fsched, adm)
        iteration()                                                       # warm-up (cuDNN autotuning, allocator)
        sync()
        t0 = time.perf_counter()
        for _ in range(cfg.profile):
            iteration()
        sync()
        sec = (time.perf_counter() - t0) / cfg.profile
        syncs = ''
        if cuda:
            torch.cuda.set_sync_debug_mode('warn')
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter('always')
                    iteration()
                    sync()
            finally:
                torch.cuda.set_sync_debug_mode('default')
            n_sync = sum('synchronizing' in str(w.message) for w in caught)
            syncs = f' | {n_sync} host-device syncs per iteration ({cfg.ratio + 1} optimiser updates)'
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            iteration()
            sync()
        print(f'{stage}: {1 / sec:.3f} iterations/s, {cfg.batch * (cfg.ratio + 1) / sec:.1f} generated images/s '
              f'(batch {cfg.batch}, {cfg.ratio} critic updates + 1 generator update, mean of {cfg.profile}) on {d.device}{syncs}')
        print(prof.key_averages().table(sort_by='self_device_time_total' if cuda else 'self_cpu_time_total', row_limit=12))
        prof.export_chrome_trace(os.path.join(cfg.out, f'profile-{stage}.json'))
        print(f'wrote {os.path.join(cfg.out, f"profile-{stage}.json")}', flush=True)


def stage_path(cfg, stage, k):
    return os.path.join(cfg.out, 'ckpt', f'{stage}-student{k}.pt')


def regression_pairs(cfg, d, teacher, num_classes, shape):
    """DMD's paired set: (z, y, teacher Heun sample from z) over ALL classes (MSD Fig. 8), cached."""
    path = os.path.join(cfg.out, 'ckpt', 'regression_pairs.pt')
    if os.path.exists(path):
        pairs, n = read_checkpoint(path, None), cfg.regression_pairs
        with resuming(path):
            if {k: tuple(v.shape) for k, v in pairs.items()} != dict(z=(n, *shape), y=(n,), x=(n, *shape)):
                raise ValueError(f'not {n} pairs of {shape} images')
        return pairs
    seeds = list(range(10 ** 6, 10 ** 6 + cfg.regression_pairs))
    z = S.seeded_noise(seeds, shape)
    y = torch.arange(cfg.regression_pairs) % num_classes
    x = torch.cat([S.heun(teacher, z[i:i + 64].to(d.device), y[i:i + 64].to(d.device), cfg.heun_steps, cfg.sigma_max).cpu()
                   for i in range(0, len(z), 64)])
    pairs = dict(z=z, y=y, x=x)
    atomic_save(pairs, path + f'.rank{d.rank}')
    os.replace(path + f'.rank{d.rank}', path)
    return pairs


LPIPS_FILES = ('weights-vgg16-lpips.pth', 'vgg16-397923af.pth')     # torch-fidelity's LPIPS head, torchvision's VGG16


def lpips_if_present(device):
    """(distance, description): torch-fidelity's LPIPS (VGG16) when both weight files are already in the
    torch hub cache (nothing is downloaded), otherwise None and the reason, for the log."""
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
    missing = [f for f in LPIPS_FILES if not os.path.exists(os.path.join(hub, f))]
    if missing:
        return None, f'pixel L2 (LPIPS weights {", ".join(missing)} not in {hub})'
    from torch_fidelity.sample_similarity_lpips import SampleSimilarityLPIPS
    net = SampleSimilarityLPIPS('lpips-vgg16').to(device)
    to_255 = lambda x: ((x + 1) * 127.5).expand(-1, 3, -1, -1)           # its input: RGB in [0, 255]
    return (lambda a, b: net(to_255(a), to_255(b)).flatten()), 'LPIPS (VGG16, torch-fidelity)'


def train_student(cfg, d, k, groups, data, teacher, stages, group, n_ranks):
    """Run this student's stages in order; each starts from the previous stage's final state."""
    classes = groups[k]
    run = StudentRun(cfg, d, k, classes, data, teacher, group, n_ranks)
    leader = d.rank % n_ranks == 0 if n_ranks > 1 else True
    G, fake = build_pair(cfg, teacher, d.device)
    smaller = G.net.cfg.model_channels < teacher.cfg.model_channels
    if d.main:
        print(f'student {k}: classes {classes}, {count_params(G) / 1e6:.2f}M parameters'
              f'{" (smaller: TSM first)" if smaller else " (copy of the teacher)"}', flush=True)
    pairs = None
    if cfg.regression_weight > 0 and 'dm' in stages:
        pairs = {a: b.to(d.device) for a, b in regression_pairs(cfg, d, teacher, data.num_classes, data.shape).items()}
        run.lpips, how = lpips_if_present(d.device)
        if d.main and k == 0:
            print(f'regression loss: {how}, on {len(pairs["z"])} teacher pairs over all classes', flush=True)
    for stage in stages:
        if stage == 'teacher' or (stage == 'tsm' and not smaller):
            continue
        steps = dict(tsm=cfg.tsm_steps, dm=cfg.dm_steps, adm=cfg.adm_steps)[stage]
        adm = stage == 'adm'
        lr = (cfg.adm_lr or cfg.lr) if adm else cfg.lr
        go, gsched = make_optimizer(list(G.parameters()), cfg.tsm_lr if stage == 'tsm' else lr, cfg,
                                    steps_per_update=1 if stage == 'tsm' else cfg.ratio)
        fo, fsched = make_optimizer(list(fake.parameters()), lr, cfg)
        step, state = 0, load_state(stage_path(cfg, stage, k))
        if state is None:       # start from the latest earlier stage that ran (adm from dm, dm from tsm)
            for s in ('dm', 'tsm'):
                if STAGES.index(s) < STAGES.index(stage) and os.path.exists(stage_path(cfg, s, k)):
                    earlier = load_state(stage_path(cfg, s, k))
                    with resuming(stage_path(cfg, s, k)):
                        state = dict(G=earlier['G'], fake=earlier['fake'])        # weights, fresh optimiser
                    break
        # A stage that starts fresh is seeded from (seed, student, stage, rank) alone, so a resumed run
        # draws exactly the numbers an uninterrupted one would, whatever ran before it in this process.
        seed = cfg.seed * 10 ** 6 + k * 10 ** 4 + STAGES.index(stage) * 100 + d.rank
        torch.manual_seed(seed)
        run.gen.manual_seed(seed)
        run.stage, run.step = stage, 0
        if state is not None:
            with resuming(stage_path(cfg, stage, k)):
                G.load_state_dict(state['G']); fake.load_state_dict(state['fake'])
                if 'opt_G' in state:
                    load_optimizer(go, state['opt_G']); gsched.load_state_dict(state['sched_G'])
                    load_optimizer(fo, state['opt_fake']); fsched.load_state_dict(state['sched_fake'])
                    step = run.step = int(state['step']); set_rng_state(state['rng'][d.rank % n_ranks], run.gen)
        bar = S.progress(steps, f'{stage} s{k}', step, d.main)
        t0, step0 = time.time(), step
        info = {}
        while step < steps:
            if stage == 'tsm':
                info = tsm_step(run, G, go, gsched)
            else:
                info = distill_iteration(run, G, fake, go, gsched, fo, fsched, adm, None if adm else pairs)   # regression: DM only
            step += 1
            run.step = step
            bar.set_postfix_str(' '.join(f'{a} {b:.4g}' for a, b in info.items() if not a.startswith('grad')), refresh=False)
            bar.update()
            if leader and (step % cfg.log_every == 0 or step == steps):
                log_metrics(cfg, dict(stage=stage, student=k, step=step, sec=round(time.time() - t0, 2), **info))
            if step % cfg.ckpt_every == 0 or step == steps:
                rngs = gather_rng(rng_state(run.gen), run.group, n_ranks)
                if leader:
                    atomic_save(dict(kind='state', stage=stage, student=k, step=step, G=G.state_dict(),
                                     fake=fake.state_dict(), opt_G=go.state_dict(), sched_G=gsched.state_dict(),
                                     opt_fake=fo.state_dict(), sched_fake=fsched.state_dict(), rng=rngs,
                                     partition=groups, config=asdict(cfg)), stage_path(cfg, stage, k))
            if leader and cfg.snapshot_every and step % cfg.snapshot_every == 0 and stage != 'tsm':
                os.makedirs(os.path.join(cfg.out, 'snapshots'), exist_ok=True)
                atomic_save(student_record(G, k, classes, groups, cfg),
                            os.path.join(cfg.out, 'snapshots', f'{stage}-student{k}-step{step}.pt'))
            if leader and cfg.grid_every and step % cfg.grid_every == 0:
                S.save_grid(S.class_grid(G, data.num_classes, 4, G.net.cfg, classes=classes, device=d.device),
                            os.path.join(cfg.out, 'grids', f'{stage}-student{k}-step{step}.png'))
        bar.close()
        if leader and step > step0:     # throughput: a generator step generates batch x (ratio + 1) images
            per_step = cfg.batch * n_ranks * (1 if stage == 'tsm' else cfg.ratio + 1)
            log_throughput(cfg, stage, k, step - step0, time.time() - t0, per_step)
        if leader:
            S.save_grid(S.class_grid(G, data.num_classes, 8, G.net.cfg, classes=classes, device=d.device),
                        os.path.join(cfg.out, 'grids', f'{stage}-student{k}.png'))
    if leader:
        atomic_save(student_record(G, k, classes, groups, cfg), os.path.join(cfg.out, f'student{k}.pt'))


def student_record(G, k, classes, groups, cfg):
    """One trained student as a plain checkpoint (weights on the CPU, its classes, the run's config)."""
    return dict(kind='student', student=k, classes=list(classes), partition=groups, net=asdict(G.net.cfg),
                state_dict={n: t.detach().cpu() for n, t in G.state_dict().items()}, config=asdict(cfg))


# ----------------------------------------------------------------------------------------------

def main(cfg: Config):
    stages = [s.strip() for s in cfg.stages.split(',') if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f'unknown stage {",".join(bad) or "(none)"}: choose from {", ".join(STAGES)}')
    stages = [s for s in STAGES if s in stages]
    if cfg.partition not in P.STRATEGIES:
        raise ValueError(f'unknown partition {cfg.partition!r}: choose one of {", ".join(P.STRATEGIES)}')
    for name in ('batch', 'ratio', 'teacher_batch', 'heun_steps'):
        if getattr(cfg, name) < 1:
            raise ValueError(f'--{name} must be at least 1')
    if not 0 < cfg.student_width <= 1:
        raise ValueError('--student_width must be in (0, 1]')
    S.keep_freed_memory()                               # CPU: no page faults for every activation (sample.py)
    data = S.load_data(cfg.data)
    if not 1 <= cfg.students <= data.num_classes:
        raise ValueError(f'--students must be between 1 and the number of classes ({data.num_classes}), got {cfg.students}')
    teacher = load_checked_teacher(cfg.teacher, data) if cfg.teacher else None    # a bad --teacher: fail before writing
    d = init_dist(cfg)
    mine, n_ranks = student_plan(d.rank, d.world, cfg.students)
    os.makedirs(os.path.join(cfg.out, 'ckpt'), exist_ok=True)
    os.makedirs(os.path.join(cfg.out, 'grids'), exist_ok=True)
    check_same_run(cfg)
    if d.world > 1:
        dist.barrier()                 # every rank has read an existing config.json before rank 0 rewrites it
    if d.main:
        with open(os.path.join(cfg.out, 'config.json'), 'w') as f:
            json.dump(asdict(cfg), f, indent=1)
        print(f'data: {len(data)} images {data.shape}, {data.num_classes} classes | {d.world} rank(s) on {d.device} | '
              f'stages {",".join(stages)} | run folder {cfg.out}', flush=True)
    t_start = time.time()

    # Teacher: given, or trained here.
    teacher_path = cfg.teacher or os.path.join(cfg.out, 'teacher.pt')
    if teacher is None:
        if 'teacher' in stages:
            train_teacher(cfg, d, data)
        if not os.path.exists(teacher_path):
            raise FileNotFoundError(f'no teacher at {teacher_path}: give --teacher or include the teacher stage')
        teacher = load_checked_teacher(teacher_path, data)
    teacher = teacher.to(d.device)
    if cfg.compile:
        teacher.compile()
    student_stages = [s for s in stages if s != 'teacher']
    if not student_stages:
        return
    emb = teacher.model.map_label.weight.t().detach().cpu() if cfg.partition == 'kmeans' else None
    if cfg.partition_file:
        with open(cfg.partition_file) as f:
            try:
                groups = P.validate(json.load(f), data.num_classes)
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f'{cfg.partition_file}: not a JSON list of lists of class indices ({e})') from None
        if len(groups) != cfg.students:
            raise ValueError(f'{cfg.partition_file} has {len(groups)} groups but --students is {cfg.students}')
    else:
        groups = P.make_partition(cfg.partition, data.num_classes, cfg.students, cfg.seed, emb)
    if d.main:
        print(f'partition ({cfg.partition}): {groups}', flush=True)
    if cfg.profile:
        if d.world > 1:
            raise ValueError('--profile runs in one process: start it with python, not torchrun')
        return profile_iterations(cfg, d, groups, data, teacher)

    # Students: subgroups are created by every rank, in the same order (torch.distributed requires it).
    groups_pg = [dist.new_group(list(range(k * n_ranks, (k + 1) * n_ranks))) for k in range(cfg.students)] \
        if d.world > 1 and n_ranks > 1 else [None] * cfg.students
    if cfg.only_students:
        only = [int(v) for v in cfg.only_students.split(',') if v.strip()]
        if any(not 0 <= v < cfg.students for v in only):
            raise ValueError(f'--only_students {cfg.only_students}: students are numbered 0..{cfg.students - 1}')
        mine = [k for k in mine if k in only]
    torch.manual_seed(cfg.seed + d.rank)
    for k in mine:
        if not os.path.exists(os.path.join(cfg.out, f'student{k}.pt')) or student_stages[-1] not in done_stages(cfg, k):
            train_student(cfg, d, k, groups, data, teacher, student_stages, groups_pg[k], n_ranks)
    if d.world > 1:
        dist.barrier()
    missing = [k for k in range(cfg.students) if not os.path.exists(os.path.join(cfg.out, f'student{k}.pt'))]
    if missing:                                  # --only_students: the others are trained elsewhere
        d.main and print(f'students {missing} not trained yet: msd.pt is written by a run that finds all of them', flush=True)
        return
    if d.main:
        students = []
        for k in range(cfg.students):
            path = os.path.join(cfg.out, f'student{k}.pt')
            students.append(load_student(read_checkpoint(path, 'student'), cfg.sigma_max, data.num_classes, path))
        atomic_save(msd_checkpoint(students, groups, data.num_classes, asdict(cfg),
                                   teacher=os.path.abspath(teacher_path), stages=student_stages),
                    os.path.join(cfg.out, 'msd.pt'))
        train_min = (time.time() - t_start) / 60
        print(f'wrote {os.path.join(cfg.out, "msd.pt")} ({cfg.students} students, {train_min:.1f} min)', flush=True)
        final_eval(cfg, d, teacher, MSD(students, groups, data.num_classes).to(d.device).eval(), data)
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def load_checked_teacher(path, data):
    teacher = load_teacher(path)
    if teacher.label_dim != data.num_classes or teacher.cfg.img_channels != data.shape[0] or teacher.cfg.img_resolution != data.shape[-1]:
        raise ValueError(f'teacher {path} is for {teacher.label_dim} classes at {teacher.cfg.img_channels}x'
                         f'{teacher.cfg.img_resolution}, the data has {data.num_classes} classes at {data.shape}')
    return teacher


# Settings that give saved state its meaning: a run folder resumes only with the same ones.
RUN_IDENTITY = ('data', 'teacher', 'students', 'partition', 'partition_file', 'seed', 'student_width', 'model_channels',
                'channel_mult', 'num_blocks', 'attn_resolutions', 'channels_per_head', 'sigma_max')


def check_same_run(cfg):
    path = os.path.join(cfg.out, 'config.json')
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = [f'--{k} {old.get(k)!r} -> {getattr(cfg, k)!r}' for k in RUN_IDENTITY if old.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f'{cfg.out} holds a run with other settings ({"; ".join(diff)}): use another --out')


def done_stages(cfg, k):
    """Stages whose resumable state for student k reached its final step."""
    done = []
    for stage, steps in (('tsm', cfg.tsm_steps), ('dm', cfg.dm_steps), ('adm', cfg.adm_steps)):
        s = load_state(stage_path(cfg, stage, k))
        if s is not None and isinstance(s.get('step'), int) and s['step'] >= steps:
            done.append(stage)
    return done


def final_eval(cfg, d, teacher, msd, data):
    """Grids of both generators; FID of the teacher (Heun, 2N-1 NFE) and of MSD (1 NFE)."""
    S.save_grid(S.class_grid(msd, data.num_classes, 10, teacher.cfg, device=d.device), os.path.join(cfg.out, 'grids', 'msd.png'))
    if cfg.fid_samples <= 0:
        return
    nfe = 2 * cfg.heun_steps - 1
    ref = S.reference_stats_name(cfg.data, cfg.fid_ref)
    real = lambda n: data.uint8(torch.randperm(len(data), generator=torch.Generator().manual_seed(123))[:n])
    results = {}
    models = ([('teacher', lambda z, y: S.heun(teacher, z, y, cfg.heun_steps))] if cfg.fid_teacher else []) + [('msd', msd)]
    for name, fn in models:
        print(f'FID of {name}: {cfg.fid_samples} samples ({nfe if name == "teacher" else 1} NFE each), then Inception '
              f'features (~0.25 s per image on a 2-core CPU)', flush=True)
        t0 = time.time()
        fid = S.fid(fn, data.num_classes, tuple(data.shape), cfg.fid_samples, ref, real, cfg.fid_ref, d.device)
        results[name] = fid
        log_metrics(cfg, dict(stage='eval', model=name, fid=fid, samples=cfg.fid_samples, ref=cfg.fid_ref,
                              nfe=nfe if name == 'teacher' else 1, sec=round(time.time() - t0, 1)))
    teacher_part = f'teacher (Heun, {nfe} NFE) {results["teacher"]:.2f} | ' if 'teacher' in results else ''
    print(f'FID ({cfg.fid_samples} samples vs {cfg.fid_ref} training images): '
          f'{teacher_part}MSD, {cfg.students} students (1 NFE) {results["msd"]:.2f}', flush=True)


def cli(argv=None):
    cfg = parse_args(argv)
    try:
        main(cfg)
    except (ValueError, OSError, FloatingPointError) as e:        # OSError: missing files, full disk, ...
        if os.environ.get('MSD_DEBUG'):
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2 if not isinstance(e, FloatingPointError) else 3)
    except KeyboardInterrupt:
        print('\ninterrupted: rerun the same command to resume from the last checkpoint', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    cli()
