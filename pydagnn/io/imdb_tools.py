"""Tools over imdb files: colour statistics, conversion, repacking, a synthetic data set.

:class:`RgbStats` streams the per-channel mean and covariance that ``meta.rgbMean`` and
``meta.rgbCovariance`` hold; :func:`convert_imagenet64` turns downsampled-ImageNet batches
into an imdb.mat; :func:`repack_imdb` copies any imdb.mat (e.g. MATLAB's own,
gzip-chunked) into the fast v7.3 layout; :func:`synth_imdb` writes a small learnable imdb.
They read through :mod:`pydagnn.io.imdb_read` and write through :mod:`pydagnn.io.imdb_write`.
"""
import glob
import math
import os
import re

import numpy as np

from .batch_pickle import load_batch_pickle
from .errors import MatFileError
from .imdb_read import load_imdb
from .imdb_write import DEFAULT_SETS, ImdbWriter, save_imdb

__all__ = ['RgbStats', 'convert_imagenet64', 'repack_imdb', 'read_class_list', 'synth_imdb']


# ---------------------------------------------------------------------------------------
#                                                                         colour statistics
# ---------------------------------------------------------------------------------------

class RgbStats:
    """Streaming per-channel mean and covariance over all pixels of uint8 images.

    Sums are exact integers (each block's cross products are formed in float64, exact for
    uint8 values, then accumulated as int64), so the result does not depend on the chunking.
    ``mean()`` is ``C``, ``covariance()`` is ``C x C`` (population: divided by the number of
    pixels), both in 0..255 units, as MatConvNet's ``getImageStats`` computes them.
    """

    def __init__(self, num_channels=3):
        self.c = num_channels
        self.count = 0
        self.s = np.zeros(num_channels, np.int64)
        self.ss = np.zeros((num_channels, num_channels), np.int64)

    def update(self, images, block=256):
        """Add ``H x W x C x k`` uint8 images (any memory order)."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        x = images.T                     # k x C x W x H
        k, c = x.shape[:2]
        if c != self.c:
            raise ValueError(f'RgbStats: expected {self.c} channels, got {c}')
        for a in range(0, k, block):
            y = np.ascontiguousarray(x[a:a + block]).reshape(min(block, k - a), c, -1)
            self.s += y.sum(axis=(0, 2), dtype=np.int64)
            yf = y.astype(np.float64)
            g = np.matmul(yf, yf.transpose(0, 2, 1)).sum(axis=0)
            self.ss += np.rint(g).astype(np.int64)
            self.count += y.shape[0] * y.shape[2]

    def mean(self):
        if not self.count:
            return np.zeros(self.c)
        return self.s / self.count

    def covariance(self):
        if not self.count:
            return np.zeros((self.c, self.c))
        n = self.count
        out = np.empty((self.c, self.c))
        s = [int(v) for v in self.s]
        for i in range(self.c):
            for j in range(self.c):
                out[i, j] = (n * int(self.ss[i, j]) - s[i] * s[j]) / (n * n)
        return out

    def meta(self):
        """``{'rgbMean': C x 1, 'rgbCovariance': C x C}`` for an imdb's meta."""
        return {'rgbMean': self.mean().reshape(-1, 1), 'rgbCovariance': self.covariance()}


# ---------------------------------------------------------------------------------------
#                                                 downsampled ImageNet (64x64) conversion
# ---------------------------------------------------------------------------------------

def _batch_files(src):
    def num(p):
        m = re.search(r'(\d+)(\.\w+)?$', os.path.basename(p))
        return int(m.group(1)) if m else 0
    train = [p for p in glob.glob(os.path.join(src, 'train_data_batch_*')) if os.path.isfile(p)]
    train.sort(key=num)
    val = [p for p in glob.glob(os.path.join(src, 'val_data*')) if os.path.isfile(p)]
    return [(p, 1) for p in train] + [(p, 2) for p in sorted(val)[:1]]


