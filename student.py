"""One-step student generator and its training companion, the fake score with a GAN head.

    G(z, y) = D_theta(sigma_max z; sigma_max, y),  z ~ N(0, I),  sigma_max = 80          (DMD2, MSD sec. 3)

- `Student` wraps an EDM-preconditioned DhariwalUNet. A same-size student starts as an exact copy
  of the teacher; a smaller student has the same architecture with fewer channels (`width`) and
  starts untrained, then learns the teacher's denoiser by TSM (losses.tsm_loss) before DM.
- `FakeScore` is the fake-score ("guidance") network of DMD/DMD2, initialised from the teacher, with
  DMD2's GAN classifier head on its encoder bottleneck (`critic`). The same module gives both the
  fake denoiser D_fake (for the DM gradient) and the GAN critic logit.

Run: python train.py --preset smoke   (builds both, with a smaller student, and trains them)
"""
from dataclasses import replace

from torch import nn

from teacher import EDMPrecond, GroupNorm, NetConfig, build_net, float32_region


def student_config(teacher_cfg: NetConfig, width: float = 1.0) -> NetConfig:
    """Same architecture as the teacher; width < 1 scales every channel count (model_channels).
    Students run without dropout: a one-step generator should be a deterministic function of z."""
    target = teacher_cfg.model_channels * width
    if width >= 1:
        return replace(teacher_cfg, dropout=0.0)
    valid = [c for c in range(4, teacher_cfg.model_channels, 4) if _fits(teacher_cfg, c)]   # strictly smaller
    channels = min(valid, key=lambda c: (abs(c - target), c))       # nearest width the architecture allows
    return replace(teacher_cfg, model_channels=channels, dropout=0.0)


def _fits(cfg: NetConfig, model_channels):
    """Every level's width must suit GroupNorm (min(32, C/4) groups must divide C) and, where there is
    attention, its C // channels_per_head heads must divide C."""
    for level, mult in enumerate(cfg.channel_mult):
        c = model_channels * mult
        groups = min(32, c // 4)
        attention = (cfg.img_resolution >> level) in cfg.attn_resolutions or level == len(cfg.channel_mult) - 1
        heads = c // cfg.channels_per_head if attention else 0
        if c % 4 or c % groups or (heads and c % heads):
            return False
    return True


class Student(nn.Module):
    """The one-step generator G(z, y) = D(sigma_max z; sigma_max, y)."""

    def __init__(self, cfg: NetConfig, sigma_max: float = 80.0):
        super().__init__()
        self.sigma_max = sigma_max
        self.net: EDMPrecond = build_net(cfg)

    @classmethod
    def from_teacher(cls, teacher: EDMPrecond, width=1.0, sigma_max=80.0):
        cfg = student_config(teacher.cfg, width)
        s = cls(cfg, sigma_max)
        if cfg.model_channels == teacher.cfg.model_channels:       # same size: start as an exact copy of the teacher
            s.net.load_state_dict(teacher.state_dict())
        return s

    def forward(self, z, labels):
        return self.net(z * self.sigma_max, self.sigma_max, labels)


class GANHead(nn.Module):
    """DMD2's classifier head on the encoder bottleneck [N, C, r, r] -> one logit per image:
    Conv4x4/s2 -> GN -> SiLU -> Conv(k=s=r') -> GN -> SiLU -> Conv1x1, where r' is the side after the
    first conv (at ImageNet-64: 8x8x768 -> 4x4 -> 1x1, DMD2's Conv4x4/s4). It computes in float32 (DMD2
    casts the bottleneck to float32 before its head), also inside a bf16 autocast region."""

    def __init__(self, channels, resolution):
        super().__init__()
        r = (resolution + 2 - 4) // 2 + 1
        if r < 1:
            raise ValueError(f'bottleneck of side {resolution} is too small for the GAN head')
        self.layers = nn.Sequential(
            nn.Conv2d(channels, channels, 4, stride=2, padding=1), GroupNorm(channels), nn.SiLU(),
            nn.Conv2d(channels, channels, r, stride=r), GroupNorm(channels), nn.SiLU(),
            nn.Conv2d(channels, 1, 1))

    def forward(self, h):
        with float32_region(h.device):        # the realism logit in float32, also under bf16 autocast
            return self.layers(h.float()).flatten()


class FakeScore(nn.Module):
    """Fake-score network D_fake (a copy of the teacher, trained on generator outputs) plus the GAN
    critic head on its bottleneck. `forward` is the denoiser; `critic` is the GAN logit."""

    def __init__(self, teacher: EDMPrecond):
        super().__init__()
        cfg = replace(teacher.cfg, dropout=0.0)
        self.net = build_net(cfg)
        self.net.load_state_dict(teacher.state_dict())
        bottleneck_res = cfg.img_resolution >> (len(cfg.channel_mult) - 1)
        self.head = GANHead(self.net.model.bottleneck_channels, bottleneck_res)

    def forward(self, x, sigma, labels):
        return self.net(x, sigma, labels)

    def critic(self, x, sigma, labels):
        return self.head(self.net(x, sigma, labels, return_bottleneck=True))

