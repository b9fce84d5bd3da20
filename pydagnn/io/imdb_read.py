"""MatConvNet image databases (``imdb.mat``): the schema, and reading it.

An imdb is the MATLAB struct that ``cnn_imagenet64`` loads::

    images.data    uint8  H x W x 3 x N   (MATLAB order; HDF5 holds it reversed, N x 3 x W x H)
    images.labels  1 x N  class indices, 1-based
    images.set     1 x N  1 = train, 2 = val, 3 = test
    meta.sets      {'train', 'val', 'test'}
    meta.rgbMean   3 x 1  (0..255 units)
    meta.rgbCovariance  3 x 3

Files are read by :func:`pydagnn.io.matfile.read_mat` (the one MAT codec: the
bounds-checked v5 parser, the v7.3 decoder); this module only checks and normalises the
fields. In a v7.3 file ``images.data`` stays on disk as matfile's lazy dataset handle
(:class:`pydagnn.io.matfile.LazyArray`) behind an :class:`ImageArray`, whose
``data[:, :, :, idx]`` reads only the images asked for, so a 13 GB ImageNet64 imdb opens
in milliseconds and in a few megabytes. MATLAB's own files (gzip-compressed chunks) are
read chunk by chunk, each needed chunk read once; ``python -m pydagnn.imdb convert --src
matlab_imdb.mat --out fast.mat`` repacks one. :func:`imdb_info` summarises a file.

Bad files raise :class:`pydagnn.io.errors.MatFileError` naming the file and the field.
The public names (with writing and tools) are importable from :mod:`pydagnn.io.imdb`.
"""
import os

import numpy as np

from .errors import MatFileError
from .matfile import LazyArray, MatCell, MatStruct, lazy_array, read_mat, sniff

__all__ = ['Record', 'Imdb', 'ImageArray', 'load_imdb', 'imdb_info']

# images.data is left on disk (v7.3), with its 4 MATLAB dims (a single image: 3 in the file)
_LAZY = {'images.data': 4, 'imdb.images.data': 4}


# ---------------------------------------------------------------------------------------
#                                                                     MATLAB-like structs
# ---------------------------------------------------------------------------------------

class Record(dict):
    """A 1x1 MATLAB struct as the imdb code hands it out: a dict whose fields are also
    attributes (``s.images.data``). (The file-level struct array is
    :class:`pydagnn.io.matfile.MatStruct`.)"""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __dir__(self):
        keys = [k for k in self if isinstance(k, str) and k.isidentifier()]
        return list(super().__dir__()) + keys

    def __repr__(self):
        return f'{type(self).__name__}({", ".join(self.keys())})'


class Imdb(Record):
    """The loaded imdb: ``imdb.images`` and ``imdb.meta`` (plus any other top-level field).

    ``imdb.path`` and ``imdb.version`` ('7' or '7.3') say where it came from. ``close()``
    (or leaving a ``with`` block) releases the file handle; a copy pickled into another
    process (or a forked child) reopens the file on its first read.
    """

    def __init__(self, fields=(), path=None, version=None):
        super().__init__(fields)
        object.__setattr__(self, 'path', path)
        object.__setattr__(self, 'version', version)

    def __getattr__(self, name):
        if name in ('path', 'version'):   # not yet set (during unpickling)
            raise AttributeError(name)
        return Record.__getattr__(self, name)

    def __setattr__(self, name, value):
        if name in ('path', 'version'):
            object.__setattr__(self, name, value)
        else:
            self[name] = value

    def __reduce_ex__(self, protocol):
        return (_rebuild_imdb, (dict(self), self.path, self.version))

    def close(self):
        images = self.get('images')
        data = images.get('data') if isinstance(images, dict) else None
        if isinstance(data, ImageArray):
            data.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        n = None
        try:
            n = self.images.data.shape[-1]
        except Exception:
            pass
        return (f'Imdb(path={self.path!r}, version={self.version!r}, images={n}, '
                f'fields={list(self.keys())})')


def _rebuild_imdb(fields, path, version):
    return Imdb(fields, path=path, version=version)


# ---------------------------------------------------------------------------------------
#                                                        images.data: lazy image storage
# ---------------------------------------------------------------------------------------

