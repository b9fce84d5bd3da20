"""MatConvNet image databases (``imdb.mat``): reading, lazily.

An imdb is the MATLAB struct that ``cnn_imagenet64`` loads::

    images.data    uint8  H x W x 3 x N   (MATLAB order; HDF5 holds it reversed, N x 3 x W x H)
    images.labels  1 x N  class indices, 1-based
    images.set     1 x N  1 = train, 2 = val, 3 = test
    meta.sets      {'train', 'val', 'test'}
    meta.rgbMean   3 x 1  (0..255 units)
    meta.rgbCovariance  3 x 3

:func:`load_imdb` reads v7 files (all in memory, through the bounds-checked parser of
:mod:`pydagnn.io.matfile`) and v7.3 files (HDF5): there
``images.data`` stays on disk as an :class:`ImageArray` whose ``data[:, :, :, idx]`` reads
only the images asked for, so a 13 GB ImageNet64 imdb opens in milliseconds and in a few
megabytes. :func:`imdb_info` summarises a file. How the two layouts of ``images.data``
written by :mod:`pydagnn.io.imdb_write` are read (and how fast): see there. MATLAB's own
files (gzip-compressed chunks) are read chunk by chunk, each needed chunk read once and
inflated here; ``python -m pydagnn.imdb convert --src matlab_imdb.mat --out fast.mat``
repacks one.

Bad files raise :class:`pydagnn.io.errors.MatFileError` naming the file and the field.

This module reads. Writing is :mod:`pydagnn.io.imdb_write` (:func:`save_imdb`,
:class:`ImdbWriter`); colour statistics, conversions and the synthetic data set are
:mod:`pydagnn.io.imdb_tools` (:class:`RgbStats`, :func:`convert_imagenet64`,
:func:`repack_imdb`, :func:`synth_imdb`). Their public names are importable from here too.
"""
import os
import threading
import zlib
from typing import TYPE_CHECKING

import numpy as np

from .errors import MatFileError

if TYPE_CHECKING:   # for linters and type checkers; at run time these come from __getattr__
    from .imdb_tools import RgbStats, convert_imagenet64, repack_imdb, synth_imdb
    from .imdb_write import ImdbWriter, save_imdb

__all__ = ['MatStruct', 'Imdb', 'ImageArray', 'MatFileError', 'load_imdb', 'save_imdb',
           'ImdbWriter', 'RgbStats', 'convert_imagenet64', 'repack_imdb', 'synth_imdb',
           'imdb_info']

_HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'


# ---------------------------------------------------------------------------------------
#                                                                     MATLAB-like structs
# ---------------------------------------------------------------------------------------

class MatStruct(dict):
    """A MATLAB struct: a dict whose fields are also attributes (``s.images.data``)."""

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


class Imdb(MatStruct):
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
        return MatStruct.__getattr__(self, name)

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

def _runs(u):
    """Start/stop positions (into ``u``) of runs of consecutive values of sorted ``u``."""
    if len(u) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(u) != 1) + 1
    return np.r_[0, breaks], np.r_[breaks, len(u)]


class _Source:
    """Reads whole images in HDF5 order: image ``u[j]`` (``u`` sorted, unique) into row
    ``dest[j]`` of ``out`` (``k x C x W x H``, C-contiguous)."""

    n = 0
    item_shape = ()

    def read_into(self, u, out, dest):
        raise NotImplementedError

    def close(self):
        pass


class _MemorySource(_Source):
    """Images held in memory (v7 files, in-memory saves). ``arr`` is ``N x C x W x H``."""

    def __init__(self, arr):
        self.arr = arr
        self.n = arr.shape[0]
        self.item_shape = arr.shape[1:]

    def read_into(self, u, out, dest):
        if len(u) == out.shape[0] and np.array_equal(dest, np.arange(len(u))):
            if u[-1] - u[0] + 1 == len(u):
                out[...] = self.arr[u[0]:u[-1] + 1]
            else:
                np.take(self.arr, u, axis=0, out=out)
        else:
            out[dest] = self.arr[u]


