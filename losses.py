"""Every loss of the method, as pure functions that return one value per sample.

    edm_loss            EDM eq. 8 with lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2      (teacher)
    tsm_loss            teacher score matching (MSD sec. 3.3): a smaller student imitates the teacher
    dm_loss             distribution matching (DMD eq. 7-8, DMD2 normalisation)             (generator)
    fake_score_loss     denoising loss of the fake score on generated images                 (critic)
    gan_critic_loss     DMD2 GAN, critic side: softplus(D(fake)) + softplus(-D(real))       (critic)
    gan_generator_loss  DMD2 GAN, generator side: softplus(-D(fake))                         (generator)
    regression_loss     DMD's regression onto teacher (z -> image) pairs, LPIPS or pixel L2  (generator)
    lpips_if_present    its LPIPS distance, when the weights are already cached

Networks are passed in as callables D(x, sigma, labels); nothing here holds state. The noise levels
of distillation live on a 1000-point Karras grid (DMD2), `sigma_grid`. Callers reduce with .mean().
Exercised by: python -m pytest test_msd.py -k loss
"""
import os

import torch
import torch.nn.functional as F

P_MEAN, P_STD = -1.2, 1.2          # EDM's log-normal training distribution of sigma


def edm_weight(sigma, sigma_data=0.5):
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1/sigma^2 + 1/sd^2 (EDM eq. 8, Table 1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_edm_sigma(n, device, generator=None):
    """ln(sigma) ~ N(P_mean, P_std^2)."""
    return (torch.randn(n, 1, 1, 1, device=device, generator=generator) * P_STD + P_MEAN).exp()


def sigma_grid(n=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The distillation noise levels: a Karras grid of n sigmas, ascending with the index (DMD2)."""
    i = torch.arange(n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return s.flip(0).float()


def sample_grid_sigma(n, grid, lo=0.0, hi=1.0, device='cpu'):
    """Uniform grid index in [lo * len, hi * len] (DMD2: 20..980 of 1000), clipped to the grid; sigma for
    each of n samples, shaped [n,1,1,1]."""
    idx = torch.randint(int(lo * len(grid)), min(int(hi * len(grid)) + 1, len(grid)), (n,), device=grid.device)
    return grid[idx].to(device).reshape(-1, 1, 1, 1)                 # drawn where the grid lives: no copy


def per_sample_mean(x):
    return x.flatten(1).mean(1)


def edm_loss(D, x, labels, sigma=None, sigma_data=0.5):
    """EDM denoising loss: lambda(sigma) ||D(x + sigma n; sigma, y) - x||^2, mean over pixels."""
    if sigma is None:
        sigma = sample_edm_sigma(x.shape[0], x.device)
    x_t = x + sigma * torch.randn_like(x)
    return per_sample_mean(edm_weight(sigma, sigma_data) * (D(x_t, sigma, labels) - x) ** 2)


def tsm_loss(D_student, D_teacher, x, labels, sigma=None, sigma_data=0.5):
    """Teacher score matching: lambda(sigma) ||D_student(x_t) - D_teacher(x_t)||^2, x_t = x + sigma n
    with x real images of the student's classes; sigma from EDM's log-normal. The teacher's output
    replaces the clean image as the regression target, so the student learns the teacher's score
    at every noise level (its denoiser is the score up to (D - x_t) / sigma^2)."""
    if sigma is None:
        sigma = sample_edm_sigma(x.shape[0], x.device)
    x_t = x + sigma * torch.randn_like(x)
    with torch.no_grad():
        target = D_teacher(x_t, sigma, labels)
    return per_sample_mean(edm_weight(sigma, sigma_data) * (D_student(x_t, sigma, labels) - target.float()) ** 2)


def dm_loss(D_real, D_fake, x, labels, grid, lo=0.02, hi=0.98):
    """Distribution matching loss whose gradient w.r.t. the generated image x is the DMD gradient.

    DMD eq. 7: grad_theta KL(p_fake || p_real) = E[ (s_fake(x_t) - s_real(x_t)) dG/dtheta ], and with
    s(x_t) = (D(x_t) - x_t) / sigma^2 the score difference is proportional to D_fake - D_real.
    DMD eq. 8 normalises it per sample by w = mean_{C,H,W} |x - D_real(x_t)|:

        g = (D_fake(x_t) - D_real(x_t)) / w

    We want a scalar whose gradient w.r.t. x is g (both D's are held constant, no_grad). Take
        L = 0.5 * mean_{C,H,W} (x - sg(x - g))^2      =>   dL/dx = (x - (x - g)) / numel = g / numel,
    so autograd passes exactly g (scaled by 1/numel) into the generator. Sign: gradient descent moves
    x by -g, i.e. toward D_real (the teacher's denoised estimate) and away from D_fake; the
    normalisation by w makes the step size independent of the noise level."""
    sigma = sample_grid_sigma(x.shape[0], grid, lo, hi, x.device)
    with torch.no_grad():
        x_t = x + sigma * torch.randn_like(x)
        d_real = D_real(x_t, sigma, labels).float()
        d_fake = D_fake(x_t, sigma, labels).float()
        w = (x - d_real).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1).clamp_min(1e-8)
        g = (d_fake - d_real) / w
        g = torch.nan_to_num(g)
        target = x - g
    return 0.5 * per_sample_mean((x - target) ** 2)


def fake_score_loss(D_fake, x_fake, labels, grid, hi=1.0, sigma_data=0.5):
    """The fake score learns the generator's distribution: EDM denoising loss on detached generated
    images, sigma uniform over the lowest fraction `hi` of the grid (DMD2: 1, the whole grid),
    lambda = 1/sigma^2 + 1/sd^2."""
    sigma = sample_grid_sigma(x_fake.shape[0], grid, 0.0, hi, x_fake.device)
    return edm_loss(D_fake, x_fake.detach(), labels, sigma, sigma_data)


def _renoise(x, grid, hi):
    sigma = sample_grid_sigma(x.shape[0], grid, 0.0, hi, x.device)
    return x + sigma * torch.randn_like(x), sigma


def gan_critic_loss(critic, x_real, y_real, x_fake, y_fake, grid, hi=1.0):
    """DMD2 GAN critic: softplus(critic(fake)) + softplus(-critic(real)) on images re-noised at random
    sigmas from the lowest fraction `hi` of the grid (DMD2: diffusion_gan_max_timestep / 1000, 1 there)
    (the non-saturating logistic loss; softplus(-l) = -log sigmoid(l)). `critic(x_t, sigma, y)` returns
    one logit per image."""
    xr, sr = _renoise(x_real, grid, hi)
    xf, sf = _renoise(x_fake.detach(), grid, hi)
    return F.softplus(critic(xf, sf, y_fake)) + F.softplus(-critic(xr, sr, y_real))


def gan_generator_loss(critic, x_fake, labels, grid, hi=1.0):
    """DMD2 GAN generator: softplus(-critic(fake)), gradients flow through the critic into x_fake."""
    xf, sf = _renoise(x_fake, grid, hi)
    return F.softplus(-critic(xf, sf, labels))


def regression_loss(x_student, x_teacher, lpips=None):
    """DMD's regression loss on paired (z, teacher ODE sample from z): LPIPS(G(z), x_teacher) when an
    LPIPS network is given, otherwise the mean squared pixel distance."""
    if lpips is not None:
        return lpips(x_student, x_teacher).flatten()
    return per_sample_mean((x_student - x_teacher) ** 2)


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