class ImageArray:
    """``images.data`` of an imdb: ``H x W x C x N`` uint8 in MATLAB order, read on demand.

    ``data[:, :, :, idx]`` (or ``data[..., idx]``) reads only the images ``idx`` names: an
    int (the image axis is then dropped, as NumPy does), a slice, a list or index array
    (any order, duplicates allowed, negatives count from the end) or a boolean mask of
    length N. The result is a Fortran-ordered ``H x W x C x len(idx)`` uint8 array in the
    order asked. Indices on the first three axes are applied after reading. ``np.asarray``
    reads everything. Pickles (by file name) for worker threads and processes.
    """

    def __init__(self, source, path=None):
        self._source = source
        self.path = path
        c, w, h = source.item_shape
        self.shape = (h, w, c, source.n)
        self.dtype = np.dtype(np.uint8)

    ndim = 4

    @property
    def size(self):
        return int(np.prod(self.shape))

    @property
    def nbytes(self):
        return self.size

    @property
    def num_images(self):
        return self.shape[3]

    @property
    def in_memory(self):
        return self._source.in_memory

    @property
    def storage(self):
        """How images are reached: 'PreadSource', 'H5Source' or 'MemorySource'."""
        return self._source.storage

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        kind = 'in memory' if self.in_memory else f'on disk: {self.path}'
        return f'ImageArray(shape={self.shape}, dtype=uint8, {kind})'

    def close(self):
        self._source.close()

    def _normalize(self, idx):
        n = self.shape[3]
        if isinstance(idx, slice):
            return np.arange(*idx.indices(n), dtype=np.int64)
        a = np.asarray(idx)
        if a.dtype == bool:
            if a.ndim != 1 or a.shape[0] != n:
                raise IndexError(f'boolean mask over images must have length {n}, '
                                 f'got shape {a.shape}')
            return np.flatnonzero(a).astype(np.int64)
        if a.size == 0:
            return np.zeros(0, np.int64)
        if a.dtype.kind not in 'iu':
            raise IndexError('image indices must be integers, slices or a boolean mask, '
                             f'got {a.dtype}')
        a = a.astype(np.int64).ravel()
        if a.min() < -n or a.max() >= n:
            bad = a[(a < -n) | (a >= n)][0]
            raise IndexError(f'image index {bad} is out of bounds for {n} images')
        return np.where(a < 0, a + n, a)

    def read(self, idx, out=None):
        """Images ``idx`` (see the class doc) as a Fortran-ordered ``H x W x C x k`` array.

        ``out``: a Fortran-ordered uint8 ``H x W x C x k`` array to fill (reuse one across
        batches to skip allocating and faulting in fresh pages each time)."""
        sel = self._normalize(idx)
        k = len(sel)
        c, w, h = self._source.item_shape
        if out is None:
            buf = np.empty((k, c, w, h), np.uint8)
        else:
            if not isinstance(out, np.ndarray) or out.dtype != np.uint8 \
                    or out.shape != (h, w, c, k) or not out.flags.f_contiguous \
                    or not out.flags.writeable:
                raise ValueError(f'out must be a writeable Fortran-ordered uint8 array of shape '
                                 f'{(h, w, c, k)}, got {getattr(out, "dtype", type(out).__name__)} '
                                 f'{getattr(out, "shape", "")}')
            buf = out.T
        if k == 0:
            return buf.T
        if k == 1 or bool(np.all(sel[1:] > sel[:-1])):
            self._source.read_into(sel, buf, np.arange(k))
        else:
            # read each image once, in file order, straight into its place; copy duplicates
            order = np.argsort(sel, kind='stable')
            ss = sel[order]
            first = np.r_[True, ss[1:] != ss[:-1]]
            dest = order[first]
            self._source.read_into(ss[first], buf, dest)
            if not first.all():
                group = np.cumsum(first) - 1
                dup = ~first
                buf[order[dup]] = buf[dest[group[dup]]]
        return buf.T

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = [j for j, k in enumerate(key) if k is Ellipsis]
            if len(i) > 1:
                raise IndexError('an index can only have a single ellipsis')
            i = i[0]
            fill = 4 - (len(key) - 1)
            if fill < 0:
                raise IndexError(f'too many indices for a 4-D image array: {len(key) - 1}')
            key = key[:i] + (slice(None),) * fill + key[i + 1:]
        if len(key) != 4:
            raise IndexError('index images along the last axis: data[:, :, :, idx] or '
                             f'data[..., idx] (got {len(key)} indices for a 4-D array)')
        last = key[3]
        scalar = isinstance(last, (int, np.integer)) and not isinstance(last, (bool, np.bool_)) or (
            isinstance(last, np.ndarray) and last.ndim == 0 and last.dtype.kind in 'iu')
        if scalar:
            out = self.read([int(last)])[:, :, :, 0]
        else:
            out = self.read(last)
        lead = key[:3]
        if all(isinstance(k, slice) and k == slice(None) for k in lead):
            return out
        res = out[lead] if scalar else out[lead + (slice(None),)]
        return np.asfortranarray(res) if isinstance(res, np.ndarray) else res

    def __array__(self, dtype=None, copy=None):
        out = self.read(slice(None))
        if dtype is not None and np.dtype(dtype) != out.dtype:
            out = out.astype(dtype, order='F')
        return out

    def iter_chunks(self, chunk=4096):
        """Yield ``(start, images)`` blocks of at most ``chunk`` images, in file order."""
        n = self.shape[3]
        for a in range(0, n, chunk):
            yield a, self.read(slice(a, min(a + chunk, n)))