class _ReopeningSource(_Source):
    """A source owning an OS-level handle: opened lazily, per process, closed by close()."""

    field = 'images.data'

    def __init__(self, path):
        self.path = os.path.abspath(path)      # workers may run in another directory
        st = os.stat(self.path)
        self.stamp = (st.st_size, st.st_mtime_ns)
        self._handle = None
        self._pid = None
        self._closed = False
        self._lock = threading.Lock()

    def _open(self):
        raise NotImplementedError

    def _close_handle(self, handle):
        raise NotImplementedError

    def handle(self):
        if self._closed:
            raise ValueError(f'{self.path}: the imdb was closed')
        pid = os.getpid()
        if self._handle is None or self._pid != pid:
            with self._lock:
                if self._handle is None or self._pid != pid:
                    if self._handle is not None and self._pid != pid:
                        self._forget_inherited(self._handle)
                    try:
                        st = os.stat(self.path)
                        if (st.st_size, st.st_mtime_ns) != self.stamp:
                            raise MatFileError(self.path, self.field,
                                               'the file changed since it was loaded')
                        self._handle = self._open()
                    except (FileNotFoundError, MatFileError):
                        raise
                    except Exception as e:
                        raise MatFileError(self.path, self.field, f'cannot reopen: {e}') from None
                    self._pid = pid
        return self._handle

    def _forget_inherited(self, handle):
        pass

    def close(self):
        with self._lock:
            if self._handle is not None and self._pid == os.getpid():
                try:
                    self._close_handle(self._handle)
                except Exception:
                    pass
            self._handle = None
            self._closed = True

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_handle'] = None
        state['_pid'] = None
        state['_closed'] = False
        del state['_lock']
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _PreadSource(_ReopeningSource):
    """An unfiltered contiguous HDF5 dataset: images are read with positional reads."""

    def __init__(self, path, offset, n, item_shape):
        super().__init__(path)
        self.offset = int(offset)
        self.n = int(n)
        self.item_shape = tuple(item_shape)
        self.item_bytes = int(np.prod(self.item_shape))

    def _open(self):
        if hasattr(os, 'pread'):
            flags = os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_BINARY', 0)
            return os.open(self.path, flags)
        return open(self.path, 'rb')   # platforms without pread: seek + readinto under a lock

    def _close_handle(self, handle):
        if isinstance(handle, int):
            os.close(handle)
        else:
            handle.close()

    def _forget_inherited(self, handle):
        # a forked child owns its own copy of the descriptor: close it, reopen fresh
        try:
            self._close_handle(handle)
        except Exception:
            pass

    def _pread_into(self, handle, views, pos):
        """Fill the buffers ``views`` (in order) from file position ``pos`` on."""
        if isinstance(handle, int) and hasattr(os, 'preadv'):
            total = sum(len(v) for v in views)
            got = os.preadv(handle, views, pos)
            if got == total:
                return
            # short read (rare for regular files; at the end of a truncated one): go on singly
            skip = got
            rest = []
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                rest.append(v[skip:])
                skip = 0
            pos += got
            views = rest
        for v in views:
            done = 0
            while done < len(v):
                if isinstance(handle, int):
                    got = os.preadv(handle, [v[done:]], pos + done) if hasattr(os, 'preadv') \
                        else _pread_copy(handle, v[done:], pos + done)
                else:
                    with self._lock:
                        handle.seek(pos + done)
                        got = handle.readinto(v[done:])
                if not got:
                    raise MatFileError(self.path, self.field,
                                       f'file is truncated (image bytes expected at {pos + done}, '
                                       f'the file has {os.path.getsize(self.path)} bytes)')
                done += got
            pos += len(v)

    def read_into(self, u, out, dest):
        handle = self.handle()
        ib = self.item_bytes
        rows = out.reshape(out.shape[0], -1)
        starts, stops = _runs(u)
        u = u.tolist()
        dest = dest.tolist()
        if len(starts) > 1 and _HAS_FADVISE and isinstance(handle, int):
            # announce every run first: the kernel then fetches them concurrently instead of
            # one disk round trip per image (a cold random batch of 256: ~4x faster)
            for s, e in zip(starts.tolist(), stops.tolist()):
                os.posix_fadvise(handle, self.offset + u[s] * ib, (e - s) * ib,
                                 os.POSIX_FADV_WILLNEED)
        for s, e in zip(starts.tolist(), stops.tolist()):
            pos = self.offset + u[s] * ib
            if dest[s:e] == list(range(dest[s], dest[s] + e - s)):
                # consecutive in the file and in the output: one buffer
                block = rows[dest[s]:dest[e - 1] + 1].reshape(-1)
                self._pread_into(handle, [memoryview(block)], pos)
                continue
            # consecutive in the file, scattered in the output: one vectored read per IOV_MAX
            for c in range(s, e, _IOV_MAX):
                views = [memoryview(rows[d]) for d in dest[c:min(c + _IOV_MAX, e)]]
                self._pread_into(handle, views, pos + (c - s) * ib)


