"""Speed: the one-step MSD generator against the teacher's sampler (MSD Table 3), and the cost of a training iteration.

    teacher           EDM Heun sampler, 2N-1 network evaluations per image      EDM Algorithm 1
    MSD               x = G_{k(y)}(z, y): 1 evaluation per image, K sub-batches  MSD sec. 3.1, Fig. 2
    speed-up          images/s of one student / images/s of the teacher       ideal 2N-1, bound >= 30x
    routing overhead  1 - median_r(t_one,r / t_MSD,r), mixed labels             bound <= 10%

All rows are timed in rounds (each calls every row once), over the same stretch of a machine whose speed drifts.
--train N instead times and profiles student 0's train.py DM and ADM iterations (top operations, Chrome trace, CUDA syncs).

    python bench.py                                        # checkpoints/fashion-msd4.pt, batch 256
    python bench.py --ckpt runs/fashion/msd.pt --batch 64 --batches 1,16,64,256,1024
    python bench.py --device cuda --batch 1024 --compile   # CUDA-graph rows, and torch.compile
    python bench.py --train 5 --device cuda --train_args '--batch 64 --compile 1'   # DM / ADM iterations
"""
import argparse
import os
import shlex
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import partition as P
import sample as S
import train
from data import load_data
from msd import MSD, load_msd
from student import Student, student_config
from checkpoint import load_teacher, one_line_errors, read_checkpoint
from teacher import count_params


@dataclass(eq=False)
class Row:
    """One generator of the table: `calls` timed calls gen(z, labels) on one batch."""
    name: str
    gen: object                                         # (z, labels) -> images
    labels: torch.Tensor
    calls: int
    params: int = 0                                     # of one network
    warm: object = None                                 # the warm-up call, if not gen
    times: list = field(default_factory=list)           # seconds per round (None: not called in it)

    @property
    def images_per_s(self):
        """Images per second in the median call."""
        return len(self.labels) / float(np.median([t for t in self.times if t is not None]))


def timed(fn, n, device):
    """Seconds of n calls fn(), to their end on the device."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def warm_up(rows, shape, device):
    """Call every row once (graphs captured, code compiled, cuDNN tuned). Returns the rows that ran; a failure is reported."""
    live = []
    for row in rows:
        try:
            round_robin([Row(row.name, row.warm or row.gen, row.labels, 1)], shape, device)
            live.append(row)
        except RuntimeError as e:                    # e.g. a graph capture that fails on this device
            print(f'  {row.name}: failed ({str(e).splitlines()[0][:160]})', flush=True)
    return live


@torch.no_grad()
def round_robin(rows, shape, device, tick=lambda: None):
    """Fill each row's `times` (rows of one batch): as many rounds as the most calls, each calling every row in turn,
    the order reversed every other round; a row with fewer calls runs in evenly spread rounds. A shared CPU varies
    10-30% from call to call and drifts over minutes, which cancels in a ratio of neighbouring calls (time_ratio)."""
    z, rounds = torch.randn((len(rows[0].labels),) + tuple(shape), device=device), max(row.calls for row in rows)
    for row in rows:
        row.times = [None] * rounds
    for r in range(rounds):
        for row in rows[::1 if r % 2 == 0 else -1]:
            if (r + 1) * row.calls // rounds > r * row.calls // rounds:
                row.times[r] = timed(lambda: row.gen(z, row.labels), 1, device)
                tick()


def time_ratio(t_a, t_b):
    """median_r(t_a,r / t_b,r) over the rounds where both ran: how many times longer a takes than b."""
    ratios = [a / b for a, b in zip(t_a, t_b) if a is not None and b is not None]
    if not ratios:
        raise ValueError('the two generators ran in no common round')
    return float(np.median(ratios))


def overhead(t_a, t_b):
    """1 - median_r(t_a,r / t_b,r): the share of a's images/s that b loses (bound 0.10; below 0, b is the faster)."""
    return 1 - time_ratio(t_a, t_b)