# ---------------------------------------------------------------------------------------
#                                                                            the schema
# ---------------------------------------------------------------------------------------

def _to_schema(v):
    """:mod:`pydagnn.io.matfile` values -> the forms used here (1x1 struct: Record,
    struct array: list of Record, cell vector: list, other cells: object arrays)."""
    if isinstance(v, MatStruct):
        items = [Record((k, _to_schema(e[k])) for k in v.fields if k in e) for e in v.elements]
        return items[0] if len(items) == 1 else items
    if isinstance(v, MatCell):
        vals = [_to_schema(x) for x in v.items]
        if len(v.shape) <= 2 and min(v.shape) <= 1:
            return vals
        arr = np.empty(len(vals), object)
        arr[:] = vals
        return arr.reshape(v.shape, order='F')
    return v


def _lazy_handles(m):
    images = m.get('images')
    if images is None and isinstance(m.get('imdb'), MatStruct) and m['imdb'].size == 1:
        images = m['imdb'].elements[0].get('images')
    if isinstance(images, MatStruct) and images.size == 1:
        data = images.elements[0].get('data')
        if isinstance(data, LazyArray):
            yield data


def _image_data(path, arr):
    """``images.data`` (a lazy handle or an array) -> the lazy handle, checked."""
    if isinstance(arr, LazyArray):
        if arr.dtype != np.uint8 or arr.matlab_class not in (None, 'uint8'):
            raise MatFileError(path, 'images.data',
                               f'must be uint8, found {arr.matlab_class or arr.dtype}')
        return arr
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        kind = f'{arr.dtype}' if isinstance(arr, np.ndarray) else type(arr).__name__
        raise MatFileError(path, 'images.data', f'must be uint8, found {kind}')
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or 0 in arr.shape[:3]:
        found = ' x '.join(map(str, arr.shape))
        raise MatFileError(path, 'images.data', f'must be H x W x C x N, found {found}')
    return lazy_array(arr, 'uint8')


def _schema(path, m, version):
    root = Record((k, _to_schema(v)) for k, v in m.items())
    if 'images' not in root and isinstance(root.get('imdb'), dict):
        root = Record(root['imdb'])
    if 'images' not in root:
        raise MatFileError(path, 'images', 'missing (not an imdb file?)')
    images = root['images']
    if not isinstance(images, dict):
        raise MatFileError(path, 'images', 'must be a struct')
    if 'data' not in images:
        raise MatFileError(path, 'images.data', 'missing')
    data = ImageArray(_image_data(path, images['data']), path)
    # MATLAB's field order: data first
    root['images'] = Record([('data', data)] + [(k, v) for k, v in images.items() if k != 'data'])
    return _finish(path, root, data, version)


def _numeric(path, value, field, want_size=None):
    if not isinstance(value, np.ndarray) or value.dtype.kind not in 'biuf':
        kind = type(value).__name__ if not isinstance(value, np.ndarray) else f'{value.dtype} array'
        raise MatFileError(path, field, f'must be a numeric array, found {kind}')
    v = value.ravel(order='F')
    if want_size is not None and v.size != want_size:
        raise MatFileError(path, field,
                           f'has {v.size} elements but images.data holds {want_size} images')
    return v


