"""The paper's claims at small scale: the MSD experiment grid on Fashion-MNIST, written to RESULTS.md.

Claims tested (MSD sec. 4), every row distilled from one committed teacher:
    (a) one-step MSD students match or beat the 35-NFE teacher       teacher vs K = 4 (DM + ADM)
    (b) more same-size students give lower FID                       K = 1, 2, 4 (same batch, same iterations)
    (c) the adversarial stage helps                                  DM only vs DM then ADM, equal updates
    (d) smaller students (TSM first) are faster and stay competitive  K = 4 at half the channels
    (e) contiguous partitions beat random ones                       K = 4 contiguous vs random
Every row: FID (sample.py's: torch-fidelity's Inception, 2048 pool features, stated sample counts)
against the Fashion-MNIST training set, classifier accuracy of its samples (which also checks the
routing), parameters, one-step latency and images/s on the machine that ran it (bench.py's timer),
training time. K = 4 also gets per-student FID (each student's samples against the real images of
its own classes), and K = 1 vs K = 4 a plot of FID against generator iterations.

    python experiments.py                       # 2-core CPU preset: 250 updates per student, several hours
    python experiments.py --preset gpu          # larger sizes on one GPU (students train in parallel)
    python experiments.py --preset gpu --runs k1,k4 --train_minutes 5   # K = 1 vs K = 4 only, sized to 5 minutes
    python experiments.py --parts report        # rewrite RESULTS.md from runs/grid/results.json

Each part resumes: a finished student, cached reference features (sample.reference) or an evaluated
row is not redone.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields

import torch
from PIL import Image, ImageDraw
from torch import nn

import bench as B
import sample as S
from data import FASHION_DIR, load_data, read_idx_pair
from msd import MSD, load_msd, load_student
from checkpoint import load_teacher, one_line_errors, read_checkpoint
from teacher import count_params


def opt(default, help):
    return field(default=default, metadata={'help': help})


@dataclass
class GridConfig:
    out: str = opt('runs/grid', 'folder for the runs, results.json, grids and the plot')
    results: str = opt('RESULTS.md', 'the report to write')
    figures: str = opt('results', 'folder (committed) the report copies its grids and plot into')
    teacher: str = opt('checkpoints/fashion-teacher.pt', 'the teacher every row distils')
    classifier: str = opt('checkpoints/fashion-classifier.pt', 'Fashion-MNIST classifier (trained here if missing)')
    data: str = opt('', f'Fashion-MNIST IDX folder (default {FASHION_DIR})')
    parts: str = opt('train,eval,report', 'what to do: features (reference features only), train, eval, report, '
                                          'curves (FID of every snapshot and msd.pt in --curve_runs)')
    curve_runs: str = opt('', 'comma-separated train.py run folders (snapshots/ from --snapshot_every, msd.pt), for --parts '
                              'curves; LABEL:FOLDER names its plot line (default: the folder\'s name; the legend shows 10 characters)')
    runs: str = opt('k1,k4,k4-dm,k2,k4-random,k4-half,k1-dm', 'the training runs (and their rows) to train and evaluate; '
                                                             'the teacher\'s row is always evaluated')
    device: str = opt('auto', 'auto, cpu or cuda')
    jobs: int = opt(1, 'student trainings run at once (one process each; on a GPU they share it)')
    batch: int = opt(16, 'per-student batch (equal in every row)')
    lr: float = opt(1e-4, 'AdamW learning rate of DM and ADM')
    dm_noise: float = opt(0.98, 'DM\'s highest grid fraction (train.py --dm_noise; DMD2: 0.98, the rows of RESULTS.md)')
    fake_noise: float = opt(1.0, 'the fake score\'s highest grid fraction (train.py --fake_noise; DMD2: 1, the rows of RESULTS.md)')
    tsm_steps: int = opt(300, 'TSM steps of the half-width students')
    dm_steps: int = opt(60, 'DM generator iterations per student (equal in every row)')
    adm_steps: int = opt(30, 'ADM generator iterations per student, after DM')
    train_minutes: float = opt(0.0, '> 0: instead of --dm_steps/--adm_steps, time a short probe of all students '
                                    'training at once and choose the iterations that fit these minutes (60%% DM, 40%% ADM)')
    snapshot_every: int = opt(15, 'keep K = 1 and K = 4 students every this many iterations for the FID plot')
    fid_samples: int = opt(500, 'generated images per FID (labels balanced over the classes)')
    fid_ref: int = opt(2000, 'training images in the reference statistics (60000: all; cached)')
    plot_samples: int = opt(250, 'generated images per point of the FID-vs-iterations plot')
    speed_batch: int = opt(64, 'batch for images/s')
    heun_steps: int = opt(18, 'teacher Heun steps N (2N-1 = 35 NFE)')


PRESETS = {
    'cpu': GridConfig(jobs=2, dm_steps=150, adm_steps=100, tsm_steps=3000, snapshot_every=50, fid_samples=2000, fid_ref=5000,
                      plot_samples=1000, speed_batch=64),
    'gpu': GridConfig(device='cuda', jobs=15, batch=64, tsm_steps=3000, dm_steps=600, adm_steps=400,
                      fid_samples=10000, fid_ref=60000, plot_samples=2000, speed_batch=1024, snapshot_every=50),
}

# (name, K, partition, width, stages): one training run each, in the order they are started. A 'dm' run
# spends all dm_steps + adm_steps generator updates in DM, so that its row separates the adversarial
# stage from the extra updates.
RUNS = [('k1', 1, 'contiguous', 1.0, 'dm,adm'), ('k4', 4, 'contiguous', 1.0, 'dm,adm'), ('k4-dm', 4, 'contiguous', 1.0, 'dm'),
        ('k2', 2, 'contiguous', 1.0, 'dm,adm'), ('k4-random', 4, 'random', 1.0, 'dm,adm'),
        ('k4-half', 4, 'contiguous', 0.5, 'tsm,dm,adm'), ('k1-dm', 1, 'contiguous', 1.0, 'dm')]
ROWS = [('teacher', None, 'EDM teacher, Heun 35 NFE'),
        ('k1-dm', 'k1-dm', 'K = 1, DM only'), ('k1', 'k1', 'K = 1, DM + ADM'), ('k2', 'k2', 'K = 2, DM + ADM'),
        ('k4-dm', 'k4-dm', 'K = 4, DM only'), ('k4', 'k4', 'K = 4, DM + ADM (main)'),
        ('k4-random', 'k4-random', 'K = 4, random partition, DM + ADM'),
        ('k4-half', 'k4-half', 'K = 4, half width, TSM + DM + ADM')]


def selected(cfg):
    """The RUNS named by --runs, in RUNS's order."""
    names = [n.strip() for n in cfg.runs.split(',') if n.strip()]
    if bad := [n for n in names if n not in {r[0] for r in RUNS}]:
        raise ValueError(f'unknown run {bad[0]!r} in --runs: choose from {", ".join(r[0] for r in RUNS)}')
    return [r for r in RUNS if r[0] in names]


