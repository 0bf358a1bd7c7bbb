"""Tests on CPU, under two minutes:  python -m pytest -q test_msd.py

Closed forms where they exist (preconditioning at F = 0, the exact denoiser of a Gaussian, the DM
gradient formula), invariants elsewhere (partitions, routing, checkpoints), and tiny end-to-end runs
of every stage, in one process and in two gloo processes through torchrun.
"""
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import bench as B
import data as D
import losses as L
import partition as P
import sample as S
import msd as msd_module
from msd import MSD, load_msd, msd_checkpoint
from student import FakeScore, GANHead, Student, student_config
from checkpoint import load_teacher, teacher_checkpoint
from teacher import EDMPrecond, NetConfig, build_net, heun_sampler, seeded_noise

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = NetConfig(img_resolution=8, img_channels=1, label_dim=6, model_channels=8, channel_mult=(1, 2),
                 num_blocks=1, attn_resolutions=(4,), dropout=0.0, channels_per_head=8)
HAVE_DATA = os.path.exists(D.FASHION_DIR)


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
    """DMD2's grid: EDM's Karras schedule (rho 7) from 0.002 to 80, ascending, checked at interior points too."""
    grid = L.sigma_grid(1000)
    assert abs(grid[0].item() - 0.002) < 1e-6 and abs(grid[-1].item() - 80) < 1e-3
    assert (grid[1:] > grid[:-1]).all()
    for i in (1, 100, 500, 900, 998):              # ascending index i = descending index 999 - i of EDM eq. 5
        karras = (80 ** (1 / 7) + (999 - i) / 999 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        assert abs(grid[i].item() / karras - 1) < 1e-5, i
    assert abs(grid[500].item() - 2.5265) < 1e-3                       # the middle of the grid (rho 1 would give 40)
    sig = L.sample_grid_sigma(10000, grid, 0.02, 0.98)
    assert sig.min() >= grid[20] and sig.max() <= grid[980]


def test_edm_sigma_is_lognormal():
    """EDM's training noise levels: ln(sigma) ~ N(P_mean = -1.2, P_std = 1.2^2) (EDM Table 1)."""
    torch.manual_seed(0)
    log = L.sample_edm_sigma(100000, 'cpu').log()
    assert abs(log.mean().item() + 1.2) < 0.02 and abs(log.std().item() - 1.2) < 0.02


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
    # EDM eq. 8's weighting lambda = 1/sigma^2 + 1/sd^2 at two noise levels, in edm_loss and in the fake score's
    # loss (DMD2: the same weighting, sigma from the grid; here a grid holding only that sigma).
    for s, lam in ((0.05, 404.0), (20.0, 4.0025)):
        expected = torch.full((4,), lam * 0.01)
        torch.testing.assert_close(L.edm_loss(off, x0, None, sigma=torch.full((4, 1, 1, 1), s)), expected)
        torch.testing.assert_close(L.fake_score_loss(off, x0, None, torch.full((1000,), s)), expected)
    assert not L.fake_score_loss(off, x0.clone().requires_grad_(), None, L.sigma_grid()).requires_grad   # no grad to G


def test_gan_losses_closed_form():
    """DMD2's GAN losses: softplus(D(fake)) + softplus(-D(real)) for the critic, softplus(-D(fake)) for the
    generator; with a critic that scores an image by its mean, the critic loss is small when it scores real
    images above fake ones, and only the generator loss passes gradient into the generated images."""
    grid = L.sigma_grid()
    x = torch.randn(2, 1, 4, 4)
    const = lambda v: (lambda x_t, sigma, y: torch.full((x_t.shape[0],), v))
    sp = lambda v: math.log1p(math.exp(v))
    torch.testing.assert_close(L.gan_critic_loss(const(0.5), x, None, x, None, grid), torch.full((2,), sp(0.5) + sp(-0.5)))
    torch.testing.assert_close(L.gan_generator_loss(const(2.0), x, None, grid), torch.full((2,), sp(-2.0)))
    quiet = torch.full((1000,), 1e-6)                                   # re-noising that changes nothing
    mean = lambda x_t, sigma, y: x_t.flatten(1).mean(1)
    real, fake = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -2.0, requires_grad=True)
    torch.testing.assert_close(L.gan_critic_loss(mean, real, None, fake, None, quiet), torch.full((2,), 2 * sp(-2.0)))
    assert not L.gan_critic_loss(mean, real, None, fake, None, quiet).requires_grad      # critic side: x_fake detached
    L.gan_generator_loss(mean, fake, None, quiet).sum().backward()
    torch.testing.assert_close(fake.grad, torch.full_like(fake, -torch.sigmoid(torch.tensor(2.0)).item() / 16))


def test_gan_head_shapes():
    assert GANHead(768, 8)(torch.randn(2, 768, 8, 8)).shape == (2,)       # ImageNet-64 bottleneck
    assert GANHead(64, 7)(torch.randn(3, 64, 7, 7)).shape == (3,)         # Fashion-MNIST bottleneck
    fake = FakeScore(build_net(TINY))
    assert fake.critic(torch.randn(3, 1, 8, 8), torch.ones(3), torch.tensor([0, 1, 2])).shape == (3,)


# ---------------------------------------------------------------- the training loop

class SpyNet(torch.nn.Module):
    """Stands in for the teacher or the fake score: denoiser D(x, sigma, y) = b + s x and GAN critic logit
    c mean(x) / 1000, with learnable b (an image), s and c. Records every call: which of the two, x, sigma,
    labels, whether x requires grad, grad mode, train/eval mode and whether its parameters were frozen."""
    sigma_data = 0.5

    def __init__(self, b=0.0, c=0.0):
        super().__init__()
        self.b = torch.nn.Parameter(torch.as_tensor(b, dtype=torch.float32).expand(1, 4, 4).clone())
        self.s = torch.nn.Parameter(torch.zeros(()))
        self.c = torch.nn.Parameter(torch.tensor(float(c)))
        self.calls = []

    def record(self, role, x, sigma, labels):
        self.calls.append(dict(role=role, x=x.detach().clone(), sigma=sigma.detach().flatten().clone(),
                               labels=labels.clone(), x_grad=x.requires_grad, grad_mode=torch.is_grad_enabled(),
                               training=self.training, frozen=not any(p.requires_grad for p in self.parameters())))

    def forward(self, x, sigma, labels):
        self.record('denoise', x, sigma, labels)
        return self.b + self.s * x

    def critic(self, x, sigma, labels):
        self.record('critic', x, sigma, labels)
        return self.c * x.flatten(1).mean(1) / 1000

    def seen(self, role, **flags):
        return [c for c in self.calls if c['role'] == role and all(c[k] == v for k, v in flags.items())]


class SpyGenerator(torch.nn.Module):
    """G(z, y) = x for every z (x a learnable image), with a SpyNet as its denoiser `net` (for TSM);
    records the labels it is asked for and the grad mode."""

    def __init__(self, x=0.0, b=0.0):
        super().__init__()
        self.x = torch.nn.Parameter(torch.as_tensor(x, dtype=torch.float32).expand(1, 4, 4).clone())
        self.net = SpyNet(b)
        self.calls = []

    def forward(self, z, labels):
        self.calls.append(dict(labels=labels.clone(), grad_mode=torch.is_grad_enabled()))
        return self.x + 0 * z


class ClassImages:
    """Six classes of 1x4x4 images filled with 1000 (label + 1): an image's class can be read from its
    mean at every noise level of the grid (80 / sqrt(16) << 1000)."""
    num_classes, shape, labels = 6, (1, 4, 4), torch.arange(6).repeat(5)

    def get(self, idx):
        y = self.labels[idx]
        return (1000.0 * (y + 1)).reshape(-1, 1, 1, 1).expand(-1, *self.shape).clone(), y


class Recorder(torch.optim.SGD):
    """SGD at learning rate 0 that records every parameter's gradient at each step (None: it got none), so
    the spies stay as they are and each update's gradient can be checked against its closed form."""

    def __init__(self, module):
        self.named = dict(module.named_parameters())
        super().__init__(module.parameters(), lr=0.0)
        self.grads = []

    def step(self, closure=None):
        self.grads.append({n: None if p.grad is None else p.grad.clone() for n, p in self.named.items()})
        return super().step(closure)


OWN = [1, 3, 5]                         # the classes of student 1 in the spy runs


def spy_run(G, teacher, fake, **cfg):
    """A StudentRun of student 1 (classes OWN) on ClassImages, and recording optimisers for G and the fake score."""
    import train
    run = train.StudentRun(train.Config(**{'batch': 64, 'ratio': 3, 'clip': math.inf, **cfg}), train.Dist(), 1, OWN,
                           ClassImages(), teacher, None, 1)
    go, fo = Recorder(G), Recorder(fake)
    const = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)
    return run, go, const(go), fo, const(fo)


def own_images(call):
    """The call's images are real images of the student's own classes, labelled with their class."""
    label = (call['x'].flatten(1).mean(1) / 1000).round() - 1
    return torch.equal(label, call['labels'].float()) and set(call['labels'].tolist()) <= set(OWN)


def grid_index(run, calls):
    """The grid indices of the calls' noise levels, each of which must be a grid value."""
    sigma = torch.cat([c['sigma'] for c in calls])
    i = torch.searchsorted(run.grid, sigma)
    assert torch.equal(run.grid[i.clamp(max=999)], sigma), 'a noise level off the grid'
    return i


def renoised(calls, clean):
    """The calls' inputs are clean images plus sigma times standard normal noise, at the sigma they were given."""
    eps = torch.cat([(c['x'] - clean(c)) / c['sigma'].reshape(-1, 1, 1, 1) for c in calls])
    return abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1


