"""Tests on CPU, under two minutes:  python -m pytest -q test_msd.py

Closed forms where they exist (preconditioning at F = 0, the exact denoiser of a Gaussian, the DM
gradient formula), invariants elsewhere (partitions, routing, checkpoints), and tiny end-to-end runs
of every stage, in one process and in two gloo processes through torchrun.
"""
import io
import json
import math
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import losses as L
import partition as P
import sample as S
from msd import MSD, load_msd, msd_checkpoint
from student import FakeScore, GANHead, Student, student_config
from teacher import NetConfig, build_net, heun_sampler, load_teacher, seeded_noise, teacher_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = NetConfig(img_resolution=8, img_channels=1, label_dim=6, model_channels=8, channel_mult=(1, 2),
                 num_blocks=1, attn_resolutions=(4,), dropout=0.0, channels_per_head=8)
HAVE_DATA = os.path.exists(S.FASHION_DIR)


def randomize(net, seed=0):
    """Give every parameter (including the zero-initialised ones) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


# ---------------------------------------------------------------- EDM preconditioning and sampler

def test_preconditioning_at_init_is_c_skip():
    """A fresh network has F = 0 (zero-initialised out_conv), so D(x; sigma) = c_skip x exactly."""
    net = build_net(TINY).eval()
    x = torch.randn(5, 1, 8, 8)
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0])
    c_skip = (0.25 / (sigma ** 2 + 0.25)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(net(x, sigma, torch.arange(5)), c_skip * x)


def test_preconditioning_coefficients():
    net = build_net(TINY)
    sigma = torch.logspace(-3, 2, 50)
    c_skip, c_out, c_in, c_noise = net.precond(sigma)
    sd = 0.5
    # The target of F, (x - c_skip x_noisy) / c_out, has unit variance, and c_skip + c_out^2 / sd^2 = 1.
    torch.testing.assert_close(c_skip + c_out ** 2 / sd ** 2, torch.ones_like(sigma))
    torch.testing.assert_close(c_in ** 2 * (sigma ** 2 + sd ** 2), torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(L.edm_weight(sigma), 1 / sigma ** 2 + 1 / sd ** 2)
    # lambda(sigma) c_out^2 = 1: EDM's weighting makes the F-space loss unit-weighted.
    torch.testing.assert_close(L.edm_weight(sigma) * c_out ** 2, torch.ones_like(sigma))


def test_labels_one_hot_equals_integer_and_change_output():
    net = randomize(build_net(TINY)).eval()
    x, s = torch.randn(4, 1, 8, 8), torch.full((4,), 1.0)
    y = torch.tensor([0, 1, 2, 5])
    torch.testing.assert_close(net(x, s, y), net(x, s, torch.nn.functional.one_hot(y, 6).float()))
    assert (net(x, s, y) - net(x, s, (y + 1) % 6)).abs().max() > 1e-3


def test_heun_on_gaussian_matches_exact_distribution():
    """Data N(mu, s^2) per pixel has the exact denoiser D(x; sigma) = mu + s^2/(s^2 + sigma^2)(x - mu),
    and the probability-flow ODE maps N(0, 80^2) onto N(mu, s^2). With 256 steps the sampler's
    output distribution must match it; at 18 steps (35 NFE) it must equal the Heun recurrence
    for this linear ODE worked out by hand: (x - mu) is multiplied by a fixed factor per step."""
    mu, s = 0.3, 0.2
    calls = []

    def D(x, sigma, labels):
        calls.append(1)
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)

    z = seeded_noise(range(4000), (1, 1, 1))
    x = heun_sampler(D, z, None, num_steps=256)
    assert abs(x.mean().item() - mu) < 0.01
    assert abs(x.std().item() - s) < 0.01

    calls.clear()
    x = heun_sampler(D, z, None, num_steps=18)
    assert len(calls) == 35                                            # 2N - 1 evaluations
    # dx/dsigma = (x - D) / sigma = (x - mu) sigma / (s^2 + sigma^2) =: (x - mu) f(sigma).
    rho, N = 7, 18
    t = [(80 ** (1 / rho) + i / (N - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho for i in range(N)] + [0.0]
    f = lambda sig: sig / (s ** 2 + sig ** 2)
    factor = 1.0
    for i in range(N):
        h = t[i + 1] - t[i]
        euler = 1 + h * f(t[i])
        factor *= euler if i == N - 1 else 1 + h * 0.5 * (f(t[i]) + euler * f(t[i + 1]))
    expected = mu + (80 * z.double() - mu) * factor
    assert (x.double() - expected).abs().max() < 1e-5
    assert abs(80 * factor - s) < 0.02                                 # and it is close to exact


def test_seeded_noise_is_batch_independent():
    a = seeded_noise([3, 7, 11], (1, 4, 4))
    b = seeded_noise([7], (1, 4, 4))
    torch.testing.assert_close(a[1], b[0])


# ---------------------------------------------------------------- losses

def test_dm_gradient_equals_formula_and_vanishes_when_fake_is_real():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    a, b = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)          # D_real, D_fake outputs
    D_real = lambda x_t, sigma, y: a
    D_fake = lambda x_t, sigma, y: b
    L.dm_loss(D_real, D_fake, x, None, L.sigma_grid()).mean().backward()
    w = (x.detach() - a).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    g = (b - a) / w                                                   # DMD eq. 8
    torch.testing.assert_close(x.grad, g / 16 / 3)                    # / numel per sample / batch
    # A gradient-descent step moves x toward the teacher's estimate a, away from the fake one b.
    x2 = x.detach() - 0.1 * x.grad * 48
    assert ((x2 - a).norm() < (x.detach() - a).norm()) and ((x2 - b).norm() > (x.detach() - b).norm())
    x.grad = None
    L.dm_loss(D_real, D_real, x, None, L.sigma_grid()).mean().backward()
    assert x.grad.abs().max() == 0


def test_sigma_grid_is_karras_ascending():
    grid = L.sigma_grid(1000)
    assert abs(grid[0].item() - 0.002) < 1e-6 and abs(grid[-1].item() - 80) < 1e-3
    assert (grid[1:] > grid[:-1]).all()
    sig = L.sample_grid_sigma(10000, grid, 0.02, 0.98)
    assert sig.min() >= grid[20] and sig.max() <= grid[980]


def test_edm_and_tsm_losses_closed_form():
    """A perfect denoiser of a point mass at x0 gives zero EDM loss; TSM against itself is zero,
    and TSM against a denoiser off by a constant c is lambda(sigma) c^2."""
    x0 = torch.randn(4, 1, 4, 4)
    perfect = lambda x_t, sigma, y: x0
    assert L.edm_loss(perfect, x0, None).abs().max() == 0
    assert L.tsm_loss(perfect, perfect, x0, None).abs().max() == 0
    sigma = torch.full((4, 1, 1, 1), 2.0)
    off = lambda x_t, sigma, y: x0 + 0.1
    torch.testing.assert_close(L.tsm_loss(off, perfect, x0, None, sigma=sigma), L.edm_weight(sigma).flatten() * 0.01)


def test_gan_losses_closed_form():
    grid = L.sigma_grid()
    x = torch.randn(2, 1, 4, 4)
    const = lambda v: (lambda x_t, sigma, y: torch.full((x_t.shape[0],), v))
    sp = lambda v: math.log1p(math.exp(v))
    torch.testing.assert_close(L.gan_critic_loss(const(0.5), x, None, x, None, grid), torch.full((2,), sp(0.5) + sp(-0.5)))
    torch.testing.assert_close(L.gan_generator_loss(const(2.0), x, None, grid), torch.full((2,), sp(-2.0)))


def test_gan_head_shapes():
    assert GANHead(768, 8)(torch.randn(2, 768, 8, 8)).shape == (2,)       # ImageNet-64 bottleneck
    assert GANHead(64, 7)(torch.randn(3, 64, 7, 7)).shape == (3,)         # Fashion-MNIST bottleneck
    fake = FakeScore(build_net(TINY))
    assert fake.critic(torch.randn(3, 1, 8, 8), torch.ones(3), torch.tensor([0, 1, 2])).shape == (3,)


# ---------------------------------------------------------------- partitions and routing

@pytest.mark.parametrize('strategy', P.STRATEGIES)
@pytest.mark.parametrize('C,K', [(10, 1), (10, 3), (10, 4), (10, 10), (1000, 4), (7, 7)])
def test_partition_invariants(strategy, C, K):
    emb = torch.randn(C, 5, generator=torch.Generator().manual_seed(1))
    groups = P.make_partition(strategy, C, K, seed=3, embeddings=emb)
    flat = sorted(c for g in groups for c in g)
    assert flat == list(range(C)) and len(groups) == K
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert P.make_partition(strategy, C, K, seed=3, embeddings=emb) == groups      # seeded, reproducible


def test_partition_contiguous_and_kmeans_recover_structure():
    assert P.make_partition('contiguous', 10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    # Four well-separated clusters of 3 classes each, interleaved in class order.
    centers = torch.eye(4) * 100
    emb = torch.stack([centers[c % 4] + 0.1 * torch.randn(4) for c in range(12)])
    groups = P.make_partition('kmeans', 12, 4, embeddings=emb)
    assert sorted(groups) == sorted([[c for c in range(12) if c % 4 == j] for j in range(4)])


def test_partition_rejects_bad_input():
    for bad in ([[0, 1], [1, 2]], [[0, 1], []], [[0, 1, 2]], [[0, 1], [2, 3, 4]], [[0, 1, 2, 3, -1]]):
        with pytest.raises(ValueError):
            P.validate(bad, 4)
    for k in (0, 5):
        with pytest.raises(ValueError):
            P.make_partition('contiguous', 4, k)
    with pytest.raises(ValueError):
        P.make_partition('alphabetical', 4, 2)


class Spy(Student):
    """A student that records the labels it is asked for and paints its index into the image."""

    def __init__(self, k):
        super().__init__(TINY)
        self.k, self.seen = k, []

    def forward(self, z, labels):
        self.seen += labels.tolist()
        return torch.full_like(z, float(self.k))


def test_routing_each_student_sees_only_its_labels_and_order_is_kept():
    groups = P.make_partition('random', 6, 3, seed=5)
    msd = MSD([Spy(k) for k in range(3)], groups, 6)
    labels = torch.randint(6, (50,), generator=torch.Generator().manual_seed(0))
    out = msd(torch.randn(50, 1, 8, 8), labels)
    owner = P.route(labels, groups, 6)
    assert torch.equal(out[:, 0, 0, 0].long(), owner)
    for k, st in enumerate(msd.students):
        assert set(st.seen) <= set(groups[k]) and len(st.seen) == int((owner == k).sum())
    with pytest.raises(ValueError):
        msd(torch.randn(1, 1, 8, 8), torch.tensor([6]))


def test_routed_batch_equals_each_image_from_its_own_student():
    """MSD(z, y)[i] = G_{k(y_i)}(z_i, y_i), image by image (the sort and scatter lose nothing), also
    with the sizes given (the CUDA-graph path), for an empty batch, with the students stacked and with
    one stream per student."""
    teacher = randomize(build_net(TINY)).eval()
    groups = P.make_partition('random', 6, 3, seed=2)
    msd = MSD([randomize(Student.from_teacher(teacher), seed=k) for k in range(3)], groups, 6).eval()
    z, y = torch.randn(9, 1, 8, 8), torch.tensor([5, 0, 3, 3, 1, 4, 2, 0, 5])
    owner = P.route(y, groups, 6)
    ref = torch.cat([msd.students[owner[i]](z[i:i + 1], y[i:i + 1]) for i in range(9)])
    torch.testing.assert_close(msd(z, y), ref)
    sizes = msd.sizes(y)
    assert sizes == [int((owner == k).sum()) for k in range(3)]
    torch.testing.assert_close(msd(z, y, sizes=sizes), ref)
    assert msd(z[:0], y[:0]).shape == (0, 1, 8, 8)
    keep = owner != 1                                      # student 1 owns none of these: it is not run
    torch.testing.assert_close(msd(z[keep], y[keep]), ref[keep])
    with torch.no_grad():                                  # the bench's batched variant: one vmapped network
        torch.testing.assert_close(S.StackedMSD(msd)(z, y), ref)
    run = S.concurrent(msd, torch.device('cpu'))           # one stream per student (no-op streams on a CPU)
    torch.testing.assert_close(run(z, y, sizes), ref)
    torch.testing.assert_close(run(z[keep], y[keep]), ref[keep])


# ---------------------------------------------------------------- students and checkpoints

def test_student_is_copy_of_teacher_and_smaller_student_is_smaller():
    teacher = randomize(build_net(TINY)).eval()
    st = Student.from_teacher(teacher)
    z, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 4])
    torch.testing.assert_close(st(z, y), teacher(80 * z, 80.0, y))        # G(z, y) = D(80 z; 80, y)
    small = Student.from_teacher(teacher, width=0.5)
    assert small.net.cfg.model_channels == 4
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in st.parameters())
    assert student_config(TINY, 1.0).model_channels == TINY.model_channels


def test_checkpoint_round_trip(tmp_path):
    teacher = randomize(build_net(TINY))
    students = [randomize(Student.from_teacher(teacher, w), seed=k) for k, w in enumerate((1.0, 0.5))]
    groups = [[0, 2, 4], [1, 3, 5]]
    path = str(tmp_path / 'msd.pt')
    torch.save(msd_checkpoint(students, groups, 6, dict(note='test')), path)
    torch.load(path, weights_only=True)                                   # plain data only
    msd = load_msd(path)
    z, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    ref = MSD(students, groups, 6).eval()
    torch.testing.assert_close(msd(z, y), ref(z, y))
    with pytest.raises(ValueError, match='trained for 6 classes'):
        load_msd(path, num_classes=10)
    tpath = str(tmp_path / 'teacher.pt')
    torch.save(teacher_checkpoint(teacher), tpath)
    torch.testing.assert_close(load_teacher(tpath)(z, torch.ones(6), y), teacher.eval()(z, torch.ones(6), y))
    with pytest.raises(ValueError, match="expected 'msd'"):
        load_msd(tpath)
    with pytest.raises(ValueError, match="expected 'teacher'"):
        load_teacher(path)


# ---------------------------------------------------------------- data

def test_edm_zip_dataset(tmp_path):
    path = tmp_path / 'ds.zip'
    with zipfile.ZipFile(path, 'w') as zf:
        labels = []
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(buf, format='PNG')
            zf.writestr(f'00000/img{i:08d}.png', buf.getvalue())
            labels.append([f'00000/img{i:08d}.png', i % 3])
        zf.writestr('dataset.json', json.dumps({'labels': labels}))
    data = S.load_data(str(path))
    assert data.shape == (3, 8, 8) and data.num_classes == 3 and len(data) == 6
    x, y = data.get(torch.tensor([5, 1]))
    assert y.tolist() == [2, 1] and abs(x[0].mean().item() - (200 / 127.5 - 1)) < 1e-6


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_fashion_mnist_reads():
    data = S.load_data('')
    assert len(data) == 60000 and data.shape == (1, 28, 28) and data.num_classes == 10
    x, _ = data.get(torch.arange(100))
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.3


# ---------------------------------------------------------------- end to end

def run_cli(args, torchrun=0, timeout=170):
    cmd = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}'] if torchrun else [])
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd + args, cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env)


TINY_RUN = ['--preset', 'smoke', '--teacher_steps', '4', '--tsm_steps', '2', '--dm_steps', '2', '--adm_steps', '1',
            '--regression_pairs', '4', '--heun_steps', '2', '--batch', '4', '--teacher_batch', '8']


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_every_stage_then_sample_and_resume_and_profile(tmp_path, capsys):
    import train
    out = str(tmp_path / 'run')
    train.main(train.parse_args(TINY_RUN + ['--out', out, '--students', '3']))
    for f in ('config.json', 'teacher.pt', 'msd.pt', 'metrics.jsonl', 'grids/msd.png', 'grids/teacher.png'):
        assert os.path.exists(os.path.join(out, f)), f
    stages = {json.loads(l).get('stage') for l in open(os.path.join(out, 'metrics.jsonl'))}
    assert {'teacher', 'tsm', 'dm', 'adm'} <= stages
    msd = load_msd(os.path.join(out, 'msd.pt'), num_classes=10)
    assert len(msd.students) == 3 and msd.groups == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert msd.students[0].net.cfg.model_channels < load_teacher(os.path.join(out, 'teacher.pt')).cfg.model_channels
    ckpt = torch.load(os.path.join(out, 'msd.pt'), weights_only=True)
    assert ckpt['config']['students'] == 3 and ckpt['partition'] == msd.groups
    # A finished run folder resumes to a no-op: same msd.pt content.
    before = {k: v.clone() for k, v in msd.state_dict().items()}
    train.main(train.parse_args(TINY_RUN + ['--out', out, '--students', '3']))
    after = load_msd(os.path.join(out, 'msd.pt')).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    S.main(['--ckpt', os.path.join(out, 'msd.pt'), '--grid', str(tmp_path / 'g.png'), '--per_class', '2'])
    assert Image.open(tmp_path / 'g.png').size == (2 * 30 + 2, 10 * 30 + 2)
    # --profile N: iterations/s of DM and ADM, the busiest operations and Chrome traces; trains nothing.
    capsys.readouterr()
    prof = str(tmp_path / 'prof')
    train.main(train.parse_args(TINY_RUN + ['--out', prof, '--teacher', os.path.join(out, 'teacher.pt'), '--stages', 'dm,adm',
                                            '--profile', '1', '--ratio', '1']))
    text = capsys.readouterr().out
    for stage in ('dm', 'adm'):
        assert f'\n{stage}: ' in text and 'convolution' in text
        with open(os.path.join(prof, f'profile-{stage}.json')) as f:
            assert json.load(f)['traceEvents']
    assert 'iterations/s' in text and not os.path.exists(os.path.join(prof, 'student0.pt'))


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_torchrun_two_gloo_processes(tmp_path):
    out = str(tmp_path / 'ddp')
    r = run_cli(['train.py'] + TINY_RUN + ['--out', out, '--students', '4', '--stages', 'teacher,tsm,dm',
                                           '--regression_weight', '0'], torchrun=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '2 rank(s)' in r.stdout
    msd = load_msd(os.path.join(out, 'msd.pt'))
    labels = torch.arange(10)
    assert msd.route(labels).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert all(os.path.exists(os.path.join(out, f'student{k}.pt')) for k in range(4))


def cli_error(main, args, capsys):
    """Run an entry point in-process; it must exit with status 2 and one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err and err.strip().count('\n') == 0, err
    return err


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
@pytest.mark.parametrize('args,message', [
    (['--students', '0'], 'between 1 and the number of classes'),
    (['--students', '11'], 'between 1 and the number of classes'),
    (['--partition', 'alphabetical'], 'unknown partition'),
    (['--stages', 'teacher,distill'], 'unknown stage'),
    (['--data', '/nonexistent/folder'], 'data not found'),
])
def test_bad_input_one_line_error(args, message, capsys, tmp_path):
    import train
    assert message in cli_error(train.cli, ['--out', str(tmp_path / 'run')] + args, capsys)


