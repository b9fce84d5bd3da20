"""MATLAB ``.mat`` files, the one codec of pydagnn: every MAT file the package reads or
writes (models, checkpoints, imdbs) goes through this module.

* :func:`sniff` tells the format (v4, v5/v7, v7.3) from the first bytes;
* v5/v7 is read by a bounds-checked pure-Python parser (scipy's compiled reader can
  crash on a damaged file) and written with :mod:`scipy.io`; v4 is read through scipy;
* v7.3 (HDF5) is read by one decoder over h5py's low-level API and written in MATLAB's
  own layout by one writer, whole (:func:`write_mat`) or piece by piece
  (:class:`MatWriter`, whose ``append_array`` streams a large array along its last axis);
* a v7.3 array can stay on disk as a lazy dataset handle (:class:`LazyArray`,
  ``read_mat(..., lazy=...)``) that reads items along its last axis on demand;
* files are published atomically (:func:`tmp_beside`, :func:`publish`, :func:`discard`).

Both readers give the same in-memory form, close to MATLAB's own:

===================  ==========================================================
MATLAB               Python (what :func:`read_mat` returns)
===================  ==========================================================
struct array         :class:`MatStruct` (``shape``, ``fields``, ``elements``:
                     one dict per element, column-major)
cell array           :class:`MatCell` (``shape``, ``items``, column-major)
char                 ``str`` (UTF-16 code units; a char matrix with several
                     rows: list of str)
numeric, logical     ``numpy.ndarray`` with the MATLAB shape (>= 2-D) and class;
                     logical is ``bool`` (``scipy.io.loadmat`` would give uint8)
object, function     :class:`MatObject` (kept as a marker; cannot be written)
handle, sparse
===================  ==========================================================

:func:`to_python` turns that form into plain Python for free-form data (``meta``,
checkpoint ``stats``): 1x1 struct -> dict, struct array -> list of dicts, cell
vector -> list, 1x1 double -> float, 1x1 logical -> bool, ``[]`` (0x0 double) -> None,
other arrays stay arrays with their MATLAB shape. :func:`to_matlab` goes the other way
(dict -> 1x1 struct, list of dicts with the same keys -> 1xN struct, list of numbers
-> 1xN double, list of bools -> 1xN logical, other lists -> 1xN cell, ``[]`` -> ``{}``,
None -> ``[]``, Python numbers -> double, 1-D arrays -> rows; field names must be MATLAB
identifiers). So a Python value comes back from a file as itself except: numeric lists
come back as 1xN arrays, a list of one dict as a dict, tuples as lists, ints as floats
(MATLAB has doubles).

:func:`write_mat` writes v7 (scipy, compressed) or v7.3 (HDF5 with the 512-byte MATLAB
header, ``MATLAB_class``/``MATLAB_fields``/``H5PATH`` attributes, struct arrays as fields
of object references into ``#refs#``, empty values as ``MATLAB_empty`` datasets holding
their dims, small arrays in compact storage -- the layout MATLAB itself writes), always to
a temporary file in the target folder that is then renamed over the target, so a crash
never leaves a half-written file.

Files are hostile until read (docs/files.md): sizes are checked against their container
(the file, the stored bytes of a dataset) and the read's :class:`~pydagnn.io.limits.Budget`
(``max_bytes`` / ``PYDAGNN_MAX_ARRAY_BYTES``, ``max_elements``) before anything is
allocated; v5 zlib streams are inflated no further than they declare; each v7.3 object is
decoded once (a DAG of references is not expanded; a cycle is an error); external links,
soft links out of ``#refs#``, external raw storage, virtual datasets and unknown filters
are refused (nothing is read from another file); the global-heap ``MATLAB_fields``
attribute is never read (HDF5 can spin forever on a damaged one); nesting is bounded.
Every failure to read is a :class:`~pydagnn.io.errors.MatFileError` naming the file.
"""
import os
import sys
import threading
import time
import zlib
import warnings

import numpy as np

from .errors import MatFileError
from .limits import Budget
from .tmpfiles import create_tmp

__all__ = ['MatStruct', 'MatCell', 'MatObject', 'LazyArray', 'MatWriter', 'AppendArray',
           'Publishing', 'read_mat', 'write_mat', 'to_python', 'to_matlab', 'lazy_array', 'sniff',
           'is_hdf5', 'tmp_beside', 'publish', 'discard', 'MatFileError']

_MAX_DEPTH = 64