@pytest.mark.parametrize('adm', [False, True], ids=['dm', 'adm'])
def test_distill_iteration_roles_noise_levels_and_classes(adm):
    """DMD2's loop: `ratio` critic updates, then one generator update whose DM gradient asks D_real (the teacher,
    frozen, in eval mode) and D_fake (the fake score, frozen) at the same x_t, grid sigma in [2%, 98%]; the fake
    score's loss and the GAN critic see the whole grid; every network sees only the student's own classes,
    and the critic's real images are images of those classes (MSD sec. 3.2)."""
    import train
    torch.manual_seed(0)
    G, teacher, fake = SpyGenerator(-1000.0), SpyNet(0.5).train(), SpyNet(0.5, c=1.0)
    run, go, gs, fo, fs = spy_run(G, teacher, fake)
    for _ in range(2):
        train.distill_iteration(run, G, fake, go, gs, fo, fs, adm)
    ratio = run.cfg.ratio
    assert len(fo.grads) == 2 * ratio and len(go.grads) == 2                    # TTUR: ratio critic updates per G update
    assert [c['grad_mode'] for c in G.calls] == ([False] * ratio + [True]) * 2  # critic steps generate without grad
    # D_real: the teacher, once per generator step, frozen and in eval mode, at grid sigmas in [2%, 98%].
    assert len(teacher.calls) == 2 and all(c['role'] == 'denoise' and not c['training'] and c['frozen'] for c in teacher.calls)
    i = grid_index(run, teacher.calls)
    assert i.min() >= 20 and i.max() <= 980 and i.min() < 100 and i.max() > 900
    generated = lambda c: -1000.0                                               # G(z) = -1000 everywhere
    assert renoised(teacher.calls, generated)
    # D_fake: the fake score at the same x_t and sigma, frozen during the generator step.
    dm = fake.seen('denoise', grad_mode=False)
    assert len(dm) == 2 and all(c['frozen'] for c in dm)
    assert all(torch.equal(d['x'], t['x']) and torch.equal(d['sigma'], t['sigma']) for d, t in zip(dm, teacher.calls))
    # The fake score's own loss: generated images (detached), sigma over the whole grid.
    own = fake.seen('denoise', grad_mode=True)
    assert len(own) == 2 * ratio and not any(c['x_grad'] or c['frozen'] for c in own)
    i = grid_index(run, own)
    assert i.min() < 20 and i.max() > 980 and renoised(own, generated)
    critic = fake.seen('critic')
    if adm:      # per critic update one call on real and one on fake images; one in the generator step
        on_real = [c for c in critic if c['x'].mean() > 0]
        assert len(on_real) == 2 * ratio and all(own_images(c) and not c['x_grad'] for c in on_real)
        gen = fake.seen('critic', x_grad=True)
        assert len(critic) == 4 * ratio + 2 and len(gen) == 2 and all(c['frozen'] for c in gen)
        i = grid_index(run, critic)
        assert i.min() < 20 and i.max() > 980                                   # DMD2: re-noised over the whole grid
        real = lambda c: 1000.0 * (c['labels'] + 1).reshape(-1, 1, 1, 1)
        assert renoised(on_real, real) and renoised([c for c in critic if c['x'].mean() < 0], generated)
    else:
        assert not critic
    labels = [c['labels'] for c in G.calls + teacher.calls + fake.calls]
    assert set(torch.cat(labels).tolist()) == set(OWN)                          # all own classes, no other
    same = lambda calls, gen: len(calls) == len(gen) and all(torch.equal(c['labels'], g['labels']) for c, g in zip(calls, gen))
    assert same(own, [g for g in G.calls if not g['grad_mode']]) and same(dm, [g for g in G.calls if g['grad_mode']])
    if adm:                                                                     # generated images keep their labels
        assert same([c for c in critic if c['x'].mean() < 0 and not c['x_grad']], [g for g in G.calls if not g['grad_mode']])
        assert same(gen, [g for g in G.calls if g['grad_mode']])


def test_gan_noise_limits_the_critic_sigmas_to_the_low_end_of_the_grid():
    """--gan_noise f: the GAN critic and the generator's GAN term re-noise at grid indices 0..f*1000 only
    (DMD2's diffusion_gan_max_timestep), real and generated images alike; the fake score's and DM's sigmas keep
    their ranges (whole grid; 2-98%)."""
    import train
    torch.manual_seed(0)
    G, teacher, fake = SpyGenerator(-1000.0), SpyNet(0.5), SpyNet(0.5, c=1.0)
    run, go, gs, fo, fs = spy_run(G, teacher, fake, gan_noise=0.4)
    for _ in range(3):
        train.distill_iteration(run, G, fake, go, gs, fo, fs, adm=True)
    critic = fake.seen('critic')                     # real, generated (critic update) and generator-term calls
    assert any(c['x'].mean() > 0 for c in critic) and fake.seen('critic', x_grad=True)
    i = grid_index(run, critic)
    assert i.max() <= 400 and i.min() < 20 and i.max() > 360, (i.min(), i.max())
    assert grid_index(run, fake.seen('denoise', grad_mode=True)).max() > 980
    assert grid_index(run, teacher.calls).max() > 500


def test_dm_noise_limits_the_dm_sigmas_and_nothing_else():
    """--dm_noise f: DM's teacher and frozen fake-score calls draw grid indices 20..f*1000 only (DMD2's
    min/max_step_percent 0.02 and f), whereas the fake score's own loss keeps the whole grid."""
    import train
    torch.manual_seed(0)
    G, teacher, fake = SpyGenerator(-1000.0), SpyNet(0.5), SpyNet(0.5, c=1.0)
    run, go, gs, fo, fs = spy_run(G, teacher, fake, dm_noise=0.6)
    for _ in range(5):
        train.distill_iteration(run, G, fake, go, gs, fo, fs, adm=False)
    for calls in (teacher.calls, fake.seen('denoise', grad_mode=False)):
        i = grid_index(run, calls)
        assert 20 <= i.min() < 60 and 550 < i.max() <= 600, (i.min(), i.max())
    assert grid_index(run, fake.seen('denoise', grad_mode=True)).max() > 980
    with pytest.raises(ValueError, match='dm_noise'):
        train.check_config(train.Config(dm_noise=0.01))


def test_fake_noise_limits_the_fake_score_sigmas_and_nothing_else():
    """--fake_noise f: the fake score's own denoising loss draws grid indices 0..f*1000 only, whereas DM's
    calls (2-98%) and the GAN critic's (whole grid) keep their ranges."""
    import train
    torch.manual_seed(0)
    G, teacher, fake = SpyGenerator(-1000.0), SpyNet(0.5), SpyNet(0.5, c=1.0)
    run, go, gs, fo, fs = spy_run(G, teacher, fake, fake_noise=0.5)
    for _ in range(5):
        train.distill_iteration(run, G, fake, go, gs, fo, fs, adm=True)
    i = grid_index(run, fake.seen('denoise', grad_mode=True))
    assert i.min() < 20 and 450 < i.max() <= 500, (i.min(), i.max())
    assert grid_index(run, teacher.calls).max() > 700
    assert grid_index(run, fake.seen('critic')).max() > 980
    with pytest.raises(ValueError, match='fake_noise'):
        train.check_config(train.Config(fake_noise=0))


@pytest.mark.parametrize('adm', [False, True], ids=['dm', 'adm'])
def test_generator_step_moves_toward_the_teacher(adm):
    """Known answer: with D_real = a and D_fake = b (constants), the generator's gradient is
    (b - a) / mean|x - a| per pixel / numel (DMD eq. 7-8), so a descent step moves x toward the teacher's
    denoised estimate a; the fake score gets no gradient (its critic has c = 0: no GAN gradient either)."""
    import train
    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    G, teacher, fake = SpyGenerator(torch.randn(1, 4, 4)), SpyNet(a), SpyNet(b)
    run, go, gs, fo, fs = spy_run(G, teacher, fake)
    train.generator_step(run, G, fake, go, gs, adm)
    x = G.x.detach()
    torch.testing.assert_close(go.grads[0]['x'], (b - a) / (x - a).abs().mean() / 16)
    assert all(p.grad is None for p in fake.parameters()) and all(p.requires_grad for p in fake.parameters())


def test_generator_gan_term_reaches_the_generator_through_the_frozen_critic():
    """ADM's generator loss softplus(-D(G(z))) (DMD2): with D_fake = D_real (no DM gradient) and a critic
    logit c mean(x_t) / 1000, the generator's gradient is -w sigmoid(-logit) c / 1000 / numel, i.e. it moves
    toward what the critic calls real, while the critic's parameters are frozen and get no gradient."""
    import train
    torch.manual_seed(0)
    image = torch.randn(1, 4, 4)
    G, teacher, fake = SpyGenerator(torch.randn(1, 4, 4)), SpyNet(image), SpyNet(image, c=1.0)
    run, go, gs, fo, fs = spy_run(G, teacher, fake)
    train.generator_step(run, G, fake, go, gs, adm=True)
    call, = fake.seen('critic')
    assert call['x_grad'] and call['frozen']
    logit = call['x'].flatten(1).mean(1) / 1000
    expected = -run.cfg.gan_gen_weight * torch.sigmoid(-logit).mean() / 1000 / 16
    torch.testing.assert_close(go.grads[0]['x'], torch.full((1, 4, 4), expected.item()))
    assert all(p.grad is None for p in fake.parameters())