@dataclass
class Graphed:
    """A student or MSD generator in bf16 as CUDA graphs, one per batch shape and label mix, replaying a small network's
    many kernel launches at once. MSD reads its sub-batch sizes on the host (one sync); its sort, K forwards and scatter
    are one graph."""
    gen: object
    graphs: dict = field(default_factory=dict)          # (shape, sizes) -> (graph, its inputs z and y, its output)

    @torch.no_grad()
    def __call__(self, z, labels):
        """Copy z and labels into their graph (captured on first use) and replay it; the next call overwrites the output."""
        kw = {'sizes': self.gen.sizes(labels)} if isinstance(self.gen, MSD) else {}
        key = (tuple(z.shape), tuple(kw.get('sizes', ())))
        if key not in self.graphs:
            z_in, y_in, graph, side = z.clone(), labels.clone(), torch.cuda.CUDAGraph(), torch.cuda.Stream()
            forward = lambda: self.gen(z_in, y_in, **kw).float()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.autocast('cuda', dtype=torch.bfloat16):
                for _ in range(3):                        # warm-up outside the graph (cuDNN picks its kernels)
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph), torch.autocast('cuda', dtype=torch.bfloat16):
                self.graphs[key] = graph, z_in, y_in, forward()
        graph, z_in, y_in, out = self.graphs[key]
        z_in.copy_(z)
        y_in.copy_(labels)
        graph.replay()
        return out


def table(header, lines):
    """Rows of strings as an aligned Markdown table (first column left, the others right)."""
    width = [max(len(c) for c in col) for col in zip(header, *lines)]
    fmt = lambda cells: '| ' + ' | '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, width))) + ' |'
    return '\n'.join(map(fmt, [header, [':'.rjust(w, '-') if i else '-' * w for i, w in enumerate(width)]] + lines))


def bench(msd: MSD, teacher, batch, heun_steps, device, widths=(0.76, 0.5), repeats=10, compile_=False):
    """Images/s of the teacher, one student, MSD with mixed labels, one student on MSD's sub-batches (on CUDA the pair
    also as bf16 CUDA graphs), one student under torch.compile (compile_) and smaller students; the speed-up and the
    routing overheads. Returns {row name or measure: value}."""
    shape = (teacher.cfg.img_channels, teacher.cfg.img_resolution, teacher.cfg.img_resolution)
    K, st, nfe, n = len(msd.students), msd.students[0], 2 * heun_steps - 1, count_params(msd.students[0])
    mixed = (torch.arange(batch) % msd.num_classes).to(device)              # every student runs
    own, sizes = torch.full((batch,), msd.groups[0][0], dtype=torch.long, device=device), msd.sizes(mixed)
    split = lambda z, y: [st(zk, yk) for zk, yk in zip(z.split(sizes), y.split(sizes)) if len(zk)]
    heun = Row(f'teacher, Heun {nfe} NFE', lambda z, y: S.heun(teacher, z, y, heun_steps), mixed, 3,
               count_params(teacher), warm=lambda z, y: S.heun(teacher, z, y, 2))   # 3 NFE warm it up too
    one, routed = Row('one student (1 NFE)', st, own, repeats, n), Row(f'MSD, {K} students, mixed labels', msd, mixed, repeats, n)
    sub = Row(f'one student on {K} sub-batches of ~{batch // K} (no routing)', split, own, repeats, n)
    rows, pairs = [heun, one, routed, sub], [('routing overhead, eager', one, routed)]
    if device.type == 'cuda':
        pairs.append(('routing overhead, bf16 + CUDA graph', Row('one student, bf16 + CUDA graph', Graphed(st), own, repeats, n),
                      Row(f'{routed.name}, bf16 + CUDA graph', Graphed(msd), mixed, repeats, n)))
        rows += pairs[-1][1:]
    rows += [Row('one student, torch.compile', torch.compile(st), own, repeats, n)] if compile_ else []
    for w in widths:
        s = Student(student_config(teacher.cfg, w)).to(device).eval()
        rows.append(Row(f'student at width {w} ({s.net.cfg.model_channels} ch, random weights)', s, own, repeats, count_params(s)))
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu, {torch.get_num_threads()} threads'
    print(f'batch {batch} on {where}, torch {torch.__version__}: median of {repeats} calls per row (teacher: 3), in rounds', flush=True)
    live = warm_up(rows, shape, device)
    with S.progress(sum(row.calls for row in live), 'bench', enabled=device.type == 'cpu') as bar:
        round_robin(live, shape, device, bar.update)
    print(table(['generator', 'images/s', 'ms / batch', 'parameters / network'], [[row.name, f'{row.images_per_s:,.2f}',
                f'{1000 * batch / row.images_per_s:,.1f}', f'{row.params / 1e6:.2f}M'] for row in live]))
    out = {row.name: row.images_per_s for row in live}
    if heun in live and one in live:         # from the two medians: a teacher call spans many student calls
        speedup = out['speed-up'] = one.images_per_s / heun.images_per_s
        print(f'speed-up, one student over the teacher: {speedup:.1f}x the images/s '
              f'(ideal {nfe}x; bound at least 30x: {"holds" if speedup >= 30 else "NOT REACHED"})')
    for how, a, b in pairs + [('smaller batches alone', one, sub)]:
        if a in live and b in live:
            over = out[how] = overhead(a.times, b.times)
            bound = '' if b is sub else f'; bound: at most 10% fewer: {"holds" if over <= 0.10 else "EXCEEDED"}'
            print(f'{how}: {b.name} gives {100 * abs(over):.1f}% {"fewer" if over >= 0 else "more"} images/s '
                  f'than one student (median over {sum(t is not None for t in b.times)} rounds{bound})')
    return out