# ---------------------------------------------------------------------------- types
def _prod(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _mshape(shape):
    """A MATLAB shape: a tuple of >= 2 ints."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (shape[0], 1)
    return shape


class _MatArray:
    """What struct and cell arrays share: a sequence of values in column-major order
    (``_values``) with a MATLAB ``shape``."""
    __slots__ = ()

    @property
    def size(self):
        return len(self._values())

    def __len__(self):
        return len(self._values())

    def __getitem__(self, i):
        return self._values()[i]

    def __iter__(self):
        return iter(self._values())


class MatStruct(_MatArray):
    """A MATLAB struct array.

    ``shape``: MATLAB dims (>= 2); ``fields``: field names in file order;
    ``elements``: one dict per element (field -> value), in column-major order.
    """
    __slots__ = ('shape', 'fields', 'elements')

    def __init__(self, fields=(), elements=None, shape=None):
        self.fields = [str(f) for f in fields]
        if elements is None:
            elements = [{}] if shape is None else [dict() for _ in range(_prod(shape))]
        self.elements = list(elements)
        self.shape = _mshape(shape) if shape is not None else (1, len(self.elements))
        if _prod(self.shape) != len(self.elements):
            raise ValueError(f'MatStruct: shape {self.shape} does not hold {len(self.elements)} elements')

    @classmethod
    def scalar(cls, mapping):
        """A 1x1 struct from a dict."""
        return cls(list(mapping), [dict(mapping)], (1, 1))

    @classmethod
    def row(cls, fields, elements):
        """A 1xN struct array."""
        return cls(fields, elements, (1, len(elements)))

    def _values(self):
        return self.elements

    def __repr__(self):
        return f"MatStruct({'x'.join(map(str, self.shape))}, fields={self.fields})"


class MatCell(_MatArray):
    """A MATLAB cell array: ``shape`` (>= 2 dims) and ``items`` in column-major order."""
    __slots__ = ('shape', 'items')

    def __init__(self, items=(), shape=None):
        self.items = list(items)
        self.shape = _mshape(shape) if shape is not None else ((1, len(self.items)) if self.items else (0, 0))
        if _prod(self.shape) != len(self.items):
            raise ValueError(f'MatCell: shape {self.shape} does not hold {len(self.items)} items')

    def _values(self):
        return self.items

    def __repr__(self):
        return f"MatCell({'x'.join(map(str, self.shape))})"


class MatObject:
    """A value pydagnn does not represent (MATLAB object, function handle, sparse
    matrix, ...): ``classname`` says what it was."""
    __slots__ = ('classname',)

    def __init__(self, classname):
        self.classname = str(classname)

    def __repr__(self):
        return f'MatObject({self.classname!r})'


# ---------------------------------------------------------------------------- reading
_HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'
_HDF5_OFFSETS = (0, 512, 1024, 2048, 4096)   # after a user block of 0, 512, 1024, ... bytes


def sniff(path):
    """The format of a ``.mat`` file: '7.3' (HDF5, with or without the MATLAB userblock),
    '7' (MATLAB 5/7 format) or '4' (headerless v4). Raises MatFileError naming the file
    for anything else (a folder, an empty or cut-short file, another format)."""
    path = os.fspath(path)
    try:
        with open(path, 'rb') as f:
            head = f.read(_HDF5_OFFSETS[-1] + 8)
    except IsADirectoryError:
        raise MatFileError(path, None, 'is a directory, not a MAT-file') from None
    except FileNotFoundError:
        raise MatFileError(path, None, 'no such file') from None
    except OSError as e:
        raise MatFileError(path, None, f'cannot open: {e}') from None
    if not head:
        raise MatFileError(path, None, 'the file is empty')
    if any(head[off:off + 8] == _HDF5_SIGNATURE for off in _HDF5_OFFSETS):
        return '7.3'
    text = head[:116]
    if text.startswith(b'MATLAB 7.3 MAT-file'):
        raise MatFileError(path, None, 'MATLAB 7.3 header but no HDF5 data (file truncated?)')
    if len(head) >= 128 and head[126:128] in (b'IM', b'MI'):
        return '7'
    if text.startswith(b'MATLAB'):
        raise MatFileError(path, None, f'MATLAB 5/7 header is cut short ({len(head)} bytes; '
                           'file truncated?)')
    if len(head) >= 4 and int.from_bytes(head[:4], 'little') < 5000:
        return '4'
    raise MatFileError(path, None, 'not a MAT-file (no MATLAB v5/v7 header, no HDF5 signature)')


def is_hdf5(path):
    """True when ``path`` is an HDF5 file (a MATLAB v7.3 file is one)."""
    try:
        return sniff(path) == '7.3'
    except MatFileError:
        return False


def read_mat(path, variable_names=None, lazy=None, max_bytes=None, max_elements=None):
    """Read a ``.mat`` file (v4/v5/v7 or v7.3) into ``{name: value}`` (see the module doc).

    ``variable_names``: read only these variables (others are not loaded).
    ``lazy``: ``{'var.field.field': ndim}``: in a v7.3 file, the numeric array at that
    place comes back as a :class:`LazyArray` of ``ndim`` MATLAB dims (one fewer in the
    file is one item: MATLAB drops the trailing 1; anything else, or an empty item, is
    a MatFileError) that reads slices of its last axis on demand; v5/v7 files are read
    whole (:func:`lazy_array` gives an in-memory array the same interface).
    ``max_bytes``, ``max_elements``: the caps on what this read may decode into memory
    (:mod:`pydagnn.io.limits`: default 8 GiB and 2^24 values, or ``PYDAGNN_MAX_ARRAY_BYTES``
    and ``PYDAGNN_MAX_ELEMENTS``); a file declaring more fails before allocating it.
    Raises MatFileError naming the file (and the field) for anything unreadable or hostile
    (docs/files.md: what a file may not do).
    """
    path = os.fspath(path)
    budget = Budget(path, max_bytes, max_elements)
    version = sniff(path)
    try:
        if version == '7.3':
            return _read_h5(path, variable_names, dict(lazy or {}), budget)
        if version == '4':
            return _read_v4(path, variable_names, budget)
        return _read_v5(path, variable_names, budget)
    except MatFileError:
        raise
    except (Exception, RecursionError) as e:  # scipy/h5py/zlib/numpy errors on a bad file
        raise MatFileError(path, None, f'not a readable MATLAB .mat file ({type(e).__name__}: {e})') from e


def _read_v5(path, variable_names, budget):
    with open(path, 'rb') as f:
        data = f.read()
    if len(data) == 0:
        raise MatFileError(path, None, 'the file is empty')
    if len(data) < 128:
        raise MatFileError(path, None, f'too short to be a .mat file ({len(data)} bytes)')
    endian = data[126:128]
    if endian not in (b'IM', b'MI'):
        raise MatFileError(path, None, 'not a MATLAB .mat file (no v5 header)')
    return _V5Reader(data, path, '<' if endian == b'IM' else '>', budget).variables(variable_names)


def _read_v4(path, variable_names, budget):
    """MATLAB v4 files (no header, no nesting): through scipy, after checking every
    matrix header against the file and the cap (scipy allocates what a header declares)."""
    import scipy.io
    _check_v4_headers(path, budget)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        raw = scipy.io.loadmat(path, appendmat=False, variable_names=variable_names, squeeze_me=False,
                               chars_as_strings=True, mat_dtype=False)
    return {k: _from_scipy(v, path, k, 0) for k, v in raw.items() if not k.startswith('__')}


_V4_ITEMSIZE = {0: 8, 1: 4, 2: 4, 3: 2, 4: 2, 5: 1}   # P digit of MOPT: double .. uint8


def _check_v4_headers(path, budget):
    """Walk the v4 matrices (20-byte header, name, data): each one's declared size must
    lie inside the file and under the cap."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        pos = 0
        while pos + 20 <= size:
            f.seek(pos)
            head = f.read(20)
            mopt = int.from_bytes(head[:4], 'little')
            bo = 'little'
            if mopt > 5000:              # big-endian file: the word reads back as such
                mopt, bo = int.from_bytes(head[:4], 'big'), 'big'
            mrows, ncols, imagf, namlen = (int.from_bytes(head[i:i + 4], bo) for i in range(4, 20, 4))
            item = _V4_ITEMSIZE.get(mopt % 100 // 10, 8)
            n = mrows * ncols * item * (2 if imagf else 1)
            where = f'matrix at byte {pos}'
            budget.take(mrows * ncols * 8 * (2 if imagf else 1), 1, where)
            end = pos + 20 + namlen + n
            if end > size:
                raise MatFileError(path, where, f'declares {n} bytes of data, the file has '
                                   f'{size - pos - 20 - namlen} left')
            pos = end


# MAT v5 data types and array classes
_MI_DTYPES = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 9: 'f8', 12: 'i8', 13: 'u8',
              16: 'u1', 17: 'u2', 18: 'u4'}
_MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 14, 15, 16
_MX_DTYPES = {6: 'f8', 7: 'f4', 8: 'i1', 9: 'u1', 10: 'i2', 11: 'u2', 12: 'i4', 13: 'u4', 14: 'i8', 15: 'u8'}
_MX_CELL, _MX_STRUCT, _MX_OBJECT, _MX_CHAR, _MX_SPARSE, _MX_FUNCTION, _MX_OPAQUE = 1, 2, 3, 4, 5, 16, 17


class _V5Reader:
    """A MAT v5/v7 parser in plain Python. Every size is checked against its container,
    so a damaged file raises MatFileError (scipy's compiled reader can crash on one)."""

    def __init__(self, data, path, bo, budget):
        self.data = data
        self.path = path
        self.budget = budget
        self.bo = bo
        self.byteorder = 'little' if bo == '<' else 'big'

    def fail(self, where, msg):
        return MatFileError(self.path, where, msg)

    def u32(self, buf, pos):
        return int.from_bytes(buf[pos:pos + 4], self.byteorder)

    def tag(self, buf, pos, end, where):
        """(type, data start, data end, next element) of the element at ``pos``."""
        if pos + 8 > end:
            raise self.fail(where, f'truncated data element at byte {pos}')
        first = self.u32(buf, pos)
        if first >> 16:  # small data element: type and size in one word, data in the next
            n = first >> 16
            if n > 4:
                raise self.fail(where, f'malformed small data element at byte {pos}')
            return first & 0xFFFF, pos + 4, pos + 4 + n, pos + 8
        n = self.u32(buf, pos + 4)
        ds = pos + 8
        de = ds + n
        if de > end:
            raise self.fail(where, f'data element at byte {pos} runs past its end ({n} bytes)')
        nxt = de if first == _MI_COMPRESSED else ds + (n + 7) // 8 * 8
        return first, ds, de, min(nxt, end)

    def numbers(self, buf, ds, de, mtype, where):
        dt = _MI_DTYPES.get(mtype)
        if dt is None:
            raise self.fail(where, f'unexpected data type {mtype}')
        dt = np.dtype(dt).newbyteorder(self.bo)
        if (de - ds) % dt.itemsize:
            raise self.fail(where, f'{de - ds} bytes is not a whole number of {dt} values')
        return np.frombuffer(buf, dtype=dt, count=(de - ds) // dt.itemsize, offset=ds)

    def variables(self, variable_names=None):
        import zlib
        wanted = None
        if variable_names is not None:
            wanted = {variable_names} if isinstance(variable_names, str) else set(variable_names)
        data = self.data
        out = {}
        pos = 128
        while pos < len(data):
            if len(data) - pos < 8 and not data[pos:].strip(b'\x00'):
                break  # trailing padding
            where = f'variable at byte {pos}'
            mtype, ds, de, nxt = self.tag(data, pos, len(data), where)
            if mtype == _MI_COMPRESSED:
                try:
                    if wanted is not None:
                        name = self.peek_name(zlib.decompressobj().decompress(data[ds:de], 1024), where)
                        if name is not None and name not in wanted:
                            pos = nxt
                            continue
                    inner = self.inflate(data, ds, de, where)
                except zlib.error as e:
                    raise self.fail(where, f'corrupt compressed data ({e})') from None
                itype, ids, ide, _ = self.tag(inner, 0, len(inner), where)
                if itype != _MI_MATRIX:
                    raise self.fail(where, f'compressed element holds data type {itype}, not a matrix')
                name, value = self.matrix(inner, ids, ide, where, 0)
            elif mtype == _MI_MATRIX:
                name, value = self.matrix(data, ds, de, where, 0)
            else:
                raise self.fail(where, f'unexpected top-level data type {mtype}')
            if name and not name.startswith('__') and (wanted is None or name in wanted):
                out[name] = value
            pos = nxt
        return out

    def inflate(self, data, ds, de, where):
        """The miMATRIX held by the compressed element ``data[ds:de]``, decompressed as a
        stream and never past the size its own tag declares (checked against the cap
        first): a zlib bomb costs what its header admits, not what it would inflate to."""
        import zlib
        d = zlib.decompressobj()
        head = d.decompress(data[ds:de], 8)
        if len(head) < 8:
            raise self.fail(where, 'compressed data ends inside its first tag')
        if self.u32(head, 0) >> 16:
            raise self.fail(where, 'compressed element holds a small data element, not a matrix')
        need = 8 + self.u32(head, 4)
        self.budget.check_bytes(need, where, 'a compressed variable')
        parts = [head, d.decompress(d.unconsumed_tail, min(need, 4096) - 8)]
        self.check_head(parts[0] + parts[1], where)
        got = len(parts[0]) + len(parts[1])
        while got < need:
            piece = d.decompress(d.unconsumed_tail, min(need - got, 1 << 24))
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        if got < need:
            raise self.fail(where, f'compressed data ends after {got} of the {need} bytes its '
                            'tag declares (file truncated?)')
        return b''.join(parts)

    def check_head(self, head, where):
        """Refuse a compressed variable from its first bytes, before inflating the rest:
        no array flags (a stream of junk), or a cell or struct declaring more elements
        than the cap allows."""
        if self.u32(head, 8) != 6 or self.u32(head, 12) != 8:
            raise self.fail(where, 'malformed array flags')
        cls = self.u32(head, 16) & 0xFF
        if cls not in (_MX_CELL, _MX_STRUCT, _MX_OBJECT) or len(head) < 32:
            return
        mt, ds, de, _ = self.tag(head, 24, len(head), where)
        if mt == 5 and (de - ds) % 4 == 0 and de > ds:
            dims = self.numbers(head, ds, de, mt, where)
            self.budget.check_elements(_prod(abs(int(x)) for x in dims),
                                       self.peek_name(head, where) or where)

    def peek_name(self, head, where):
        try:
            _, ds, _, _ = self.tag(head, 0, len(head) + (1 << 40), where)
            _, _, _, p = self.tag(head, ds, len(head), where)  # array flags
            _, _, _, p = self.tag(head, p, len(head), where)  # dimensions
            _, nds, nde, _ = self.tag(head, p, len(head), where)
            return head[nds:nde].decode('latin-1')
        except MatFileError:
            return None

    def declared(self, n, per, left, where, what):
        """A cell or struct declaring ``n`` elements of ``per`` values each: every value is
        a tagged element of >= 8 bytes, so they must fit in the ``left`` bytes that remain,
        and all of them under the element cap (a struct without fields costs no bytes)."""
        if n * per * 8 > left:
            raise self.fail(where, f'declares {n} {what} ({n * per} values), but only {left} '
                            'bytes remain to hold them')
        self.budget.take(0, n * max(per, 1), where)

    def name_of(self, buf, ds, de):
        return bytes(buf[ds:de]).decode('latin-1')

    def matrix(self, buf, s, e, where, depth):
        """(name, value) of the miMATRIX whose data is buf[s:e]."""
        if depth > _MAX_DEPTH:
            raise self.fail(where, f'nesting deeper than {_MAX_DEPTH} levels')
        if s == e:
            return '', np.zeros((0, 0))
        mt, ds, de, p = self.tag(buf, s, e, where)
        if mt != 6 or de - ds != 8:
            raise self.fail(where, 'malformed array flags')
        flags = self.u32(buf, ds)
        cls = flags & 0xFF
        is_complex, is_logical = bool(flags & 0x800), bool(flags & 0x200)
        if cls == _MX_OPAQUE:
            mt, ds, de, p = self.tag(buf, p, e, where)
            return self.name_of(buf, ds, de), MatObject('opaque object (classdef object saved as an object)')
        mt, ds, de, p = self.tag(buf, p, e, where)
        if mt != 5:
            raise self.fail(where, 'malformed dimensions')
        dims = self.numbers(buf, ds, de, mt, where)
        if dims.size < 2 or (dims < 0).any():
            raise self.fail(where, f'bad dimensions {dims.tolist()}')
        shape = tuple(int(d) for d in dims)
        n = _prod(shape)
        mt, ds, de, p = self.tag(buf, p, e, where)
        if mt not in (1, 2):
            raise self.fail(where, 'malformed array name')
        name = self.name_of(buf, ds, de)
        w = name if depth == 0 and name else where
        if cls in _MX_DTYPES:
            mt, ds, de, p = self.tag(buf, p, e, w)
            real = self.numbers(buf, ds, de, mt, w)
            if real.size != n:
                raise self.fail(w, f'{real.size} values for an array of size {shape}')
            self.budget.take(n * np.dtype(_MX_DTYPES[cls]).itemsize * (2 if is_complex else 1), 1, w)
            out = real.astype(np.dtype(_MX_DTYPES[cls]))
            if is_complex:
                mt, ds, de, p = self.tag(buf, p, e, w)
                imag = self.numbers(buf, ds, de, mt, w)
                if imag.size != n:
                    raise self.fail(w, f'{imag.size} imaginary values for an array of size {shape}')
                out = out + 1j * imag.astype(out.dtype)
            if is_logical:
                out = out != 0
            return name, out.reshape(shape, order='F')
        if cls == _MX_CHAR:
            if n == 0:
                return name, ''
            mt, ds, de, p = self.tag(buf, p, e, w)
            if mt == _MI_UTF8:
                codes = [ord(c) for c in bytes(buf[ds:de]).decode('utf-8', 'replace')]
                codes = np.array(codes, dtype=np.uint32)
            else:
                codes = self.numbers(buf, ds, de, mt, w).astype(np.uint32)
            if codes.size != n:
                raise self.fail(w, f'{codes.size} characters for a char array of size {shape}')
            self.budget.take(4 * n, 1, w)
            return name, _text(codes.reshape(shape[0], -1, order='F'))
        if cls == _MX_CELL:
            self.declared(n, 1, e - p, w, 'cell items')
            items = []
            for i in range(n):
                iw = f'{w}{{{i + 1}}}'
                mt, ds, de, p = self.tag(buf, p, e, iw)
                if mt != _MI_MATRIX:
                    raise self.fail(iw, f'cell element of data type {mt}, not a matrix')
                items.append(self.matrix(buf, ds, de, iw, depth + 1)[1])
            return name, MatCell(items, shape)
        if cls in (_MX_STRUCT, _MX_OBJECT):
            classname = None
            if cls == _MX_OBJECT:
                mt, ds, de, p = self.tag(buf, p, e, w)
                classname = self.name_of(buf, ds, de)
            mt, ds, de, p = self.tag(buf, p, e, w)
            flen = self.numbers(buf, ds, de, mt, w)
            if flen.size != 1 or not 0 < flen[0] <= 4096:
                raise self.fail(w, 'malformed struct field name length')
            flen = int(flen[0])
            mt, ds, de, p = self.tag(buf, p, e, w)
            raw = bytes(buf[ds:de])
            if len(raw) % flen:
                raise self.fail(w, 'malformed struct field names')
            fields = [raw[i:i + flen].split(b'\x00', 1)[0].decode('latin-1') for i in range(0, len(raw), flen)]
            if len(set(fields)) != len(fields) or not all(fields):
                raise self.fail(w, f'bad struct field names {fields}')
            self.declared(n, len(fields), e - p, w, 'struct elements')
            elements = []
            for i in range(n):
                elem = {}
                for fn in fields:
                    fw = f'{w}({i + 1}).{fn}'
                    mt, ds, de, p = self.tag(buf, p, e, fw)
                    if mt != _MI_MATRIX:
                        raise self.fail(fw, f'struct field of data type {mt}, not a matrix')
                    elem[fn] = self.matrix(buf, ds, de, fw, depth + 1)[1]
                elements.append(elem)
            if classname is not None:
                return name, MatObject(classname)
            return name, MatStruct(fields, elements, shape)
        if cls == _MX_SPARSE:
            return name, MatObject('sparse')
        if cls == _MX_FUNCTION:
            return name, MatObject('function_handle')
        raise self.fail(w, f'unsupported MATLAB array class {cls}')


def _text(rows):
    """The text of a char array given as rows of character codes: one str per row (a
    single row: that str). Codes are MATLAB's UTF-16 code units (a surrogate pair is one
    character, a lone surrogate U+FFFD); a code past U+FFFF (a v5 file's UTF-8 text) is
    that character."""
    strings = []
    for r in rows:
        r = np.asarray(r)
        if r.size and int(r.max()) > 0xFFFF:
            strings.append(''.join(chr(c) if c < 0x110000 else '\ufffd' for c in r.tolist()))
        else:
            strings.append(r.astype('<u2').tobytes().decode('utf-16-le', 'replace'))
    return strings[0] if len(strings) == 1 else strings


def _from_scipy(x, path, where, depth):
    from scipy.io.matlab import MatlabFunction, MatlabObject, MatlabOpaque
    if depth > _MAX_DEPTH:
        raise MatFileError(path, where, f'nesting deeper than {_MAX_DEPTH} levels')
    if isinstance(x, MatlabOpaque):
        return MatObject('opaque object (classdef object saved as an object)')
    if isinstance(x, MatlabFunction):
        return MatObject('function_handle')
    if isinstance(x, MatlabObject):
        return MatObject(getattr(x, 'classname', 'object'))
    try:
        import scipy.sparse
        if scipy.sparse.issparse(x):
            return MatObject('sparse')
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, str):
        return x
    if not isinstance(x, np.ndarray):
        raise MatFileError(path, where, f'unexpected value of type {type(x).__name__}')
    dt = x.dtype
    if dt.names is not None:
        fields = list(dt.names)
        flat = x.ravel(order='F')
        elements = [{f: _from_scipy(e[f], path, f'{where}({i + 1}).{f}', depth + 1) for f in fields}
                    for i, e in enumerate(flat)]
        return MatStruct(fields, elements, x.shape)
    if dt == object:
        flat = x.ravel(order='F')
        if flat.size and all(e is None for e in flat):  # scipy's form of a struct without fields
            return MatStruct([], [{} for _ in flat], x.shape)
        return MatCell([_from_scipy(e, path, f'{where}{{{i + 1}}}', depth + 1) for i, e in enumerate(flat)],
                       _mshape(x.shape))
    if dt.kind in 'US':
        if x.size == 0:
            return ''
        strings = [str(s) if dt.kind == 'U' else s.decode('latin-1') for s in x.ravel(order='F')]
        return strings[0] if len(strings) == 1 else strings
    if dt.kind in 'biufc':
        return x.reshape(_mshape(x.shape), order='F') if x.ndim < 2 else x
    raise MatFileError(path, where, f'unsupported MATLAB data of numpy type {dt}')


_H5_CLASSES = {
    'double': np.float64, 'single': np.float32, 'int8': np.int8, 'uint8': np.uint8, 'int16': np.int16,
    'uint16': np.uint16, 'int32': np.int32, 'uint32': np.uint32, 'int64': np.int64, 'uint64': np.uint64,
    'logical': np.bool_,
}


def _h5_attr(oid, name):
    """The value of attribute ``name`` (bytes) of a low-level HDF5 object, or None."""
    import h5py
    if not h5py.h5a.exists(oid, name):
        return None
    aid = h5py.h5a.open(oid, name)
    if aid.dtype.kind == 'O':  # variable-length data (MATLAB_fields): let h5py convert
        return None
    if _prod(aid.shape) * max(aid.dtype.itemsize, 1) > _MAX_ATTR_BYTES:
        return None            # MATLAB's attributes are a few bytes: a huge one is not its own
    buf = np.empty(aid.shape, dtype=aid.dtype)
    aid.read(buf)
    return buf


def _h5_class(oid):
    v = _h5_attr(oid, b'MATLAB_class')
    if v is None:
        return None
    v = v.reshape(-1)[0] if v.size else b''
    return v.decode('ascii', 'replace') if isinstance(v, bytes) else str(v)


def _hl(oid):
    import h5py
    return h5py.Group(oid) if isinstance(oid, h5py.h5g.GroupID) else h5py.Dataset(oid)


class _H5Context:
    """What one v7.3 read shares: the file and its size, the places to leave on disk
    (``lazy``), whether a lazy handle took over the open file, the :class:`Budget`, the
    objects decoded so far (``memo``: HDF5 address -> (value, its cost)) and the addresses
    being decoded (``open``: a reference back to one of them is a cycle)."""

    def __init__(self, path, f, lazy, budget):
        self.path = path
        self.f = f
        self.fid = f.id
        self.size = os.path.getsize(path)
        self.lazy = lazy
        self.keep_open = False
        self.budget = budget
        self.memo = {}
        self.open = set()


def _read_h5(path, variable_names, lazy, budget):
    import h5py
    out = {}
    f = h5py.File(path, 'r')
    rd = _H5Context(path, f, lazy or {}, budget)
    try:
        names = [k for k in f.keys() if not k.startswith('#')]
        if variable_names is not None:
            wanted = [variable_names] if isinstance(variable_names, str) else list(variable_names)
            names = [n for n in names if n in wanted]
        for name in names:
            out[name] = _decode(_h5_member(f.id, name, path, name), rd, name, 0)
    except BaseException:
        rd.keep_open = False
        for v in _lazy_values(out):
            v.close()
        raise
    finally:
        if not rd.keep_open:
            f.close()
    return out


def _lazy_values(tree):
    if isinstance(tree, LazyArray):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _lazy_values(v)
    elif isinstance(tree, MatStruct):
        for e in tree.elements:
            yield from _lazy_values(e)


def _h5_member(gid, name, path, where):
    """Open member ``name`` of a group, following only what stays in the file: hard links,
    and soft links into ``/#refs#`` (an external link would open another file; MATLAB
    writes neither)."""
    import h5py
    bname = name.encode('utf-8')
    try:
        info = gid.links.get_info(bname)
    except Exception as e:
        raise MatFileError(path, where, f'{name!r} is listed but missing ({e})') from e
    if info.type == h5py.h5l.TYPE_EXTERNAL:
        target = gid.links.get_val(bname)
        raise MatFileError(path, where, f'is an HDF5 external link to {target!r}: a MAT-file may '
                           'not read other files')
    if info.type == h5py.h5l.TYPE_SOFT:
        target = gid.links.get_val(bname)
        if not target.startswith(b'/#refs#/'):
            raise MatFileError(path, where, f'is an HDF5 soft link to {target.decode("utf-8", "replace")!r} '
                               '(outside #refs#): not a MATLAB layout')
    elif info.type != h5py.h5l.TYPE_HARD:
        raise MatFileError(path, where, f'is an HDF5 link of user-defined type {info.type}')
    try:
        return h5py.h5o.open(gid, bname)
    except Exception as e:
        raise MatFileError(path, where, f'{name!r} is listed but missing ({e})') from e


def _h5_child(gid, name, path, where):
    return _h5_member(gid, name, path, f'{where}.{name}')


_MAX_LAZY_BYTES = 2 ** 44      # one array left on disk (ImageNet64's images: 16 GB)
_MAX_ATTR_BYTES = 1 << 16      # an attribute read (MATLAB_class, MATLAB_empty: a few bytes)
_ALLOWED_FILTERS = {1: 'deflate', 2: 'shuffle', 3: 'fletcher32'}   # what MATLAB/h5py write
_DEFLATE_RATIO = 1100          # zlib never inflates more than ~1032:1
_STORAGE_SLACK = 1 << 16       # bytes a dataset may declare beyond what it stores (fill)


def _check_dataset(dsid, rd, where):
    """Refuse a dataset whose data would come from outside the file (virtual dataset,
    external raw storage), pass through an unknown filter (HDF5 would load a plugin), or
    whose declared size its stored bytes cannot hold (a 2 GB shape over a few bytes).
    Returns the declared byte count."""
    import h5py
    path = rd.path
    dcpl = dsid.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise MatFileError(path, where, 'is an HDF5 virtual dataset (its data would be read '
                           'from other files): a MAT-file may not read other files')
    if dcpl.get_external_count():
        name = dcpl.get_external(0)[0]
        raise MatFileError(path, where, f'keeps its data in the external file {name!r}: a '
                           'MAT-file may not read other files')
    filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
    bad = [fid for fid in filters if fid not in _ALLOWED_FILTERS]
    if bad:
        raise MatFileError(path, where, f'uses HDF5 filter {bad[0]} (only '
                           f'{", ".join(_ALLOWED_FILTERS.values())} are read)')
    declared = _prod(dsid.shape) * max(dsid.dtype.itemsize, 1)
    stored = dsid.get_storage_size()
    if layout == h5py.h5d.CONTIGUOUS and declared > rd.size:
        raise MatFileError(path, where, f'declares {declared} bytes of data '
                           f'({" x ".join(map(str, dsid.shape[::-1]))} of {dsid.dtype}), '
                           f'more than the whole file ({rd.size} bytes)')
    ratio = _DEFLATE_RATIO if 1 in filters else 1
    if declared > stored * ratio + _STORAGE_SLACK:
        raise MatFileError(path, where, f'declares {declared} bytes of data '
                           f'({" x ".join(map(str, dsid.shape[::-1]))} of {dsid.dtype}) but '
                           f'stores {stored}: file damaged?')
    return declared


def _h5_read(dsid, rd, where, nvalues=1):
    """The whole dataset ``dsid`` as an array, after :func:`_check_dataset` and charging
    its bytes (and ``nvalues`` values) to the read's budget."""
    import h5py
    nbytes = _check_dataset(dsid, rd, where)
    rd.budget.take(nbytes, nvalues, where)
    arr = np.empty(dsid.shape, dtype=dsid.dtype)
    if arr.size:
        dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, arr)
    return arr


