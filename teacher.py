"""The EDM teacher: preconditioned denoiser, ADM backbone, Heun sampler (Karras et al. 2022).

    D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), y)      (EDM Table 1)

- `DhariwalUNet` is the ADM backbone (Dhariwal & Nichol 2021) as EDM builds it. Module structure and
  parameter names follow EDM's networks.py, so that `EDMPrecond.state_dict()` has the same keys and
  shapes as NVIDIA's `EDMPrecond` (e.g. `model.enc.64x64_block0.affine.weight`): an official EDM
  state_dict loads into it with strict=True. `forward(..., return_bottleneck=True)` returns the
  encoder's last feature map, where DMD2 attaches its GAN head.
- `EDMPrecond` wraps any backbone that knows nothing of sigma (method.md section 1).
- `heun_sampler` is EDM Algorithm 1 (deterministic, 2N-1 network evaluations), in float64 on the
  Karras grid, with each image's noise drawn from its own seed.
- The EDM training loss lives in losses.py (`edm_loss`); train.py's teacher stage uses it.

- `load_teacher` also reads NVIDIA's EDM network pickles (e.g. edm-imagenet-64x64-cond-adm.pkl) without
  NVIDIA's code and without executing anything stored in them (a restricted unpickler).

Run:  python train.py --stages teacher            (trains one on Fashion-MNIST)
      python sample.py --ckpt runs/fashion/teacher.pt --grid teacher.png
      python teacher.py edm-imagenet-64x64-cond-adm.pkl edm-imagenet64-teacher.pt     (convert a pickle)
"""
import collections
import io
import math
import os
import pickle
from dataclasses import asdict, dataclass

import numpy as np
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
        f = torch.tensor([1.0, 1.0])
        f = torch.outer(f, f)[None, None] / f.sum() ** 2            # 2x2 box filter, sums to 1
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


def net_config_from_dict(d: dict) -> NetConfig:
    d = dict(d)
    for k in ('channel_mult', 'attn_resolutions'):
        d[k] = tuple(d[k])
    return NetConfig(**d)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def read_checkpoint(path, kind, map_location='cpu'):
    """torch.load(weights_only=True) of one of our checkpoints, checked to be of the given kind(s).
    Anything unreadable or of another kind is a ValueError with a one-line message."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f'{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:100]})') from None
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    found = ckpt.get('kind') if isinstance(ckpt, dict) else type(ckpt).__name__
    if found not in kinds:
        raise ValueError(f'{path} holds a {found!r} checkpoint, expected {" or ".join(map(repr, kinds))}')
    return ckpt


# ----------------------------------------------------------------------------------------------
# NVIDIA's EDM network pickles, read without NVIDIA's code and without running anything in the file.
#
# EDM saves {'ema': EDMPrecond, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': ...} with
# pickle; its torch_utils.persistence turns every network object into a call
# _reconstruct_persistent_obj(meta) whose meta holds the class's *source code* (module_src), its
# name and its state (the nn.Module __dict__: _parameters, _buffers, _modules, _init_kwargs, ...).
# Plain unpickling executes that source. Here find_class() hands out only inert stand-ins and
# torch's own tensor rebuilders; the network is then built from our code and the weights copied in.

class _Persistent:
    """What a persistent EDM object becomes here: its class name and state, no code."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class':
            raise pickle.UnpicklingError('unexpected persistent-object record in EDM pickle')
        self.class_name, self.state = meta.get('class_name'), meta.get('state') or {}


class _Container:
    """Stand-in for a pickled torch.nn container (ModuleDict, ModuleList, Sequential): keeps its state."""

    def __setstate__(self, state):
        self.state = state


class _EasyDict(dict):
    """Stand-in for dnnlib.EasyDict (a dict)."""


def _storage_from_bytes(b):
    return torch.load(io.BytesIO(b), weights_only=True)            # torch's own restricted loader


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError('refusing a numpy object scalar')
    return np.frombuffer(data, dtype=dtype)[0]


_EDM_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _Persistent,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): torch._utils._rebuild_parameter_with_state,
    ('torch.storage', '_load_from_bytes'): _storage_from_bytes,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('torch.nn.modules.container', 'ModuleDict'): _Container,
    ('torch.nn.modules.container', 'ModuleList'): _Container,
    ('torch.nn.modules.container', 'Sequential'): _Container,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', 'scalar'): _np_scalar,         # numpy scalars (e.g. init gains) from raw bytes
    ('numpy._core.multiarray', 'scalar'): _np_scalar,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('torch', 'Size'): torch.Size,
}


class _EDMUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        fn = _EDM_GLOBALS.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}: an EDM network pickle does not need it')
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('refusing a pickle with persistent ids (not an EDM network pickle)')