def _finish(path, root, data, version):
    """Validate the decoded struct and normalise the known fields."""
    images = root['images']
    n = data.shape[3]
    for name in ('labels', 'set'):
        if name not in images:
            raise MatFileError(path, f'images.{name}', 'missing')
        images[name] = _numeric(path, images[name], f'images.{name}', n)
    images['data'] = data
    meta = root.get('meta')
    if meta is None:
        meta = root['meta'] = Record()
    elif not isinstance(meta, dict):
        raise MatFileError(path, 'meta', f'must be a struct, found {type(meta).__name__}')
    c = data.shape[2]
    if 'sets' in meta:
        s = meta['sets']
        if isinstance(s, str):
            s = [s]
        if not isinstance(s, list) or not all(isinstance(x, str) for x in s):
            raise MatFileError(path, 'meta.sets', 'must be a cell array of strings')
        meta['sets'] = s
    if 'rgbMean' in meta:
        m = _numeric(path, meta['rgbMean'], 'meta.rgbMean')
        if m.size != c:
            raise MatFileError(path, 'meta.rgbMean',
                               f'has {m.size} elements, expected {c} (one per channel)')
        meta['rgbMean'] = m
    if 'rgbCovariance' in meta:
        cov = meta['rgbCovariance']
        if not isinstance(cov, np.ndarray) or cov.dtype.kind not in 'biuf' or cov.shape != (c, c):
            shape = getattr(cov, 'shape', type(cov).__name__)
            raise MatFileError(path, 'meta.rgbCovariance',
                               f'must be a {c} x {c} numeric matrix, found {shape}')
    return Imdb(root, path=path, version=version)


def load_imdb(path, max_bytes=None):
    """Load an imdb.mat (v7 whole, v7.3 with ``images.data`` left on disk).

    Returns an :class:`Imdb` (fields as attributes and items): ``images.data`` an
    :class:`ImageArray` ``H x W x C x N`` uint8, ``images.labels`` and ``images.set`` 1-D,
    ``meta.sets`` a list of str, ``meta.rgbMean`` ``(C,)``, ``meta.rgbCovariance``
    ``(C, C)``, other fields as stored (MATLAB shapes). A struct saved inside a top-level
    variable ``imdb`` is unwrapped, as ``cnn_imagenet64`` does. Raises
    :class:`MatFileError` (naming the file and the field) for anything malformed and
    ``FileNotFoundError`` when there is no file. ``max_bytes``: the most the file may
    decode into memory besides ``images.data``, which stays on disk whatever its size
    (default ``$PYDAGNN_MAX_ARRAY_BYTES`` or 8 GiB; docs/files.md).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no such imdb file')
    version = sniff(path)
    try:
        m = read_mat(path, lazy=_LAZY, max_bytes=max_bytes)
    except MatFileError:
        raise
    except MemoryError:
        raise MatFileError(path, None, 'malformed MATLAB file (declares an impossible size)') from None
    handles = list(_lazy_handles(m))
    try:
        return _schema(path, m, '7.3' if version == '7.3' else '7')
    except BaseException as e:
        for h in handles:
            h.close()
        if isinstance(e, (MatFileError, KeyboardInterrupt, SystemExit)):
            raise
        raise MatFileError(path, None, f'malformed imdb: {type(e).__name__}: {e}') from None


def imdb_info(path):
    """A dict summarising an imdb file (for ``python -m pydagnn.imdb info``). ``num_classes``
    is the largest label, what ``examples/cnn_imagenet64.py`` gives the net by default;
    ``distinct_labels`` counts the labels that occur."""
    with load_imdb(path) as imdb:
        im = imdb.images
        sets = {int(s): int(c) for s, c in zip(*np.unique(im.set, return_counts=True))}
        info = {'path': os.fspath(path), 'version': imdb.version,
                'data': list(im.data.shape), 'storage': im.data.storage,
                'labels': ([float(im.labels.min()), float(im.labels.max())]
                           if im.labels.size else []),
                # as the trainer counts classes (labels are 1-based, a class may be absent)
                'num_classes': int(im.labels.max()) if im.labels.size else 0,
                'distinct_labels': int(len(np.unique(im.labels))), 'set_counts': sets,
                'meta': sorted(imdb.meta.keys())}
        if 'rgbMean' in imdb.meta:
            info['rgbMean'] = [round(float(v), 4) for v in imdb.meta.rgbMean]
    return info