def batch_sweep(msd: MSD, batches, shape, device, repeats=5):
    """One student against MSD with mixed labels at each batch size (on CUDA also both as bf16 CUDA graphs),
    2 x repeats rounds each. Returns {(how, batch): routing overhead}."""
    st, out, lines, hows = msd.students[0], {}, [], []
    for b in batches:                                   # fresh CUDA graphs per batch: each holds its own memory
        hows = [('eager', st, msd)] + ([('bf16 + CUDA graph', Graphed(st), Graphed(msd))] if device.type == 'cuda' else [])
        own = torch.full((b,), msd.groups[0][0], dtype=torch.long, device=device)
        mixed, line = (torch.arange(b) % msd.num_classes).to(device), [str(b)]
        for how, one_gen, msd_gen in hows:
            one, routed = Row('one student', one_gen, own, 2 * repeats), Row('MSD', msd_gen, mixed, 2 * repeats)
            if len(warm_up([one, routed], shape, device)) == 2:          # else a row cannot run on this device
                round_robin([one, routed], shape, device)
                out[how, b] = overhead(one.times, routed.times)
            line += ([f'{one.images_per_s:,.1f}', f'{routed.images_per_s:,.1f}', f'{100 * out[how, b]:.1f}%'] if (how, b) in out
                     else ['-'] * 3)
        lines.append(line)
    print(f'batch sweep, median of {2 * repeats} calls in rounds:\n' + table(
        ['batch'] + [f'{what}, {how}' for how, _, _ in hows for what in ('one student, images/s', 'MSD, images/s', 'overhead')], lines))
    return out


def profile_training(cfg, data, teacher, iterations, out):
    """Images/s of train.py's DM and ADM iterations (`ratio` critic updates + 1 generator update) of a fresh student 0 on
    fresh optimisers: `iterations` timed after one warm-up, then one profiled (trace out/profile-{dm,adm}.json; on CUDA
    also its host-device syncs), the DM iteration without the optional regression loss. Returns {stage: iterations/s}."""
    d = train.init_dist(cfg)
    cuda, teacher, rates = d.device.type == 'cuda', teacher.to(d.device), {}
    groups = P.class_groups(cfg.partition, data.num_classes, cfg.students, cfg.seed, teacher, cfg.partition_file)
    run = train.StudentRun(cfg, d, 0, groups[0], data, teacher, None, 1)
    G, fake = train.build_pair(cfg, teacher, d.device)
    go, gsched = train.make_optimizer(list(G.parameters()), cfg.lr, cfg, steps_per_update=cfg.ratio)
    fo, fsched = train.make_optimizer(list(fake.parameters()), cfg.lr, cfg)
    os.makedirs(out, exist_ok=True)
    for stage in ('dm', 'adm'):
        step = lambda: train.distill_iteration(run, G, fake, go, gsched, fo, fsched, stage == 'adm')
        timed(step, 1, d.device)                                          # warm-up (cuDNN autotuning, allocator)
        rates[stage], syncs = iterations / timed(step, iterations, d.device), ''
        if cuda:                                  # torch's sync debug mode warns at every host-device sync
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                torch.cuda.set_sync_debug_mode('warn')
                timed(step, 1, d.device)
                torch.cuda.set_sync_debug_mode('default')
            syncs = f' | {sum("synchroniz" in str(w.message) for w in caught)} host-device syncs per iteration'
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            timed(step, 1, d.device)
        print(f'{stage}: {rates[stage]:.3f} iterations/s, {cfg.batch * (cfg.ratio + 1) * rates[stage]:.1f} generated images/s '
              f'(batch {cfg.batch}, {cfg.ratio} critic updates + 1 generator update, mean of {iterations}) on {d.device}{syncs}')
        print(prof.key_averages().table(sort_by='self_device_time_total' if cuda else 'self_cpu_time_total', row_limit=12))
        prof.export_chrome_trace(trace := os.path.join(out, f'profile-{stage}.json'))
        print(f'wrote {trace}', flush=True)
    return rates


