"""Datasets: class-labelled images for the teacher's EDM loss, the ADM critic's real images and FID.

Two layouts are read: Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist puts them in
FASHION_DIR), and EDM's dataset_tool layout, a folder or zip of PNGs with dataset.json
{"labels": [[relative_path, class], ...]} (how EDM and MSD store ImageNet-64, MSD sec. 4). MSD routes
every image by its class, so a dataset without labels is refused.

    python -c "import data; d = data.load_data(); print(len(d), d.shape, d.num_classes)"
"""
import gzip
import io
import json
import os
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image

FASHION_DIR = '/usr/share/datasets/fashion-mnist'


class ImageData:
    """Images as uint8 [N, C, H, W] (in memory) or read lazily from an EDM folder/zip; labels [N].
    `path` names the files they came from (the key of cached FID reference features; None: unnamed)."""

    def __init__(self, labels, num_classes, shape, images=None, reader=None, names=None, path=None):
        self.labels, self.num_classes, self.shape, self.path = labels, num_classes, shape, path
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


def read_idx(path):
    """An IDX file of unsigned bytes (gzipped or not) as a uint8 tensor of its stated shape."""
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


def idx_file(folder, stem):
    """folder/stem or folder/stem.gz, whichever exists."""
    for name in (stem, stem + '.gz'):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f'{folder} has neither {stem}[.gz] nor dataset.json')


def read_idx_pair(folder, split='train'):
    """Fashion-MNIST's images [N, 1, 28, 28] and labels [N] of one split ('train' or 't10k')."""
    try:
        images = read_idx(idx_file(folder, f'{split}-images-idx3-ubyte'))[:, None]
        labels = read_idx(idx_file(folder, f'{split}-labels-idx1-ubyte')).long()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f'{folder}: corrupt data file ({type(e).__name__}: {e})') from None
    if len(images) != len(labels):
        raise ValueError(f'{folder}: {len(images)} images but {len(labels)} labels')
    return images, labels


def load_data(path='') -> ImageData:
    """The training set at `path` (default FASHION_DIR): an IDX folder, or an EDM folder or zip."""
    path = path or FASHION_DIR
    if not os.path.exists(path):
        hint = ' (install it: apt-get install dataset-fashion-mnist, or run `make setup`)' if path == FASHION_DIR else ''
        raise FileNotFoundError(f'data not found at {path}{hint}')
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, 'dataset.json')):
        images, labels = read_idx_pair(path)
        return ImageData(labels, int(labels.max()) + 1, tuple(images.shape[1:]), images=images, path=path)
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
    return ImageData(labels, int(labels.max()) + 1, tuple(first.shape), reader=reader, names=names, path=path)