def _deref(ref, fid, path, where):
    import h5py
    try:
        oid = h5py.h5r.dereference(ref, fid) if ref else None
    except Exception as e:
        raise MatFileError(path, where, f'broken object reference ({e})') from e
    if oid is None:
        raise MatFileError(path, where, 'null object reference')
    return oid


def _is_refs(dsid):
    import h5py
    return dsid.get_type().get_class() == h5py.h5t.REFERENCE


def _h5_address(oid):
    import h5py
    info = h5py.h5o.get_info(oid)
    return (info.fileno, info.addr)


def _decode(oid, rd, where, depth):
    """The value of the HDF5 object ``oid``, each object decoded once: references that
    all point at one subtree make a DAG, which expanded as a tree doubles the work per
    level. A repeated object is charged its cost again (what a caller walking the tree
    copies); a reference back to an object still being decoded is a cycle."""
    if depth > _MAX_DEPTH:
        raise MatFileError(rd.path, where, f'nesting deeper than {_MAX_DEPTH} levels')
    key = _h5_address(oid)
    if key in rd.open:
        raise MatFileError(rd.path, where, 'refers back to an object that contains it (a cycle)')
    hit = rd.memo.get(key)
    if hit is not None:
        rd.budget.take(hit[1][0], hit[1][1], where)
        return hit[0]
    mark = rd.budget.mark()
    rd.open.add(key)
    try:
        value = _from_h5(oid, rd, where, depth)
    finally:
        rd.open.discard(key)
    if not isinstance(value, LazyArray):    # a lazy handle belongs to its one place
        rd.memo[key] = (value, rd.budget.since(mark))
    return value