def test_bad_input_in_a_real_process_has_no_traceback():
    r = run_cli(['train.py', '--out', '/tmp/msd-bad-input', '--stages', 'distill'])
    assert r.returncode == 2 and r.stderr.startswith('error: unknown stage') and 'Traceback' not in r.stderr


def test_sample_rejects_wrong_checkpoint_kind(tmp_path, capsys):
    p = str(tmp_path / 'x.pt')
    torch.save({'kind': 'student'}, p)
    assert "expected 'msd' or 'teacher'" in cli_error(S.cli, ['--ckpt', p, '--grid', str(tmp_path / 'g.png')], capsys)


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_wrong_teacher_checkpoints_one_line_error(tmp_path, capsys):
    import train
    other = str(tmp_path / 'teacher6.pt')
    torch.save(teacher_checkpoint(build_net(TINY)), other)                # 6 classes at 8x8
    wrong_kind = str(tmp_path / 'msd.pt')
    torch.save({'kind': 'msd'}, wrong_kind)
    garbage = str(tmp_path / 'garbage.pt')
    open(garbage, 'wb').write(b'not a checkpoint')
    for path, message in ((other, 'is for 6 classes'), (wrong_kind, "expected 'teacher'"), (garbage, 'not a readable checkpoint')):
        args = ['--out', str(tmp_path / 'run'), '--teacher', path, '--stages', 'dm']
        assert message in cli_error(train.cli, args, capsys)
        assert not os.path.exists(tmp_path / 'run')                       # nothing written