_HAS_FADVISE = hasattr(os, 'posix_fadvise') and hasattr(os, 'POSIX_FADV_WILLNEED')
try:
    _IOV_MAX = min(1024, os.sysconf('SC_IOV_MAX'))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16


def _pread_copy(fd, mv, pos):
    b = os.pread(fd, len(mv), pos)
    mv[:len(b)] = b
    return len(b)


class _H5Source(_ReopeningSource):
    """A dataset read through h5py (chunked: each needed chunk once; other layouts: h5py)."""

    def __init__(self, path, dsname, n, item_shape, chunks=None, filters=(), file=None):
        super().__init__(path)
        self.dsname = dsname
        self.n = int(n)
        self.item_shape = tuple(item_shape)
        self.chunks = tuple(chunks) if chunks else None
        self.filters = tuple(filters)
        # the direct-chunk path: no filter, or deflate (+ shuffle, a no-op on bytes)
        self.direct = bool(self.chunks) and set(self.filters) <= {1, 2}
        if file is not None:
            self._handle = file
            self._pid = os.getpid()

    def _open(self):
        import h5py
        return h5py.File(self.path, 'r')

    def _close_handle(self, handle):
        handle.close()

    def _forget_inherited(self, handle):
        pass   # never close an HDF5 handle inherited through fork: just open a new one

    def _dataset(self):
        return self.handle()[self.dsname]

    def _read_rows_h5py(self, ds, a, b, out):
        ds.read_direct(out, np.s_[a:b], np.s_[0:b - a])

    def _read_chunk_row(self, ds, r, block):
        """Rows ``[r*cn, r*cn + len(block))`` into ``block`` through read_direct_chunk."""
        cn = self.chunks[0]
        nr = block.shape[0]
        inner = self.chunks[1:]
        full = self.item_shape
        did = ds.id
        chunk_items = int(np.prod(self.chunks))
        for c0 in range(0, full[0], inner[0]):
            for c1 in range(0, full[1], inner[1]):
                for c2 in range(0, full[2], inner[2]):
                    mask, raw = did.read_direct_chunk((r * cn, c0, c1, c2))
                    if 1 in self.filters and not (mask & (1 << self.filters.index(1))):
                        raw = zlib.decompress(raw)
                    if len(raw) != chunk_items:
                        raise ValueError(f'chunk holds {len(raw)} bytes, expected {chunk_items}')
                    arr = np.frombuffer(raw, np.uint8).reshape(self.chunks)
                    e0, e1, e2 = (min(c0 + inner[0], full[0]), min(c1 + inner[1], full[1]),
                                  min(c2 + inner[2], full[2]))
                    block[:, c0:e0, c1:e1, c2:e2] = arr[:nr, :e0 - c0, :e1 - c1, :e2 - c2]

    def read_into(self, u, out, dest):
        ds = self._dataset()      # 'closed' and reopen errors pass through as they are
        try:
            self._read(ds, u, out, dest)
        except MatFileError:
            raise
        except Exception as e:
            raise MatFileError(self.path, self.field,
                               f'cannot read images: {type(e).__name__}: {e}') from None

    def _read(self, ds, u, out, dest):
        if not self.chunks:
            starts, stops = _runs(u)
            for s, e in zip(starts.tolist(), stops.tolist()):
                tmp = np.empty((e - s,) + self.item_shape, np.uint8)
                self._read_rows_h5py(ds, int(u[s]), int(u[e - 1]) + 1, tmp)
                out[dest[s:e]] = tmp
            return
        cn = self.chunks[0]
        rows = u // cn
        bounds = np.flatnonzero(np.diff(rows)) + 1
        starts = np.r_[0, bounds]
        stops = np.r_[bounds, len(u)]
        whole = cn == 1 and self.chunks[1:] == self.item_shape and not self.filters
        for s, e in zip(starts.tolist(), stops.tolist()):
            r = int(rows[s])
            a = r * cn
            b = min(a + cn, self.n)
            block = None
            if self.direct:
                try:
                    if whole:       # one image per unfiltered chunk: straight into place
                        _, raw = ds.id.read_direct_chunk((a, 0, 0, 0))
                        if len(raw) != out[0].nbytes:
                            raise ValueError(f'chunk holds {len(raw)} bytes')
                        out[dest[s]] = np.frombuffer(raw, np.uint8).reshape(self.item_shape)
                        continue
                    block = np.empty((b - a,) + self.item_shape, np.uint8)
                    self._read_chunk_row(ds, r, block)
                except Exception:
                    block = None    # e.g. a chunk never written (fill value): HDF5 decides
            if block is None:
                block = np.empty((b - a,) + self.item_shape, np.uint8)
                self._read_rows_h5py(ds, a, b, block)
            out[dest[s:e]] = block[u[s:e] - a]


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
        return isinstance(self._source, _MemorySource)

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
#                                                                      reading .mat files
# ---------------------------------------------------------------------------------------

