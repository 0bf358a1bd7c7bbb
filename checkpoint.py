"""Checkpoint files: read safely whatever a file holds, write atomically.

- `read_checkpoint` opens our checkpoints (train.py's teacher, student, msd and resumable states): plain
  dicts of state_dicts and config that torch.load(weights_only=True) reads, after checking the archive
  names nothing else. `net_config_from_dict` and `check_weights` refuse settings and weights that do not
  make the recorded network, before anything of its size is allocated.
- `load_teacher` also reads NVIDIA's EDM network pickles (e.g. edm-imagenet-64x64-cond-adm.pkl) without
  NVIDIA's code and without executing anything stored in them (a restricted unpickler, `read_edm_pickle`).
- `atomic_save`: a crash or a full disk never leaves a half-written file.
- `save_state` / `load_state` / `restore`: train.py's resumable states (weights, optimisers, every rank's RNG).
- `one_line_errors`: bad input to a command ends in one line, not a traceback.

Run:  python checkpoint.py edm-imagenet-64x64-cond-adm.pkl edm-imagenet64-teacher.pt     (convert a pickle)
"""
import collections
import contextlib
import io
import math
import os
import pickle
import pickletools
import sys
import zipfile
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from teacher import EDMPrecond, NetConfig, UNetBlock, build_net, count_params

# ----------------------------------------------------------------------------------------------
# Reading files. Whatever a file holds, reading it runs no code and ends in either a network or a
# ValueError with a one-line message, and nothing is allocated that the file's own bytes do not
# pay for: settings are checked against sane bounds, the network is first built on the meta device
# (shapes only), and the weights must match it before the real one is built.

LIMITS = dict(img_resolution=(1, 256), img_channels=(1, 4), label_dim=(0, 10000), model_channels=(4, 2048),
              channel_mult_emb=(1, 16), num_blocks=(0, 16), channels_per_head=(1, 2048))   # (min, max)
MAX_ATTENTION_RESOLUTION = 64       # attention costs (H W)^2 per head and image


def _clip(x, n=60):
    """A value read from a file, safe to put in a one-line message."""
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10 ** 18:
        return 'a huge integer'
    return repr(x)[:n] if isinstance(x, (str, bytes, int, float, bool, type(None))) else f'a {type(x).__name__}'


def _global(module, name):
    return f'{_clip(module)[1:-1]}.{_clip(name)[1:-1]}'


def _names(xs, n=3):
    return ', '.join(map(_clip, xs[:n])) + (f' and {len(xs) - n} more' if len(xs) > n else '')