# ---------------------------------------------------------------- NVIDIA EDM pickles (issue: bring your own teacher)

EDM_NAMES = {'EDMPrecond': 'EDMPrecond', 'DhariwalUNet': 'DhariwalUNet', 'UNetBlock': 'UNetBlock', 'Conv2d': 'Conv2d',
             'Linear': 'Linear', 'GroupNorm': 'GroupNorm', 'PositionalEmbedding': 'PositionalEmbedding'}


def evil_class(marker):
    """A class whose unpickling would run `touch marker`."""
    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)
    return Evil


def write_edm_pickle(net, path, extra_src=''):
    """Write `net` the way NVIDIA's EDM saves a snapshot, without NVIDIA's code: every network object
    becomes torch_utils.persistence._reconstruct_persistent_obj(meta), meta = {type, version,
    module_src, class_name, state}, inside {'ema': ..., 'loss_fn': ..., 'dataset_kwargs': ...}."""
    import pickle
    import types
    fake = types.ModuleType('torch_utils.persistence')

    def _reconstruct_persistent_obj(meta):
        raise AssertionError('never called by the loader')
    _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    cfg = net.cfg
    init_kwargs = dict(img_resolution=cfg.img_resolution, img_channels=cfg.img_channels, label_dim=cfg.label_dim,
                       use_fp16=True, model_type='DhariwalUNet', model_channels=cfg.model_channels,
                       channel_mult=list(cfg.channel_mult), num_blocks=cfg.num_blocks,
                       attn_resolutions=list(cfg.attn_resolutions), dropout=0.1, augment_dim=0)

    class EDMPickler(pickle.Pickler):
        def reducer_override(self, obj):
            name = 'GroupNorm' if isinstance(obj, torch.nn.GroupNorm) else \
                'Linear' if isinstance(obj, torch.nn.Linear) else type(obj).__name__
            if isinstance(obj, torch.nn.Module) and name in EDM_NAMES:
                state = {k: v for k, v in obj.__dict__.items() if k != 'cfg'}
                state['_init_args'], state['_init_kwargs'] = (), (init_kwargs if name == 'EDMPrecond' else {})
                meta = dict(type='class', version=6, module_src='import torch\n' + extra_src, class_name=name, state=state)
                return _reconstruct_persistent_obj, (meta,)
            return NotImplemented

    sys.modules['torch_utils'] = types.ModuleType('torch_utils')
    sys.modules['torch_utils.persistence'] = fake
    try:
        with open(path, 'wb') as f:
            EDMPickler(f, protocol=4).dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={'path': 'x.zip'}))
    finally:
        del sys.modules['torch_utils'], sys.modules['torch_utils.persistence']