def _from_h5(oid, rd, where, depth):
    import h5py
    fid, path = rd.fid, rd.path
    cls = _h5_class(oid)
    if isinstance(oid, h5py.h5g.GroupID):
        if h5py.h5a.exists(oid, b'MATLAB_sparse'):
            return MatObject('sparse')
        if cls not in (None, 'struct'):
            return MatObject(cls)
        # HDF5's (alphabetical) order, not MATLAB_fields': that variable-length attribute
        # lives in the global heap, and a corrupted heap makes HDF5 spin forever on it
        # (found by fuzzing). A Python dict loses nothing by the order.
        fields = [n.decode('utf-8', 'replace') for n in oid.__iter__() if not n.startswith(b'#')]
        if not fields:
            return MatStruct([], [{}], (1, 1))
        first = _h5_child(oid, fields[0], path, where)
        is_array = (isinstance(first, h5py.h5d.DatasetID) and _is_refs(first)
                    and not h5py.h5a.exists(first, b'MATLAB_class'))
        if not is_array:
            elem = {}
            for fn in fields:
                elem[fn] = _decode(_h5_child(oid, fn, path, where), rd, f'{where}.{fn}', depth + 1)
            return MatStruct(fields, [elem], (1, 1))
        shape = _mshape(first.shape[::-1])
        n = _prod(shape)
        rd.budget.take(0, n * len(fields), where)     # before the n dicts are made
        elements = [dict() for _ in range(n)]
        for fn in fields:
            ds = _h5_child(oid, fn, path, where)
            if not isinstance(ds, h5py.h5d.DatasetID) or not _is_refs(ds):
                raise MatFileError(path, f'{where}.{fn}', 'struct array field is not a reference array')
            if _prod(ds.shape) != n:
                raise MatFileError(path, f'{where}.{fn}', f'{_prod(ds.shape)} references for a {shape} struct array')
            refs = _h5_read(ds, rd, f'{where}.{fn}', 0).reshape(-1)
            for i, r in enumerate(refs):
                w = f'{where}({i + 1}).{fn}'
                elements[i][fn] = _decode(_deref(r, fid, path, w), rd, w, depth + 1)
        return MatStruct(fields, elements, shape)

    if not isinstance(oid, h5py.h5d.DatasetID):
        raise MatFileError(path, where, f'unexpected HDF5 object {type(oid).__name__}')
    empty = _h5_attr(oid, b'MATLAB_empty')
    if empty is not None and empty.reshape(-1)[:1].any():
        # The data holds the MATLAB dims in MATLAB's order (MATLAB writes zeros(0,3) as
        # [0 3]); struct() and a fieldless struct array are MATLAB_empty too, with
        # nonzero dims: MATLAB reads them back with those dims and no fields.
        dims = _h5_read(oid, rd, where).reshape(-1)
        shape = _mshape(int(d) for d in dims) if dims.size >= 2 else (0, 0)
        if cls == 'struct':
            if _prod(shape) > 2 ** 20:   # a cap before allocating one dict each
                raise MatFileError(path, where, f'a fieldless struct of {shape} elements')
            return MatStruct([], [{} for _ in range(_prod(shape))], shape)
        if _prod(shape) != 0:
            shape = (0, 0)
        if cls == 'cell':
            return MatCell([], shape)
        if cls == 'char':
            return ''
        return np.zeros(shape, dtype=_H5_CLASSES.get(cls, np.float64), order='F')
    if _is_refs(oid):
        if cls not in (None, 'cell'):
            return MatObject(cls)
        data = _h5_read(oid, rd, where, 1 + _prod(oid.shape))   # the items, before reading
        shape = _mshape(data.shape[::-1])
        items = []
        for i, r in enumerate(data.reshape(-1)):
            w = f'{where}{{{i + 1}}}'
            items.append(_decode(_deref(r, fid, path, w), rd, w, depth + 1))
        return MatCell(items, shape)
    if oid.get_type().get_class() in (h5py.h5t.STRING, h5py.h5t.VLEN, h5py.h5t.OPAQUE, h5py.h5t.ENUM):
        raise MatFileError(path, where, 'unsupported HDF5 data (not written by MATLAB)')
    if where in rd.lazy and cls != 'char' and \
            oid.get_type().get_class() in (h5py.h5t.INTEGER, h5py.h5t.FLOAT):
        return _lazy_h5(rd, oid, where, cls, rd.lazy[where])
    data = _h5_read(oid, rd, where)
    if data.dtype.names is not None:
        if set(data.dtype.names) >= {'real', 'imag'}:
            data = data['real'] + 1j * data['imag']
        else:
            raise MatFileError(path, where, f'unsupported compound HDF5 data {data.dtype}')
    arr = data.T
    if arr.ndim < 2:
        arr = arr.reshape(_mshape(arr.shape), order='F')
    if cls == 'char':
        codes = np.asarray(arr, dtype=np.uint16)
        if codes.size == 0:
            return ''
        return _text(codes.reshape(codes.shape[0], -1, order='F'))
    if cls == 'logical':
        return arr.astype(bool)
    if cls in _H5_CLASSES and arr.dtype.kind in 'biuf':
        return arr.astype(_H5_CLASSES[cls], copy=False)
    if arr.dtype.kind not in 'biufc':
        raise MatFileError(path, where, f'unsupported HDF5 data of type {arr.dtype}')
    return arr