def _sniff(path):
    """'7.3' (HDF5, with or without the MATLAB userblock) or '7' (MATLAB 5/7 format)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(4096)
    except IsADirectoryError:
        raise MatFileError(path, None, 'is a directory, not a MAT-file') from None
    if not head:
        raise MatFileError(path, None, 'file is empty')
    for off in (0, 512, 1024, 2048):
        if head[off:off + 8] == _HDF5_SIGNATURE:
            return '7.3'
    text = head[:116]
    if text.startswith(b'MATLAB 7.3 MAT-file'):
        raise MatFileError(path, None, 'MATLAB 7.3 header but no HDF5 data (file truncated?)')
    if len(head) >= 128 and head[126:128] in (b'IM', b'MI') and text.startswith(b'MATLAB'):
        return '7'
    if text.startswith(b'MATLAB 5.0 MAT-file'):
        raise MatFileError(path, None, 'MATLAB 5/7 header is cut short (file truncated?)')
    raise MatFileError(path, None, 'not a MAT-file (no MATLAB v5/v7 header, no HDF5 signature)')


def _attr_str(obj, name, default=None):
    v = obj.attrs.get(name, default)
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode('ascii', 'replace')
    if isinstance(v, np.ndarray) and v.dtype.kind == 'S' and v.size == 1:
        return bytes(v.ravel()[0]).decode('ascii', 'replace')
    return v


_MAX_FIELD_BYTES = 2 ** 31      # any field but images.data (labels of 1.3M images: 10 MB)
_MAX_DATA_BYTES = 2 ** 44       # images.data: 16 TB (ImageNet64: 16 GB)
_NUMERIC_CLASSES = {'double', 'single', 'int8', 'uint8', 'int16', 'uint16', 'int32', 'uint32',
                    'int64', 'uint64'}


class _H5Decoder:
    """MATLAB v7.3 objects -> Python (structs: MatStruct, cells: lists, char: str)."""

    def __init__(self, path, f):
        self.path = path
        self.f = f
        self.depth = 0

    def fail(self, field, msg):
        raise MatFileError(self.path, field, msg)

    def decode(self, obj, field):
        import h5py
        self.depth += 1
        try:
            if self.depth > 64:
                self.fail(field, 'nesting too deep (cyclic references?)')
            if isinstance(obj, h5py.Group):
                return self._group(obj, field)
            if isinstance(obj, h5py.Dataset):
                return self._dataset(obj, field)
            self.fail(field, f'unsupported HDF5 object {type(obj).__name__}')
        except MatFileError:
            raise
        except Exception as e:
            raise MatFileError(self.path, field,
                               f'cannot decode: {type(e).__name__}: {e}') from None
        finally:
            self.depth -= 1

    def _group(self, g, field, skip=()):
        # Fields come in HDF5's (alphabetical) order. MATLAB_fields (MATLAB's order) is not
        # read: it is a variable-length attribute in the global heap, and a corrupted heap
        # can make HDF5 spin forever (found by fuzzing); the order carries no information.
        out = MatStruct()
        for n in g.keys():
            if n.startswith('#') or n in skip:
                continue
            out[n] = self.decode(g[n], f'{field}.{n}' if field else n)
        return out

    def _deref(self, ref, field):
        if not ref:
            return np.zeros((0, 0))
        return self.decode(self.f[ref], field)

    def _dataset(self, ds, field):
        import h5py
        if ds.size * max(ds.dtype.itemsize, 1) > _MAX_FIELD_BYTES:
            self.fail(field, f'implausibly large ({ds.shape} of {ds.dtype}): file damaged?')
        cls = _attr_str(ds, 'MATLAB_class')
        if ds.attrs.get('MATLAB_empty', 0):
            dims = np.asarray(ds[()]).ravel()
            shape = tuple(int(d) for d in dims[::-1]) if dims.size else (0, 0)
            if cls == 'char':
                return ''
            if cls == 'cell':
                return []
            if cls == 'struct':
                return MatStruct()
            dt = np.dtype(cls) if cls in _NUMERIC_CLASSES else np.float64
            if cls == 'logical':
                dt = bool
            return np.zeros(shape, dt)
        if ds.dtype == h5py.ref_dtype or ds.dtype.kind == 'O' and h5py.check_ref_dtype(ds.dtype):
            refs = ds[()]
            mshape = refs.T.shape
            vals = [self._deref(r, f'{field}{{{i + 1}}}')
                    for i, r in enumerate(refs.T.ravel(order='F'))]
            if min(mshape) <= 1 if mshape else True:
                return vals
            arr = np.empty(len(vals), object)
            arr[:] = vals
            return arr.reshape(mshape, order='F')
        raw = ds[()]
        if cls == 'char':
            codes = np.asarray(raw).T
            if codes.ndim < 2:
                codes = codes.reshape(1, -1)
            rows = [''.join(map(chr, row.tolist())) for row in codes.reshape(codes.shape[0], -1)]
            return rows[0] if len(rows) == 1 else rows
        arr = np.asarray(raw)
        if arr.dtype.names and set(arr.dtype.names) >= {'real', 'imag'}:
            arr = arr['real'] + 1j * arr['imag']
        if cls == 'logical':
            arr = arr.astype(bool)
        return arr.T


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
        meta = root['meta'] = MatStruct()
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


def _load_h5(path):
    import h5py
    try:
        f = h5py.File(path, 'r')
    except Exception as e:
        raise MatFileError(path, None, f'cannot open as HDF5 (MATLAB v7.3): {e}') from None
    keep_open = False
    try:
        dec = _H5Decoder(path, f)
        try:
            top = f
            if 'images' not in f and 'imdb' in f and isinstance(f['imdb'], h5py.Group):
                top = f['imdb']
            if 'images' not in top:
                raise MatFileError(path, 'images', 'missing (not an imdb file?)')
            g = top['images']
            if not isinstance(g, h5py.Group):
                raise MatFileError(path, 'images', 'must be a struct')
            if 'data' not in g:
                raise MatFileError(path, 'images.data', 'missing')
            ds = g['data']
            if not isinstance(ds, h5py.Dataset):
                raise MatFileError(path, 'images.data', 'must be a numeric array, found a struct')
            cls = _attr_str(ds, 'MATLAB_class')
            if ds.attrs.get('MATLAB_empty', 0):
                raise MatFileError(path, 'images.data', 'is empty')
            if ds.dtype != np.uint8 or (cls is not None and cls != 'uint8'):
                raise MatFileError(path, 'images.data', f'must be uint8, found {cls or ds.dtype}')
            shape = ds.shape
            if len(shape) == 3:       # a single image: MATLAB drops the trailing 1
                shape = (1,) + shape
            if len(shape) != 4 or 0 in shape[1:]:
                found = ' x '.join(map(str, ds.shape[::-1]))
                raise MatFileError(path, 'images.data', f'must be H x W x C x N, found {found}')
            n, item = shape[0], shape[1:]
            if n * int(np.prod(item)) > _MAX_DATA_BYTES:
                raise MatFileError(path, 'images.data',
                                   f'implausibly large ({ds.shape}): file damaged?')
            root = MatStruct()
            for k in top.keys():
                if k.startswith('#'):
                    continue
                if k == 'images':
                    root['images'] = dec._group(g, 'images', skip=('data',))
                else:
                    root[k] = dec.decode(top[k], k)
            src = _data_source(path, f, ds, n, item)
            keep_open = isinstance(src, _H5Source)
            data = ImageArray(src, path)
            # MATLAB's field order: data first
            root['images'] = MatStruct([('data', None)] + list(root['images'].items()))
            return _finish(path, root, data, '7.3')
        except MatFileError:
            raise
        except Exception as e:
            raise MatFileError(path, None,
                               f'malformed MATLAB v7.3 file: {type(e).__name__}: {e}') from None
    finally:
        if not keep_open:
            try:
                f.close()
            except Exception:
                pass


def _data_source(path, f, ds, n, item):
    import h5py
    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    nfilters = dcpl.get_nfilters()
    if layout == h5py.h5d.CONTIGUOUS and nfilters == 0 and dcpl.get_external_count() == 0:
        offset = ds.id.get_offset()
        need = n * int(np.prod(item))
        if offset is not None:
            size = os.path.getsize(path)
            if offset + need > size:
                raise MatFileError(path, 'images.data', 'file is truncated: the images need '
                                   f'bytes up to {offset + need}, the file has {size}')
            return _PreadSource(path, offset, n, item)
    if layout == h5py.h5d.CHUNKED:
        filters = [dcpl.get_filter(i)[0] for i in range(nfilters)]
        chunks = ds.chunks
        if len(chunks) == 3:
            chunks = (1,) + tuple(chunks)
        return _H5Source(path, ds.name, n, item, chunks=chunks, filters=filters, file=f)
    return _H5Source(path, ds.name, n, item, file=f)


def _decode_v7(v):
    """:mod:`pydagnn.io.matfile` values -> the forms used here (1x1 struct: MatStruct,
    struct array: list of MatStruct, cell vector: list, other cells: object arrays)."""
    from .matfile import MatCell, MatStruct as _FileStruct
    if isinstance(v, _FileStruct):
        items = [MatStruct((k, _decode_v7(e[k])) for k in v.fields if k in e) for e in v.elements]
        return items[0] if len(items) == 1 else items
    if isinstance(v, MatCell):
        vals = [_decode_v7(x) for x in v.items]
        if len(v.shape) <= 2 and min(v.shape) <= 1:
            return vals
        arr = np.empty(len(vals), object)
        arr[:] = vals
        return arr.reshape(v.shape, order='F')
    return v


def _load_v7(path):
    # pydagnn.io.matfile's bounds-checked MAT v5 parser: scipy's compiled reader can crash
    # (segfault) on a damaged file, found by fuzzing
    from .matfile import read_mat
    try:
        m = read_mat(path)
    except MatFileError:
        raise
    except MemoryError:
        raise MatFileError(path, None,
                           'malformed MATLAB v5/v7 file (declares an impossible size)') from None
    except Exception as e:
        raise MatFileError(path, None,
                           f'cannot read as MATLAB v5/v7 file: {type(e).__name__}: {e}') from None
    try:
        root = MatStruct((k, _decode_v7(v)) for k, v in m.items() if not k.startswith('__'))
        if 'images' not in root and isinstance(root.get('imdb'), dict):
            root = MatStruct(root['imdb'])
        if 'images' not in root:
            raise MatFileError(path, 'images', 'missing (not an imdb file?)')
        images = root['images']
        if not isinstance(images, dict):
            raise MatFileError(path, 'images', 'must be a struct')
        if 'data' not in images:
            raise MatFileError(path, 'images.data', 'missing')
        arr = images['data']
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
            kind = f'{arr.dtype}' if isinstance(arr, np.ndarray) else type(arr).__name__
            raise MatFileError(path, 'images.data', f'must be uint8, found {kind}')
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4 or 0 in arr.shape[:3]:
            found = ' x '.join(map(str, arr.shape))
            raise MatFileError(path, 'images.data', f'must be H x W x C x N, found {found}')
        data = ImageArray(_MemorySource(np.ascontiguousarray(arr.T)), path)
        return _finish(path, root, data, '7')
    except MatFileError:
        raise
    except Exception as e:
        raise MatFileError(path, None, f'malformed imdb: {type(e).__name__}: {e}') from None


def load_imdb(path):
    """Load an imdb.mat (v7 via scipy, v7.3 via h5py with ``images.data`` left on disk).

    Returns an :class:`Imdb` (fields as attributes and items): ``images.data`` an
    :class:`ImageArray` ``H x W x C x N`` uint8, ``images.labels`` and ``images.set`` 1-D,
    ``meta.sets`` a list of str, ``meta.rgbMean`` ``(C,)``, ``meta.rgbCovariance``
    ``(C, C)``, other fields as stored (MATLAB shapes). A struct saved inside a top-level
    variable ``imdb`` is unwrapped, as ``cnn_imagenet64`` does. Raises
    :class:`MatFileError` (naming the file and the field) for anything malformed and
    ``FileNotFoundError`` when there is no file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no such imdb file')
    version = _sniff(path)
    return _load_h5(path) if version == '7.3' else _load_v7(path)