@pytest.mark.parametrize('cfg', [TINY, NetConfig(img_resolution=16, img_channels=3, label_dim=0, model_channels=16,
                                                 channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16, 4),
                                                 channels_per_head=16)])
def test_edm_pickle_loads_without_nvidia_code(tmp_path, cfg):
    import teacher as T
    net = randomize(build_net(cfg)).eval()
    path = str(tmp_path / 'edm.pkl')
    write_edm_pickle(net, path)
    assert 'torch_utils' not in sys.modules
    if cfg.channels_per_head != 64:          # EDM's DhariwalUNet always uses 64 channels per head
        with pytest.raises(ValueError):
            T.load_teacher(path)
        return
    loaded = T.load_teacher(path)
    assert loaded.cfg == dataclasses_replace(cfg, dropout=0.1)
    x, s = torch.randn(3, cfg.img_channels, cfg.img_resolution, cfg.img_resolution), torch.tensor([0.01, 1.0, 80.0])
    y = torch.tensor([0, 3, 5]) if cfg.label_dim else None
    assert torch.equal(loaded(x, s, y), net(x, s, y))
    out = str(tmp_path / 'teacher.pt')
    T.main([path, out])                                                   # the converter
    assert torch.equal(T.load_teacher(out)(x, s, y), net(x, s, y))
    torch.load(out, weights_only=True)


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_edm_pickles_that_ask_for_code_are_refused(tmp_path):
    import pickle
    import teacher as T
    marker = tmp_path / 'PWNED'

    Evil = evil_class(marker)
    path = str(tmp_path / 'evil.pkl')
    with open(path, 'wb') as f:
        pickle.dump({'ema': Evil()}, f)
    with pytest.raises(ValueError, match=r'refusing to load (posix|os|nt)\.system'):
        T.load_teacher(path)
    # EDM-style pickle whose embedded module source would run a command if exec'd (as EDM's loader does).
    path2 = str(tmp_path / 'evil_persist.pkl')
    cfg = NetConfig(img_resolution=8, img_channels=1, label_dim=6, model_channels=16, channel_mult=(1, 2),
                    num_blocks=1, attn_resolutions=(4,))
    write_edm_pickle(build_net(cfg), path2, extra_src=f"import os\nos.system('touch {marker}')\n")
    T.load_teacher(path2)                                                 # loads: the source is never run
    assert not marker.exists()