def _module_state(obj, prefix, out):
    """Flatten a tree of stand-ins into a state_dict: prefix.param / prefix.buffer names."""
    state = obj.state
    for name, t in list(state.get('_parameters', {}).items()) + list(state.get('_buffers', {}).items()):
        if t is not None and name not in state.get('_non_persistent_buffers_set', set()):
            out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    for name, child in state.get('_modules', {}).items():
        if child is None:
            continue
        if not isinstance(child, (_Persistent, _Container)):
            raise ValueError(f'EDM pickle: unexpected module {prefix + name} of type {type(child).__name__}')
        _module_state(child, prefix + name + '.', out)
    return out


def read_edm_pickle(path, key='ema'):
    """(NetConfig, state_dict) of the EDMPrecond stored under `key` in an NVIDIA EDM network pickle."""
    with open(path, 'rb') as f:
        try:
            data = _EDMUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f'{path}: {e}') from None
        except Exception as e:
            raise ValueError(f'{path} is not a readable EDM pickle ({type(e).__name__}: {str(e).splitlines()[0][:100]})') from None
    net = data.get(key) if isinstance(data, dict) else data
    if not isinstance(net, _Persistent) or net.class_name != 'EDMPrecond':
        found = getattr(net, 'class_name', type(net).__name__)
        raise ValueError(f'{path}: expected an EDMPrecond under {key!r}, found {found}')
    kw = dict(net.state.get('_init_kwargs', {}))
    args = list(net.state.get('_init_args', ()))
    for name in ('img_resolution', 'img_channels', 'label_dim')[:len(args)]:
        kw[name] = args.pop(0)
    for name in ('img_resolution', 'img_channels', 'label_dim', 'sigma_data'):     # also stored as attributes
        if name not in kw and name in net.state:
            kw[name] = net.state[name]
    model_type = kw.pop('model_type', 'DhariwalUNet')
    if model_type != 'DhariwalUNet':
        raise ValueError(f'{path}: model_type {model_type!r} is not supported (only DhariwalUNet, the ADM backbone)')
    if kw.pop('augment_dim', 0):
        raise ValueError(f'{path}: networks with an augmentation embedding (augment_dim > 0) are not supported')
    for unused in ('use_fp16', 'sigma_min', 'sigma_max', 'label_dropout', 'in_channels', 'out_channels'):
        kw.pop(unused, None)
    defaults = dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                    attn_resolutions=(32, 16, 8), dropout=0.10)       # DhariwalUNet's own defaults
    fields = {**defaults, **kw}
    unknown = set(fields) - set(NetConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f'{path}: unsupported EDMPrecond settings {sorted(unknown)}')
    fields = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in fields.items()}
    cfg = net_config_from_dict({**asdict(NetConfig()), **fields, 'sigma_data': float(fields.get('sigma_data', 0.5))})
    return cfg, _module_state(net, '', {})


def load_teacher(path, map_location='cpu') -> EDMPrecond:
    """The teacher denoiser D(x, sigma, labels), in eval mode, from either of
    - our checkpoint ({'kind': 'teacher', 'net': NetConfig dict, 'state_dict': ...}, weights_only=True), or
    - an NVIDIA EDM network pickle (.pkl, {'ema': EDMPrecond, ...}), read by the restricted unpickler above;
    the weights load with strict key and shape matching."""
    if is_pickle_file(path):
        cfg, state_dict = read_edm_pickle(path)
    else:
        ckpt = read_checkpoint(path, 'teacher', map_location)
        cfg, state_dict = net_config_from_dict(ckpt['net']), ckpt['state_dict']
    net = build_net(cfg)
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = ' '.join(line.strip() for line in str(e).splitlines()[1:2])[:300]
        raise ValueError(f'{path}: weights do not fit the recorded architecture ({detail})') from None
    return net.to(map_location).eval().requires_grad_(False)


def is_pickle_file(path):
    """A raw pickle starts with the PROTO opcode (0x80); torch.save files are zip archives ('PK')."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'no checkpoint at {path}')
    with open(path, 'rb') as f:
        return f.read(1) == b'\x80'


def teacher_checkpoint(net: EDMPrecond, **extra) -> dict:
    """A plain teacher checkpoint; tensors on the CPU, so a plain torch.load works on any machine."""
    return dict(kind='teacher', net=asdict(net.cfg), state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()}, **extra)


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


def main(argv=None):
    """Convert an NVIDIA EDM network pickle into our plain teacher checkpoint (weights_only-loadable)."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(description='Convert an EDM network pickle (.pkl) into a teacher checkpoint, '
                                             'without NVIDIA\'s code and without executing anything in the pickle.')
    ap.add_argument('pkl', help='EDM network pickle, e.g. edm-imagenet-64x64-cond-adm.pkl')
    ap.add_argument('out', help='output teacher checkpoint, e.g. edm-imagenet64-teacher.pt')
    args = ap.parse_args(argv)
    try:
        net = load_teacher(args.pkl)
        tmp = args.out + '.tmp'
        torch.save(teacher_checkpoint(net, source=os.path.basename(args.pkl)), tmp)
        os.replace(tmp, args.out)
    except (ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'wrote {args.out}: {count_params(net) / 1e6:.1f}M parameters, {net.cfg}')


if __name__ == '__main__':
    main()
