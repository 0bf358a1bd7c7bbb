"""The EDM teacher: preconditioned denoiser, ADM backbone, Heun sampler (Karras et al. 2022).

    D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), y)      (EDM Table 1)

- `DhariwalUNet` is the ADM backbone (Dhariwal & Nichol 2021) as EDM builds it. Module structure and
  parameter names follow EDM's networks.py, so that `EDMPrecond.state_dict()` has the same keys and
  shapes as NVIDIA's `EDMPrecond` (e.g. `model.enc.64x64_block0.affine.weight`): an official EDM
  state_dict loads into it with strict=True. `forward(..., return_bottleneck=True)` returns the
  encoder's last feature map, where DMD2 attaches its GAN head.
- `EDMPrecond` wraps any backbone that knows nothing of sigma (EDM sec. 5, Table 1).
- `heun_sampler` is EDM Algorithm 1 (deterministic, 2N-1 network evaluations), in float64 on the
  Karras grid, with each image's noise drawn from its own seed.
- The EDM training loss lives in losses.py (`edm_loss`); train.py's teacher stage uses it.
- Reading checkpoints (ours and NVIDIA's EDM pickles) safely: checkpoint.py (`load_teacher`).

Run:  python train.py --stages teacher            (trains one on Fashion-MNIST)
      python sample.py --ckpt runs/fashion/teacher.pt --grid teacher.png
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class NetConfig:
    """Constructor settings of one EDM-preconditioned DhariwalUNet (saved in every checkpoint)."""
    img_resolution: int = 28            # image side in pixels
    img_channels: int = 1               # 1 grey, 3 RGB
    label_dim: int = 10                 # number of classes (one-hot labels); 0 = unconditional
    model_channels: int = 32            # base width (192 for EDM's ImageNet-64 ADM)
    channel_mult: tuple = (1, 2, 2)     # width multiplier per resolution level
    channel_mult_emb: int = 4           # embedding width = model_channels * this
    num_blocks: int = 2                 # residual blocks per level in the encoder (decoder: +1)
    attn_resolutions: tuple = (7,)      # resolutions with self-attention
    dropout: float = 0.10               # dropout inside the residual blocks
    channels_per_head: int = 64         # attention heads = channels // this (EDM: 64)
    sigma_data: float = 0.5             # expected std of the data


# ----------------------------------------------------------------------------------------------
# Layers. Initialisation follows EDM: kaiming-uniform with gain sqrt(1/3) (PyTorch's default),
# zero init for the last conv of every residual path ("init_zero"), so a fresh block is identity.

def _uniform_(t, fan_in, gain):
    return nn.init.uniform_(t, -gain * math.sqrt(3 / fan_in), gain * math.sqrt(3 / fan_in))


class Linear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, gain=math.sqrt(1 / 3)):
        super().__init__(in_features, out_features, bias=bias)
        _uniform_(self.weight.data, in_features, gain)
        if bias:
            _uniform_(self.bias.data, in_features, gain)


class Conv2d(nn.Module):
    """EDM's Conv2d: optional 2x up/down resampling with the [1,1] filter (nearest up, box down),
    then a kernel x kernel convolution (kernel=0: resampling only, no weights)."""

    def __init__(self, in_channels, out_channels, kernel, up=False, down=False, gain=math.sqrt(1 / 3)):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(_uniform_(torch.empty(out_channels, in_channels, kernel, kernel), max(fan_in, 1), gain)) if kernel else None
        self.bias = nn.Parameter(_uniform_(torch.empty(out_channels), max(fan_in, 1), gain)) if kernel else None
        f = torch.full((1, 1, 2, 2), 0.25)     # 2x2 box filter: EDM's [1, 1] filter, outer(f, f) / sum(f)^2
        # (a constant rather than that arithmetic, which on the meta device would import torch._dynamo)
        self.register_buffer('resample_filter', f if (up or down) else None)

    def forward(self, x):
        if self.up:      # transposed conv with 4*box = nearest-neighbour 2x upsampling
            f = (self.resample_filter * 4).to(x.dtype).tile(self.in_channels, 1, 1, 1)
            x = F.conv_transpose2d(x, f, groups=self.in_channels, stride=2)
        if self.down:    # strided box filter = 2x2 average pooling
            f = self.resample_filter.to(x.dtype).tile(self.in_channels, 1, 1, 1)
            x = F.conv2d(x, f, groups=self.in_channels, stride=2)
        if self.weight is not None:
            x = F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), padding=self.weight.shape[-1] // 2)
        return x


def float32_region(device):
    """Float32 computation even inside a bf16 / fp16 autocast region (which would otherwise recast the
    operands of matrix products and convolutions); a no-op on devices without autocast (meta)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else contextlib.nullcontext()