def test_edm_parameter_names_and_imagenet_size():
    """Names and sizes that NVIDIA's checkpoints need (EDM networks.py), checked on the meta device."""
    cfg = NetConfig(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=(1, 2, 3, 4),
                    num_blocks=3, attn_resolutions=(32, 16, 8))
    with torch.device('meta'):
        net = build_net(cfg)
        h = net(torch.zeros(2, 3, 64, 64), torch.ones(2), torch.tensor([1, 2]), return_bottleneck=True)
    assert sum(p.numel() for p in net.parameters()) == 295_899_267     # EDM's edm-imagenet-64x64-cond-adm
    assert tuple(h.shape) == (2, 768, 8, 8)
    keys = set(net.state_dict())
    for k in ('model.map_layer0.weight', 'model.map_label.weight', 'model.enc.64x64_conv.weight',
              'model.enc.32x32_down.conv0.resample_filter', 'model.enc.32x32_down.skip.resample_filter',
              'model.enc.8x8_block2.qkv.weight', 'model.dec.8x8_in0.proj.bias', 'model.dec.64x64_block3.skip.weight',
              'model.out_norm.weight', 'model.out_conv.bias'):
        assert k in keys, k
    assert 'model.map_label.bias' not in keys and 'model.enc.64x64_block0.skip.weight' not in keys


@pytest.mark.skipif(not os.environ.get('MSD_SLOW'), reason='slow (minutes, ~12 GB): set MSD_SLOW=1')
def test_imagenet64_preset_one_full_size_iteration():
    """One ADM iteration (critic step + generator step) of the imagenet64 preset at full network size,
    random weights and random images, batch 2 on CPU."""
    import dataclasses
    import train
    cfg = dataclasses.replace(train.PRESETS['imagenet64'], batch=2)
    data = S.ImageData(torch.randint(1000, (64,)), 1000, (3, 64, 64), images=torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8))
    teacher = build_net(train.net_config(cfg, data)).eval().requires_grad_(False)
    G, fake = Student.from_teacher(teacher), FakeScore(teacher)
    assert fake.head(torch.randn(2, 768, 8, 8)).shape == (2,)
    run = train.StudentRun(cfg, train.Dist(), 0, list(range(250)), data, teacher, None, 1)
    go, gs = train.make_optimizer(list(G.parameters()), cfg.lr, cfg, steps_per_update=cfg.ratio)
    fo, fs = train.make_optimizer(list(fake.parameters()), cfg.lr, cfg)
    before = G.net.model.out_conv.weight.clone()
    c = train.critic_step(run, G, fake, fo, fs, adm=True)
    g = train.generator_step(run, G, fake, go, gs, adm=True)
    assert all(math.isfinite(v) for v in {**c, **g}.values())
    assert not torch.equal(before, G.net.model.out_conv.weight)


# ---------------------------------------------------------------- nothing lost, nothing executed, nothing silent

