"""Writing imdb.mat files as MATLAB does (the struct: see :mod:`pydagnn.io.imdb`).

:func:`save_imdb` and the streaming :class:`ImdbWriter` write the v7.3 layout
MATLAB writes (512-byte MAT header userblock, ``MATLAB_class`` attributes, cellstr through
``#refs#``), or a v7 file through scipy. Files are written under a temporary name and
renamed into place, so a failure never leaves a half-written imdb.

Storage of ``images.data`` in files written here: ``layout='contiguous'`` (default) is one
unfiltered block, which the reader reaches with plain ``pread`` calls after announcing the
whole batch to the kernel (no HDF5 call per batch, thread- and fork-safe; a random batch of
256 64x64 images takes a few ms, see ``benchmarks/bench_imdb.py``); ``layout='chunked'``
is one chunk per image with an unlimited first dimension, as MATLAB lays out growable
arrays (read with one HDF5 call per image: slower, above all from a cold disk). Both are
ordinary HDF5 datasets that MATLAB, h5py and ``load_imdb`` read.
"""
import os
import re

import numpy as np

from .imdb import ImageArray
from .matfile import _CLASS_OF_DTYPE, _matlab_header, _ref_name, discard, publish, tmp_beside

__all__ = ['ImdbWriter', 'save_imdb']

_DEFAULT_SETS = ('train', 'val', 'test')
_MAX_V7_BYTES = 2 ** 31 - 1


# ---------------------------------------------------------------------------------------
#                                                                writing MATLAB v7.3 files
# ---------------------------------------------------------------------------------------

_COMPACT_MAX = 16 * 1024    # MATLAB keeps small arrays in the object header (compact layout)