def GroupNorm(num_channels, eps=1e-5):
    """EDM's GroupNorm: min(32, C // 4) groups."""
    return nn.GroupNorm(min(32, num_channels // 4), num_channels, eps=eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of c_noise (ADM style: [cos, sin], frequencies 10000^(-i/(C/2)))."""

    def __init__(self, num_channels, max_positions=10000):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, x):
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=x.device) / half)
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, adaptive scale/shift from the embedding, GN-SiLU-dropout-conv,
    skip connection; then optional multi-head self-attention (norm2, qkv, proj)."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 channels_per_head=64, dropout=0.0, eps=1e-5):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = in_channels, out_channels, dropout
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.norm0 = GroupNorm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
        self.affine = Linear(emb_channels, out_channels * 2)
        self.norm1 = GroupNorm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, gain=0)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1 if out_channels != in_channels else 0, up=up, down=down)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1, gain=0)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].to(x.dtype).chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))           # GN(x) * (1 + scale) + shift
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        if self.num_heads:
            n, c, h, w = x.shape
            # qkv channels are laid out [head, channel-in-head, (q,k,v)], as in EDM's reshape.
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            with float32_region(x.device):        # logits and softmax in float32, as in EDM, also under bf16 autocast
                attn = torch.einsum('ncq,nck->nqk', q.float(), k.float() / math.sqrt(q.shape[1])).softmax(dim=2)
            a = torch.einsum('nqk,nck->ncq', attn.to(v.dtype), v)
            x = self.proj(a.reshape(n, c, h, w)) + x
        return x


class DhariwalUNet(nn.Module):
    """ADM U-Net backbone F(x; c_noise, y) with EDM's module names (enc / dec ModuleDicts)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10, channels_per_head=64):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        blk = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = None
        if label_dim:   # EDM: kaiming-normal times sqrt(label_dim), i.e. unit-variance label vectors
            self.map_label = nn.Linear(label_dim, emb_channels, bias=False)
            nn.init.normal_(self.map_label.weight)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, 3)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **blk)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{i}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        skips = [block.out_channels for block in self.enc.values()]
        self.bottleneck_channels = cout

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **blk)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **blk)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{i}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, gain=0)

    def forward(self, x, noise_labels, class_labels, return_bottleneck=False):
        emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise_labels))))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        if return_bottleneck:
            return x
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:     # blocks that take a skip connection
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class EDMPrecond(nn.Module):
    """D(x; sigma, y) = c_skip x + c_out F(c_in x; c_noise, y) (EDM eq. 7, Table 1).

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4. Labels: integer class indices or
    one-hot / soft rows of width label_dim."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.sigma_data = cfg.sigma_data
        self.label_dim = cfg.label_dim
        self.model = DhariwalUNet(cfg.img_resolution, cfg.img_channels, cfg.img_channels, cfg.label_dim,
                                  cfg.model_channels, tuple(cfg.channel_mult), cfg.channel_mult_emb,
                                  cfg.num_blocks, tuple(cfg.attn_resolutions), cfg.dropout, cfg.channels_per_head)

    def one_hot(self, labels, n):
        if labels is None:
            return torch.zeros(n, self.label_dim)
        if labels.ndim == 1:       # one-hot by comparison: unlike F.one_hot, no device sync (CUDA graphs)
            return (labels.long()[:, None] == torch.arange(self.label_dim, device=labels.device)).float()
        return labels.float()

    def precond(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x, sigma, labels=None, return_bottleneck=False):
        x = x.float()
        if torch.is_tensor(sigma):
            sigma = sigma.to(x.device, torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        else:                      # a number: filled on the device, no host-to-device copy (CUDA graphs)
            sigma = torch.full((x.shape[0], 1, 1, 1), float(sigma), device=x.device)
        y = self.one_hot(labels, x.shape[0]).to(x.device) if self.label_dim else None
        c_skip, c_out, c_in, c_noise = self.precond(sigma)
        F_x = self.model(c_in * x, c_noise.flatten(), y, return_bottleneck=return_bottleneck)
        if return_bottleneck:
            return F_x
        return c_skip * x + c_out * F_x.float()                              # D_x


def build_net(cfg: NetConfig) -> EDMPrecond:
    return EDMPrecond(cfg)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Noise levels and the sampler.

def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0, dtype=torch.float64):
    """sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..n-1 (descending)."""
    i = torch.arange(n, dtype=dtype)
    return (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def seeded_noise(seeds, shape, device='cpu'):
    """One N(0, I) tensor per seed, so an image depends on its seed only, never on the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def heun_sampler(net, latents, labels, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Algorithm 1, deterministic: Heun's 2nd-order method on dx/dsigma = (x - D(x; sigma)) / sigma.

    N = num_steps noise levels plus sigma_N = 0; the last step (to 0) is plain Euler, so the cost is
    2N - 1 network evaluations (N = 18 -> 35 NFE). The state x is kept in float64."""
    t_steps = torch.cat([karras_sigmas(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    t_steps = t_steps.to(latents.device)
    x = latents.double() * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = (x - net(x.float(), t_cur, labels).double()) / t_cur            # dx/dsigma at t_cur
        x_next = x + (t_next - t_cur) * d_cur                                   # Euler step
        if i < num_steps - 1:                                                   # 2nd-order correction
            d_next = (x_next - net(x_next.float(), t_next, labels).double()) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.float()


def to_uint8(x):
    """[-1, 1] float images -> uint8 in [0, 255]."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