# ---------------------------------------------------------------------------- lazy dataset handles
def _runs(u):
    """Start/stop positions (into ``u``) of runs of consecutive values of sorted ``u``."""
    if len(u) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    breaks = np.flatnonzero(np.diff(u) != 1) + 1
    return np.r_[0, breaks], np.r_[breaks, len(u)]


class LazyArray:
    """A lazy dataset handle: a MATLAB array read slice by slice along its last axis.

    ``shape`` is the MATLAB shape (``item x n``), ``dtype`` the file's, ``matlab_class``
    its MATLAB class. :meth:`read_into` reads whole items in HDF5 (reversed) order: item
    ``u[j]`` (``u`` sorted, unique) into row ``dest[j]`` of ``out`` (``k x item_shape``,
    C-contiguous). A handle on a file opens it lazily per process (forked children and
    unpickled copies reopen it) and refuses a file that changed since it was read.
    ``storage`` says how items are reached ('PreadSource': positional reads of a contiguous
    dataset; 'H5Source': HDF5, each needed chunk read once; 'MemorySource': in memory).
    """

    n = 0
    item_shape = ()
    dtype = np.dtype(np.uint8)
    matlab_class = None
    in_memory = False

    @property
    def shape(self):
        return tuple(self.item_shape[::-1]) + (self.n,)

    @property
    def storage(self):
        return type(self).__name__.strip('_')

    def read_into(self, u, out, dest):
        raise NotImplementedError

    def close(self):
        pass


class _MemorySource(LazyArray):
    """Items held in memory. ``arr`` is in HDF5 order (``N x item``, C-contiguous)."""

    in_memory = True

    def __init__(self, arr, matlab_class=None):
        self.arr = arr
        self.dtype = arr.dtype
        self.matlab_class = matlab_class
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


class _ReopeningSource(LazyArray):
    """A source owning an OS-level handle: opened lazily, per process, closed by close()."""

    def __init__(self, path, field, dtype, matlab_class):
        self.field = field
        self.dtype = np.dtype(dtype)
        self.matlab_class = matlab_class
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

    def __init__(self, path, field, dtype, matlab_class, offset, n, item_shape):
        super().__init__(path, field, dtype, matlab_class)
        self.offset = int(offset)
        self.n = int(n)
        self.item_shape = tuple(item_shape)
        self.item_bytes = _prod(self.item_shape) * self.dtype.itemsize

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
                                       f'file is truncated (bytes expected at {pos + done}, '
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

    def __init__(self, path, field, dtype, matlab_class, dsname, n, item_shape, chunks=None,
                 filters=(), file=None):
        super().__init__(path, field, dtype, matlab_class)
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
        chunk_bytes = _prod(self.chunks) * self.dtype.itemsize
        for c0 in range(0, full[0], inner[0]):
            for c1 in range(0, full[1], inner[1]):
                for c2 in range(0, full[2], inner[2]):
                    mask, raw = did.read_direct_chunk((r * cn, c0, c1, c2))
                    if 1 in self.filters and not (mask & (1 << self.filters.index(1))):
                        raw = zlib.decompress(raw)
                    if len(raw) != chunk_bytes:
                        raise ValueError(f'chunk holds {len(raw)} bytes, expected {chunk_bytes}')
                    arr = np.frombuffer(raw, self.dtype).reshape(self.chunks)
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
                               f'cannot read: {type(e).__name__}: {e}') from None

    def _read(self, ds, u, out, dest):
        if not self.chunks:
            starts, stops = _runs(u)
            for s, e in zip(starts.tolist(), stops.tolist()):
                tmp = np.empty((e - s,) + self.item_shape, self.dtype)
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
                        out[dest[s]] = np.frombuffer(raw, self.dtype).reshape(self.item_shape)
                        continue
                    block = np.empty((b - a,) + self.item_shape, self.dtype)
                    self._read_chunk_row(ds, r, block)
                except Exception:
                    block = None    # e.g. a chunk never written (fill value): HDF5 decides
            if block is None:
                block = np.empty((b - a,) + self.item_shape, self.dtype)
                self._read_rows_h5py(ds, a, b, block)
            out[dest[s:e]] = block[u[s:e] - a]