def test_critic_step_scores_real_above_fake_and_leaves_the_generator_alone():
    """The critic update (DMD2): the fake score's denoising loss on generated images has gradient
    mean(lambda(sigma)) 2 (b - x) / numel in b (lambda = 1/sigma^2 + 1/sd^2); the GAN critic's,
    w (mean h_fake - mean h_real) / 2 in c at c = 0, so descent raises the score of real images (the
    student's own) above fake ones; the generator runs without grad and gets none."""
    import train
    torch.manual_seed(0)
    G, teacher, fake = SpyGenerator(-1000.0), SpyNet(0.0), SpyNet(0.0)
    run, go, gs, fo, fs = spy_run(G, teacher, fake)
    train.critic_step(run, G, fake, fo, fs, adm=True)
    own, = fake.seen('denoise')
    lam = 1 / own['sigma'] ** 2 + 4
    torch.testing.assert_close(fo.grads[0]['b'], (lam.mean() * 2 * 1000 / 16).expand(1, 4, 4), rtol=1e-4, atol=0)
    real, = [c for c in fake.seen('critic') if c['x'].mean() > 0]
    generated, = [c for c in fake.seen('critic') if c['x'].mean() < 0]
    assert own_images(real) and set(generated['labels'].tolist()) <= set(OWN) and not generated['x_grad']
    h = lambda call: call['x'].flatten(1).mean(1) / 1000
    expected = run.cfg.gan_critic_weight * (h(generated) - h(real)).mean() / 2
    assert expected < 0
    torch.testing.assert_close(fo.grads[0]['c'], expected)
    assert all(p.grad is None for p in G.parameters()) and not G.calls[0]['grad_mode']


def test_tsm_step_regresses_the_teacher():
    """TSM (MSD sec. 3.3): the student's denoiser and the teacher see the same x_t (real images of the
    student's own classes plus noise at EDM's log-normal sigma) and labels; the target is the teacher's
    output a, so the gradient in the student's b is mean(lambda(sigma)) 2 (b - a) / numel."""
    import train
    torch.manual_seed(0)
    a = torch.randn(1, 4, 4)
    G, teacher = SpyGenerator(b=torch.randn(1, 4, 4)), SpyNet(a).train()
    run, go, gs, fo, fs = spy_run(G, teacher, SpyNet(), batch=2000)
    train.tsm_step(run, G, go, gs)
    (t,), (s,) = teacher.calls, G.net.calls
    assert not t['training'] and not t['grad_mode'] and own_images(t)
    assert all(torch.equal(t[k], s[k]) for k in ('x', 'sigma', 'labels'))
    log = t['sigma'].log()
    assert abs(log.mean() + 1.2) < 0.1 and abs(log.std() - 1.2) < 0.1
    lam = 1 / t['sigma'] ** 2 + 4
    torch.testing.assert_close(go.grads[0]['net.b'], lam.mean() * 2 * (G.net.b.detach() - a) / 16, rtol=1e-4, atol=0)


def test_students_and_fake_score_start_from_the_teacher(tmp_path):
    """DMD / DMD2: a same-size student and the fake score start as copies of the teacher (a smaller student
    starts untrained, for TSM); the teacher loads frozen and in eval mode."""
    import train
    teacher = randomize(build_net(TINY)).eval()
    for width in (1.0, 0.5):
        G, fake = train.build_pair(train.Config(student_width=width), teacher, torch.device('cpu'))
        assert all(torch.equal(v, fake.net.state_dict()[k]) for k, v in teacher.state_dict().items())
        copy = G.net.cfg == student_config(TINY) and all(torch.equal(v, G.net.state_dict()[k]) for k, v in teacher.state_dict().items())
        assert copy == (width == 1.0) and G.training and fake.training
    torch.save(teacher_checkpoint(teacher), tmp_path / 'teacher.pt')
    loaded = load_teacher(str(tmp_path / 'teacher.pt'))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


FLAT = NetConfig(img_resolution=8, img_channels=1, label_dim=6, model_channels=8, channel_mult=(1,), num_blocks=0,
                 attn_resolutions=(), dropout=0.0, channels_per_head=8)      # one level: the cheapest real network


class RecordingTeacher(EDMPrecond):
    """An EDM teacher that records the labels it is asked about and whether it was in train mode."""

    def forward(self, x, sigma, labels=None, return_bottleneck=False):
        self.__dict__.setdefault('seen', []).append((labels.tolist(), self.training))
        return super().forward(x, sigma, labels, return_bottleneck)


def test_train_student_uses_own_classes_and_stage_learning_rates(tmp_path):
    """train_student for student 1 of a non-contiguous partition, every stage (smaller student), ADM in a later
    call: the teacher only ever sees that student's classes and is never in train mode; the saved student names
    them; each stage starts from the last one's weights (ADM from DM's checkpoint) and TSM, DM and ADM optimise
    at tsm_lr, lr and adm_lr (DMD2's resumed GAN stage runs at its own learning rate)."""
    import train
    torch.manual_seed(0)
    teacher = randomize(RecordingTeacher(FLAT)).train()
    data = S.ImageData(torch.arange(6).repeat(4), 6, (1, 8, 8), images=torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8))
    cfg = train.Config(out=str(tmp_path), students=2, student_width=0.5, batch=2, ratio=1, tsm_steps=1, dm_steps=1,
                       adm_steps=1, warmup=1, lr=1e-4, adm_lr=3e-5, tsm_lr=5e-4, grid_every=0)
    groups = [[0, 2, 4], [1, 3, 5]]
    for d in ('ckpt', 'grids'):
        os.makedirs(tmp_path / d)
    train.train_student(cfg, train.Dist(), 1, groups, data, teacher, ['tsm', 'dm'], None, 1)
    train.train_student(cfg, train.Dist(), 1, groups, data, teacher, ['adm'], None, 1)    # ADM in a later run
    labels = {c for seen, _ in teacher.seen for c in seen}
    assert labels == set(groups[1]) and not any(mode for _, mode in teacher.seen)
    assert torch.load(tmp_path / 'student1.pt', weights_only=True)['classes'] == groups[1]
    before = None
    for stage, lr in (('tsm', cfg.tsm_lr), ('dm', cfg.lr), ('adm', cfg.adm_lr)):
        state = torch.load(train.stage_path(cfg, stage, 1), weights_only=True)
        assert state['opt_G']['param_groups'][0]['initial_lr'] == lr, stage
        if stage != 'tsm':
            assert state['opt_fake']['param_groups'][0]['initial_lr'] == lr, stage
        if before is not None:          # each stage continues from the last: one AdamW step moves a weight <= ~lr
            for net in ('G', 'fake'):
                assert all((v - before[net][k]).abs().max() <= 1.5 * lr for k, v in state[net].items()), (stage, net)
        before = state
    # ADM continued (one more update) at a lower --adm_lr: the resumed optimisers run at the new rate.
    cfg2 = dataclasses_replace(cfg, adm_steps=2, adm_lr=1e-5)
    train.train_student(cfg2, train.Dist(), 1, groups, data, teacher, ['adm'], None, 1)
    after = torch.load(train.stage_path(cfg, 'adm', 1), weights_only=True)
    assert after['step'] == 2 and all(after[o]['param_groups'][0]['lr'] == 1e-5 for o in ('opt_G', 'opt_fake'))
    assert all((v - before['G'][k]).abs().max() <= 1.5e-5 for k, v in after['G'].items())
    presets = train.PRESETS
    assert (presets['imagenet64'].lr, presets['imagenet64'].adm_lr, presets['fashion'].adm_lr) == (2e-6, 5e-7, 0.0)