RESUME_RUN = ['--preset', 'smoke', '--students', '1', '--teacher_steps', '4', '--tsm_steps', '2', '--dm_steps', '3',
              '--adm_steps', '1', '--ckpt_every', '1', '--regression_weight', '0', '--heun_steps', '2', '--batch', '4',
              '--teacher_batch', '8']


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_sigkill_then_resume_gives_bitwise_the_same_run(tmp_path):
    """A run killed with SIGKILL in the middle of distillation and rerun with the same command ends
    with bitwise the same teacher and students as an uninterrupted run (CPU, one thread each)."""
    import signal
    import time
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    start = lambda out: subprocess.Popen([sys.executable, 'train.py', '--out', out] + RESUME_RUN, cwd=HERE, env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ref, p = start(a), start(b)                 # the uninterrupted run and the one to kill, side by side
    target = os.path.join(b, 'ckpt', 'dm-student0.pt')
    t0 = time.time()
    while not os.path.exists(target) and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(b, 'msd.pt')), 'the run finished before it could be killed'
    assert ref.wait() == 0, ref.stderr.read()[-1000:]
    r = run_cli(['train.py', '--out', b] + RESUME_RUN)
    assert r.returncode == 0, r.stderr[-1000:]
    for name in ('teacher.pt', 'msd.pt'):
        sa = torch.load(os.path.join(a, name), weights_only=True)
        sb = torch.load(os.path.join(b, name), weights_only=True)
        da = sa['state_dict'] if name == 'teacher.pt' else {f'{i}.{k}': v for i, s in enumerate(sa['students']) for k, v in s['state_dict'].items()}
        db = sb['state_dict'] if name == 'teacher.pt' else {f'{i}.{k}': v for i, s in enumerate(sb['students']) for k, v in s['state_dict'].items()}
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da), name


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_nonfinite_loss_stops_with_message_or_is_skipped(tmp_path, monkeypatch):
    import train
    calls = {'n': 0}
    real_dm_loss = L.dm_loss

    def flaky(*a, **k):
        calls['n'] += 1
        out = real_dm_loss(*a, **k)
        return out * float('nan') if calls['n'] == 2 else out
    monkeypatch.setattr(train.L, 'dm_loss', flaky)
    out = str(tmp_path / 'run')
    args = TINY_RUN + ['--out', out, '--students', '1', '--stages', 'teacher,dm', '--dm_steps', '3', '--ckpt_every', '1']
    with pytest.raises(FloatingPointError, match=r'dm stage, student 0, step 2 \(generator update\): non-finite loss dm = nan'):
        train.main(train.parse_args(args))
    assert torch.load(os.path.join(out, 'ckpt', 'dm-student0.pt'), weights_only=True)['step'] == 1   # last good state
    calls['n'] = 0
    out2 = str(tmp_path / 'run2')
    train.main(train.parse_args(TINY_RUN + ['--out', out2, '--students', '1', '--stages', 'dm', '--dm_steps', '3',
                                            '--teacher', os.path.join(out, 'teacher.pt'), '--skip_nonfinite', '1']))
    msd = load_msd(os.path.join(out2, 'msd.pt'))
    assert all(torch.isfinite(v).all() for v in msd.state_dict().values())


def _one_update(images, group=None, n=1):
    """One AdamW update of a fixed random network on images `images` of a fixed batch of 8."""
    import train
    torch.manual_seed(0)
    net = randomize(build_net(TINY))
    cfg = train.Config(lr=1e-3, warmup=1, clip=1e9)
    opt, sched = train.make_optimizer(list(net.parameters()), cfg.lr, cfg)
    g = torch.Generator().manual_seed(1)
    x, y, s = torch.randn(8, 1, 8, 8, generator=g), torch.randint(6, (8,), generator=g), torch.rand(8, generator=g) + 0.1
    ((net(x[images], s[images], y[images]) - x[images]) ** 2).mean().backward()
    train.step_optimizer(opt, sched, list(net.parameters()), cfg, group, n)
    return net.state_dict()


def _ddp_worker(rank, path, result):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{path}', rank=rank, world_size=2)
    state = _one_update(slice(4 * rank, 4 * rank + 4), dist.group.WORLD, 2)
    if rank == 0:
        torch.save(state, result)
    dist.destroy_process_group()


def test_two_ranks_batch_b_equal_one_rank_batch_2b(tmp_path):
    """Data parallelism: 2 gloo ranks with 4 images each take the same step as 1 rank with all 8."""
    import torch.multiprocessing as mp
    result = str(tmp_path / 'ddp.pt')
    mp.spawn(_ddp_worker, args=(str(tmp_path / 'rdzv'), result), nprocs=2)
    ddp, single = torch.load(result, weights_only=True), _one_update(slice(0, 8))
    assert ddp.keys() == single.keys()
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)


def test_project_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / 'PWNED'

    Evil = evil_class(marker)
    p = str(tmp_path / 'msd.pt')
    torch.save({'kind': 'msd', 'payload': Evil()}, p)
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        load_msd(p)
    assert not marker.exists()


