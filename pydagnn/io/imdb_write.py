"""Writing imdb.mat files (the struct: see :mod:`pydagnn.io.imdb_read`).

:func:`save_imdb` and the streaming :class:`ImdbWriter` are schema code over
:mod:`pydagnn.io.matfile`: the v7.3 layout MATLAB writes (512-byte MAT header userblock,
``MATLAB_class`` attributes, cellstr through ``#refs#``) comes from its
:class:`~pydagnn.io.matfile.MatWriter` (``images.data`` streamed through
``append_array``), a v7 file from :func:`~pydagnn.io.matfile.write_mat`. Files are written
under a temporary name and renamed into place, so a failure never leaves a half-written
imdb.

Storage of ``images.data`` in files written here: ``layout='contiguous'`` (default) is one
unfiltered block, which the reader reaches with plain ``pread`` calls after announcing the
whole batch to the kernel (no HDF5 call per batch, thread- and fork-safe; a random batch of
256 64x64 images takes a few ms, see ``benchmarks/bench_imdb.py``); ``layout='chunked'``
is one chunk per image with an unlimited first dimension, as MATLAB lays out growable
arrays (read with one HDF5 call per image: slower, above all from a cold disk). Both are
ordinary HDF5 datasets that MATLAB, h5py and ``load_imdb`` read.
"""
import os

import numpy as np

from .imdb_read import ImageArray
from .matfile import MatWriter, Publishing, write_mat

__all__ = ['ImdbWriter', 'save_imdb', 'DEFAULT_SETS']

DEFAULT_SETS = ('train', 'val', 'test')
_MAX_V7_BYTES = 2 ** 31 - 1


def _check_meta(meta):
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TypeError(f'meta must be a dict (a MATLAB struct), got {type(meta).__name__}')
    meta = dict(meta)
    meta.setdefault('sets', list(DEFAULT_SETS))
    return meta


class ImdbWriter(Publishing):
    """Write an imdb.mat (MATLAB v7.3) image by image, in bounded memory.

    ::

        with ImdbWriter('imdb.mat', num_images=N, image_size=(64, 64)) as w:
            for images, labels, sets in chunks:     # images: H x W x C x k uint8
                w.append(images, labels, sets)
            w.meta['rgbMean'] = ...                  # meta may be filled in until the end

    The file is built under a temporary name beside ``path`` and renamed into place when
    the block ends without error after exactly ``num_images`` images; otherwise it is
    deleted. ``meta`` defaults to ``{'sets': ['train', 'val', 'test']}``. ``layout``:
    'contiguous' (fastest random reads) or 'chunked' (one image per chunk, unlimited first
    dimension, optionally gzip ``compression`` level 1-9, as MATLAB does).
    """

    def __init__(self, path, num_images, image_size=(64, 64), num_channels=3, meta=None,
                 layout='contiguous', compression=None):
        self.path = os.fspath(path)
        self.num_images = int(num_images)
        if self.num_images < 1:
            raise ValueError(f'ImdbWriter: num_images must be at least 1, got {num_images}')
        if np.isscalar(image_size):
            image_size = (image_size, image_size)
        h, w = map(int, image_size)
        self.image_shape = (h, w, int(num_channels))
        if min(self.image_shape) < 1:
            raise ValueError(f'ImdbWriter: bad image size {self.image_shape}')
        if layout not in ('contiguous', 'chunked'):
            raise ValueError("ImdbWriter: layout must be 'contiguous' or 'chunked', "
                             f"got {layout!r}")
        if compression is not None and layout != 'chunked':
            raise ValueError("ImdbWriter: compression needs layout='chunked'")
        self.layout = layout
        self.meta = _check_meta(meta)
        self.count = 0
        self._labels = np.zeros(self.num_images, np.float64)
        self._set = np.zeros(self.num_images, np.float64)
        self._mw = MatWriter(self.path)
        try:
            self._images = self._mw.struct('images', ['data', 'labels', 'set'])
            self._data = self._mw.append_array(self._images, 'data', self.image_shape, self.num_images,
                                               np.uint8, layout=layout, compression=compression)
        except BaseException:
            self.abort()
            raise

    def append(self, images, labels, set):  # noqa: A002 (MATLAB's field name)
        """Append ``k`` images (``H x W x C x k`` uint8, any memory order; ``H x W x C`` for
        one), their ``k`` labels and sets (``set`` may be one number for all)."""
        if self._done:
            raise ValueError('ImdbWriter: already closed')
        if isinstance(images, ImageArray):
            images = np.asarray(images)
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f'ImdbWriter.append: images must be uint8, got {images.dtype}')
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[:3] != self.image_shape:
            want = ' x '.join(map(str, self.image_shape))
            got = ' x '.join(map(str, images.shape))
            raise ValueError(f'ImdbWriter.append: images must be {want} x k, got {got}')
        k = images.shape[3]
        labels = np.asarray(labels, np.float64).ravel()
        sets = np.asarray(set, np.float64).ravel()
        if labels.size != k:
            raise ValueError(f'ImdbWriter.append: {k} images but {labels.size} labels')
        if sets.size == 1:
            sets = np.full(k, sets[0])
        if sets.size != k:
            raise ValueError(f'ImdbWriter.append: {k} images but {sets.size} set values')
        if self.count + k > self.num_images:
            raise ValueError(f'ImdbWriter.append: {self.count + k} images exceed '
                             f'num_images={self.num_images}')
        a = self.count
        self._data.append(images)
        self._labels[a:a + k] = labels
        self._set[a:a + k] = sets
        self.count += k

    def _finish(self):
        """Write labels, set and meta, and rename the file into place (error if images are
        missing)."""
        if self.count != self.num_images:
            raise ValueError(f'ImdbWriter: {self.count} images written, '
                             f'{self.num_images} announced')
        for name, v in (('labels', self._labels), ('set', self._set)):
            self._mw.write(name, v, self._images)
        self._mw.write('meta', _check_meta(self.meta))
        self._mw.close()

    def _drop(self):
        mw = getattr(self, '_mw', None)
        if mw is not None:
            mw.abort()