def reason(e):
    """An exception as one short line; torch's weights_only refusal is cut down to its reason."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].startswith('Weights only load failed'):
        lines = [line.split('WeightsUnpickler error:')[-1].split(' Please use')[0].strip() for line in lines[1:]
                 if not line.startswith(('(1)', '(2)', 'Check the documentation'))]
        lines = [line for line in lines if line]
    return f'{type(e).__name__}: {lines[0][:200]}' if lines else type(e).__name__


@contextlib.contextmanager
def one_line_errors(errors=(ValueError, OSError)):
    """A command's bad input ends in one line on stderr and exit status 2, a FloatingPointError (a non-finite
    training loss) in exit status 3 (MSD_DEBUG=1: the traceback)."""
    try:
        yield
    except errors as e:
        if os.environ.get('MSD_DEBUG'):
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(3 if isinstance(e, FloatingPointError) else 2)


def net_config_from_dict(d, where='network settings') -> NetConfig:
    """NetConfig from saved settings (missing ones take NetConfig's defaults), refused with a ValueError
    unless every value has the right type and lies within LIMITS."""
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        raise ValueError(f'{where}: network settings are {_clip(d)}, not a dict of names')
    unknown = [k for k in d if k not in NetConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f'{where}: unknown network settings {_names(unknown)}')
    d = {**asdict(NetConfig()), **d}

    def integer(name, v, lo, hi):
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f'{where}: {name} must be an integer in {lo}..{hi}, got {_clip(v)}')

    for name, (lo, hi) in LIMITS.items():
        integer(name, d[name], lo, hi)
    for name, fewest, lo, hi in (('channel_mult', 1, 1, 16), ('attn_resolutions', 0, 1, MAX_ATTENTION_RESOLUTION)):
        v = d[name]
        if not isinstance(v, (list, tuple)) or not fewest <= len(v) <= 8:
            got = f'{len(v)} entries' if isinstance(v, (list, tuple)) else _clip(v)
            raise ValueError(f'{where}: {name} must be a list of {fewest} to 8 integers, got {got}')
        for i, x in enumerate(v):
            integer(f'{name}[{i}]', x, lo, hi)
        d[name] = tuple(v)
    for name, lo, hi in (('dropout', 0, 1), ('sigma_data', 1e-3, 100)):
        if type(d[name]) not in (int, float) or not lo <= d[name] <= hi:
            raise ValueError(f'{where}: {name} must be a number in [{lo}, {hi}], got {_clip(d[name])}')
        d[name] = float(d[name])
    if d['model_channels'] % 2:
        raise ValueError(f'{where}: model_channels must be even (the noise embedding is [cos, sin]), got {d["model_channels"]}')
    levels = len(d['channel_mult'])
    if d['img_resolution'] % 2 ** (levels - 1) or d['img_resolution'] >> (levels - 1) > MAX_ATTENTION_RESOLUTION:
        raise ValueError(f'{where}: img_resolution {d["img_resolution"]} does not suit {levels} levels (it must halve '
                         f'exactly at each, down to at most {MAX_ATTENTION_RESOLUTION}, where there is attention)')
    return NetConfig(**d)


def check_weights(cfg: NetConfig, state_dict, where, prefix=''):
    """Refuse weights that do not fit `cfg`, before anything of the network's size is allocated.

    The network is built on the meta device (shapes only, no memory); every tensor it expects must be
    in `state_dict` (keys with `prefix`), float, of its shape, finite, and together no larger than the
    storage they live in (a tensor of stride 0 costs the file one number, but a full-size parameter
    in memory)."""
    try:
        with torch.device('meta'):  # label embedding added apart: its normal_ init on meta imports torch._dynamo
            net = build_net(replace(cfg, label_dim=0))
            if cfg.label_dim:
                net.model.map_label = nn.Linear(cfg.label_dim, cfg.model_channels * cfg.channel_mult_emb, bias=False)
    except Exception as e:       # e.g. GroupNorm groups that do not divide the channels
        raise ValueError(f'{where}: the recorded settings do not make a network ({reason(e)})') from None
    odd = [m.out_channels for m in net.modules()
           if isinstance(m, UNetBlock) and m.num_heads and m.out_channels % m.num_heads]
    if odd:
        raise ValueError(f'{where}: {odd[0]} channels do not split into attention heads of {cfg.channels_per_head}')
    if not isinstance(state_dict, dict):
        raise ValueError(f'{where}: the weights are {_clip(state_dict)}, not a dict of tensors')
    expected = {prefix + k: t for k, t in net.state_dict().items()}
    missing, unexpected = [k for k in expected if k not in state_dict], [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f'{where}: weights do not fit the recorded architecture (missing {_names(missing) or "none"}; '
                         f'unexpected {_names(unexpected) or "none"})')
    storages, nbytes = {}, 0
    for k, e in expected.items():
        t = state_dict[k]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or not t.is_floating_point():
            what = f'a {t.dtype} {t.layout} tensor' if isinstance(t, torch.Tensor) else _clip(t)
            raise ValueError(f'{where}: {k} is {what}, not float weights')
        if t.shape != e.shape:
            raise ValueError(f'{where}: weights do not fit the recorded architecture ({k} is {tuple(t.shape)}, '
                             f'expected {tuple(e.shape)})')
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        nbytes += t.numel() * t.element_size()
    if nbytes > sum(storages.values()):
        raise ValueError(f'{where}: the weights claim {nbytes} bytes but the file holds {sum(storages.values())}')
    for k in expected:
        if not torch.isfinite(state_dict[k]).all():
            raise ValueError(f'{where}: {k} holds NaN or infinite values')


_PT_GLOBALS = {'collections OrderedDict', 'torch._utils _rebuild_tensor_v2', 'torch._utils _rebuild_parameter'} | \
    {f'torch {t}Storage' for t in ('Float', 'Double', 'Half', 'BFloat16', 'Long', 'Int', 'Short', 'Char', 'Byte', 'Bool')}


def _check_archive(path):
    """What torch.save writes: a zip archive of stored records whose pickle names only tensors and plain
    data. Refused before torch.load opens it: compressed records (their inflated size is not bounded by
    the file), a zip behind other bytes (torch would read those), and any other global (torch's own
    weights_only allow-list is broader than our checkpoints need)."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        if f.read(4) != b'PK\x03\x04':
            raise ValueError('not a zip archive')
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if any(i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size for i in infos) \
                or sum(i.file_size for i in infos) > size:
            raise ValueError('compressed records (torch.save stores them uncompressed)')
        for i in infos:
            if i.filename.endswith('data.pkl'):
                for op, arg, _ in pickletools.genops(z.read(i)):
                    other = op.name in ('STACK_GLOBAL', 'INST', 'OBJ', 'EXT1', 'EXT2', 'EXT4')
                    if other or op.name == 'GLOBAL' and arg not in _PT_GLOBALS:
                        what = _clip(arg or op.name)[1:-1].replace(' ', '.')
                        raise pickle.UnpicklingError(f'refusing {what}: not a tensor or plain data')


def read_checkpoint(path, kind, map_location='cpu'):
    """torch.load(weights_only=True) of one of our checkpoints, checked to be of the given kind(s)
    (None: any dict). Anything unreadable or of another kind is a ValueError with a one-line message."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'no checkpoint at {path}')
    try:
        _check_archive(path)
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f'{path} is not a readable checkpoint ({reason(e)})') from None
    kinds = (kind,) if isinstance(kind, (str, type(None))) else tuple(kind)
    found = ckpt.get('kind') if isinstance(ckpt, dict) else ckpt
    if not isinstance(ckpt, dict) or kind is not None and not (isinstance(found, str) and found in kinds):
        what = _clip(found) if isinstance(found, (str, type(None))) else repr(type(found).__name__)
        raise ValueError(f'{path} holds a {what} checkpoint, expected {" or ".join(map(repr, kinds))}')
    return ckpt


# ----------------------------------------------------------------------------------------------
# NVIDIA's EDM network pickles, read without NVIDIA's code and without running anything in the file.
#
# EDM saves {'ema': EDMPrecond, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': ...} with
# pickle; its torch_utils.persistence turns every network object into a call
# _reconstruct_persistent_obj(meta) whose meta holds the class's *source code* (module_src), its
# name and its state (the nn.Module __dict__: _parameters, _buffers, _modules, _init_kwargs, ...).
# Plain unpickling executes that source. Here find_class() hands out only our own functions and
# inert stand-ins (_EDM_GLOBALS), each checking its arguments; BUILD (which calls __setstate__) can
# alter only containers and dtype stand-ins. The network is then built from our code, checked
# against the weights on the meta device first (check_weights), and the weights copied in.

class _Inert:
    """A stand-in that BUILD must not alter (Tensor.__setstate__, for one, would call set_)."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f'refusing to change a {type(self).__name__.strip("_").lower()} after it is made')


class _Persistent(_Inert):
    """What a persistent EDM object becomes here: its class name and state, no code."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state


def _persistent(meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('class_name'), str) \
            or not isinstance(meta.get('state') or {}, dict):
        raise pickle.UnpicklingError('unexpected persistent-object record in EDM pickle')
    return _Persistent(meta['class_name'], meta.get('state') or {})


class _Container:
    """Stand-in for a pickled torch.nn container (ModuleDict, ModuleList, Sequential): keeps its state."""
    state = None

    def __setstate__(self, state):
        self.state = state


class _EasyDict(dict):
    """Stand-in for dnnlib.EasyDict (a dict)."""


class _Storage(_Inert):
    def __init__(self, flat):
        self.flat = flat                    # a 1-D tensor, exactly as long as the bytes read


class _Tensor(_Inert):
    def __init__(self, t):
        self.t = t


_STORAGE_DTYPES = {'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
                   'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
                   'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
                   'BoolStorage': torch.bool, 'UntypedStorage': torch.uint8}


class _StorageUnpickler(pickle.Unpickler):
    """The small pickles of torch's legacy format: plain data, a storage class, one persistent id."""

    def find_class(self, module, name):
        if module in ('torch', 'torch.storage') and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f'refusing to load {_global(module, name)} inside a storage')

    def persistent_load(self, pid):
        return pid