def test_atomic_save_keeps_previous_file_when_disk_is_full(tmp_path, monkeypatch):
    import train
    p = str(tmp_path / 'state.pt')
    train.atomic_save({'step': 1}, p)

    def full(*a, **k):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(train.torch, 'save', full)
    with pytest.raises(OSError, match='No space left on device.*previous file is kept'):
        train.atomic_save({'step': 2}, p)
    monkeypatch.undo()
    assert torch.load(p, weights_only=True) == {'step': 1} and not os.path.exists(p + '.tmp')


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_bad_files_one_line_errors(tmp_path, capsys):
    import gzip
    import train
    # Corrupt data: a truncated gzip IDX file.
    bad = tmp_path / 'fmnist'
    bad.mkdir()
    raw = gzip.open(os.path.join(S.FASHION_DIR, 'train-images-idx3-ubyte.gz')).read(5000)
    (bad / 'train-images-idx3-ubyte.gz').write_bytes(gzip.compress(raw)[:3000])
    (bad / 'train-labels-idx1-ubyte').write_bytes(b'\x00\x00\x08\x01' + (60000).to_bytes(4, 'big') + bytes(10))
    err = cli_error(train.cli, ['--out', str(tmp_path / 'r1'), '--data', str(bad)], capsys)
    assert 'corrupt data file' in err or 'is truncated' in err
    # A partition file that misses or repeats a class.
    fashion_teacher = str(tmp_path / 'fashion_teacher.pt')
    torch.save(teacher_checkpoint(build_net(NetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1,
                                                      attn_resolutions=(), channels_per_head=8))), fashion_teacher)
    for name, groups in (('missing', [[0, 1, 2, 3, 4], [5, 6, 7, 8]]), ('repeated', [[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9]])):
        pf = tmp_path / f'{name}.json'
        pf.write_text(json.dumps(groups))
        err = cli_error(train.cli, ['--out', str(tmp_path / name), '--students', '2', '--partition_file', str(pf),
                                   '--teacher', fashion_teacher, '--stages', 'dm'], capsys)
        assert 'exactly once' in err
    # A truncated checkpoint, and one whose weights do not fit its recorded architecture.
    good = tmp_path / 'teacher.pt'
    torch.save(teacher_checkpoint(build_net(TINY)), good)
    (tmp_path / 'trunc.pt').write_bytes(good.read_bytes()[:2000])
    ck = teacher_checkpoint(build_net(TINY))
    ck['net']['model_channels'] = 16
    torch.save(ck, tmp_path / 'arch.pt')
    for path, message in (('trunc.pt', 'not a readable checkpoint'), ('arch.pt', 'do not fit')):
        assert message in cli_error(train.cli, ['--out', str(tmp_path / ('r-' + path)), '--teacher', str(tmp_path / path), '--stages', 'dm'], capsys)
    # A label outside the class range.
    assert 'must lie in 0..5' in cli_error(S.cli, ['--ckpt', str(good), '--seeds', '0-1', '--classes', '7', '--heun_steps', '2',
                                                   '--outdir', str(tmp_path / 'imgs')], capsys)


def test_bench_reports_every_generator(capsys):
    teacher = randomize(build_net(TINY)).eval()
    msd = MSD([Student.from_teacher(teacher) for _ in range(2)], [[0, 1, 2], [3, 4, 5]], 6).eval()
    out = S.bench(msd, teacher, 4, 2, torch.device('cpu'), widths=(0.5,), repeats=3)
    speeds = {k: v for k, v in out.items() if not k.startswith(('routing', 'sub-batches')) and '/' not in k}
    assert len(speeds) == 6 and all(v > 0 for v in speeds.values())
    assert out['one student / teacher'] > 1                  # 3 NFE (heun_steps 2) against 1
    assert -1 < out['routing overhead, eager'] < 1
    assert 0 < out['routing alone, ms'] < 1000 * 4 / speeds['one student (1 NFE)']   # cheaper than one student's call
    assert 'routing overhead, eager: MSD with mixed labels gives' in capsys.readouterr().out


def test_round_robin_overhead_of_a_generator_twice_as_slow_is_one_half():
    def gen(seconds):
        return lambda z, y: time.sleep(seconds)
    t_a, t_b, t_c = S.round_robin_times([(gen(0.05), torch.zeros(2), 6), (gen(0.1), torch.zeros(2), 6),
                                         (gen(0.0), torch.zeros(2), 3)], (1, 2, 2), torch.device('cpu'))
    assert [t is not None for t in t_c] == [False, True] * 3    # 3 calls spread evenly over 6 rounds
    assert all(t is not None for t in t_a + t_b)
    assert 0.4 < S.overhead(t_a, t_b) < 0.6                   # 1 - t_a / t_b = 1 - 0.05 / 0.1
    assert -1.2 < S.overhead(t_b, t_a) < -0.8                 # b is the faster: 1 - 0.1 / 0.05 = -1
    assert 1.8 < S.time_ratio(t_b, t_a) < 2.2
    slow = [None, 1.0, None, 1.0, None, 1.0]                  # ratios only within rounds where both ran
    assert S.time_ratio(slow, [9.0, 0.5, 9.0, 0.5, 9.0, 0.5]) == 2.0
    with pytest.raises(ValueError):
        S.time_ratio(slow, [1.0, None] * 3)


def test_keep_freed_memory_stops_page_faults():
    """glibc would mmap each 64 MiB block afresh and fault in its 16,384 pages on every allocation."""
    import resource
    if S.keep_freed_memory() < 2 ** 26:
        pytest.skip('needs glibc taking an mmap threshold above 64 MiB (and MSD_RETURN_MEMORY unset)')
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):                      # the heap grows a few times (aligned blocks fragment it), then settles
        torch.empty(2 ** 24).fill_(1)
    f0 = faults()
    for _ in range(5):
        torch.empty(2 ** 24).fill_(1)
    assert faults() - f0 < 2 * 16384                          # without it: 5 x 16,384


@pytest.mark.parametrize('width', [0.9, 0.76, 0.67, 0.5, 0.3])
def test_smaller_student_widths_build_at_imagenet_size(width):
    """Any --student_width gives a network GroupNorm and attention accept (nearest valid width)."""
    cfg = NetConfig(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=(1, 2, 3, 4),
                    num_blocks=3, attn_resolutions=(32, 16, 8))
    small = student_config(cfg, width)
    assert small.model_channels < 192
    with torch.device('meta'):
        assert build_net(small)(torch.zeros(1, 3, 64, 64), torch.ones(1), torch.tensor([3])).shape == (1, 3, 64, 64)


def test_channels_last_variant_computes_the_same_images():
    st = Student.from_teacher(randomize(build_net(TINY))).eval()
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 5])
    (name, fn), = S.variants(st, (1, 8, 8), 3, torch.device('cpu'))
    with torch.no_grad():
        torch.testing.assert_close(fn(z, y), st(z, y), rtol=1e-5, atol=1e-5)