def _read_batch(path):
    """A downsampled-ImageNet batch: ``(data k x 3*S*S uint8, labels k)``. Pickles are
    read by :func:`~pydagnn.io.batch_pickle.load_batch_pickle`, which runs no code from
    the file; ``labels`` must be a flat list of ints or an integer array."""
    if path.endswith('.npz'):
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {'data': z['data'], 'labels': z['labels']}
        except Exception as e:
            raise MatFileError(path, None, f'cannot read as a downsampled-ImageNet batch: '
                               f'{type(e).__name__}: {e}') from None
    else:
        d = load_batch_pickle(path)
    if not isinstance(d, dict) or 'data' not in d or 'labels' not in d:
        raise MatFileError(path, None, "expected a dict with 'data' and 'labels'")
    data, labels = d['data'], d['labels']
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        found = f'{data.dtype} {data.shape}' if isinstance(data, np.ndarray) else type(data).__name__
        raise MatFileError(path, 'data', f'must be a k x 3*S*S uint8 array, got {found}')
    # a list is walked flat: nested lists sharing one another would expand exponentially
    if isinstance(labels, list) and all(type(x) is int for x in labels):
        labels = np.array(labels, dtype=np.int64)
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in 'iu':
        raise MatFileError(path, 'labels', 'must be a list of ints or an integer array')
    labels = labels.ravel()
    if labels.shape[0] != data.shape[0]:
        raise MatFileError(path, 'labels', f'{data.shape[0]} images but {labels.shape[0]} labels')
    side = math.isqrt(data.shape[1] // 3)
    if 3 * side * side != data.shape[1]:
        raise MatFileError(path, 'data', f'rows of {data.shape[1]} values are not 3 square colour planes')
    return data, labels


def _batch_count(path):
    if path.endswith('.npz'):
        with np.load(path, mmap_mode='r') as z:
            return int(z['labels'].shape[0]), None
    data, labels = _read_batch(path)
    return data.shape[0], (data, labels)


def _planes_to_matlab(data, side):
    """Rows of 3 row-major planes (R, G, B) -> ``S x S x 3 x k`` MATLAB-order view (upright:
    the original script's ``reshape`` to ``[col row channel n]`` then ``permute [2 1 3 4]``)."""
    return data.reshape(data.shape[0], 3, side, side).transpose(2, 3, 1, 0)


def read_class_list(path):
    """Class names from a class list such as ImageNet's ``map_clsloc.txt`` (lines
    ``n02119789 1 kit_fox``: WordNet id, 1-based label, name; downsampled ImageNet's labels
    follow it) as ``meta.classes`` the way MatConvNet stores it: ``{'name': [wnid per
    label], 'description': [name per label]}`` (underscores read as spaces). Raises
    ValueError naming the file and line for anything else."""
    path = os.fspath(path)
    rows = {}
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 3 or not parts[1].isdigit():
                raise ValueError(f'{path}, line {n}: expected "WNID LABEL NAME", got {line.strip()!r}')
            label = int(parts[1])
            if label in rows:
                raise ValueError(f'{path}, line {n}: label {label} listed twice')
            rows[label] = (parts[0], ' '.join(parts[2:]).replace('_', ' '))
    if not rows:
        raise ValueError(f'{path}: no classes')
    if sorted(rows) != list(range(1, len(rows) + 1)):
        missing = sorted(set(range(1, max(rows) + 1)) - set(rows))
        why = f'label {missing[0]} is missing' if missing else 'a label is below 1'
        raise ValueError(f'{path}: labels must run 1..{len(rows)}; {why}')
    labels = sorted(rows)
    return {'name': [rows[i][0] for i in labels], 'description': [rows[i][1] for i in labels]}


def convert_imagenet64(src, out, layout='contiguous', chunk=4096, log=None, progress=None,
                       classes=None):
    """Convert downsampled-ImageNet batches (``train_data_batch_1..10``, ``val_data``: pickled
    dicts, or ``.npz``) in directory ``src`` into an imdb.mat (v7.3) at ``out``.

    Train images get set 1, val images set 2; labels stay 1..1000. ``meta.rgbMean`` (3 x 1)
    and ``meta.rgbCovariance`` (3 x 3) are computed over all train pixels (0..255 units,
    exact streaming sums). One batch file is in memory at a time (files are read twice:
    once to count, once to write; the last one counted is reused). ``progress(done,
    total)``, when given, is called after each chunk with the images written so far."""
    src = os.fspath(src)
    files = _batch_files(src)
    if not files:
        raise FileNotFoundError(f'{src}: no train_data_batch_* or val_data files')
    if not any(s == 1 for _, s in files):
        raise FileNotFoundError(f'{src}: no train_data_batch_* files')
    log = log or (lambda msg: None)
    counts = {}
    cached = loaded = None
    for p, _ in reversed(files):          # the first file is counted last and reused
        cached = loaded = None
        counts[p], loaded = _batch_count(p)
        if loaded is not None:
            cached = (p, loaded)
    loaded = None
    total = sum(counts.values())
    first = cached[1] if cached else _read_batch(files[0][0])
    side = math.isqrt(first[0].shape[1] // 3)
    log(f'{len(files)} files, {total} images of {side}x{side}')
    stats = RgbStats(3)
    done = 0
    with ImdbWriter(out, total, image_size=(side, side), layout=layout) as w:
        for p, setv in files:
            if cached is not None and cached[0] == p:
                data, labels = cached[1]
                cached = None
            else:
                data, labels = _read_batch(p)
            if data.shape[0] != counts[p]:
                raise ValueError(f'{p}: changed while converting')
            if data.shape[1] != 3 * side * side:
                raise ValueError(f'{p}: images of {data.shape[1]} values, '
                                 f'expected {3 * side * side}')
            for a in range(0, data.shape[0], chunk):
                imgs = _planes_to_matlab(data[a:a + chunk], side)
                if setv == 1:
                    stats.update(imgs)
                w.append(imgs, labels[a:a + chunk], setv)
                done += imgs.shape[3]
                if progress is not None:
                    progress(done, total)
            log(f'{os.path.basename(p)}: {data.shape[0]} images (set {setv})')
            del data, labels
        w.meta.update(stats.meta())
        if classes is not None:
            w.meta['classes'] = classes
    return out


def repack_imdb(src, out, layout='contiguous', chunk=4096, progress=None, classes=None):
    """Copy an imdb.mat (e.g. MATLAB's own, gzip-chunked) into the fast v7.3 layout,
    streaming ``chunk`` images at a time. Other meta fields are kept. ``progress(done,
    total)`` as for :func:`convert_imagenet64`."""
    with load_imdb(src) as imdb:
        images = imdb.images
        extra = {k: v for k, v in imdb.meta.items() if k not in ('rgbMean',)}
        meta = dict(extra)
        if 'rgbMean' in imdb.meta:
            meta['rgbMean'] = np.asarray(imdb.meta.rgbMean).reshape(-1, 1)
        if classes is not None:
            meta['classes'] = classes
        save_imdb(out, images.data, images.labels, images.set, meta, layout=layout, chunk=chunk,
                  progress=progress)
    return out


# ---------------------------------------------------------------------------------------
#                                                              a small learnable data set
# ---------------------------------------------------------------------------------------

_PATTERNS = ('hstripes', 'vstripes', 'checker', 'rings', 'disc', 'square')


def _class_table(num_classes, rng):
    """Per class: two distinct colours, a pattern, a frequency (all flip-invariant)."""
    golden = 0.618033988749895
    hue0 = rng.random()
    tab = []
    for c in range(num_classes):
        hue = (hue0 + c * golden) % 1.0
        fg = _hsv_to_rgb(hue, 0.55 + 0.4 * rng.random(), 0.65 + 0.35 * rng.random())
        bg = _hsv_to_rgb((hue + 0.5) % 1.0, 0.3 * rng.random(), 0.15 + 0.35 * rng.random())
        tab.append((fg * 255.0, bg * 255.0, c % len(_PATTERNS), 2 + (c // len(_PATTERNS)) % 4))
    return tab


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _synth_block(cls, tab, size, rng, noise):
    """``k x 3 x S x S`` float images of classes ``cls`` (0-based)."""
    k = len(cls)
    g = ((np.arange(size) + 0.5) / size).astype(np.float32)
    yy, xx = g[:, None], g[None, :]        # broadcast: separable patterns stay 1-D
    m = np.empty((k, size, size), np.float32)
    phase = rng.uniform(0, 2 * np.pi, k).astype(np.float32)
    centre = (0.5 + rng.uniform(-0.12, 0.12, (k, 2))).astype(np.float32)
    scale = rng.uniform(0.8, 1.2, k)
    pat = np.array([tab[c][2] for c in cls])
    freq = (np.array([tab[c][3] for c in cls], np.float64) * scale).astype(np.float32)
    for t in range(len(_PATTERNS)):
        sel = np.flatnonzero(pat == t)
        if not len(sel):
            continue
        f = freq[sel, None, None]
        ph = phase[sel, None, None]
        cy = centre[sel, 0, None, None]
        cx = centre[sel, 1, None, None]
        name = _PATTERNS[t]
        if name == 'hstripes':
            v = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi) * f * yy + ph)
        elif name == 'vstripes':
            v = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi) * f * xx + ph)
        elif name == 'checker':
            w = np.float32(2 * np.pi) * f
            v = (np.sin(w * yy + ph) > 0) ^ (np.sin(w * xx + ph) > 0)
        elif name == 'rings':
            r = np.hypot(yy - cy, xx - cx)
            v = 0.5 + 0.5 * np.cos(np.float32(2 * np.pi) * f * r + ph)
        elif name == 'disc':
            r = np.hypot(yy - cy, xx - cx)
            v = r < 0.12 + 0.05 * f / 2
        else:
            d = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
            v = d < 0.1 + 0.04 * f / 2
        m[sel] = v
    fg = np.array([tab[c][0] for c in cls], np.float32)
    bg = np.array([tab[c][1] for c in cls], np.float32)
    bright = rng.uniform(-20, 20, k).astype(np.float32)
    img = rng.standard_normal((k, 3, size, size), dtype=np.float32)
    img *= np.float32(noise)
    for ch in range(3):
        plane = img[:, ch]
        plane += m * (fg[:, ch] - bg[:, ch])[:, None, None]
        plane += (bg[:, ch] + bright)[:, None, None]
    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def synth_imdb(path, num_train=1000, num_val=200, num_classes=10, size=64, seed=0,
               noise=24.0, version='7.3', layout='contiguous', chunk=1024):
    """Write a small *learnable* imdb: class c is a colour pair and a pattern (stripes,
    checker, rings, disc, square at some frequency, all unchanged by left-right flips),
    drawn with random phase, position, brightness and Gaussian noise (std ``noise``).

    Train images (set 1) come first, then val (set 2); labels are 1..num_classes, balanced
    and shuffled. ``meta.rgbMean``/``rgbCovariance`` are over the train pixels. Same
    ``seed``, same images (whatever ``chunk``, the number generated and written at a time:
    each block of 256 images has its own random stream). Returns ``path``."""
    if num_classes < 1 or num_train < 0 or num_val < 0 or num_train + num_val < 1:
        raise ValueError('synth_imdb: need num_classes >= 1 and at least one image')
    rng = np.random.default_rng(seed)
    tab = _class_table(num_classes, rng)
    labels = np.concatenate([rng.permutation(np.resize(np.arange(num_classes), n))
                             for n in (num_train, num_val)]).astype(np.int64)
    sets = np.r_[np.ones(num_train), 2 * np.ones(num_val)]
    n = num_train + num_val
    stats = RgbStats(3)
    meta = {'sets': list(DEFAULT_SETS),
            'classes': [f'class{c + 1}' for c in range(num_classes)]}

    sub = 256
    chunk = max(sub, chunk // sub * sub)

    def blocks():
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            x = np.concatenate([      # k x 3 x S x S (row, col)
                _synth_block(labels[i:min(i + sub, b)], tab, size,
                             np.random.default_rng([seed, 1 + i // sub]), noise)
                for i in range(a, b, sub)])
            imgs = x.transpose(2, 3, 1, 0)                          # S x S x 3 x k
            if a < num_train:
                stats.update(imgs[:, :, :, :max(0, min(b, num_train) - a)])
            yield a, b, imgs

    if str(version) == '7.3':
        with ImdbWriter(path, n, image_size=(size, size), meta=meta, layout=layout) as w:
            for a, b, imgs in blocks():
                w.append(imgs, labels[a:b] + 1, sets[a:b])
            w.meta.update(stats.meta())
    else:
        data = np.empty((size, size, 3, n), np.uint8, order='F')
        for a, b, imgs in blocks():
            data[:, :, :, a:b] = imgs
        meta.update(stats.meta())
        save_imdb(path, data, labels + 1, sets, meta, version=version)
    return path