def _storage_from_bytes(b):
    """torch.storage._load_from_bytes(b), read here instead of by a nested torch.load. b is torch's
    legacy format: pickles of the magic number, the protocol version, system info, the storage (a
    persistent id: 'storage', dtype, key, location, element count, ...) and its key list; then the
    element count as int64 and the raw little-endian bytes."""
    f = io.BytesIO(b if isinstance(b, bytes) else b'')
    try:
        magic, version, info, pid, keys = (_StorageUnpickler(f).load() for _ in range(5))
        count = int.from_bytes(f.read(8), 'little')
        if magic != 0x1950a86a20f9469cfc6c or version != 1001 or not isinstance(info, dict) \
                or not info.get('little_endian') or not isinstance(pid, tuple) or len(pid) < 5 \
                or pid[0] != 'storage' or not isinstance(pid[1], torch.dtype) or keys != [pid[2]] or pid[4] != count:
            raise ValueError('unexpected header')
    except Exception as e:
        raise pickle.UnpicklingError(f"a storage that is not in torch's legacy format ({reason(e)})") from None
    data = f.read(count * pid[1].itemsize)
    if len(data) != count * pid[1].itemsize:
        raise pickle.UnpicklingError(f'a storage of {count} elements holds {len(data)} bytes')
    return _Storage(torch.frombuffer(bytearray(data), dtype=pid[1]) if count else torch.empty(0, dtype=pid[1]))


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2, for a view that lies inside its storage and is no larger."""
    if not isinstance(storage, _Storage) or not isinstance(size, tuple) or not isinstance(stride, tuple) \
            or len(size) != len(stride) or len(size) > 8 \
            or not all(type(v) is int and v >= 0 for v in (offset, *size, *stride)):
        raise pickle.UnpicklingError('a tensor with malformed size, stride or offset')
    n, numel = len(storage.flat), math.prod(size)
    if numel > n or numel and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= n:
        raise pickle.UnpicklingError(f'a tensor of {numel} elements runs past its storage of {n}')
    return _Tensor(storage.flat.as_strided(size, stride, offset))


def _rebuild_parameter(data, *_):
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError('a parameter that is not a tensor')
    return data


_NP_NUMBERS = ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8')


class _NpDtype:
    """numpy.dtype(name, align, copy), for plain numbers only. BUILD's state is read for the byte order
    alone: numpy's own dtype.__setstate__ trusts the file's fields, offsets and flags (memory unsafe)."""

    def __init__(self, name, *_):
        if name not in _NP_NUMBERS:
            raise pickle.UnpicklingError(f'refusing numpy dtype {_clip(name)}: only plain numbers')
        self.dtype = np.dtype(name)

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else '|'
        if order not in ('<', '>', '=', '|'):
            raise pickle.UnpicklingError('a numpy dtype with a malformed byte order')
        self.dtype = self.dtype.newbyteorder(order)


def _np_scalar(dtype, data):
    """A numpy scalar (e.g. an init gain) from its raw bytes, as a Python number."""
    if not isinstance(dtype, _NpDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError('a malformed numpy scalar')
    return np.frombuffer(data, dtype=dtype.dtype)[0].item()


_EDM_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _storage_from_bytes,
    ('dnnlib.util', 'EasyDict'): _EasyDict,
    ('torch.nn.modules.container', 'ModuleDict'): _Container,
    ('torch.nn.modules.container', 'ModuleList'): _Container,
    ('torch.nn.modules.container', 'Sequential'): _Container,
    ('numpy', 'dtype'): _NpDtype,
    ('numpy.core.multiarray', 'scalar'): _np_scalar,
    ('numpy._core.multiarray', 'scalar'): _np_scalar,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('torch', 'Size'): torch.Size,
    **{('torch', name): getattr(torch, name) for name in ('float16', 'float32', 'float64', 'bfloat16', 'half', 'float',
                                                          'double', 'uint8', 'int8', 'int16', 'int32', 'int64', 'bool')},
}


class _EDMUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        fn = _EDM_GLOBALS.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f'refusing to load {_global(module, name)}: an EDM network pickle does not need it')
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('refusing a pickle with persistent ids (not an EDM network pickle)')


def _module_state(root):
    """Flatten the tree of stand-ins into a state_dict (prefix.param / prefix.buffer names). Each module
    is visited once and the tree is at most 32 levels deep, so shared or cyclic references are refused
    instead of being walked exponentially often (a "billion laughs") or forever."""
    out, seen, todo = {}, set(), [('', root)]
    while todo:
        prefix, obj = todo.pop()
        here = _clip(prefix[:-1] or 'EDMPrecond')
        if id(obj) in seen:
            raise ValueError(f'module {here} appears twice in the module tree')
        if prefix.count('.') > 32:
            raise ValueError(f'module {here} lies more than 32 levels deep')
        seen.add(id(obj))
        state = obj.state if isinstance(obj.state, dict) else {'_modules': None}          # None: malformed
        tables = [state.get(k, {}) for k in ('_parameters', '_buffers', '_modules')]
        skip = state.get('_non_persistent_buffers_set', set())
        if not all(isinstance(t, dict) and all(isinstance(k, str) and len(k) <= 100 for k in t) for t in tables) \
                or not isinstance(skip, (set, frozenset)):
            raise ValueError(f'module {here} has a malformed state')
        params, buffers, modules = tables
        for name, t in list(params.items()) + list(buffers.items()):
            if t is not None and name not in skip:
                if not isinstance(t, _Tensor):
                    raise ValueError(f'{_clip(prefix + name)} is {_clip(t)}, not a tensor')
                out[prefix + name] = t.t
        for name, child in modules.items():
            if child is not None:
                if not isinstance(child, (_Persistent, _Container)):
                    raise ValueError(f'unexpected module {_clip(prefix + name)}, {_clip(child)}')
                todo.append((prefix + name + '.', child))
    return out


def read_edm_pickle(path, key='ema'):
    """(NetConfig, state_dict) of the EDMPrecond stored under `key` in an NVIDIA EDM network pickle."""
    with open(path, 'rb') as f:
        try:
            data = _EDMUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f'{path}: {e}') from None
        except Exception as e:
            raise ValueError(f'{path} is not a readable EDM pickle ({reason(e)})') from None
    net = data.get(key) if isinstance(data, dict) else data
    if not isinstance(net, _Persistent) or net.class_name != 'EDMPrecond':
        found = net.class_name if isinstance(net, _Persistent) else net
        raise ValueError(f'{path}: expected an EDMPrecond under {key!r}, found {_clip(found)}')
    kw, args = net.state.get('_init_kwargs', {}), net.state.get('_init_args', ())
    if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw) \
            or not isinstance(args, (list, tuple)) or len(args) > 3:
        raise ValueError(f'{path}: the EDMPrecond settings (_init_args, _init_kwargs) are malformed')
    kw = {**kw, **dict(zip(('img_resolution', 'img_channels', 'label_dim'), args))}
    for name in ('img_resolution', 'img_channels', 'label_dim', 'sigma_data'):     # also stored as attributes
        if name not in kw and name in net.state:
            kw[name] = net.state[name]
    model_type = kw.pop('model_type', 'DhariwalUNet')
    if model_type != 'DhariwalUNet':
        raise ValueError(f'{path}: model_type {_clip(model_type)} is not supported (only DhariwalUNet, the ADM backbone)')
    if kw.pop('augment_dim', 0):
        raise ValueError(f'{path}: networks with an augmentation embedding (augment_dim > 0) are not supported')
    for unused in ('use_fp16', 'sigma_min', 'sigma_max', 'label_dropout', 'in_channels', 'out_channels'):
        kw.pop(unused, None)
    defaults = dict(model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                    attn_resolutions=(32, 16, 8), dropout=0.10, channels_per_head=64)       # DhariwalUNet's own
    cfg = net_config_from_dict({**defaults, **kw}, path)
    try:
        return cfg, _module_state(net)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None


def check_fits(cfg: NetConfig, data, path):
    """Refuse a network that is not for the data's (an ImageData's) classes and image shape (C, H, W)."""
    want = (cfg.img_channels, cfg.img_resolution, cfg.img_resolution)
    if (cfg.label_dim, want) != (data.num_classes, tuple(data.shape)):
        raise ValueError(f'{path} is for {cfg.label_dim} classes of {want} images, '
                         f'the data has {data.num_classes} classes of {tuple(data.shape)}')


def load_teacher(path, map_location='cpu', data=None) -> EDMPrecond:
    """The teacher denoiser D(x, sigma, labels), in eval mode, from either of
    - our checkpoint ({'kind': 'teacher', 'net': NetConfig dict, 'state_dict': ...}, weights_only=True), or
    - an NVIDIA EDM network pickle (.pkl, {'ema': EDMPrecond, ...}), read by the restricted unpickler above;
    the weights load with strict key and shape matching. Given `data`, a teacher for other data is refused."""
    if is_pickle_file(path):
        cfg, state_dict = read_edm_pickle(path)
    else:
        ckpt = read_checkpoint(path, 'teacher')
        cfg, state_dict = net_config_from_dict(ckpt.get('net'), path), ckpt.get('state_dict')
    check_weights(cfg, state_dict, path)
    if data is not None:
        check_fits(cfg, data, f'teacher {path}')
    net = build_net(cfg)
    net.load_state_dict(state_dict)
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


def atomic_save(obj, path):
    """Write to a temporary file, fsync, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:                  # e.g. a full disk: keep the previous file
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f'could not save {path} ({e}); the previous file is kept') from None