class _H5MatWriter:
    """MATLAB v7.3 objects into an open h5py.File, with MATLAB's attributes."""

    def __init__(self, f):
        self.f = f
        self._refs = None
        self._nref = 0

    @staticmethod
    def set_str_attr(obj, name, value):
        import h5py
        b = value.encode('ascii')
        tid = h5py.h5t.C_S1.copy()
        tid.set_size(max(len(b), 1))
        tid.set_strpad(h5py.h5t.STR_NULLTERM)
        bname = name.encode('ascii')
        if h5py.h5a.exists(obj.id, bname):
            h5py.h5a.delete(obj.id, bname)
        aid = h5py.h5a.create(obj.id, bname, tid, h5py.h5s.create(h5py.h5s.SCALAR))
        aid.write(np.array(b, dtype=f'S{max(len(b), 1)}'), mtype=tid)

    @staticmethod
    def set_fields_attr(obj, names):
        import h5py
        base = h5py.h5t.C_S1.copy()
        base.set_size(1)
        base.set_strpad(h5py.h5t.STR_NULLTERM)
        tid = h5py.h5t.vlen_create(base)
        bufs = [np.frombuffer(n.encode('ascii'), np.uint8).copy() for n in names]
        hv = np.zeros(len(names), dtype=[('len', np.uintp), ('p', np.uintp)])
        for i, b in enumerate(bufs):
            hv[i] = (len(b), b.ctypes.data)
        aid = h5py.h5a.create(obj.id, b'MATLAB_fields', tid, h5py.h5s.create_simple((len(names),)))
        aid.write(hv, mtype=tid)   # same memory and file type: the bytes go in as they are
        del bufs

    def refs_group(self):
        if self._refs is None:
            g = self.f.require_group('#refs#')
            self.set_str_attr(g, 'H5PATH', '/#refs#')
            a = g.create_dataset('a', data=np.zeros(2, np.uint64))
            self.set_str_attr(a, 'MATLAB_class', 'canonical empty')
            a.attrs.create('MATLAB_empty', np.uint8(1))
            self._refs = g
            self._nref = 1
        return self._refs

    def _create(self, group, name, arr):
        import h5py
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if arr.nbytes <= _COMPACT_MAX:
            dcpl.set_layout(h5py.h5d.COMPACT)
        return group.create_dataset(name, data=arr, dcpl=dcpl)

    def write_struct(self, group, name, fields, h5path=None):
        g = group.create_group(name)
        if h5path:
            self.set_str_attr(g, 'H5PATH', h5path)
        self.set_str_attr(g, 'MATLAB_class', 'struct')
        names = list(fields.keys())
        for n in names:
            if not isinstance(n, str) or not re.match(r'^[A-Za-z][A-Za-z0-9_]*$', n):
                raise ValueError(f'field name {n!r} is not a valid MATLAB identifier')
        self.set_fields_attr(g, names)
        for n in names:
            self.write_value(g, n, fields[n])
        return g

    def write_value(self, group, name, value, h5path=None):
        """A MATLAB value: str -> char, list/tuple -> cell, dict -> struct, arrays by dtype.
        ``H5PATH`` is the parent group's path inside a group (as MATLAB writes it)."""
        inside = group.name != '/'
        if h5path is None and inside:
            h5path = group.name
        if isinstance(value, dict):
            own = f'{group.name.rstrip("/")}/{name}'
            return self.write_struct(group, name, value, h5path=own if inside else None)
        value = _plain_value(value)
        if isinstance(value, (list, tuple)):
            ds = self._cell(group, name, value)
        elif isinstance(value, str):
            ds = self._char(group, name, value)
        else:
            ds = self._array(group, name, value)
        if h5path:
            self.set_str_attr(ds, 'H5PATH', h5path)
        return ds

    def _empty(self, group, name, cls, mshape):
        dims = np.array(mshape[::-1] if mshape else (0, 0), np.uint64)
        ds = group.create_dataset(name, data=dims)
        self.set_str_attr(ds, 'MATLAB_class', cls)
        ds.attrs.create('MATLAB_empty', np.uint8(1))
        return ds

    def _char(self, group, name, s):
        if not s:
            return self._empty(group, name, 'char', (0, 0))
        codes = np.array([ord(ch) for ch in s], np.uint16)
        if codes.max() > 0xFFFF:
            raise ValueError(f'{name}: characters beyond U+FFFF cannot be stored in a MATLAB char')
        ds = self._create(group, name, codes.reshape(-1, 1))
        self.set_str_attr(ds, 'MATLAB_class', 'char')
        ds.attrs.create('MATLAB_int_decode', np.int32(2))
        return ds

    def _cell(self, group, name, items):
        import h5py
        if len(items) == 0:
            return self._empty(group, name, 'cell', (0, 0))
        refs_g = self.refs_group()
        refs = []
        for v in items:
            rname = _ref_name(self._nref)
            self._nref += 1
            d = self.write_value(refs_g, rname, v, h5path=f'/#refs#/{rname}')
            refs.append(d.ref)
        arr = np.empty((len(refs), 1), dtype=h5py.ref_dtype)   # a 1 x n cell
        for i, r in enumerate(refs):
            arr[i, 0] = r
        ds = group.create_dataset(name, data=arr)
        self.set_str_attr(ds, 'MATLAB_class', 'cell')
        return ds

    def _array(self, group, name, value):
        arr = np.asarray(value)
        if arr.dtype == bool:
            cls, store = 'logical', arr.astype(np.uint8)
        elif arr.dtype.kind in 'iufb' and arr.dtype.newbyteorder('=') in _CLASS_OF_DTYPE:
            store = arr.astype(arr.dtype.newbyteorder('='), copy=False)
            cls = _CLASS_OF_DTYPE[store.dtype]
        elif arr.dtype.kind in 'iu':
            store = arr.astype(np.int64)
            cls = 'int64'
        else:
            raise TypeError(f'{name}: cannot store a {arr.dtype} value in a MAT-file')
        if arr.ndim == 0:
            mshape = (1, 1)
        elif arr.ndim == 1:
            mshape = (1, arr.shape[0])          # a row vector, as scipy's savemat writes it
        else:
            mshape = arr.shape
        if 0 in mshape:
            return self._empty(group, name, cls, mshape)
        ds = self._create(group, name, np.ascontiguousarray(store.reshape(mshape, order='F').T))
        self.set_str_attr(ds, 'MATLAB_class', cls)
        if cls == 'logical':
            ds.attrs.create('MATLAB_int_decode', np.int32(1))
        return ds


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) \
        and not isinstance(x, (bool, np.bool_))


def _plain_value(value):
    """Python scalars and lists of numbers as MATLAB has them: doubles, 1 x n double rows."""
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if _is_number(value):
        return np.float64(value)            # a MATLAB literal is a double
    if isinstance(value, (list, tuple)) and value and all(_is_number(x) for x in value):
        return np.asarray(value, np.float64)
    return value