def _lazy_h5(rd, oid, where, cls, ndim):
    """The :class:`LazyArray` of the dataset ``oid`` (``ndim`` MATLAB dims)."""
    import h5py
    path = rd.path
    hshape = tuple(oid.shape)
    if len(hshape) == ndim - 1:  # one item: MATLAB drops the trailing singleton dim
        hshape = (1,) + hshape
    if len(hshape) != ndim or 0 in hshape[1:]:
        found = ' x '.join(map(str, tuple(oid.shape)[::-1]))
        raise MatFileError(path, where, f'must be a non-empty {ndim}-D array, found {found}')
    n, item = hshape[0], hshape[1:]
    dtype = oid.dtype
    if n * _prod(item) * dtype.itemsize > _MAX_LAZY_BYTES:
        raise MatFileError(path, where, f'implausibly large ({tuple(oid.shape)}): file damaged?')
    _check_dataset(oid, rd, where)     # in the file, known filters, stored bytes (not the cap)
    dcpl = oid.get_create_plist()
    layout = dcpl.get_layout()
    nfilters = dcpl.get_nfilters()
    if layout == h5py.h5d.CONTIGUOUS and nfilters == 0 and dcpl.get_external_count() == 0:
        offset = oid.get_offset()
        need = n * _prod(item) * dtype.itemsize
        if offset is not None:
            size = os.path.getsize(path)
            if offset + need > size:
                raise MatFileError(path, where, 'file is truncated: the array needs '
                                   f'bytes up to {offset + need}, the file has {size}')
            return _PreadSource(path, where, dtype, cls, offset, n, item)
    name = h5py.h5i.get_name(oid).decode('utf-8')
    file = None
    if not rd.keep_open:         # the first HDF5-read handle keeps this open file
        rd.keep_open = True
        file = rd.f
    if layout == h5py.h5d.CHUNKED:
        filters = [dcpl.get_filter(i)[0] for i in range(nfilters)]
        chunks = tuple(dcpl.get_chunk())
        if len(chunks) < ndim:
            chunks = (1,) * (ndim - len(chunks)) + chunks
        return _H5Source(path, where, dtype, cls, name, n, item, chunks=chunks, filters=filters,
                         file=file)
    return _H5Source(path, where, dtype, cls, name, n, item, file=file)


def lazy_array(arr, matlab_class=None):
    """An in-memory MATLAB-order array (items along the last axis) as a :class:`LazyArray`."""
    arr = np.asarray(arr)
    return _MemorySource(np.ascontiguousarray(arr.T), matlab_class)



# ---------------------------------------------------------------------------- conversions
def _is_vector_shape(shape):
    return len(shape) == 2 and (shape[0] == 1 or shape[1] == 1) or _prod(shape) == 0


def to_python(v, where='value'):
    """The plain-Python form of a value :func:`read_mat` returned (see the module doc)."""
    if isinstance(v, MatStruct):
        if v.shape == (1, 1):
            return {f: to_python(v.elements[0][f], f'{where}.{f}') for f in v.fields}
        return [{f: to_python(e[f], f'{where}({i + 1}).{f}') for f in v.fields} for i, e in enumerate(v.elements)]
    if isinstance(v, MatCell):
        items = [to_python(x, f'{where}{{{i + 1}}}') for i, x in enumerate(v.items)]
        if _is_vector_shape(v.shape):
            return items
        arr = np.empty(len(items), dtype=object)
        for i, x in enumerate(items):
            arr[i] = x
        return arr.reshape(v.shape, order='F')
    if isinstance(v, MatObject):
        warnings.warn(f'{where}: a MATLAB {v.classname} cannot be represented; it is dropped (None)',
                      stacklevel=2)
        return None
    if isinstance(v, np.ndarray):
        if v.shape == (0, 0) and v.dtype == np.float64:
            return None
        if v.size == 1 and all(s == 1 for s in v.shape):
            s = v.reshape(-1)[0]
            if v.dtype == np.float64:
                return float(s)
            if v.dtype == np.bool_:
                return bool(s)
            return s
        return v
    return v


def to_matlab(v, where='value'):
    """The :func:`write_mat` form of a Python value (see the module doc)."""
    if isinstance(v, MatStruct):
        return MatStruct(v.fields, [{f: to_matlab(e[f], f'{where}({i + 1}).{f}') for f in v.fields}
                                    for i, e in enumerate(v.elements)], v.shape)
    if isinstance(v, MatCell):
        return MatCell([to_matlab(x, f'{where}{{{i + 1}}}') for i, x in enumerate(v.items)], v.shape)
    if isinstance(v, MatObject):
        raise MatFileError(None, where, f'cannot write a MATLAB {v.classname}')
    if v is None:
        return np.zeros((0, 0))
    if isinstance(v, (bool, np.bool_)):
        return np.array([[bool(v)]])
    if isinstance(v, (int, float)):
        return np.array([[float(v)]])
    if isinstance(v, complex):
        return np.array([[v]])
    if isinstance(v, np.generic):
        if v.dtype.kind in 'US':
            return str(v)
        return np.array([[v]], dtype=v.dtype)
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return v.decode('latin-1')
    if isinstance(v, dict):
        for k in v:
            _check_field_name(k, f'{where}.{k}')
        return MatStruct.scalar({k: to_matlab(x, f'{where}.{k}') for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, dict) for x in v) and all(list(x) == list(v[0]) for x in v):
            fields = list(v[0])
            return MatStruct.row(fields, [{k: to_matlab(x[k], f'{where}({i + 1}).{k}') for k in fields}
                                          for i, x in enumerate(v)])
        if v and all(isinstance(x, (bool, np.bool_)) for x in v):
            return np.array([list(v)], dtype=bool)
        if v and all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
                     for x in v):
            return np.array([[float(x) for x in v]])
        return MatCell([to_matlab(x, f'{where}{{{i + 1}}}') for i, x in enumerate(v)], (1, len(v)) if v else (0, 0))
    if not isinstance(v, np.ndarray) and hasattr(v, '__cuda_array_interface__'):
        from .. import backend
        v = backend.to_host(v)
    if isinstance(v, np.ndarray):
        if v.dtype.names is not None:
            fields = list(v.dtype.names)
            flat = v.ravel(order='F')
            return MatStruct(fields, [{f: to_matlab(e[f], f'{where}({i + 1}).{f}') for f in fields}
                                      for i, e in enumerate(flat)], _mshape(v.shape))
        if v.dtype == object:
            flat = v.ravel(order='F')
            return MatCell([to_matlab(x, f'{where}{{{i + 1}}}') for i, x in enumerate(flat)], _mshape(v.shape))
        if v.dtype.kind in 'US':
            flat = [str(s) for s in v.ravel(order='F')]
            if v.ndim == 0:
                return flat[0]
            return MatCell(flat, _mshape(v.shape))
        if v.dtype.kind not in 'biufc':
            raise MatFileError(None, where, f'cannot write an array of type {v.dtype}')
        if v.ndim == 0:
            return v.reshape(1, 1)
        if v.ndim == 1:
            return v.reshape(1, -1)
        return v
    raise MatFileError(None, where, f'cannot write a value of type {type(v).__name__}')


# ---------------------------------------------------------------------------- writing
def _normalize_version(version):
    v = str(version).strip().lower().lstrip('-').lstrip('v')
    if v in ('7.3', '73'):
        return '7.3'
    if v in ('7', '7.0', '6', '5'):
        return '7' if v.startswith('7') else '6'
    raise ValueError(f"unknown .mat version {version!r}: use '7' (default) or '7.3'")


def write_mat(path, variables, version='7', compress=True):
    """Write ``{name: value}`` to a .mat file, atomically (temporary file + rename).

    version: '7' (v5 format, zlib-compressed when ``compress``; scipy), '6' (v5
    uncompressed) or '7.3' (HDF5 with the MATLAB header; datasets gzip-compressed when
    ``compress`` and large). Values may be Python values or the MatStruct/MatCell form.
    """
    path = os.fspath(path)
    ver = _normalize_version(version)
    for name in variables:
        if not isinstance(name, str) or not name or not (name[0].isalpha()) or \
                not all(c.isalnum() or c == '_' for c in name):
            raise MatFileError(path, None, f'{name!r} is not a valid MATLAB variable name')
    try:
        mvars = {name: to_matlab(value, name) for name, value in variables.items()}
        if ver == '7.3':
            _atomic_write(path, lambda tmp: _write_h5(tmp, mvars, compress))
        else:
            _atomic_write(path, lambda tmp: _write_v5(tmp, mvars, compress and ver == '7'))
    except MatFileError as e:
        if e.path is None:
            raise MatFileError(path, e.field, e.reason) from None
        raise


def _umask():
    """The process umask, read without changing it where /proc allows (threads)."""
    try:
        with open('/proc/self/status') as fh:
            for line in fh:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tmp_beside(path):
    """A new empty temporary file in ``path``'s folder, with the mode the published file
    should have: that of the file it replaces, else what ``open(path, 'w')`` would give
    (a new file's 0600 would otherwise end up on the published file). Its name is
    :func:`pydagnn.io.tmpfiles.create_tmp`'s."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_umask()
    d, base = os.path.split(os.path.abspath(path))
    # named as ours, with the writer's pid: a killed writer's file is removed at the next
    # start (pydagnn.io.tmpfiles.clean_stale), nothing else ever is
    tmp = create_tmp(d, base)
    try:
        os.chmod(tmp, mode)
    except OSError:
        pass
    return tmp


def publish(tmp, path, header=None):
    """Write ``header`` at the start of ``tmp`` (the MATLAB userblock), fsync, and rename
    it onto ``path``: readers see the old file or the whole new one, never a part."""
    with open(tmp, 'r+b') as fh:
        if header is not None:
            fh.write(header)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def discard(tmp):
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _atomic_write(path, write):
    """``write(tmp)`` into a temporary file beside ``path``, then :func:`publish` it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MatFileError(path, None, f'the folder {folder} does not exist')
    tmp = tmp_beside(path)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise


# -- v5/v7 (scipy)
def _to_scipy(v):
    if isinstance(v, MatStruct):
        if not v.fields:
            if v.size == 1:
                return {}
            arr = np.empty(v.size, dtype=object)
            for i in range(v.size):
                arr[i] = {}
            return arr.reshape(v.shape, order='F')
        arr = np.empty(v.size, dtype=[(f, object) for f in v.fields])
        for f in v.fields:
            col = arr[f]
            for i, e in enumerate(v.elements):
                col[i] = _to_scipy(e[f])
        return arr.reshape(v.shape, order='F')
    if isinstance(v, MatCell):
        arr = np.empty(v.size, dtype=object)
        for i, x in enumerate(v.items):
            arr[i] = _to_scipy(x)
        return arr.reshape(v.shape, order='F')
    if isinstance(v, str):
        return v if v else np.zeros((0, 0), dtype='U1')
    if isinstance(v, np.ndarray):
        if v.ndim < 2:
            return v.reshape(1, -1) if v.ndim == 1 else v.reshape(1, 1)
        return v
    raise MatFileError(None, None, f'cannot write {type(v).__name__}')  # pragma: no cover


def _write_v5(tmp, mvars, compress):
    import scipy.io
    mdict = {name: _to_scipy(v) for name, v in mvars.items()}
    with open(tmp, 'wb') as fh:
        scipy.io.savemat(fh, mdict, format='5', long_field_names=True, do_compression=compress,
                         oned_as='row')


# -- v7.3 (HDF5)
_CLASS_OF_DTYPE = {
    np.dtype(np.float64): 'double', np.dtype(np.float32): 'single', np.dtype(np.int8): 'int8',
    np.dtype(np.uint8): 'uint8', np.dtype(np.int16): 'int16', np.dtype(np.uint16): 'uint16',
    np.dtype(np.int32): 'int32', np.dtype(np.uint32): 'uint32', np.dtype(np.int64): 'int64',
    np.dtype(np.uint64): 'uint64', np.dtype(np.bool_): 'logical',
    np.dtype(np.complex128): 'double', np.dtype(np.complex64): 'single',
}


def _matlab_header():
    """The 128 bytes MATLAB writes at the start of a v7.3 file's 512-byte userblock."""
    platform = {'win32': 'PCWIN64', 'darwin': 'MACI64'}.get(sys.platform, 'GLNXA64')
    text = (f'MATLAB 7.3 MAT-file, Platform: {platform}, '
            f'Created on: {time.strftime("%a %b %d %H:%M:%S %Y")} HDF5 schema 1.00 .').encode('ascii')
    text = text[:116].ljust(116, b' ')
    # 8 bytes of subsystem data offset (none), version 0x0200, endian indicator 'IM'
    return text + b'\x00' * 8 + b'\x00\x02' + b'IM'


def _ref_name(n):
    """The name of the ``n``-th member of ``#refs#``: MATLAB's 'a', 'b', ..., 'z', 'ba', ..."""
    s = ''
    while True:
        s = chr(ord('a') + n % 26) + s
        n //= 26
        if n == 0:
            return s


_COMPACT_MAX = 16 * 1024    # MATLAB keeps small arrays in the object header (compact layout)


class _H5Writer:
    """Writes MATLAB's v7.3 layout (``MATLAB_class``, ``MATLAB_fields`` and ``H5PATH``
    attributes, ``#refs#`` with its canonical empty, small arrays compact) with h5py's
    low-level API (the high-level one costs about 0.3 ms per attribute, and a network has
    thousands)."""

    def __init__(self, f, compress):
        import h5py
        self.h5py = h5py
        self.f = f
        self.fid = f.id
        self.compress = compress
        self.refs = None
        self.count = 0
        self.scalar_space = h5py.h5s.create(h5py.h5s.SCALAR)
        self.str_types = {}

    def _refs_group(self):
        h5py = self.h5py
        if self.refs is None:
            self.refs = h5py.h5g.create(self.fid, b'#refs#')
            self._attr_str(self.refs, b'H5PATH', '/#refs#')
            ds = self._dataset(self.refs, 'a', np.zeros(2, np.uint64))
            self._class(ds, 'canonical empty')
            self._attr_num(ds, b'MATLAB_empty', np.uint8(1))
            self.count = 1
        return self.refs

    def _ref(self, value, where):
        h5py = self.h5py
        refs = self._refs_group()
        name = _ref_name(self.count)
        self.count += 1
        self.write(refs, name, value, where, '/#refs#')
        return h5py.h5r.create(refs, name.encode('ascii'), h5py.h5r.OBJECT)

    def _attr_str(self, oid, name, value):
        h5py = self.h5py
        b = value.encode('ascii')
        size = max(len(b), 1)
        tid = self.str_types.get(size)
        if tid is None:
            tid = h5py.h5t.C_S1.copy()
            tid.set_size(size)
            tid.set_strpad(h5py.h5t.STR_NULLTERM)
            self.str_types[size] = tid
        if h5py.h5a.exists(oid, name):
            h5py.h5a.delete(oid, name)
        aid = h5py.h5a.create(oid, name, tid, self.scalar_space)
        aid.write(np.array(b, dtype=f'S{size}'), mtype=tid)

    def _attr_num(self, oid, name, value):
        h5py = self.h5py
        arr = np.array(value)
        aid = h5py.h5a.create(oid, name, h5py.h5t.py_create(arr.dtype), self.scalar_space)
        aid.write(arr)

    def _class(self, oid, cls):
        self._attr_str(oid, b'MATLAB_class', cls)

    def _fields(self, oid, fields):
        """``MATLAB_fields`` with MATLAB's type: variable-length sequences of 1-byte strings."""
        h5py = self.h5py
        base = h5py.h5t.C_S1.copy()
        base.set_size(1)
        base.set_strpad(h5py.h5t.STR_NULLTERM)
        tid = h5py.h5t.vlen_create(base)
        bufs = [np.frombuffer(n.encode('ascii'), np.uint8).copy() for n in fields]
        hv = np.zeros(len(fields), dtype=[('len', np.uintp), ('p', np.uintp)])
        for i, b in enumerate(bufs):
            hv[i] = (len(b), b.ctypes.data)
        aid = h5py.h5a.create(oid, b'MATLAB_fields', tid, h5py.h5s.create_simple((len(fields),)))
        aid.write(hv, mtype=tid)   # same memory and file type: the bytes go in as they are
        del bufs

    def _dataset(self, parent, name, data, mtype=None, ftype=None, compress=False):
        h5py = self.h5py
        data = np.ascontiguousarray(data)
        space = h5py.h5s.create_simple(data.shape)
        tid = ftype if ftype is not None else h5py.h5t.py_create(data.dtype, logical=True)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if compress:
            chunks = h5py.filters.guess_chunk(data.shape, None, data.dtype.itemsize)
            dcpl.set_chunk(chunks)
            dcpl.set_deflate(3)
        elif data.nbytes <= _COMPACT_MAX:
            dcpl.set_layout(h5py.h5d.COMPACT)
        dsid = h5py.h5d.create(parent, name.encode('utf-8'), tid, space, dcpl=dcpl)
        if data.size:
            dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, data, mtype=mtype)
        return dsid

    def _empty(self, parent, name, cls, shape, fields=None):
        ds = self._dataset(parent, name, np.array(_mshape(shape), dtype=np.uint64))
        self._class(ds, cls)
        if fields:
            self._fields(ds, fields)
        if cls == 'logical':
            self._attr_num(ds, b'MATLAB_int_decode', np.int32(1))
        elif cls == 'char':
            self._attr_num(ds, b'MATLAB_int_decode', np.int32(2))
        self._attr_num(ds, b'MATLAB_empty', np.uint8(1))
        return ds

    def _ref_dataset(self, parent, name, refs, shape):
        h5py = self.h5py
        arr = np.empty(len(refs), dtype=h5py.ref_dtype)
        for i, r in enumerate(refs):
            arr[i] = r
        return self._dataset(parent, name, arr.reshape(shape[::-1]), ftype=h5py.h5t.STD_REF_OBJ)

    @staticmethod
    def _h5path(parent_path, name, is_group):
        """MATLAB's ``H5PATH``: none at the top level, the own path for a member of
        ``#refs#`` and for a struct group, else the parent group's path."""
        if parent_path == '/':
            return None
        if is_group or parent_path == '/#refs#':
            return f'{parent_path.rstrip("/")}/{name}'
        return parent_path

    def struct(self, parent, parent_path, name, fields):
        """An open 1x1 struct group (its fields written by later calls); returns
        ``(group id, its path)``."""
        h5py = self.h5py
        for fn in fields:
            _check_field_name(fn, f'{name}.{fn}')
        g = h5py.h5g.create(parent, name.encode('utf-8'))
        h5path = self._h5path(parent_path, name, True)
        if h5path:
            self._attr_str(g, b'H5PATH', h5path)
        self._class(g, 'struct')
        if fields:
            self._fields(g, fields)
        return g, f'{parent_path.rstrip("/")}/{name}'

    def write(self, parent, name, v, where, parent_path='/'):
        """Write the :func:`to_matlab` value ``v`` as ``name`` into the group ``parent``
        whose path is ``parent_path``."""
        # MATLAB writes a struct with no fields (struct(), a Sum block) as a MATLAB_empty
        # dataset of its dims, not as a group
        if isinstance(v, MatStruct) and v.size and v.fields:
            g, gpath = self.struct(parent, parent_path, name, v.fields)
            if v.shape == (1, 1):
                for fn in v.fields:
                    self.write(g, fn, v.elements[0][fn], f'{where}.{fn}', gpath)
            else:
                for fn in v.fields:
                    refs = [self._ref(e[fn], f'{where}({i + 1}).{fn}') for i, e in enumerate(v.elements)]
                    ds = self._ref_dataset(g, fn, refs, v.shape)
                    self._attr_str(ds, b'H5PATH', gpath)
            return g
        obj = self._write_dataset(parent, name, v, where)
        h5path = self._h5path(parent_path, name, False)
        if h5path:
            self._attr_str(obj, b'H5PATH', h5path)
        return obj

    def _write_dataset(self, parent, name, v, where):
        if isinstance(v, MatStruct):
            return self._empty(parent, name, 'struct', v.shape, v.fields)
        if isinstance(v, MatCell):
            if v.size == 0:
                return self._empty(parent, name, 'cell', v.shape)
            refs = [self._ref(x, f'{where}{{{i + 1}}}') for i, x in enumerate(v.items)]
            ds = self._ref_dataset(parent, name, refs, v.shape)
            self._class(ds, 'cell')
            return ds
        if isinstance(v, str):
            if not v:
                return self._empty(parent, name, 'char', (0, 0))
            codes = np.frombuffer(v.encode('utf-16-le', 'surrogatepass'), dtype='<u2')
            ds = self._dataset(parent, name, codes.reshape(-1, 1))
            self._class(ds, 'char')
            self._attr_num(ds, b'MATLAB_int_decode', np.int32(2))
            return ds
        if isinstance(v, np.ndarray):
            arr = v if v.ndim >= 2 else v.reshape(1, -1)
            if arr.dtype.byteorder not in '=|':
                arr = arr.astype(arr.dtype.newbyteorder('='))
            cls = _CLASS_OF_DTYPE.get(arr.dtype)
            if cls is None:
                raise MatFileError(None, where, f'cannot write an array of type {arr.dtype} in v7.3')
            if arr.size == 0:
                return self._empty(parent, name, cls, arr.shape)
            data = arr.T
            if cls == 'logical':
                data = data.astype(np.uint8)
            elif arr.dtype.kind == 'c':
                real = arr.real.dtype
                cdata = np.empty(data.shape, dtype=[('real', real), ('imag', real)])
                cdata['real'] = data.real
                cdata['imag'] = data.imag
                data = cdata
            ds = self._dataset(parent, name, data, compress=self.compress and data.nbytes >= 1 << 16)
            self._class(ds, cls)
            if cls == 'logical':
                self._attr_num(ds, b'MATLAB_int_decode', np.int32(1))
            return ds
        raise MatFileError(None, where, f'cannot write {type(v).__name__} in v7.3')