def test_attention_logits_and_gan_head_in_float32_under_bf16_autocast():
    """Inside a bf16 autocast region the attention logits and their softmax (EDM) and the GAN head (DMD2)
    still compute in float32, while the convolutions around them run in bf16."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ops.append((func.__name__, [a.dtype for a in args if isinstance(a, torch.Tensor)], getattr(out, 'dtype', None),
                        tuple(getattr(out, 'shape', ()))))
            return out
    fake = FakeScore(randomize(build_net(TINY)))
    head_dtypes = []
    for m in fake.head.modules():
        if not list(m.children()):
            m.register_forward_hook(lambda m, i, o: head_dtypes.append(o.dtype))
    ops = []
    x, s, y = torch.randn(3, 1, 8, 8), torch.full((3,), 2.0), torch.tensor([0, 1, 2])
    with torch.autocast('cpu', dtype=torch.bfloat16), Ops():
        fake(x, s, y)
        logit = fake.critic(x, s, y)
    logits = [o for o in ops if o[3][-2:] == (16, 16) and 'bmm' in o[0]]              # 4x4 attention: 16 x 16 logits
    softmax = [o for o in ops if 'softmax' in o[0]]
    assert logits and softmax and all(o[2] == torch.float32 and set(o[1]) == {torch.float32} for o in logits + softmax)
    assert any(o[2] == torch.bfloat16 for o in ops if 'convolution' in o[0])           # autocast was on
    assert head_dtypes and set(head_dtypes) == {torch.float32} and logit.dtype == torch.float32


def test_optimiser_clips_warms_up_and_is_dmd2s_adamw():
    """DMD2's optimiser: AdamW, betas (0.9, 0.999), weight decay; the gradient norm clipped to --clip; a
    linear warm-up over --warmup iterations, which the generator (one step per `ratio` iterations) covers
    in warmup / ratio of its own steps."""
    import train
    cfg = train.Config(clip=10.0, warmup=10, weight_decay=0.01)
    p = torch.nn.Parameter(torch.zeros(4))
    opt, sched = train.make_optimizer([p], 1e-3, cfg, steps_per_update=5)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults['betas'] == (0.9, 0.999) and opt.defaults['weight_decay'] == 0.01
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]['lr'])
        p.grad = torch.ones(4)
        train.step_optimizer(opt, sched, [p], cfg)
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])
    sgd = torch.optim.SGD([p], lr=1.0)
    before, p.grad = p.detach().clone(), torch.full((4,), 100.0)                      # norm 200
    gn, _ = train.step_optimizer(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0), [p], cfg)
    assert gn == pytest.approx(200) and (p.detach() - before).norm().item() == pytest.approx(10, rel=1e-4)


def test_regression_pairs_span_all_classes_and_pull_toward_the_teacher(tmp_path):
    """DMD's regression term, kept by MSD's DM stage on the full paired set (every class, MSD Fig. 8): pairs are
    (z, y, the teacher's Heun sample from z); with D_fake = D_real it alone moves the generator, by the
    gradient w 2 (x - x_pair) / numel of the pixel L2."""
    import train
    teacher = randomize(build_net(FLAT)).eval()
    os.makedirs(tmp_path / 'ckpt')
    cfg = train.Config(out=str(tmp_path), regression_pairs=12, heun_steps=2)
    pairs = train.regression_pairs(cfg, train.Dist(), teacher, 6, (1, 8, 8))
    assert sorted(pairs['y'].tolist()) == sorted(list(range(6)) * 2)
    torch.testing.assert_close(pairs['x'], S.heun(teacher, pairs['z'], pairs['y'], 2))
    image, target = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    G, teacher, fake = SpyGenerator(torch.randn(1, 4, 4)), SpyNet(image), SpyNet(image)
    run, go, gs, fo, fs = spy_run(G, teacher, fake, regression_weight=0.25)
    spy_pairs = dict(z=torch.randn(12, 1, 4, 4), y=torch.arange(12) % 6, x=target.expand(12, 1, 4, 4))
    train.generator_step(run, G, fake, go, gs, adm=False, pairs=spy_pairs)
    torch.testing.assert_close(go.grads[0]['x'], 0.25 * 2 * (G.x.detach() - target) / 16)


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


def test_class_groups_file_or_strategy_on_the_teachers_label_embedding(tmp_path):
    """A run's partition: a JSON file wins over --partition; kmeans clusters the teacher's label embedding."""
    teacher = build_net(TINY)
    emb = teacher.model.map_label.weight.t().detach()
    assert P.class_groups('kmeans', 6, 2, 3, teacher) == P.make_partition('kmeans', 6, 2, 3, emb)
    assert P.class_groups('random', 6, 3, 5) == P.make_partition('random', 6, 3, 5)
    (tmp_path / 'p.json').write_text('[[5, 0, 1], [2, 3, 4]]')
    assert P.class_groups('contiguous', 6, 2, path=str(tmp_path / 'p.json')) == [[5, 0, 1], [2, 3, 4]]


def test_check_fits_refuses_other_classes_channels_or_image_size():
    """A network is used only on data of its classes and (C, H, W): train.py's teacher, sample.py --fid."""
    import checkpoint as T
    from types import SimpleNamespace as NS
    T.check_fits(TINY, NS(num_classes=6, shape=(1, 8, 8)), 'net')
    for classes, shape in ((10, (1, 8, 8)), (6, (3, 8, 8)), (6, (1, 16, 16)), (6, (1, 8, 16)), (6, (1, 16, 8))):
        with pytest.raises(ValueError, match=r'net is for 6 classes of \(1, 8, 8\) images'):
            T.check_fits(TINY, NS(num_classes=classes, shape=shape), 'net')


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
    with the sizes given (the CUDA-graph path) and for an empty batch."""
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


def test_msd_copy_with_bf16_weights(tmp_path):
    """python msd.py IN OUT --dtype bfloat16: half the bytes; loads into float32 students whose weights
    are the originals rounded to bf16 (8 significant bits), and the partition and config survive."""
    teacher = randomize(build_net(TINY))
    students = [randomize(Student.from_teacher(teacher), seed=k) for k in range(2)]
    src, dst = str(tmp_path / 'msd.pt'), str(tmp_path / 'msd-bf16.pt')
    torch.save(msd_checkpoint(students, [[0, 2, 4], [1, 3, 5]], 6, dict(note='test'), teacher='t.pt'), src)
    msd_module.main([src, dst, '--dtype', 'bfloat16'])
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt['partition'] == [[0, 2, 4], [1, 3, 5]] and ckpt['config'] == dict(note='test') and ckpt['teacher'] == 't.pt'
    assert all(v.dtype == torch.bfloat16 for r in ckpt['students'] for v in r['state_dict'].values())
    assert os.path.getsize(dst) < 0.7 * os.path.getsize(src)             # tiny networks: pickle overhead counts
    loaded = load_msd(dst)
    for a, b in zip(loaded.students, students):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, q.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
    with pytest.raises(SystemExit):
        msd_module.main([str(tmp_path / 'missing.pt'), dst])


# ---------------------------------------------------------------- hostile checkpoints
# Crafted files, written opcode by opcode where pickle itself would not write them. Whatever the
# file, loading ends in a network or a one-line ValueError (exit status 2 from the commands).

def pk(obj):
    """A pickle (protocol 4) of obj, written opcode by opcode (names as in pickletools): bytes pass
    through as opcodes already written, so calls, BUILDs and memo references can be nested anywhere."""
    def op(x):
        if isinstance(x, bytes):
            return x
        if x is None or isinstance(x, bool):
            return {None: b'N', True: b'\x88', False: b'\x89'}[x]                     # NONE, NEWTRUE, NEWFALSE
        if isinstance(x, int):
            n = (x.bit_length() + 8) // 8
            return b'J' + struct.pack('<i', x) if abs(x) < 2 ** 31 else b'\x8a' + bytes([n]) + x.to_bytes(n, 'little', signed=True)
        if isinstance(x, float):
            return b'G' + struct.pack('>d', x)                                          # BINFLOAT
        if isinstance(x, str):
            return b'X' + struct.pack('<I', len(x.encode())) + x.encode()              # BINUNICODE
        if isinstance(x, dict):
            return b'(' + b''.join(op(k) + op(v) for k, v in x.items()) + b'd'         # MARK ... DICT
        return b'(' + b''.join(map(op, x)) + (b'l' if isinstance(x, list) else b't')  # MARK ... LIST / TUPLE
    return b'\x80\x04' + op(obj) + b'.'


def call(name, *args, state=None):
    """GLOBAL name, its args as a tuple, REDUCE; then BUILD with state if given."""
    module, attr = name.rsplit('.', 1)
    out = f'c{module}\n{attr}\n'.encode() + pk(tuple(args))[2:-1] + b'R'
    return out + pk(state)[2:-1] + b'b' if state is not None else out


def raw(b):
    return b'B' + struct.pack('<I', len(b)) + b                                         # BINBYTES


MEMOIZE, GET = b'\x94', lambda i: b'j' + struct.pack('<I', i)                         # MEMOIZE, LONG_BINGET
EDM_KW = dict(img_resolution=8, img_channels=1, label_dim=6, model_type='DhariwalUNet', model_channels=8,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def persistent(class_name, **state):
    return call('torch_utils.persistence._reconstruct_persistent_obj', dict(type='class', class_name=class_name, state=state))


def edm_precond(kwargs=None, **state):
    """An EDM pickle holding an EDMPrecond with these settings and this module state."""
    return pk({'ema': persistent('EDMPrecond', **{'_init_args': (), '_init_kwargs': {**EDM_KW, **(kwargs or {})}, **state})})


def numpy_scalar(dtype_name, dtype_state, data):
    return call('numpy.core.multiarray.scalar', call('numpy.dtype', dtype_name, False, True, state=dtype_state), raw(data))


def storage_bytes(t):
    """What torch pickles for t's storage: the argument of torch.storage._load_from_bytes."""
    return t.untyped_storage().__reduce__()[1][0]


def tensor_call(storage, size, stride, offset=0):
    return call('torch._utils._rebuild_tensor_v2', call('torch.storage._load_from_bytes', raw(storage)), offset,
                tuple(size), tuple(stride), False, call('collections.OrderedDict'))


def test_hostile_pickles_in_a_fresh_process(tmp_path):
    """numpy's dtype.__setstate__ trusts the file's flags, fields and offsets: a structured dtype with an
    object field whose flags deny it (or a field far outside the buffer) would make the reader dereference
    an address from the file (SIGSEGV), so these run in a child process. Refused too: torch names outside
    the allow-list (getattr(torch, name) would import torch._dynamo before refusing)."""
    obj = call('numpy.dtype', 'O8', False, True, state=(3, '|', None, None, None, -1, -1, 63))
    f8 = call('numpy.dtype', 'f8', False, True, state=(3, '<', None, None, None, -1, -1, 0))
    files = {'object_field.pkl': edm_precond({'dropout': numpy_scalar('V8', (3, '|', None, ('a',), {'a': (obj, 0)}, 8, 1, 0),
                                                                       struct.pack('<Q', 0x41414141))}),
             'far_field.pkl': edm_precond({'dropout': numpy_scalar('V8', (3, '|', None, ('a',), {'a': (f8, 1 << 40)}, 8, 1, 0), bytes(8))}),
             'dynamo.pkl': pk({'ema': call('torch._dynamo')}),             # lazy submodules of torch
             'inductor.pkl': pk({'ema': call('torch._inductor.config')})}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    code = ('import sys, checkpoint\n'
            'for p in sys.argv[1:]:\n'
            '    try:\n        checkpoint.read_edm_pickle(p)\n'
            '    except ValueError as e:\n        print(str(e).split(": ", 1)[1])\n'
            'print("torch._dynamo" in sys.modules or "torch._inductor" in sys.modules)\n')
    r = subprocess.run([sys.executable, '-c', code, *[str(tmp_path / n) for n in files]], cwd=HERE,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["refusing numpy dtype 'V8': only plain numbers"] * 2 + [
        'refusing to load torch._dynamo: an EDM network pickle does not need it',
        'refusing to load torch._inductor.config: an EDM network pickle does not need it', 'False']


def test_hostile_small_files_allocate_nothing_big(tmp_path, monkeypatch):
    """The network is built on the meta device and checked against the weights before a real one is
    built; settings, module trees, archives and lists are bounded first."""
    import dataclasses
    import student
    import checkpoint as T
    good = teacher_checkpoint(build_net(TINY))
    big = dataclasses_replace(TINY, model_channels=512, label_dim=0)
    with torch.device('meta'):
        shapes = {k: t.shape for k, t in build_net(big).state_dict().items()}
    one = torch.zeros(1)
    laughs = persistent('Conv2d')                           # 20 levels of modules sharing one child: 2^20 paths
    for i in range(20):
        laughs = persistent('UNetBlock', _modules={'a': laughs + MEMOIZE, 'b': GET(i)})
    torch.save(good, tmp_path / 'teacher.pt')
    deflated = io.BytesIO()
    with zipfile.ZipFile(tmp_path / 'teacher.pt') as z, zipfile.ZipFile(deflated, 'w', zipfile.ZIP_DEFLATED) as out:
        for name in z.namelist():
            out.writestr(name, z.read(name))
    students = msd_checkpoint([Student(TINY)] * 2, [[0, 1, 2], [3, 4, 5]], 6, {})
    real_build = T.build_net

    def meta_only(cfg):
        assert torch.empty(0).is_meta, 'a network was built before its weights were checked'
        return real_build(cfg)
    monkeypatch.setattr(T, 'build_net', meta_only)
    monkeypatch.setattr(student, 'build_net', meta_only)
    cases = {
        'channels.pt': ({**good, 'net': {**good['net'], 'model_channels': 256}}, 'do not fit the recorded architecture'),
        'blocks.pkl': (edm_precond({'num_blocks': 10 ** 7}), r'num_blocks must be an integer in 0\.\.16'),
        'width.pkl': (edm_precond({'model_channels': 2048}), 'do not fit the recorded architecture'),
        'stride0.pt': (dict(kind='teacher', net=dataclasses.asdict(big), state_dict={k: one.expand(s) for k, s in shapes.items()}),
                       r'the weights claim \d+ bytes but the file holds 4$'),
        'laughs.pkl': (edm_precond(_modules={'model': laughs}), 'appears twice in the module tree'),
        'deflated.pt': (deflated.getvalue(), 'compressed records'),
        'nested.pkl': (pk({'ema': call('torch.storage._load_from_bytes', raw(deflated.getvalue()))}), "not in torch's legacy format"),
        'students.pt': ({**students, 'students': students['students'][:1] * 10 ** 4}, 'students do not match the partition of 2'),
        'partition.pt': ({**students, 'partition': [list(range(0, 10 ** 4, 2)), list(range(1, 10 ** 4, 2))]}, 'lists 10000 labels for 6'),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        p.write_bytes(content) if isinstance(content, bytes) else torch.save(content, p)
        with pytest.raises(ValueError, match=message):
            (load_msd if name in ('students.pt', 'partition.pt') else load_teacher)(str(p))


def test_hostile_malformed_files_get_one_line(tmp_path, capsys):
    """Values of the wrong type or out of bounds, missing fields, objects made the wrong way: one line
    from the converter and from sample.py, however the file is broken."""
    import checkpoint as T
    good = teacher_checkpoint(randomize(build_net(TINY)))
    msd = msd_checkpoint([Student(TINY)] * 2, [[0, 1, 2], [3, 4, 5]], 6, {})
    small = msd_checkpoint([Student(dataclasses_replace(TINY, model_channels=4))] * 2, [[0, 1, 2], [3, 4, 5]], 6, {})
    cycle = b'ctorch.nn.modules.container\nModuleDict\n)\x81' + MEMOIZE + pk({'_modules': {'me': GET(0)}})[2:-1] + b'b'
    deep = persistent('Conv2d')
    for _ in range(1500):
        deep = persistent('UNetBlock', _modules={'m': deep})
    cases = {
        'newobj.pkl': (pk({'ema': b'ctorch_utils.persistence\n_reconstruct_persistent_obj\n)\x81'}), 'NEWOBJ class argument'),
        'state.pkl': (pk({'ema': call('torch_utils.persistence._reconstruct_persistent_obj', dict(type='class', class_name='EDMPrecond', state=[1]))}),
                      'unexpected persistent-object record'),
        'args.pkl': (edm_precond(_init_args=5), r'settings \(_init_args, _init_kwargs\) are malformed'),
        'kwargs.pkl': (pk({'ema': persistent('EDMPrecond', _init_kwargs=[1, 2])}), 'are malformed'),
        'keys.pkl': (pk({'ema': persistent('EDMPrecond', _init_kwargs={1: 2, 'a': 3})}), 'are malformed'),
        'cycle.pkl': (edm_precond(_modules={'model': cycle}), 'appears twice in the module tree'),
        'deep.pkl': (edm_precond(_modules={'model': deep}), 'lies more than 32 levels deep'),
        'param.pkl': (edm_precond(_parameters={'w': 'abc'}), "'w' is 'abc', not a tensor"),
        'resolution.pkl': (edm_precond({'img_resolution': 'abc'}), "img_resolution must be an integer in 1..256, got 'abc'"),
        'labels.pt': ({**good, 'net': {**good['net'], 'label_dim': -1}}, r'label_dim must be an integer in 0\.\.10000, got -1'),
        'mult.pt': ({**good, 'net': {**good['net'], 'channel_mult': []}}, 'channel_mult must be a list of 1 to 8 integers, got 0 entries'),
        'heads.pt': ({**good, 'net': {**good['net'], 'channels_per_head': 3}}, '16 channels do not split into attention heads of 3'),
        'no_net.pt': ({k: v for k, v in good.items() if k != 'net'}, 'network settings are None'),
        'int_weights.pt': ({**good, 'state_dict': 5}, 'the weights are 5, not a dict of tensors'),
        'str_weight.pt': ({**good, 'state_dict': {**good['state_dict'], 'model.out_conv.bias': 'x'}}, "bias is 'x', not float weights"),
        'no_classes.pt': ({k: v for k, v in msd.items() if k != 'num_classes'}, r'num_classes must be an integer in 1\.\.10000'),
        'misfit.pt': ({**msd, 'students': [msd['students'][0], {**small['students'][0], 'net': msd['students'][0]['net']}]},
                      r'student 1: weights do not fit the recorded architecture \(net.model.map_layer0.weight is \(16, 4\)'),
        'empty.pt': (b'', 'not a readable checkpoint'),
        'kind.pt': ({'kind': 'x\n' * 10 ** 5}, r"holds a 'x\\nx\\n"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / name
        p.write_bytes(content) if isinstance(content, bytes) else torch.save(content, p)
        cli = (S.cli, ['--ckpt', str(p), '--grid', str(tmp_path / 'g.png')]) if name in ('no_classes.pt', 'misfit.pt') else \
            (T.main, [str(p), str(tmp_path / 'out.pt')])
        err = cli_error(*cli, capsys)
        assert re.search(message, err), (name, err)
    assert not os.path.exists(tmp_path / 'out.pt') and not os.path.exists(tmp_path / 'g.png')
    assert T.reason(EOFError()) == 'EOFError'                 # an empty message does not crash the handler
    torch.save({'m': torch.nn.Identity()}, tmp_path / 'module.pt')
    with pytest.raises(Exception) as e:
        torch.load(tmp_path / 'module.pt', weights_only=True)
    assert T.reason(e.value).startswith('UnpicklingError: Unsupported global: GLOBAL torch.nn.modules.linear.Identity')


def test_hostile_storages_tensors_and_nonfinite_weights(tmp_path, capsys):
    """Storages are exactly as large as their bytes and tensors lie inside them; BUILD cannot reach
    Tensor.__setstate__ (set_ would grow a storage); NaN or infinite weights are refused by name."""
    import checkpoint as T
    four = storage_bytes(torch.zeros(4))                     # 16 bytes (an untyped storage)
    zip_storage = io.BytesIO()
    torch.save(torch.zeros(4).untyped_storage(), zip_storage)
    cases = {
        'past.pkl': (pk({'ema': tensor_call(four, [10 ** 8], [1])}), 'a tensor of 100000000 elements runs past its storage of 16'),
        'offset.pkl': (pk({'ema': tensor_call(four, [4], [1], offset=10 ** 8)}), 'runs past its storage of 16'),
        'stride0.pkl': (pk({'ema': tensor_call(four, [10 ** 8], [0])}), 'runs past its storage of 16'),
        'build.pkl': (pk({'ema': tensor_call(four, [4], [1]) + pk((call('torch.storage._load_from_bytes', raw(four)), 0, (10 ** 8,), (1,)))[2:-1] + b'b'}),
                      'refusing to change a tensor after it is made'),
        'count.pkl': (pk({'ema': tensor_call(four.replace(struct.pack('<q', 16) + bytes(16), struct.pack('<q', 10 ** 9) + bytes(16)), [4], [1])}),
                      "not in torch's legacy format"),
        'zip.pkl': (pk({'ema': call('torch.storage._load_from_bytes', raw(zip_storage.getvalue()))}), "not in torch's legacy format"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            T.read_edm_pickle(str(tmp_path / name))
    net = randomize(build_net(dataclasses_replace(TINY, channels_per_head=64))).eval()
    with torch.no_grad():
        net.model.enc['8x8_block0'].conv1.weight[0, 0, 0, 0] = float('inf')
    write_edm_pickle(net, str(tmp_path / 'inf.pkl'))
    err = cli_error(T.main, [str(tmp_path / 'inf.pkl'), str(tmp_path / 'out.pt')], capsys)
    assert err.endswith('model.enc.8x8_block0.conv1.weight holds NaN or infinite values\n') and not os.path.exists(tmp_path / 'out.pt')
    ck = teacher_checkpoint(randomize(build_net(TINY)))
    ck['state_dict']['model.out_conv.bias'][0] = float('nan')
    torch.save(ck, tmp_path / 'nan.pt')
    err = cli_error(S.cli, ['--ckpt', str(tmp_path / 'nan.pt'), '--grid', str(tmp_path / 'g.png')], capsys)
    assert err.endswith('model.out_conv.bias holds NaN or infinite values\n') and not os.path.exists(tmp_path / 'g.png')


def test_hostile_resume_state(tmp_path):
    """Resumable states go through the same reader; contents that do not fit the run are one line."""
    import checkpoint as T
    import train
    p = str(tmp_path / 'state.pt')
    torch.save({'kind': 'state', 'x': torch.nn.Identity()}, p)
    with pytest.raises(ValueError, match='not a readable checkpoint.*refusing torch.nn.modules.linear.Identity'):
        T.load_state(p)
    net = build_net(TINY)
    o, _ = train.make_optimizer(list(net.parameters()), 1e-3, train.Config())
    bad = {'state': {i: {'step': torch.tensor(1.0), 'exp_avg': torch.zeros(1), 'exp_avg_sq': torch.zeros(1)}
                     for i in range(len(o.param_groups[0]['params']))}, 'param_groups': o.state_dict()['param_groups']}
    with pytest.raises(ValueError, match=f'{re.escape(p)} does not fit this run .*other shapes'):
        T.restore(p, {'opt': bad}, {'opt': o})


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
    data = D.load_data(str(path))
    assert data.shape == (3, 8, 8) and data.num_classes == 3 and len(data) == 6 and data.path == str(path)
    x, y = data.get(torch.tensor([5, 1]))
    assert y.tolist() == [2, 1] and abs(x[0].mean().item() - (200 / 127.5 - 1)) < 1e-6


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_fashion_mnist_reads():
    data = D.load_data('')
    assert len(data) == 60000 and data.shape == (1, 28, 28) and data.num_classes == 10 and data.path == D.FASHION_DIR
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
def test_every_stage_then_sample_and_resume(tmp_path):
    import train
    out = str(tmp_path / 'run')
    args = TINY_RUN + ['--out', out, '--students', '3', '--dm_steps', '1', '--ratio', '1']   # the loop: spy tests above
    train.main(train.parse_args(args))
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
    train.main(train.parse_args(args))
    after = load_msd(os.path.join(out, 'msd.pt')).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    S.main(['--ckpt', os.path.join(out, 'msd.pt'), '--grid', str(tmp_path / 'g.png'), '--per_class', '2'])
    assert Image.open(tmp_path / 'g.png').size == (2 * 30 + 2, 10 * 30 + 2)


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
    import checkpoint as T
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
    import checkpoint as T
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
    if torch.load(target, weights_only=True)['step'] >= 3:                   # --dm_steps 3: DM already over
        pytest.skip('the kill landed after the DM stage ended (a busy CPU): no mid-stage resume to compare')
    r = run_cli(['train.py', '--out', b] + RESUME_RUN)
    assert r.returncode == 0, r.stderr[-1000:]
    for name in ('teacher.pt', 'msd.pt'):
        sa = torch.load(os.path.join(a, name), weights_only=True)
        sb = torch.load(os.path.join(b, name), weights_only=True)
        da = sa['state_dict'] if name == 'teacher.pt' else {f'{i}.{k}': v for i, s in enumerate(sa['students']) for k, v in s['state_dict'].items()}
        db = sb['state_dict'] if name == 'teacher.pt' else {f'{i}.{k}': v for i, s in enumerate(sb['students']) for k, v in s['state_dict'].items()}
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da), name


@pytest.mark.skipif(not HAVE_DATA, reason='dataset-fashion-mnist not installed')
def test_finished_run_continued_to_more_steps_equals_an_uninterrupted_run(tmp_path):
    """One rank, two students trained one after the other: a run finished at 1 ADM step and rerun with
    --adm_steps 2 ends with bitwise the students of a run given --adm_steps 2 from the start (the second
    student's random GAN head must not depend on how far the first student trained)."""
    import train
    args = ['--preset', 'smoke', '--students', '2', '--teacher_steps', '4', '--tsm_steps', '2', '--dm_steps', '1',
            '--ratio', '1', '--regression_weight', '0', '--heun_steps', '2', '--batch', '4', '--teacher_batch', '8',
            '--grid_every', '0', '--fid_samples', '0']
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    train.main(train.parse_args(args + ['--out', a, '--adm_steps', '2']))
    train.main(train.parse_args(args + ['--out', b, '--adm_steps', '1']))
    train.main(train.parse_args(args + ['--out', b, '--adm_steps', '2']))
    sa, sb = (torch.load(os.path.join(r, 'msd.pt'), weights_only=True)['students'] for r in (a, b))
    for x, y in zip(sa, sb):
        assert x['state_dict'].keys() == y['state_dict'].keys()
        assert all(torch.equal(x['state_dict'][n], y['state_dict'][n]) for n in x['state_dict']), x['student']


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
    raw = gzip.open(os.path.join(D.FASHION_DIR, 'train-images-idx3-ubyte.gz')).read(5000)
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


def test_bench_reports_every_generator(tmp_path, capsys):
    """bench.py: the teacher, one student, MSD with mixed labels, one student on MSD's sub-batches and a
    smaller student, each timed; the speed-up and the routing overhead with its bound; the batch sweep;
    a missing teacher is a one-line error."""
    teacher = randomize(build_net(TINY)).eval()
    msd = MSD([Student.from_teacher(teacher) for _ in range(2)], [[0, 1, 2], [3, 4, 5]], 6).eval()
    out = B.bench(msd, teacher, 4, 2, torch.device('cpu'), widths=(0.5,), repeats=3)
    speeds = {k: v for k, v in out.items() if k not in ('speed-up', 'smaller batches alone') and not k.startswith('routing')}
    assert len(speeds) == 5 and all(v > 0 for v in speeds.values())
    assert out['speed-up'] > 1                                 # 3 NFE (heun_steps 2) against 1
    assert -1 < out['routing overhead, eager'] < 1 and -1 < out['smaller batches alone'] < 1
    text = capsys.readouterr().out
    assert '| one student (1 NFE) ' in text and '| student at width 0.5 (4 ch, random weights) ' in text
    assert 'routing overhead, eager: MSD, 2 students, mixed labels gives' in text and 'bound: at most 10% fewer' in text
    assert set(B.batch_sweep(msd, [1, 6], (1, 8, 8), torch.device('cpu'), repeats=1)) == {('eager', 1), ('eager', 6)}
    assert '\n| 6     |' in capsys.readouterr().out
    torch.save(msd_checkpoint(list(msd.students), msd.groups, 6, {}), tmp_path / 'msd.pt')    # no teacher recorded
    assert 'give --teacher' in cli_error(B.cli, ['--ckpt', str(tmp_path / 'msd.pt')], capsys)


def test_round_robin_overhead_of_a_generator_twice_as_slow_is_one_half():
    sleep = lambda seconds: (lambda z, y: time.sleep(seconds))
    a, b, c = (B.Row(name, sleep(t), torch.zeros(2), calls) for name, t, calls in (('a', 0.05, 6), ('b', 0.1, 6), ('c', 0.0, 3)))
    B.round_robin([a, b, c], (1, 2, 2), torch.device('cpu'))
    t_a, t_b, t_c = a.times, b.times, c.times
    assert [t is not None for t in t_c] == [False, True] * 3    # 3 calls spread evenly over 6 rounds
    assert all(t is not None for t in t_a + t_b)
    assert 0.4 < B.overhead(t_a, t_b) < 0.6                   # 1 - t_a / t_b = 1 - 0.05 / 0.1
    assert -1.2 < B.overhead(t_b, t_a) < -0.8                 # b is the faster: 1 - 0.1 / 0.05 = -1
    assert 1.8 < B.time_ratio(t_b, t_a) < 2.2 and 15 < a.images_per_s < 45    # 2 images in ~0.05 s
    slow = [None, 1.0, None, 1.0, None, 1.0]                  # ratios only within rounds where both ran
    assert B.time_ratio(slow, [9.0, 0.5, 9.0, 0.5, 9.0, 0.5]) == 2.0
    with pytest.raises(ValueError):
        B.time_ratio(slow, [1.0, None] * 3)


def test_bench_train_profiles_dm_and_adm_iterations(tmp_path, capsys):
    """bench.py --train: iterations/s of train.py's DM and ADM iterations, the busiest operations and Chrome
    traces; nothing is trained or saved."""
    import train
    teacher = randomize(build_net(FLAT)).eval()
    data = D.ImageData(torch.arange(6).repeat(4), 6, (1, 8, 8), images=torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8))
    cfg = train.Config(out=str(tmp_path), students=2, batch=2, ratio=1, warmup=1, device='cpu')
    rates = B.profile_training(cfg, data, teacher, 1, str(tmp_path))
    text = capsys.readouterr().out
    assert set(rates) == {'dm', 'adm'} and all(r > 0 for r in rates.values()) and 'iterations/s' in text
    for stage in ('dm', 'adm'):
        assert f'{stage}: ' in text and 'convolution' in text
        with open(tmp_path / f'profile-{stage}.json') as f:
            assert json.load(f)['traceEvents']
    assert sorted(os.listdir(tmp_path)) == ['profile-adm.json', 'profile-dm.json']


def test_keep_freed_memory_stops_page_faults():
    """glibc would mmap each 64 MiB block afresh and fault in its 16,384 pages on every allocation."""
    import resource
    if S.keep_freed_memory() < 2 ** 26:
        pytest.skip('needs glibc taking an mmap threshold above 64 MiB')
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


def test_frechet_distance_closed_forms():
    """Shifting features by c gives FID |c|^2; scaling by a gives (1 - a)^2 (|mu|^2 + tr S) (equal-shape
    covariances); two Gaussians with commuting covariances diag(s1^2), diag(s2^2) give |mu1 - mu2|^2 + |s1 - s2|^2."""
    f = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)).double() @ torch.randn(6, 6, generator=torch.Generator().manual_seed(1)).double()
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert abs(S.frechet(f, f + c) - c.square().sum().item()) < 1e-6
    a, mu, cov = 0.5, f.mean(0), torch.cov(f.T)
    assert abs(S.frechet(f, a * f) - (1 - a) ** 2 * (mu.square().sum() + cov.trace()).item()) < 1e-6
    z = f - f.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T          # sample mean 0, sample covariance I
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.1]).double(), torch.tensor([2.0, 2.0, 1.0, 0.5, 1.0, 1.0]).double()
    mu1, mu2 = torch.zeros(6).double(), torch.arange(6).double()
    expected = (mu1 - mu2).square().sum() + (s1 - s2).square().sum()
    assert abs(S.frechet(z * s1 + mu1, z * s2 + mu2) - expected.item()) < 1e-6


class FakeInception(torch.nn.Module):
    """Stands in for the Inception in the FID path: features are a fixed linear map of the 3-channel
    uint8 image; counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0)))
        self.seen = 0

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 8, 8)
        self.seen += len(x)
        return (x.flatten(1).float() @ self.w,)


def test_sample_accuracy_is_the_share_classified_as_asked(tmp_path, capsys):
    """sample.py --accuracy n: the committed classifier's argmax on the FID's seeds (10^7..) and labels
    (cycling over the classes) equals the label asked for in the printed share, overall and per class."""
    import experiments as E
    from teacher import to_uint8
    ckpt, clf_path = (os.path.join(HERE, 'checkpoints', f) for f in ('fashion-msd4.pt', 'fashion-classifier.pt'))
    S.main(['--ckpt', ckpt, '--accuracy', '40', '--classifier', clf_path, '--device', 'cpu'])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    gen, labels = load_msd(ckpt).eval(), torch.arange(40) % 10
    with torch.no_grad():
        images = to_uint8(gen(seeded_noise(range(10 ** 7, 10 ** 7 + 40), (1, 28, 28)), labels))
        clf = E.Classifier()
        clf.load_state_dict(torch.load(clf_path, weights_only=True)['state_dict'])
        hit = (clf.eval()(images).argmax(1) == labels).float()
    assert line.startswith(f'accuracy {100 * hit.mean():.1f}% of 40 samples'), line
    assert line.endswith(', '.join(f'{100 * hit[labels == c].mean():.1f}' for c in range(10))), line
    tiny = str(tmp_path / 'tiny.pt')
    torch.save(teacher_checkpoint(build_net(TINY)), tiny)             # 8x8 images of 6 classes: refused
    assert 'needs a 28x28 grey 10-class generator' in cli_error(S.cli, ['--ckpt', tiny, '--accuracy', '10'], capsys)


def test_fid_reference_is_cached_per_dataset_and_count(tmp_path, monkeypatch):
    """sample.py's one FID path: the reference features of n_ref training images (a fixed subset) are
    computed once per data path and n_ref, then read from the cache; fid() generates with seeds
    seed0.. and balanced labels and takes the Frechet distance to them."""
    monkeypatch.setattr(S, 'CACHE', str(tmp_path / 'cache'))
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = lambda path: D.ImageData(torch.arange(30) % 6, 6, (1, 8, 8), images=images, path=path)
    net, a = FakeInception(), data(str(tmp_path / 'a'))
    ref, labels = S.reference(a, 10, net)
    idx = torch.randperm(30, generator=torch.Generator().manual_seed(123))[:10]
    assert net.seen == 10 and torch.equal(labels, a.labels[idx])
    again, _ = S.reference(a, 10, net)
    assert net.seen == 10 and torch.equal(again, ref)                     # from the cache
    torch.testing.assert_close(ref, net(images[idx].expand(-1, 3, -1, -1))[0])
    S.reference(a, 20, net)                                               # another count,
    S.reference(data(str(tmp_path / 'b')), 10, net)                       # another dataset,
    S.reference(data(None), 10, net)                                      # an unnamed one, not cached:
    S.reference(data(None), 10, net)
    assert net.seen == 10 + 10 + 20 + 10 + 10 + 10
    assert S.reference(a, 1000, net)[0].shape == (30, 16)                 # n_ref beyond the data: all of it
    asked = []
    gen = lambda z, y: asked.append(y) or z.clamp(-1, 1)
    value, per_group = S.fid(gen, a, 12, 10, seed0=5, extractor=net, groups=[[0, 1, 2], [3, 4, 5]])
    assert torch.equal(torch.cat(asked), torch.arange(12) % 6)
    fake = S.features(S.generate(lambda z, y: z.clamp(-1, 1), list(range(5, 17)), torch.arange(12) % 6, (1, 8, 8)), net)
    assert value == S.frechet(fake, ref)
    ref_labels = a.labels[idx]                  # per group: its classes' samples against its classes' reference images
    for g, v in zip([[0, 1, 2], [3, 4, 5]], per_group):
        assert v == S.frechet(fake[(torch.arange(12) % 6 < 3) == (g[0] == 0)], ref[(ref_labels < 3) == (g[0] == 0)])


def test_report_tables_verdicts_and_plot(tmp_path):
    import experiments as E
    cfg = E.GridConfig(out=str(tmp_path), results=str(tmp_path / 'RESULTS.md'), figures=str(tmp_path / 'fig'))
    row = lambda fid, params=1e6, ips=100.0: dict(title='', fid=fid, samples=100, ref=1000, params=params, nfe=1, accuracy=0.9,
                                                 per_class=[0.9] * 10, latency_ms=1.0, images_per_s=ips, train_s=60.0,
                                                 groups=[[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]], group_fid=[1, 2, 3, 4])
    rows = {'teacher': dict(row(10.0), nfe=35, train_s=None), 'k1-dm': row(40), 'k1': row(30), 'k2': row(25),
            'k4-dm': row(30), 'k4': row(20), 'k4-random': row(22), 'k4-half': row(24, 0.3e6, 250.0)}
    results = dict(rows=rows, dm_steps=20, adm_steps=10, batch=16, lr=1e-4, tsm_steps=5, machine='test',
                   curve={'k1:10': 50.0, 'k1:20': 40.0, 'k1:30': 30.0, 'k4:10': 45.0, 'k4:20': 30.0, 'k4:30': 20.0})
    (tmp_path / 'RESULTS.md').write_text('old\n<!-- reading: written by hand, kept when the script rewrites this file -->\nmy reading\n')
    E.report(cfg, results)
    text = (tmp_path / 'RESULTS.md').read_text()
    assert text.count('\n| K = ') == 7 and '| EDM teacher, Heun 35 NFE | 10.00 |' in text and text.rstrip().endswith('my reading')
    assert 'best MSD row FID 20.00 vs teacher 10.00: does not hold' in text and 'holds (monotone)' in text
    assert 'ADM lowers FID in 2 of 2' in text and '20.00 vs 22.00: holds' in text and '0.30M vs 1.00M parameters, FID 24.00 vs 20.00' in text
    assert Image.open(tmp_path / 'fig' / 'fid_vs_iterations.png').size == (640, 400) and '](fig/fid_vs_iterations.png)' in text
    runs = {r[0]: r for r in E.RUNS}                                      # DM-only runs: every update in DM
    steps = lambda cmd: (cmd[cmd.index('--dm_steps') + 1], cmd[cmd.index('--adm_steps') + 1])
    assert steps(E.train_command(cfg, runs['k4-dm'], 't.pt', 20, 10)) == ('30', '0')
    assert steps(E.train_command(cfg, runs['k4'], 't.pt', 20, 10)) == ('20', '10')
    cmd = E.train_command(cfg, runs['k4'], 't.pt', 20, 10)                # DM's noise range named: RESULTS.md's rows
    assert cmd[cmd.index('--dm_noise') + 1] == '0.98'                    # rerun as they ran, whatever the preset holds
    assert cmd[cmd.index('--fake_noise') + 1] == '1.0'
    some = {k: rows[k] for k in ('teacher', 'k1', 'k4')}                  # a subset (--runs k1,k4): only its claims
    assert [v[:3] for v in E.verdicts(some)] == ['(a)', '(b)'] and 'K = 1, 4 (DM + ADM): 30.00, 20.00: holds (monotone)' in E.verdicts(some)[1]


def test_grid_runs_only_the_selected_runs(tmp_path, monkeypatch, capsys):
    """experiments.py --runs k1,k4: the students of those runs are trained (one command each, then one per run
    for msd.pt), nothing else; an unknown name is a one-line error before any work."""
    import experiments as E
    issued = []
    monkeypatch.setattr(E, 'run_all', lambda cmds, jobs, log: issued.append([c[c.index('--out') + 1:] for c in cmds]) or 1.0)
    cfg = E.GridConfig(out=str(tmp_path), runs='k4,k1', dm_steps=3, adm_steps=2)
    results = {}
    E.train(cfg, results)
    out = lambda name: os.path.join(str(tmp_path), name)
    assert [c[:1] + c[-2:] for c in issued[0]] == [[out('k1'), '--only_students', '0']] + \
        [[out('k4'), '--only_students', str(k)] for k in range(4)]
    assert [c[0] for c in issued[1]] == [out('k1'), out('k4')] and sorted(results['commands']) == ['k1', 'k4']
    assert 'unknown run \'k3\' in --runs' in cli_error(E.cli, ['--runs', 'k1,k3', '--out', str(tmp_path / 'x')], capsys)
    assert not os.path.exists(tmp_path / 'x')


def test_train_minutes_probe_times_steady_iterations(tmp_path, monkeypatch):
    """--train_minutes: the probe's rate is the slope between a student's first and last logged DM step, not its
    mean over all steps (whose first steps pay for start-up): here 8 steps in 4 s after a 10 s first stretch, so
    2 it/s where the mean would say 1; the slowest student sets the steps: 0.85 * 60 s * 1.5 / 1.15 = 66 updates,
    60% DM and 40% ADM in whole snapshot intervals."""
    import experiments as E
    recs = lambda k, dt: [dict(stage='dm', student=k, step=s, sec=t) for s, t in ((4, 10.0), (8, 10 + dt), (12, 10 + 2 * dt))]
    assert E.probe_rate(recs(0, 2.0) + recs(1, 4 / 1.5) + [dict(stage='dm', student=0, throughput=True, steps=12, sec=14.0)]) \
        == pytest.approx({0: 2.0, 1: 1.5})
    def fake_run_all(cmds, jobs, log):                          # every probe run appends two students' records
        for c in cmds:
            out = c[c.index('--out') + 1]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, 'metrics.jsonl'), 'a') as f:
                f.writelines(json.dumps(r) + '\n' for r in recs(0, 2.0) + recs(1, 4 / 1.5))
        return 1.0
    monkeypatch.setattr(E, 'run_all', fake_run_all)
    cfg = E.GridConfig(out=str(tmp_path), runs='k1', train_minutes=1.0, snapshot_every=5)
    os.makedirs(tmp_path / 'probe' / 'k1')                     # a stale probe's records (a slow student) are not read
    (tmp_path / 'probe' / 'k1' / 'metrics.jsonl').write_text(json.dumps(dict(stage='dm', student=1, step=2, sec=1.0)) + '\n')
    assert E.probe_steps(cfg, 't.pt') == (35, 25)              # int(0.85 * 60 * 1.5 / 1.15) = 66: 39.6 -> 35, 26.4 -> 25


def test_plot_axis_spans_the_data_and_series_keep_their_colors(tmp_path):
    """FID curves between 30 and 40: the lowest point sits in the bottom fifth of the plot area and the highest
    in the top fifth (an axis from 0 would put 30 at three quarters of the height); eight series, eight colours."""
    import experiments as E
    top, bottom = 60, 400 - 50                                            # plot area rows in plot()'s layout
    E.plot({'a': [(0, 30.0), (100, 40.0)]}, str(tmp_path / 'a.png'), 50, 100)
    img = np.asarray(Image.open(tmp_path / 'a.png').convert('RGB'))[:, 60:640 - 110].astype(int)   # without the legend
    rows = np.nonzero((np.abs(img - np.array([200, 40, 40])).sum(-1) < 10).any(1))[0]
    assert rows.max() > bottom - (bottom - top) / 5 and rows.min() < top + (bottom - top) / 5
    E.plot({f's{i}': [(10 * i, 30.0 + i)] for i in range(8)}, str(tmp_path / 'b.png'), 50, 100)
    img = np.asarray(Image.open(tmp_path / 'b.png').convert('RGB'))[top:bottom, 60:640 - 110].reshape(-1, 3)
    colors = {tuple(c) for c in img if max(c) - min(c) > 60}            # saturated pixels: series, not axes or text
    assert len(colors) >= 8
    for dm_steps, drawn in ((50, True), (None, False)):                   # the DM | ADM boundary: ADM runs only
        E.plot({'a': [(0, 30.0), (100, 40.0)]}, str(tmp_path / 'c.png'), dm_steps, 100)
        img = np.asarray(Image.open(tmp_path / 'c.png').convert('RGB'))[top:bottom, 60:640 - 110]
        assert (img == 180).all(-1).any(0).sum() == (1 if drawn else 0)  # one gray column of the plot area, or none


def test_curves_fid_per_snapshot_cached_and_plotted(tmp_path, monkeypatch):
    """experiments.py --parts curves: one point per (stage, step) at which every student left a snapshot, at
    dm_steps + step updates for ADM, and one for msd.pt at the end of its last stage (alone in a folder
    without snapshots/); its FID is that of the snapshots' (or msd.pt's) MSD generator (seeds 10^7..,
    balanced labels) against the reference, and the teacher's (Heun) on the same seeds is the plot's
    reference line; points in curve-12vs20.json and the teacher's FID are not recomputed, but another sample
    count computes its own points; one plot line per run folder, named LABEL in LABEL:FOLDER (a repeated
    name or a missing folder is an error)."""
    import experiments as E
    from dataclasses import asdict
    from student import Student
    monkeypatch.setattr(S, 'CACHE', str(tmp_path / 'cache'))
    data = D.ImageData(torch.arange(6).repeat(5), 6, (1, 8, 8), images=torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8),
                       path=str(tmp_path / 'data'))
    net = FakeInception()
    monkeypatch.setattr(E, 'load_data', lambda path: data)
    monkeypatch.setattr(S, 'inception', lambda device: net)
    run, groups = tmp_path / 'k2', [[0, 2, 4], [1, 3, 5]]
    os.makedirs(run / 'snapshots')
    (run / 'config.json').write_text(json.dumps(dict(dm_steps=10)))
    torch.manual_seed(0)
    students = {}
    for stage, step, ks in (('dm', 5, (0, 1)), ('adm', 5, (0, 1)), ('adm', 10, (0,))):      # adm:10: student 1 missing
        for k in ks:
            G = students[stage, step, k] = Student(FLAT, 80.0)
            randomize(G.net)
            torch.save(dict(kind='student', student=k, classes=groups[k], partition=groups, net=asdict(FLAT),
                            state_dict=G.state_dict(), config=dict(sigma_max=80.0)),
                       run / 'snapshots' / f'{stage}-student{k}-step{step}.pt')
    final = [Student(FLAT, 80.0) for _ in groups]                       # msd.pt after 12 ADM updates
    for G in final:
        randomize(G.net)
    torch.save(msd_checkpoint(final, groups, 6, dict(dm_steps=10, adm_steps=12), stages=['dm', 'adm']), run / 'msd.pt')
    teacher = randomize(build_net(FLAT)).eval()
    torch.save(teacher_checkpoint(teacher), tmp_path / 'teacher.pt')
    cfg = E.GridConfig(out=str(tmp_path), figures=str(tmp_path / 'fig'), curve_runs=str(run), fid_samples=12, fid_ref=20,
                       teacher=str(tmp_path / 'teacher.pt'), heun_steps=2)
    E.curves(cfg, torch.device('cpu'))
    done = json.loads((run / 'curve-12vs20.json').read_text())
    assert sorted(done) == ['adm:12', 'adm:5', 'dm:5'] and [done[k]['updates'] for k in ('dm:5', 'adm:5', 'adm:12')] == [5, 15, 22]
    ref, _ = S.reference(data, 20, net)
    seeds, labels = list(range(10 ** 7, 10 ** 7 + 12)), torch.arange(12) % 6
    gen = MSD([students['adm', 5, 0], students['adm', 5, 1]], groups, 6).eval()
    assert done['adm:5']['fid'] == pytest.approx(S.frechet(S.features(S.generate(gen, seeds, labels, (1, 8, 8)), net), ref), rel=1e-6)
    gen = MSD(final, groups, 6).eval()                                  # msd.pt: the point at the end of its last stage
    assert done['adm:12']['fid'] == pytest.approx(S.frechet(S.features(S.generate(gen, seeds, labels, (1, 8, 8)), net), ref), rel=1e-6)
    heun = lambda z, y: S.heun(teacher, z, y, 2)                        # the teacher's line: same seeds, Heun
    (value,) = json.loads((tmp_path / 'teacher_fid.json').read_text()).values()
    assert value == pytest.approx(S.frechet(S.features(S.generate(heun, seeds, labels, (1, 8, 8)), net), ref), rel=1e-6)
    seen = net.seen
    E.curves(cfg, torch.device('cpu'))                                    # both points cached: no image generated
    assert net.seen == seen and Image.open(tmp_path / 'fig' / 'fid_curves.png').size == (640, 400)
    plotted = []                                                          # LABEL:FOLDER names the plot line
    monkeypatch.setattr(E, 'plot', lambda series, *a, **k: plotted.append(series))
    E.curves(dataclasses_replace(cfg, curve_runs=f'K = 2:{run}'), torch.device('cpu'))
    assert plotted == [{'K = 2': [(5, done['dm:5']['fid']), (15, done['adm:5']['fid']), (22, done['adm:12']['fid'])]}]
    assert E.curve_runs(f'{run},a:b:{run}') == [('k2', str(run)), ('a:b', str(run))]     # split at the last ':'
    os.makedirs(colon := tmp_path / 'k2:copy')                          # a folder whose name has a ':' is not split
    assert E.curve_runs(str(colon)) == [('k2:copy', str(colon))]
    for bad, says in ((f'{run},k2:{run}', "two runs named 'k2'"), (f'K:{tmp_path}/none', 'no run folder')):
        with pytest.raises(ValueError, match=says):
            E.curve_runs(bad)
    E.curves(dataclasses_replace(cfg, fid_samples=6), torch.device('cpu'))      # another protocol: computed anew
    again = json.loads((run / 'curve-6vs20.json').read_text())
    assert sorted(again) == ['adm:12', 'adm:5', 'dm:5'] and again['adm:5']['fid'] != done['adm:5']['fid']
    bare = tmp_path / 'k2-bare'                                          # no snapshots/: msd.pt is the only point
    os.makedirs(bare)
    (bare / 'config.json').write_text(json.dumps(dict(dm_steps=7)))
    torch.save(msd_checkpoint(final, groups, 6, dict(dm_steps=7, adm_steps=0), stages=['tsm', 'dm']), bare / 'msd.pt')
    E.curves(dataclasses_replace(cfg, curve_runs=str(bare)), torch.device('cpu'))
    point = json.loads((bare / 'curve-12vs20.json').read_text())
    assert list(point) == ['dm:7'] and point['dm:7'] == dict(updates=7, fid=done['adm:12']['fid'])


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