# ---- Resumable training state (train.py's ckpt/, kind 'state'): the state_dicts of its parts (networks,
# optimisers, schedulers) and every rank's RNG states, so a resumed run draws the numbers an uninterrupted one would.

def load_state(path):
    """A resumable state saved by train.py (kind 'state'), or None if there is none."""
    return read_checkpoint(path, 'state') if os.path.exists(path) else None


def save_state(path, parts, gen, group, n, leader, **info):
    """Gather the RNG states (global, the data generator `gen`, CUDA) of the group's n ranks in rank order;
    the leader writes them with the state_dicts of `parts` and `info`."""
    rng = dict(torch=torch.get_rng_state(), data=gen.get_state(),
               cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8))
    rngs = [rng] * n
    if n > 1:
        dist.all_gather_object(rngs, rng, group=group)
    if leader:
        atomic_save(dict(kind='state', **{name: p.state_dict() for name, p in parts.items()}, rng=rngs, **info), path)


def restore(path, state, parts, gen=None, rank=0, rank0_if_new=False):
    """Load `parts` from a saved state and, given `gen`, the RNG states saved by the group's rank `rank`
    (rank0_if_new: rank 0's for a rank the saved run did not have); returns the saved step."""
    try:
        for name, p in parts.items():
            p.load_state_dict(state[name])
            # Optimizer.load_state_dict leaves the moments' shapes unchecked (a fused step would fail).
            if isinstance(p, torch.optim.Optimizer) and any(torch.is_tensor(v) and v.ndim and v.shape != q.shape
                                                            for q, s in p.state.items() for v in s.values()):
                raise ValueError('optimizer state of other shapes than the parameters')
        if gen is None:
            return 0
        rng = state['rng'][0 if rank0_if_new and rank >= len(state['rng']) else rank]
        torch.set_rng_state(rng['torch'])
        gen.set_state(rng['data'])
        if torch.cuda.is_available() and rng['cuda'].numel():
            torch.cuda.set_rng_state(rng['cuda'])
        return int(state['step'])
    except (KeyError, IndexError, AttributeError, TypeError, ValueError, RuntimeError) as e:    # a state of another run
        raise ValueError(f'{path} does not fit this run ({reason(e)})') from None


def main(argv=None):
    """Convert an NVIDIA EDM network pickle into our plain teacher checkpoint (weights_only-loadable)."""
    import argparse
    ap = argparse.ArgumentParser(description='Convert an EDM network pickle (.pkl) into a teacher checkpoint, '
                                             'without NVIDIA\'s code and without executing anything in the pickle.')
    ap.add_argument('pkl', help='EDM network pickle, e.g. edm-imagenet-64x64-cond-adm.pkl')
    ap.add_argument('out', help='output teacher checkpoint, e.g. edm-imagenet64-teacher.pt')
    args = ap.parse_args(argv)
    with one_line_errors():
        net = load_teacher(args.pkl)
        atomic_save(teacher_checkpoint(net, source=os.path.basename(args.pkl)), args.out)
    print(f'wrote {args.out}: {count_params(net) / 1e6:.1f}M parameters, {net.cfg}')


if __name__ == '__main__':
    main()