def _check_meta(meta):
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TypeError(f'meta must be a dict (a MATLAB struct), got {type(meta).__name__}')
    meta = dict(meta)
    meta.setdefault('sets', list(_DEFAULT_SETS))
    return meta


class ImdbWriter:
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
        import h5py
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
        self._tmp = tmp_beside(self.path)
        self._done = False
        try:
            self._f = h5py.File(self._tmp, 'w', libver='earliest', userblock_size=512)
            self._mw = _H5MatWriter(self._f)
            g = self._f.create_group('images')
            self._mw.set_str_attr(g, 'MATLAB_class', 'struct')
            self._mw.set_fields_attr(g, ['data', 'labels', 'set'])
            shape = (self.num_images, self.image_shape[2], w, h)
            if layout == 'chunked':
                kw = dict(chunks=(1,) + shape[1:], maxshape=(None,) + shape[1:])
                if compression is not None:
                    kw.update(compression='gzip', compression_opts=int(compression))
                ds = g.create_dataset('data', shape, np.uint8, **kw)
            else:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_layout(h5py.h5d.CONTIGUOUS)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                ds = g.create_dataset('data', shape, np.uint8, dcpl=dcpl)
            self._mw.set_str_attr(ds, 'H5PATH', '/images')
            self._mw.set_str_attr(ds, 'MATLAB_class', 'uint8')
            self._ds = ds
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
        if k:
            self._ds[a:a + k] = np.ascontiguousarray(images.T)
        self._labels[a:a + k] = labels
        self._set[a:a + k] = sets
        self.count += k

    def close(self):
        """Finish the file and rename it into place (error if images are missing)."""
        if self._done:
            return
        try:
            if self.count != self.num_images:
                raise ValueError(f'ImdbWriter: {self.count} images written, '
                                 f'{self.num_images} announced')
            g = self._f['images']
            for name, v in (('labels', self._labels), ('set', self._set)):
                self._mw.write_value(g, name, v)
            self._mw.write_struct(self._f, 'meta', _check_meta(self.meta))
            self._f.close()
            publish(self._tmp, self.path, _matlab_header())
            self._done = True
        except BaseException:
            self.abort()
            raise

    def abort(self):
        """Drop the temporary file; nothing is written at ``path``."""
        self._done = True
        f = getattr(self, '_f', None)
        if f is not None:
            try:
                f.close()
            except Exception:
                pass
        discard(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


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


def _to_scipy(value):
    value = _plain_value(value)
    if isinstance(value, dict):
        return {k: _to_scipy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        arr = np.empty((1, len(value)), object)
        for i, v in enumerate(value):
            arr[0, i] = _to_scipy(v)
        return arr
    return value


def save_imdb(path, data, labels, set, meta=None, version='7.3', layout='contiguous',  # noqa: A002
              compression=None, chunk=4096):
    """Write an imdb.mat: ``data`` ``H x W x C x N`` uint8 (an array or a loaded
    :class:`ImageArray`, copied in chunks), ``labels`` and ``set`` with N elements, ``meta``
    a dict (``sets`` defaults to {'train','val','test'}). ``version='7.3'`` writes MATLAB's
    HDF5 layout (see :class:`ImdbWriter` for ``layout``/``compression``); ``version='7'``
    writes a compressed v7 file through scipy (variables under 2 GB only). Written to a
    temporary name and renamed into place."""
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
        return path
    if version not in ('7', '-v7', '5'):
        raise ValueError(f"save_imdb: version must be '7.3' or '7', got {version!r}")
    import scipy.io
    arr = np.asarray(data)
    if arr.nbytes > _MAX_V7_BYTES:
        raise ValueError(f"save_imdb: data is {arr.nbytes} bytes; MATLAB v7 files hold at most "
                         "2 GB per variable: use version='7.3'")
    mdict = {'images': {'data': arr, 'labels': labels.astype(np.float64).reshape(1, -1),
                        'set': sets.astype(np.float64).reshape(1, -1)},
             'meta': _to_scipy(meta)}
    tmp = tmp_beside(path)
    try:
        scipy.io.savemat(tmp, mdict, format='5', do_compression=True, oned_as='row')
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    return path