def main(argv=None):
    """The command line: the sampling bench and the batch sweep, or with --train the training profile."""
    numbers = lambda kind: (lambda s: [kind(x) for x in s.split(',') if x.strip()])   # '1,16,' -> [1, 16]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', default=os.path.join(os.path.dirname(__file__), 'checkpoints/fashion-msd4.pt'), help='the MSD checkpoint')
    ap.add_argument('--teacher', default='', help="the teacher (default: the MSD checkpoint's; --train: the train.py preset's)")
    ap.add_argument('--batch', type=int, default=256, help='batch of every row (default 256: one student near its best on a CPU)')
    ap.add_argument('--repeats', type=int, default=10, help='timed calls per one-step row, median taken (default 10)')
    ap.add_argument('--widths', type=numbers(float), default='0.76,0.5', help='smaller students (random weights; empty: none)')
    ap.add_argument('--batches', type=numbers(int), default='', help='also sweep these batch sizes, e.g. 1,16,64,256,1024')
    ap.add_argument('--compile', action='store_true', help='also time one student under torch.compile (compiles first)')
    ap.add_argument('--heun_steps', type=int, default=18, help='teacher Heun steps N, 2N-1 NFE (default 18 -> 35)')
    ap.add_argument('--train', type=int, default=0, help='instead: time this many DM and ADM iterations, profile one of each')
    ap.add_argument('--train_args', default='', help="train.py flags for --train, e.g. '--batch 64 --data DIR --compile 1'")
    ap.add_argument('--out', default='runs/bench', help='folder for the --train traces (default runs/bench)')
    ap.add_argument('--device', default='auto', help='auto, cpu or cuda')
    args = ap.parse_args(argv)
    S.keep_freed_memory()
    cfg = train.parse_args(['--device', args.device, '--out', args.out] + (['--teacher', args.teacher] if args.teacher else [])
                           + shlex.split(args.train_args)) if args.train else None
    tpath = cfg.teacher if args.train else args.teacher or read_checkpoint(args.ckpt, 'msd').get('teacher')
    if not isinstance(tpath, str) or not os.path.exists(tpath):
        raise FileNotFoundError(f'no teacher at {tpath!r}: give --teacher')
    if args.train:
        return profile_training(cfg, load_data(cfg.data), load_teacher(tpath), args.train, args.out)
    device = torch.device(args.device if args.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu')
    msd, teacher = load_msd(args.ckpt).to(device), load_teacher(tpath, device)
    if teacher.label_dim != msd.num_classes:
        raise ValueError(f'teacher {tpath} has {teacher.label_dim} classes, the MSD generator {msd.num_classes}')
    print(f'{args.ckpt}: {len(msd.students)} students; teacher {tpath}')
    bench(msd, teacher, args.batch, args.heun_steps, device, args.widths, args.repeats, args.compile)
    if args.batches:
        batch_sweep(msd, args.batches, (teacher.cfg.img_channels, teacher.cfg.img_resolution, teacher.cfg.img_resolution), device)


def cli(argv=None):
    """main, its errors as one line."""
    with one_line_errors():
        main(argv)


if __name__ == '__main__':
    cli()