def imdb_info(path):
    """A dict summarising an imdb file (for ``python -m pydagnn.imdb info``)."""
    with load_imdb(path) as imdb:
        im = imdb.images
        sets = {int(s): int(c) for s, c in zip(*np.unique(im.set, return_counts=True))}
        info = {'path': os.fspath(path), 'version': imdb.version,
                'data': list(im.data.shape), 'storage': type(im.data._source).__name__.strip('_'),
                'labels': ([float(im.labels.min()), float(im.labels.max())]
                           if im.labels.size else []),
                'num_classes': int(len(np.unique(im.labels))), 'set_counts': sets,
                'meta': sorted(imdb.meta.keys())}
        if 'rgbMean' in imdb.meta:
            info['rgbMean'] = [round(float(v), 4) for v in imdb.meta.rgbMean]
    return info


# ---------------------------------------------------------------------------------------
#                                        writing and tools: names kept reachable from here
# ---------------------------------------------------------------------------------------

# pydagnn.io.imdb_write and pydagnn.io.imdb_tools import this module, so their names are
# looked up on first use (PEP 562) instead of imported here: importing them at the bottom
# would fail whenever one of those two modules is imported first (a partly run module).
_ELSEWHERE = {'ImdbWriter': 'imdb_write', 'save_imdb': 'imdb_write',
              'RgbStats': 'imdb_tools', 'convert_imagenet64': 'imdb_tools',
              'repack_imdb': 'imdb_tools', 'synth_imdb': 'imdb_tools'}


def __getattr__(name):
    where = _ELSEWHERE.get(name)
    if where is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    import importlib
    value = getattr(importlib.import_module(f'{__package__}.{where}'), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_ELSEWHERE))