def parse_args(argv=None) -> GridConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--preset', default='cpu', help=f'starting defaults: {", ".join(PRESETS)} (default: cpu)')
    for f in fields(GridConfig):
        ap.add_argument('--' + f.name, type=f.type, default=None, help=f'{f.metadata["help"]} (cpu: {getattr(PRESETS["cpu"], f.name)!r})')
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        ap.error(f'unknown preset {args.preset!r}: choose one of {", ".join(PRESETS)}')
    return dataclasses.replace(PRESETS[args.preset], **{f.name: getattr(args, f.name) for f in fields(GridConfig)
                                                         if getattr(args, f.name) is not None})


def machine(device):
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} ({os.cpu_count()} CPU cores), torch {torch.__version__}'
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}'


# ----------------------------------------------------------------------------------------------
# A small Fashion-MNIST classifier: checks that generated images show their label's garment.

class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
        self.net = nn.Sequential(conv(1, 32), conv(32, 32), nn.MaxPool2d(2), conv(32, 64), conv(64, 64), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 10))

    def forward(self, x_uint8):
        return self.net(x_uint8.float() / 127.5 - 1)


def classifier(cfg, data, device, epochs=4):
    """The committed classifier, or train one (Adam, 4 epochs, random shifts) and report test accuracy."""
    net = Classifier()
    if os.path.exists(cfg.classifier):
        net.load_state_dict(read_checkpoint(cfg.classifier, 'classifier')['state_dict'])
        return net.to(device).eval()
    torch.manual_seed(0)
    net = net.to(device).train()
    o = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(o, 3e-3, total_steps=epochs * (len(data) // 128))
    x_all, y_all = data.uint8(torch.arange(len(data))), data.labels
    bar = S.progress(epochs * (len(data) // 128), 'classifier')
    for e in range(epochs):
        perm = torch.randperm(len(data))
        for i in range(len(data) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            x = x_all[idx]
            dx, dy = torch.randint(-2, 3, (2,)).tolist()              # a random shift of up to 2 pixels
            x = torch.roll(x, (dx, dy), (2, 3))
            loss = nn.functional.cross_entropy(net(x.to(device)), y_all[idx].to(device))
            o.zero_grad(); loss.backward(); o.step(); sched.step()
            bar.set_postfix_str(f'loss {loss.item():.3f}', refresh=False)
            bar.update()
    bar.close()
    net.eval()
    acc = None
    try:
        acc = float(accuracy(net, *read_idx_pair(cfg.data or FASHION_DIR, 't10k'), device)[0])
    except FileNotFoundError:                         # an EDM dataset, or no test split
        pass
    os.makedirs(os.path.dirname(os.path.abspath(cfg.classifier)), exist_ok=True)
    torch.save(dict(kind='classifier', state_dict={k: v.cpu() for k, v in net.state_dict().items()}, test_accuracy=acc,
                    command='python experiments.py (trained when checkpoints/fashion-classifier.pt is missing)'), cfg.classifier)
    print(f'classifier: test accuracy {acc}', flush=True)
    return net


@torch.no_grad()
def accuracy(net, images, labels, device):
    """(overall accuracy, per-class accuracy [C]) of net on uint8 images with intended labels."""
    pred = torch.cat([net(images[i:i + 1000].to(device)).argmax(1).cpu() for i in range(0, len(images), 1000)])
    hit = (pred == labels).float()
    per = torch.stack([hit[labels == c].mean() for c in range(10)])
    return hit.mean().item(), per.tolist()


# ----------------------------------------------------------------------------------------------
# Training: one train.py process per student, at most cfg.jobs at once, then one to write msd.pt.

def train_command(cfg, run, teacher, dm_steps, adm_steps, k=None, out=None):
    name, K, part, width, stages = run
    snap = cfg.snapshot_every if name in ('k1', 'k4') else 0
    if stages == 'dm':                                # DM only, as many updates as DM + ADM
        dm_steps, adm_steps = dm_steps + adm_steps, 0
    cmd = [sys.executable, 'train.py', '--teacher', teacher, '--out', out or os.path.join(cfg.out, name), '--students', str(K),
           '--partition', part, '--student_width', str(width), '--stages', stages, '--batch', str(cfg.batch), '--lr', str(cfg.lr),
           '--dm_noise', str(cfg.dm_noise), '--fake_noise', str(cfg.fake_noise), '--tsm_steps', str(cfg.tsm_steps),
           '--dm_steps', str(dm_steps), '--adm_steps', str(adm_steps), '--heun_steps', str(cfg.heun_steps),
           '--snapshot_every', str(snap), '--grid_every', '0', '--fid_samples', '0', '--device', cfg.device]
    if cfg.data:
        cmd += ['--data', cfg.data]
    return cmd + (['--only_students', str(k)] if k is not None else [])


def run_all(commands, jobs, log_dir):
    """Run the commands, `jobs` at a time, each logging to its own file; stop at the first failure."""
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1' if jobs > 1 else str(torch.get_num_threads())))
    pending, running, t0 = list(enumerate(commands)), [], time.time()
    bar, done = S.progress(len(commands), 'students'), 0
    while pending or running:
        while pending and len(running) < jobs:
            i, cmd = pending.pop(0)
            log = open(os.path.join(log_dir, f'job{i:02d}.log'), 'w')
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, i))
        time.sleep(1)
        for p, log, i in list(running):
            if p.poll() is not None:
                running.remove((p, log, i)); log.close(); done += 1
                if p.returncode:
                    for q, l, _ in running:
                        q.kill()
                    raise RuntimeError(f'training job {i} failed (exit {p.returncode}): see {log_dir}/job{i:02d}.log')
        bar.update(done - bar.n)
    bar.close()
    return time.time() - t0


def probe_rate(records):
    """Steady DM iterations/s of each student in a probe run's metrics records: the slope between its first and
    last logged step. The run's own throughput record averages over all its iterations, the first of which pay
    for start-up (CUDA context, cuDNN's algorithm search, the allocator growing); on an H200 with 5 students
    at once 6 such iterations gave 1.24 it/s where the same students then trained at 2.0."""
    pts = {}
    for r in records:
        if r.get('stage') == 'dm' and 'step' in r:
            pts.setdefault(r['student'], []).append((r['step'], r['sec']))
    return {k: (p[-1][0] - p[0][0]) / (p[-1][1] - p[0][1]) for k, p in pts.items() if len(p) > 1 and p[-1][1] > p[0][1]}


def probe_steps(cfg, teacher):
    """Iterations per student that fit cfg.train_minutes with all students training at once: run 16 DM
    iterations of every student together and take the slowest one's steady rate (steps 4 to 16)."""
    runs = selected(cfg)
    shutil.rmtree(os.path.join(cfg.out, 'probe'), ignore_errors=True)   # a stale probe would resume, its clocks restarted
    cmds = [train_command(cfg, r, teacher, 16, 0, k, os.path.join(cfg.out, 'probe', r[0])) +
            ['--stages', 'dm', '--warmup', '1', '--log_every', '4', '--snapshot_every', '0'] for r in runs for k in range(r[1])]
    run_all(cmds, cfg.jobs, os.path.join(cfg.out, 'probe', 'logs'))
    rates = []
    for r in runs:
        with open(os.path.join(cfg.out, 'probe', r[0], 'metrics.jsonl')) as f:
            rates += probe_rate(map(json.loads, f)).values()
    rate = min(rates)
    total = int(0.85 * cfg.train_minutes * 60 * rate / 1.15)       # ADM iterations cost ~30-40% more than DM ones
    step = max(cfg.snapshot_every, 1)
    dm, adm = max(step, 0.6 * total // step * step), max(step, 0.4 * total // step * step)
    print(f'probe: slowest student {rate:.2f} DM it/s with {len(cmds)} at once -> dm_steps {int(dm)}, adm_steps {int(adm)}', flush=True)
    return int(dm), int(adm)


def train(cfg, results):
    teacher = os.path.abspath(cfg.teacher)
    dm, adm = results.get('dm_steps', cfg.dm_steps), results.get('adm_steps', cfg.adm_steps)
    if cfg.train_minutes > 0 and 'dm_steps' not in results:
        dm, adm = probe_steps(cfg, teacher)
    results.update(dm_steps=dm, adm_steps=adm, batch=cfg.batch, lr=cfg.lr, tsm_steps=cfg.tsm_steps)
    runs = selected(cfg)
    cmds = [train_command(cfg, r, teacher, dm, adm, k) for r in runs for k in range(r[1])
            if not os.path.exists(os.path.join(cfg.out, r[0], f'student{k}.pt'))]
    results['train_wall_s'] = results.get('train_wall_s', 0) + run_all(cmds, cfg.jobs, os.path.join(cfg.out, 'logs'))
    results['train_jobs'] = cfg.jobs
    run_all([train_command(cfg, r, teacher, dm, adm) for r in runs], cfg.jobs, os.path.join(cfg.out, 'logs-msd'))   # msd.pt
    results['commands'] = {**results.get('commands', {}),
                           **{r[0]: ' '.join(train_command(cfg, r, cfg.teacher, dm, adm)[1:]) for r in runs}}


# ----------------------------------------------------------------------------------------------
# Evaluation.

def load_stage(cfg, run, teacher, stage=None, step=None):
    """MSD generator of a run: its msd.pt, or its students' snapshots at a step of a stage."""
    folder = os.path.join(cfg.out, run[0])
    if step is None:
        return load_msd(os.path.join(folder, 'msd.pt'))
    students = []
    for k in range(run[1]):                          # a snapshot: a student record (train.py student_record)
        path = os.path.join(folder, 'snapshots', f'{stage}-student{k}-step{step}.pt')
        rec = read_checkpoint(path, 'student')
        students.append(load_student(rec, rec['config']['sigma_max'], teacher.label_dim, path))
    return MSD(students, rec['partition'], teacher.label_dim)


def speed(gen, shape, num_classes, batch, device):
    """(one-image latency in ms, images/s at `batch`): medians of 9 and 5 timed calls after a warm-up."""
    rows = [B.Row('latency', gen, torch.zeros(1, dtype=torch.long, device=device), 9),
            B.Row('images/s', gen, (torch.arange(batch) % num_classes).to(device), 5)]
    for row in rows:
        B.round_robin(B.warm_up([row], shape, device), shape, device)
    return 1000 / rows[0].images_per_s, rows[1].images_per_s


def run_seconds(cfg, name):
    """Training time of a run: the summed wall time of its students' stages (from train.py's metrics)."""
    with open(os.path.join(cfg.out, name, 'metrics.jsonl')) as f:
        return sum(r['sec'] for r in map(json.loads, f) if r.get('throughput'))


def evaluate(cfg, results, device):
    data = load_data(cfg.data)
    teacher = load_teacher(cfg.teacher).to(device).eval()
    shape = tuple(data.shape)
    results['machine'] = results.get('machine') or machine(device)
    inception = S.inception(device)
    ref, ref_labels = S.reference(data, cfg.fid_ref, inception)
    clf = classifier(cfg, data, device)
    seeds, labels = S.eval_inputs(cfg.fid_samples, data.num_classes)
    rows = results.setdefault('rows', {})
    runs = {r[0]: r for r in selected(cfg)}
    for key, run, title in ROWS:
        if key in rows or run is not None and run not in runs:
            continue
        print(f'evaluating {title}', flush=True)
        if run is None:
            gen = lambda z, y: S.heun(teacher, z, y, cfg.heun_steps)
            params, nfe, train_s, groups = count_params(teacher), 2 * cfg.heun_steps - 1, None, None
        else:
            try:
                msd = load_stage(cfg, runs[run], teacher).to(device).eval()
            except FileNotFoundError as e:                      # that run did not finish: report the others
                print(f'  skipped: {e}', flush=True)
                continue
            gen, params, nfe, groups = msd, count_params(msd.students[0]), 1, msd.groups
            train_s = run_seconds(cfg, run)
        t0 = time.time()
        images = S.generate(gen, seeds, labels, shape, device)
        feats = S.features(images, inception, f'inception, {key}')
        acc, per_class = accuracy(clf, images, labels, device)
        lat, ips = speed(gen, shape, data.num_classes, cfg.speed_batch if nfe == 1 else min(cfg.speed_batch, 256), device)
        row = dict(title=title, fid=S.frechet(feats, ref), samples=cfg.fid_samples, ref=len(ref), params=params, nfe=nfe,
                   accuracy=acc, per_class=per_class, latency_ms=lat, images_per_s=ips, train_s=train_s, eval_s=time.time() - t0)
        if groups is not None and len(groups) > 1 or key == 'teacher':      # per-student FID (teacher: on K = 4's groups)
            gs = groups if key != 'teacher' else load_msd(os.path.join(cfg.out, 'k4', 'msd.pt')).groups \
                if os.path.exists(os.path.join(cfg.out, 'k4', 'msd.pt')) else None
            if gs:
                row['groups'] = gs
                row['group_fid'] = S.group_fids(feats, labels, ref, ref_labels, gs)
        if key in ('teacher', 'k1', 'k4', 'k4-half', 'k4-random'):
            S.save_grid(S.class_grid(gen, data.num_classes, 10, teacher.cfg, device=device), os.path.join(cfg.out, 'grids', f'{key}.png'))
        rows[key] = row
        print(f'  FID {row["fid"]:.2f} ({cfg.fid_samples} vs {len(ref)}), accuracy {acc:.3f}, {lat:.2f} ms/image, {ips:.0f} img/s', flush=True)
        save_results(cfg, results)
    curve = results.setdefault('curve', {})                              # FID against generator iterations
    for run in ('k1', 'k4'):
        if not cfg.snapshot_every or run not in runs:
            continue
        total = results['dm_steps'] + results['adm_steps']
        every = cfg.snapshot_every * -(-total // (8 * cfg.snapshot_every))       # at most about 8 points per curve
        for stage, offset, steps in (('dm', 0, results['dm_steps']), ('adm', results['dm_steps'], results['adm_steps'])):
            for s in range(every, steps + 1, every):
                key = f'{run}:{offset + s}'
                if key in curve or not os.path.exists(os.path.join(cfg.out, run, 'snapshots', f'{stage}-student0-step{s}.pt')):
                    continue
                msd = load_stage(cfg, runs[run], teacher, stage, s).to(device).eval()
                curve[key] = S.fid(msd, data, cfg.plot_samples, cfg.fid_ref, device, extractor=inception)[0]
                save_results(cfg, results)


def curves(cfg, device):
    """FID of every snapshot of the train.py runs in --curve_runs, and of each run's msd.pt as the point at the
    end of its last stage (fid_samples one-step images against fid_ref training images, the same seeds for
    every point): how a recipe's FID falls with generator updates. Cached per run folder and protocol in
    curve-{fid_samples}vs{n_ref}.json; prints one line per point and plots the runs, one line each (named by
    LABEL in LABEL:FOLDER, else by folder), with the teacher's FID on the same seeds (--teacher, cached in
    --out), in {figures}/fid_curves.png."""
    runs = curve_runs(cfg.curve_runs)                                    # a bad --curve_runs fails before any work
    data, inception = load_data(cfg.data), S.inception(device)
    ref, _ = S.reference(data, cfg.fid_ref, inception)
    fid = lambda gen: S.fid(gen, data, cfg.fid_samples, cfg.fid_ref, device, extractor=inception)[0]   # seeds 10^7..
    series, dm_steps = {}, None
    reference = None
    if os.path.exists(cfg.teacher):                 # the teacher on the same seeds and counts (Heun), cached in --out
        path = os.path.join(cfg.out, 'teacher_fid.json')
        cached = json.load(open(path)) if os.path.exists(path) else {}
        key = f'{os.path.abspath(cfg.teacher)} {cfg.heun_steps} steps, {cfg.fid_samples} vs {len(ref)}'
        if key not in cached:
            teacher = load_teacher(cfg.teacher, data=data).to(device)
            cached[key] = fid(lambda z, y: S.heun(teacher, z, y, cfg.heun_steps))
            with open(path, 'w') as f:
                json.dump(cached, f, indent=1)
        reference = ('teacher', cached[key])
        print(f'teacher (Heun, {2 * cfg.heun_steps - 1} NFE): FID {cached[key]:.2f} ({cfg.fid_samples} samples vs {len(ref)})', flush=True)
    for label, folder in runs:
        path, found = os.path.join(folder, f'curve-{cfg.fid_samples}vs{len(ref)}.json'), {}   # one cache per protocol
        done = json.load(open(path)) if os.path.exists(path) else {}
        snaps = os.path.join(folder, 'snapshots')
        for name in os.listdir(snaps) if os.path.isdir(snaps) else []:      # {stage}-student{k}-step{n}.pt
            stage, k, step = name[:-3].split('-')
            found.setdefault((stage, int(step[4:])), []).append(os.path.join(snaps, name))
        run_dm = json.load(open(os.path.join(folder, 'config.json')))['dm_steps']
        final = os.path.join(folder, 'msd.pt')              # the last point: msd.pt, at the end of its last stage
        if os.path.exists(final):
            rec = read_checkpoint(final, 'msd')
            for stage in [s for s in rec.get('stages') or [] if s != 'tsm'][-1:]:
                if isinstance(step := (rec.get('config') or {}).get(f'{stage}_steps'), int):
                    found.setdefault((stage, step), final)
        if any(stage == 'adm' for stage, _ in found):      # the DM | ADM boundary is drawn only for runs with ADM
            dm_steps = run_dm
        for (stage, step), files in sorted(found.items(), key=lambda kv: (kv[0][0] == 'adm', kv[0][1])):
            key = f'{stage}:{step}'
            msd = None if key in done else point_generator(files, data.num_classes)
            if msd is not None:
                done[key] = dict(updates=step + (run_dm if stage == 'adm' else 0), fid=fid(msd.to(device).eval()))
                with open(path, 'w') as f:
                    json.dump(done, f, indent=1)
            if key in done:
                print(f'{folder} {key}: {done[key]["updates"]} generator updates, FID {done[key]["fid"]:.2f} '
                      f'({cfg.fid_samples} samples vs {len(ref)})', flush=True)
                series.setdefault(label, []).append((done[key]['updates'], done[key]['fid']))
    if plot(series, path := os.path.join(cfg.figures, 'fid_curves.png'), dm_steps, cfg.fid_samples, reference):
        print(f'wrote {path}', flush=True)


def curve_runs(spec):
    """--curve_runs as [(label, folder)]: each comma-separated entry a run folder, or LABEL:FOLDER (an entry
    that is itself a folder is never split at a ':'); every folder exists and every label is used once."""
    runs = []
    for entry in [e for e in spec.split(',') if e]:
        label, _, folder = ('', '', entry) if os.path.isdir(entry) else entry.rpartition(':')
        label = label or os.path.basename(os.path.normpath(folder))
        if not os.path.isdir(folder):
            raise ValueError(f'--curve_runs: {entry!r}: no run folder {folder!r}')
        if label in [name for name, _ in runs]:
            raise ValueError(f'--curve_runs: two runs named {label!r} (name them LABEL:FOLDER)')
        runs.append((label, folder))
    return runs


def point_generator(files, num_classes):
    """The MSD generator of one curve point: a run's msd.pt (a path), or its students' snapshots at one step
    (a list of paths; None unless every student left one there)."""
    if isinstance(files, str):
        return load_msd(files, num_classes=num_classes)
    recs = [read_checkpoint(f, 'student') for f in sorted(files)]
    if len(recs) != len(recs[0]['partition']):
        return None
    students = [load_student(r, r['config']['sigma_max'], num_classes, f) for r, f in zip(recs, sorted(files))]
    return MSD(students, recs[0]['partition'], num_classes)


def save_results(cfg, results):
    path = os.path.join(cfg.out, 'results.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(results, f, indent=1)
    os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------------------------
# Report.

def plot(series, path, dm_steps, samples, reference=None):
    """FID against generator iterations, one line per series ({name: [(iterations, FID), ...]}), as a small
    PNG (PIL only); `dm_steps`: where the DM | ADM boundary is drawn (None: no boundary, DM-only runs);
    `reference` (name, FID): a horizontal line, e.g. the teacher's. Every label has its own
    place: title above the plot, the stage boundary's label above the plot area, legend in the right margin,
    tick labels outside the axes."""
    W, H, left, right, top, bottom = 640, 400, 60, 110, 60, 50
    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    pts = {name: sorted(p) for name, p in series.items()}
    xs = [x for p in pts.values() for x, _ in p]
    ys = [y for p in pts.values() for _, y in p] + ([reference[1]] if reference else [])
    if not xs:
        return False
    # The y axis spans the data, not 0..max: FID curves a few points apart between 25 and 45 would otherwise
    # share a thin band at the top. Ticks: the finest step of 1, 2 or 5 x 10^k giving at most 8 intervals.
    x1, span = max(max(xs), dm_steps or 0), max(max(ys) - min(ys), 1.0)
    lo, hi = max(0.0, min(ys) - 0.03 * span), max(ys) + 0.03 * span
    e = math.floor(math.log10(span / 8))                                      # 10^e <= span / 8: too fine at most
    for step in (m * 10.0 ** k for k in (e, e + 1, e + 2) for m in (1, 2, 5)):   # 10^(e+2) > span: ends by then
        if (n := math.ceil(hi / step) - math.floor(lo / step)) <= 8:
            break
    y0 = math.floor(lo / step) * step
    y1 = y0 + n * step
    X = lambda x: left + (W - left - right) * x / max(x1, 1)
    Y = lambda y: H - bottom - (H - top - bottom) * (y - y0) / (y1 - y0)
    d.line([(left, H - bottom), (W - right, H - bottom)], 'black')
    d.line([(left, top), (left, H - bottom)], 'black')
    for i in range(n + 1):
        d.text((left - 6, Y(y0 + i * step)), f'{y0 + i * step:.{0 if step >= 1 else 1}f}', fill='black', anchor='rm')
    for i in range(6):
        d.text((X(x1 * i / 5), H - bottom + 6), f'{x1 * i / 5:.0f}', fill='black', anchor='mt')
    if dm_steps is not None:
        d.line([(X(dm_steps), top), (X(dm_steps), H - bottom)], (180, 180, 180))
        d.text((X(dm_steps), top - 4), 'DM | ADM', fill='gray', anchor='mb')
    def legend(i, name, color):                                               # right margin, one row each
        d.line([(W - right + 15, top + 20 * i), (W - right + 40, top + 20 * i)], color, width=2)
        d.text((W - right + 46, top + 20 * i), name[:10], fill=color, anchor='lm')
    colors = [(200, 40, 40), (40, 80, 200), (40, 150, 60), (150, 60, 170), (220, 130, 20), (0, 160, 170),
              (140, 90, 40), (230, 60, 160)]                                 # distinct up to 8 series
    for i, (name, p) in enumerate(pts.items()):
        color = colors[i % len(colors)]
        if len(p) > 1:
            d.line([(X(x), Y(y)) for x, y in p], color, width=2)
        for x, y in p:
            d.ellipse([X(x) - 3, Y(y) - 3, X(x) + 3, Y(y) + 3], color)
        legend(i, name, color)
    if reference:
        for x in range(left, W - right, 8):                                   # dashed
            d.line([(x, Y(reference[1])), (min(x + 4, W - right), Y(reference[1]))], (90, 90, 90))
        legend(len(pts), reference[0], (90, 90, 90))
    d.text((W // 2, 12), f'FID ({samples} samples) against generator iterations', fill='black', anchor='mt')
    d.text((left, top - 22), 'FID', fill='black', anchor='mb')
    d.text(((left + W - right) // 2, H - 8), 'generator iterations', fill='black', anchor='mb')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return True


def verdicts(rows):
    """One line per claim whose rows were evaluated, computed from the table (the reading of why is written
    by hand below)."""
    f, have = lambda k: rows[k]['fid'], lambda *keys: all(k in rows for k in keys)
    out = []
    if msd := [k for k in ('k4', 'k4-half', 'k4-random') if k in rows] if 'teacher' in rows else []:
        best = min(msd, key=f)
        out.append(f'(a) one-step MSD vs the 35-NFE teacher: best MSD row FID {f(best):.2f} vs teacher {f("teacher"):.2f}: '
                   + ('holds' if f(best) <= f('teacher') else 'does not hold'))
    if have('k1', 'k4'):
        ks = [k for k in (1, 2, 4) if f'k{k}' in rows]
        seq = [f(f'k{k}') for k in ks]
        out.append(f'(b) K = {", ".join(map(str, ks))} (DM + ADM): {", ".join(f"{v:.2f}" for v in seq)}: '
                   + ('holds (monotone)' if all(a > b for a, b in zip(seq, seq[1:])) else
                      'holds for K = 1 vs 4 only' if seq[0] > seq[-1] else 'does not hold'))
    if pairs := [(k, f(f'k{k}-dm'), f(f'k{k}')) for k in (1, 4) if have(f'k{k}-dm', f'k{k}')]:
        out.append('(c) DM only -> DM + ADM at equal updates: ' + ', '.join(f'K = {k}: {a:.2f} -> {b:.2f}' for k, a, b in pairs)
                   + f': ADM lowers FID in {sum(a > b for _, a, b in pairs)} of {len(pairs)}')
    if have('k4-half', 'k4'):
        h, s = rows['k4-half'], rows['k4']
        out.append(f'(d) half-width students: {h["params"] / 1e6:.2f}M vs {s["params"] / 1e6:.2f}M parameters, '
                   f'FID {h["fid"]:.2f} vs {s["fid"]:.2f} (speed: BENCHMARKS.md)')
    if have('k4', 'k4-random'):
        out.append(f'(e) contiguous vs random partition (K = 4): {f("k4"):.2f} vs {f("k4-random"):.2f}: '
                   + ('holds' if f('k4') < f('k4-random') else 'does not hold'))
    return out


def report(cfg, results):
    rows = results.get('rows', {})
    if not rows:
        raise ValueError(f'nothing to report: {cfg.out}/results.json has no evaluated rows (run --parts eval)')
    import shutil
    os.makedirs(cfg.figures, exist_ok=True)
    curve = results.get('curve', {})
    series = {f'K = {run[1:]}': [(int(k.split(':')[1]), v) for k, v in curve.items() if k.startswith(run + ':')]
              for run in ('k1', 'k4') if any(k.startswith(run + ':') for k in curve)}
    plotted = plot(series, os.path.join(cfg.figures, 'fid_vs_iterations.png'), results.get('dm_steps', 0), cfg.plot_samples)
    for k in rows:
        if os.path.exists(os.path.join(cfg.out, 'grids', f'{k}.png')):
            shutil.copy(os.path.join(cfg.out, 'grids', f'{k}.png'), os.path.join(cfg.figures, f'grid-{k}.png'))
    rel = os.path.relpath(cfg.figures, os.path.dirname(os.path.abspath(cfg.results)))
    cmd = results.get('command', 'python experiments.py')
    L = ['# RESULTS: MSD on Fashion-MNIST at small scale', '',
         f'Made by `{cmd}` on {results.get("machine", "?")}. Every student was distilled from the committed teacher '
         f'`{cfg.teacher}` with batch {results.get("batch")} per student, {results.get("dm_steps")} DM then '
         f'{results.get("adm_steps")} ADM generator iterations (DM-only rows: all {results.get("dm_steps", 0) + results.get("adm_steps", 0)} in DM; '
         f'5 critic updates each), AdamW lr {results.get("lr")}; '
         f'half-width students first ran {results.get("tsm_steps")} TSM steps. '
         f'FID: torch-fidelity\'s Inception (2048 pool features) of N generated images (labels balanced over the classes) '
         f'against the cached features of {next(iter(rows.values()))["ref"]} Fashion-MNIST training images. '
         f'Accuracy: a small CNN classifier (`{cfg.classifier}`) on the same samples, against the label asked for.', '',
         '| row | FID | samples | NFE | params / student | accuracy | latency (1 image) | images/s (batch) | training |',
         '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for key, _, title in ROWS:
        if key not in rows:
            continue
        r = rows[key]
        tr = f'{r["train_s"] / 60:.1f} min' if r['train_s'] else 'checkpoints/fashion-teacher.md'
        b = cfg.speed_batch if r['nfe'] == 1 else min(cfg.speed_batch, 256)
        L.append(f'| {title} | {r["fid"]:.2f} | {r["samples"]} | {r["nfe"]} | {r["params"] / 1e6:.2f}M | {100 * r["accuracy"]:.1f}% '
                 f'| {r["latency_ms"]:.1f} ms | {r["images_per_s"]:.0f} ({b}) | {tr} |')
    L += ['', f'Training time: the summed wall time of the run\'s students (speed columns: one measurement per row on this machine; BENCHMARKS.md has numbers timed in rounds). '
              f'{results.get("train_jobs", 1)} student processes trained at once on this machine, sharing it.', '']
    if 'k4' in rows and 'group_fid' in rows['k4']:
        L += ['## Per student (K = 4, contiguous)', '',
              f'Each student\'s samples ({rows["k4"]["samples"] // 10} per class) against the real training images of its own classes; '
              'the teacher\'s samples of the same classes for comparison. Accuracy: per class, of the classifier on those samples.', '',
              '| student | classes | FID student | FID teacher | accuracy student | accuracy teacher |', '| --- | --- | ---: | ---: | ---: | ---: |']
        t = rows.get('teacher', {})
        for k, g in enumerate(rows['k4']['groups']):
            acc = lambda r: ', '.join(f'{100 * r["per_class"][c]:.0f}%' for c in g) if r else '-'
            tf = t['group_fid'][k] if 'group_fid' in t else float('nan')
            L.append(f'| {k} | {g} | {rows["k4"]["group_fid"][k]:.2f} | {tf:.2f} | {acc(rows["k4"])} | {acc(t)} |')
        L.append('')
    L += ['## Claims', ''] + [f'- {v}' for v in verdicts(rows)] + ['']
    if plotted:
        L += [f'![FID against iterations]({rel}/fid_vs_iterations.png)', '']
    L += ['Sample grids (row c: class c, seeds 0-9 in every grid):', '', '| generator | samples |', '| --- | --- |']
    L += [f'| {rows[k]["title"]} | ![{k}]({rel}/grid-{k}.png) |' for k in ('teacher', 'k1', 'k4', 'k4-random', 'k4-half') if k in rows] + ['']
    if results.get('commands'):
        L += ['Training commands (the script runs each with `--only_students k` per student, then once more to write msd.pt):', '']
        L += [f'    python {c}' for c in results['commands'].values()] + ['']
    marker = '<!-- reading: written by hand, kept when the script rewrites this file -->'
    old = open(cfg.results).read() if os.path.exists(cfg.results) else ''
    L += [marker + (old.split(marker, 1)[1] if marker in old else '\n')]
    with open(cfg.results, 'w') as f:
        f.write('\n'.join(L))
    print(f'wrote {cfg.results}', flush=True)


def main(cfg: GridConfig, argv):
    parts = [p.strip() for p in cfg.parts.split(',') if p.strip()]
    bad = [p for p in parts if p not in ('features', 'train', 'eval', 'report', 'curves')]
    if bad:
        raise ValueError(f'unknown part {bad[0]!r}: choose from features, train, eval, report, curves')
    selected(cfg)                                                          # a bad --runs fails before any work
    if ('train' in parts or 'eval' in parts) and not os.path.exists(cfg.teacher):
        raise FileNotFoundError(f'no teacher at {cfg.teacher} (train one: python train.py --stages teacher)')
    os.makedirs(cfg.out, exist_ok=True)
    S.keep_freed_memory()
    path = os.path.join(cfg.out, 'results.json')
    results = json.load(open(path)) if os.path.exists(path) else {}
    results['command'] = results.get('command') or 'python experiments.py ' + ' '.join(argv)
    device = torch.device('cuda' if cfg.device in ('auto', 'cuda') and torch.cuda.is_available() else 'cpu')
    if cfg.device == 'cuda' and device.type != 'cuda':
        raise ValueError('--device cuda but no CUDA device is visible')
    if 'features' in parts:
        S.reference(load_data(cfg.data), cfg.fid_ref, S.inception(device))
    if 'train' in parts:
        train(cfg, results)
        save_results(cfg, results)
    if 'eval' in parts:
        evaluate(cfg, results, device)
    if 'report' in parts:
        report(cfg, results)
    if 'curves' in parts:
        curves(cfg, device)


def cli(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    with one_line_errors((ValueError, OSError, RuntimeError)):
        main(cfg, argv)


if __name__ == '__main__':
    cli()