def _check_field_name(name, where):
    if not isinstance(name, str) or not name or not name[0].isalpha() or \
            not all(c.isalnum() or c == '_' for c in name) or not name.isascii():
        raise MatFileError(None, where, f'{name!r} is not a valid MATLAB field name')


def _write_h5(tmp, mvars, compress):
    import h5py
    with h5py.File(tmp, 'w', userblock_size=512, libver='earliest') as f:
        w = _H5Writer(f, compress)
        for name, v in mvars.items():
            w.write(f.id, name, v, name)
    header = _matlab_header()
    with open(tmp, 'rb+') as fh:
        fh.write(header + b'\x00' * (512 - len(header)))


class Publishing:
    """A writer that publishes its file on :meth:`close` and leaves nothing on
    :meth:`abort`; as a context manager it closes when the block ends cleanly and aborts
    when it raises."""

    _done = False

    def _finish(self):
        """Write what is left and publish the file (subclasses)."""
        raise NotImplementedError

    def _drop(self):
        """Release the file and delete the temporary one (subclasses; must not raise)."""
        raise NotImplementedError

    def close(self):
        """Finish the file and publish it (once); on any error abort, and re-raise."""
        if self._done:
            return
        try:
            self._finish()
            self._done = True
        except BaseException:
            self.abort()
            raise

    def abort(self):
        """Drop the temporary file; nothing is written at the target path."""
        self._done = True
        self._drop()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class MatWriter(Publishing):
    """A v7.3 file written piece by piece, in bounded memory, published atomically.

    ::

        with MatWriter('big.mat') as w:
            s = w.struct('images', ['data', 'labels'])          # an open 1x1 struct
            data = w.append_array(s, 'data', (64, 64, 3), N, np.uint8)
            for block in blocks:                                # 64 x 64 x 3 x k
                data.append(block)
            w.write('labels', labels, s)
            w.write('meta', {'sets': ['train', 'val']})          # any to_matlab value

    The file grows under a temporary name beside ``path`` (:func:`tmp_beside`) and is
    :func:`publish`-ed with the MATLAB header when the block ends without error (or on
    :meth:`close`); otherwise (or on :meth:`abort`) it is deleted and ``path`` untouched.
    """

    def __init__(self, path, compress=False):
        import h5py
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise MatFileError(self.path, None, f'the folder {folder} does not exist')
        self._tmp = tmp_beside(self.path)
        self._f = None
        try:
            self._f = h5py.File(self._tmp, 'w', libver='earliest', userblock_size=512)
            self._w = _H5Writer(self._f, compress)
        except BaseException:
            self.abort()
            raise

    def struct(self, name, fields, parent=None):
        """An open 1x1 struct ``name`` with ``fields`` (written by later calls, in any
        order) at the top level or in the open struct ``parent``."""
        pid, ppath = parent if parent is not None else (self._f.id, '/')
        where = name if parent is None else f'{ppath.lstrip("/").replace("/", ".")}.{name}'
        try:
            return self._w.struct(pid, ppath, name, list(fields))
        except MatFileError as e:
            raise MatFileError(self.path, e.field or where, e.reason) from None

    def write(self, name, value, parent=None):
        """Write ``value`` (any :func:`to_matlab` value) as variable ``name``, or as field
        ``name`` of the open struct ``parent``."""
        pid, ppath = parent if parent is not None else (self._f.id, '/')
        where = name if parent is None else f'{ppath.lstrip("/").replace("/", ".")}.{name}'
        try:
            self._w.write(pid, name, to_matlab(value, where), where, ppath)
        except MatFileError as e:
            raise MatFileError(self.path, e.field, e.reason) from None

    def append_array(self, parent, name, item_shape, n, dtype, layout='contiguous',
                     compression=None):
        """An :class:`AppendArray`: a MATLAB ``item_shape x n`` array filled by ``append``
        along its last axis. ``layout``: 'contiguous' (one unfiltered block, allocated at
        once: the fastest to read back) or 'chunked' (one item per chunk, unlimited last
        axis, optionally gzip ``compression`` 1-9, as MATLAB writes growable arrays)."""
        import h5py
        pid, ppath = parent if parent is not None else (self._f.id, '/')
        dtype = np.dtype(dtype)
        cls = _CLASS_OF_DTYPE.get(dtype)
        if cls is None or cls == 'logical' or dtype.kind == 'c':
            raise ValueError(f'MatWriter.append_array: cannot stream {dtype} values')
        hshape = (int(n),) + tuple(int(s) for s in item_shape)[::-1]
        group = self._f if parent is None else h5py.Group(pid)
        if layout == 'chunked':
            kw = dict(chunks=(1,) + hshape[1:], maxshape=(None,) + hshape[1:])
            if compression is not None:
                kw.update(compression='gzip', compression_opts=int(compression))
            ds = group.create_dataset(name, hshape, dtype, **kw)
        elif layout == 'contiguous':
            if compression is not None:
                raise ValueError("MatWriter.append_array: compression needs layout='chunked'")
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            ds = group.create_dataset(name, hshape, dtype, dcpl=dcpl)
        else:
            raise ValueError("MatWriter.append_array: layout must be 'contiguous' or 'chunked', "
                             f"got {layout!r}")
        h5path = self._w._h5path(ppath, name, False)
        if h5path:
            self._w._attr_str(ds.id, b'H5PATH', h5path)
        self._w._class(ds.id, cls)
        return AppendArray(ds, tuple(int(s) for s in item_shape), int(n))

    def _finish(self):
        self._f.close()
        publish(self._tmp, self.path, _matlab_header())

    def _drop(self):
        if self._f is not None:
            try:
                self._f.close()
            except Exception:
                pass
        discard(self._tmp)


class AppendArray:
    """The streaming end of :meth:`MatWriter.append_array`: ``append(block)`` writes an
    ``item_shape x k`` block (any memory order) after what is already there."""

    def __init__(self, ds, item_shape, n):
        self._ds = ds
        self.item_shape = item_shape
        self.n = n
        self.count = 0

    def append(self, block):
        block = np.asarray(block)
        k = block.shape[-1]
        if block.shape[:-1] != self.item_shape or self.count + k > self.n:
            raise ValueError(f'AppendArray.append: a {block.shape} block does not fit '
                             f'{self.item_shape} x {self.n} after {self.count} items')
        if k:
            self._ds[self.count:self.count + k] = np.ascontiguousarray(block.T)
        self.count += k