def _check_arrays(data, labels, set):  # noqa: A002
    if isinstance(data, ImageArray):
        shape = data.shape
    else:
        data = np.asarray(data)
        if data.dtype != np.uint8:
            raise TypeError(f'save_imdb: data must be uint8, got {data.dtype}')
        if data.ndim == 3:
            data = data[..., None]
        shape = data.shape
    if len(shape) != 4 or 0 in shape[:3]:
        raise ValueError(f'save_imdb: data must be H x W x C x N, got shape {shape}')
    n = shape[3]
    labels = np.asarray(labels).ravel(order='F')
    sets = np.asarray(set).ravel(order='F')
    if labels.size != n:
        raise ValueError(f'save_imdb: data holds {n} images but labels has {labels.size} elements')
    if sets.size != n:
        raise ValueError(f'save_imdb: data holds {n} images but set has {sets.size} elements')
    for name, v in (('labels', labels), ('set', sets)):
        if v.dtype.kind not in 'biuf':
            raise TypeError(f'save_imdb: {name} must be numeric, got {v.dtype}')
    return data, labels, sets


def save_imdb(path, data, labels, set, meta=None, version='7.3', layout='contiguous',  # noqa: A002
              compression=None, chunk=4096, progress=None):
    """Write an imdb.mat: ``data`` ``H x W x C x N`` uint8 (an array or a loaded
    :class:`ImageArray`, copied in chunks), ``labels`` and ``set`` with N elements, ``meta``
    a dict (``sets`` defaults to {'train','val','test'}). ``version='7.3'`` writes MATLAB's
    HDF5 layout (see :class:`ImdbWriter` for ``layout``/``compression``); ``version='7'``
    writes a compressed v7 file (variables under 2 GB only). Written to a
    temporary name and renamed into place. ``progress(done, total)``, when given, is
    called after each chunk of a v7.3 write with the images written so far."""
    path = os.fspath(path)
    data, labels, sets = _check_arrays(data, labels, set)
    meta = _check_meta(meta)
    version = str(version)
    if version in ('7.3', '-v7.3'):
        h, w, c, n = data.shape
        with ImdbWriter(path, n, image_size=(h, w), num_channels=c, meta=meta, layout=layout,
                        compression=compression) as wr:
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                if isinstance(data, ImageArray):
                    block = data.read(slice(a, b))
                else:
                    block = data[:, :, :, a:b]
                wr.append(block, labels[a:b], sets[a:b])
                if progress is not None:
                    progress(b, n)
        return path
    if version not in ('7', '-v7', '5'):
        raise ValueError(f"save_imdb: version must be '7.3' or '7', got {version!r}")
    arr = np.asarray(data)
    if arr.nbytes > _MAX_V7_BYTES:
        raise ValueError(f"save_imdb: data is {arr.nbytes} bytes; MATLAB v7 files hold at most "
                         "2 GB per variable: use version='7.3'")
    write_mat(path, {'images': {'data': arr, 'labels': labels.astype(np.float64).reshape(1, -1),
                                'set': sets.astype(np.float64).reshape(1, -1)},
                     'meta': meta})
    return path