def test_frechet_distance_closed_forms():
    """Shifting features by c gives FID |c|^2; scaling by a gives (1 - a)^2 (|mu|^2 + tr S) (equal-shape covariances)."""
    import experiments as E
    f = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)).double() @ torch.randn(6, 6, generator=torch.Generator().manual_seed(1)).double()
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert abs(E.frechet(f, f + c) - c.square().sum().item()) < 1e-6
    a, mu, cov = 0.5, f.mean(0), torch.cov(f.T)
    assert abs(E.frechet(f, a * f) - (1 - a) ** 2 * (mu.square().sum() + cov.trace()).item()) < 1e-6


def test_report_tables_verdicts_and_plot(tmp_path):
    import experiments as E
    cfg = E.GridConfig(out=str(tmp_path), results=str(tmp_path / 'RESULTS.md'), figures=str(tmp_path / 'fig'))
    row = lambda fid, params=1e6, ips=100.0: dict(title='', fid=fid, samples=100, ref=1000, params=params, nfe=1, accuracy=0.9,
                                                 per_class=[0.9] * 10, latency_ms=1.0, images_per_s=ips, train_s=60.0,
                                                 groups=[[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]], group_fid=[1, 2, 3, 4])
    rows = {'teacher': dict(row(10.0), nfe=35, train_s=None), 'k1-dm': row(40), 'k1': row(30), 'k2-dm': row(35), 'k2': row(25),
            'k4-dm': row(30), 'k4': row(20), 'k4-random': row(22), 'k4-half': row(24, 0.3e6, 250.0)}
    results = dict(rows=rows, dm_steps=20, adm_steps=10, batch=16, lr=1e-4, tsm_steps=5, machine='test',
                   curve={'k1:10': 50.0, 'k1:20': 40.0, 'k1:30': 30.0, 'k4:10': 45.0, 'k4:20': 30.0, 'k4:30': 20.0})
    (tmp_path / 'RESULTS.md').write_text('old\n<!-- reading: written by hand, kept when the script rewrites this file -->\nmy reading\n')
    E.report(cfg, results)
    text = (tmp_path / 'RESULTS.md').read_text()
    assert text.count('\n| K = ') == 8 and '| EDM teacher, Heun 35 NFE | 10.00 |' in text and text.rstrip().endswith('my reading')
    assert 'best MSD row FID 20.00 vs teacher 10.00: does not hold' in text and 'holds (monotone)' in text
    assert 'ADM lowers FID in 3 of 3' in text and '20.00 vs 22.00: holds' in text and '2.50x the images/s' in text
    assert Image.open(tmp_path / 'fig' / 'fid_vs_iterations.png').size == (640, 400) and '](fig/fid_vs_iterations.png)' in text


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_only_students_in_separate_processes_then_msd(tmp_path):
    """Students trained by separate --only_students runs (the experiment grid on one GPU) give msd.pt once all exist."""
    import train
    out = str(tmp_path / 'run')
    args = TINY_RUN + ['--out', out, '--students', '2', '--stages', 'teacher,dm', '--snapshot_every', '1', '--fid_samples', '0']
    train.main(train.parse_args(args + ['--only_students', '1']))
    assert os.path.exists(os.path.join(out, 'student1.pt')) and not os.path.exists(os.path.join(out, 'student0.pt'))
    assert not os.path.exists(os.path.join(out, 'msd.pt'))
    assert sorted(os.listdir(os.path.join(out, 'snapshots'))) == ['dm-student1-step1.pt', 'dm-student1-step2.pt']
    train.main(train.parse_args(args + ['--only_students', '0']))
    train.main(train.parse_args(args))
    msd = load_msd(os.path.join(out, 'msd.pt'))
    final = torch.load(os.path.join(out, 'snapshots', 'dm-student1-step2.pt'), weights_only=True)['state_dict']
    assert all(torch.equal(final[k], v) for k, v in msd.students[1].state_dict().items())


@pytest.mark.skipif(not os.environ.get('MSD_SLOW'), reason='slow-ish (builds three 296M-parameter networks on meta tensors): set MSD_SLOW=1')
def test_imagenet64_iteration_flops():
    """FLOPs of one ADM iteration of the imagenet64 preset (5 critic + 1 generator update, batch 40), on
    meta tensors: the README's time estimate rests on these numbers (forward 219 GFLOP per image)."""
    from torch.utils.flop_counter import FlopCounterMode
    import train
    cfg = train.PRESETS['imagenet64']
    data = S.ImageData(torch.zeros(1, dtype=torch.long), 1000, (3, 64, 64), images=torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    B = cfg.batch

    def count(fn):
        c = FlopCounterMode(display=False)
        with c:
            fn()
        return c.get_total_flops()
    with torch.device('meta'):
        teacher = build_net(train.net_config(cfg, data)).eval().requires_grad_(False)
        G, fake, grid = Student(teacher.cfg), FakeScore(teacher), L.sigma_grid(1000)
        z, y = torch.randn(B, 3, 64, 64), torch.randint(1000, (B,))

        def critic():
            with torch.no_grad():
                x = G(z, y)
            (L.fake_score_loss(fake, x, y, grid).mean() + L.gan_critic_loss(fake.critic, z, y, x, y, grid).mean()).backward()

        def generator():
            fake.requires_grad_(False)
            x = G(z, y)
            (L.dm_loss(teacher, fake, x, y, grid).mean() + L.gan_generator_loss(fake.critic, x, y, grid).mean()).backward()
        fwd, c, g = count(lambda: teacher(z, torch.ones(B), y)), count(critic), count(generator)
    print(f'forward {fwd / B / 1e9:.1f} GFLOP/image; critic update {c / 1e12:.1f} TFLOP, generator update {g / 1e12:.1f} TFLOP, '
          f'ADM iteration {(cfg.ratio * c + g) / 1e12:.0f} TFLOP at batch {B}')
    assert 215e9 < fwd / B < 225e9
    assert 290e12 < cfg.ratio * c + g < 300e12
