"""MATLAB ``.mat`` files: v5/v7 (read by a checked pure-Python parser, written with
:mod:`scipy.io`), v7.3 (HDF5) through h5py.

Both readers give the same in-memory form, close to MATLAB's own:

===================  ==========================================================
MATLAB               Python (what :func:`read_mat` returns)
===================  ==========================================================
struct array         :class:`MatStruct` (``shape``, ``fields``, ``elements``:
                     one dict per element, column-major)
cell array           :class:`MatCell` (``shape``, ``items``, column-major)
char                 ``str`` (a char matrix with several rows: list of str)
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
None -> ``[]``, Python numbers -> double, 1-D arrays -> rows). So a Python value comes
back from a file as itself except: numeric lists come back as 1xN arrays, a list of
one dict as a dict, tuples as lists, ints as floats (MATLAB has doubles).

:func:`write_mat` writes v7 (scipy, compressed) or v7.3 (HDF5 with the 512-byte
MATLAB header, ``MATLAB_class`` attributes, struct arrays as fields of object
references into ``#refs#``, empty values as ``MATLAB_empty`` datasets -- the layout
MATLAB itself writes), always to a temporary file in the target folder that is then
renamed over the target, so a crash never leaves a half-written file.

Every failure to read is a :class:`~pydagnn.io.errors.MatFileError` naming the file.
"""
import os
import sys
import tempfile
import time
import warnings

import numpy as np

from .errors import MatFileError

__all__ = ['MatStruct', 'MatCell', 'MatObject', 'read_mat', 'write_mat', 'to_python', 'to_matlab',
           'is_hdf5', 'MatFileError']

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


class MatStruct:
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

    @property
    def size(self):
        return len(self.elements)

    def __len__(self):
        return len(self.elements)

    def __getitem__(self, i):
        return self.elements[i]

    def __iter__(self):
        return iter(self.elements)

    def __repr__(self):
        return f"MatStruct({'x'.join(map(str, self.shape))}, fields={self.fields})"


class MatCell:
    """A MATLAB cell array: ``shape`` (>= 2 dims) and ``items`` in column-major order."""
    __slots__ = ('shape', 'items')

    def __init__(self, items=(), shape=None):
        self.items = list(items)
        self.shape = _mshape(shape) if shape is not None else ((1, len(self.items)) if self.items else (0, 0))
        if _prod(self.shape) != len(self.items):
            raise ValueError(f'MatCell: shape {self.shape} does not hold {len(self.items)} items')

    @property
    def size(self):
        return len(self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __iter__(self):
        return iter(self.items)

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
def is_hdf5(path):
    """True when ``path`` is an HDF5 file (a MATLAB v7.3 file is one)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(8)
            if head == b'\x89HDF\r\n\x1a\n':
                return True
            # the signature may sit after a user block of 512, 1024, 2048, ... bytes
            for off in (512, 1024, 2048, 4096):
                f.seek(off)
                if f.read(8) == b'\x89HDF\r\n\x1a\n':
                    return True
    except OSError:
        return False
    return False


def read_mat(path, variable_names=None):
    """Read a ``.mat`` file (v4/v5/v7 or v7.3) into ``{name: value}`` (see the module doc).

    ``variable_names``: read only these variables (others are not loaded).
    Raises MatFileError naming the file for anything unreadable.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MatFileError(path, None, 'no such file')
    if os.path.isdir(path):
        raise MatFileError(path, None, 'is a folder, not a .mat file')
    try:
        if is_hdf5(path):
            return _read_h5(path, variable_names)
        return _read_v5(path, variable_names)
    except MatFileError:
        raise
    except (Exception, RecursionError) as e:  # scipy/h5py/zlib/numpy errors on a bad file
        raise MatFileError(path, None, f'not a readable MATLAB .mat file ({type(e).__name__}: {e})') from e


def _read_v5(path, variable_names):
    with open(path, 'rb') as f:
        data = f.read()
    if len(data) == 0:
        raise MatFileError(path, None, 'the file is empty')
    if len(data) < 128:
        raise MatFileError(path, None, f'too short to be a .mat file ({len(data)} bytes)')
    endian = data[126:128]
    if endian not in (b'IM', b'MI'):
        if data[:6] != b'MATLAB' and int.from_bytes(data[:4], 'little') < 5000:
            return _read_v4(path, variable_names)
        raise MatFileError(path, None, 'not a MATLAB .mat file (no v5 header)')
    return _V5Reader(data, path, '<' if endian == b'IM' else '>').variables(variable_names)


def _read_v4(path, variable_names):
    """MATLAB v4 files (no header, no nesting): through scipy."""
    import scipy.io
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        raw = scipy.io.loadmat(path, appendmat=False, variable_names=variable_names, squeeze_me=False,
                               chars_as_strings=True, mat_dtype=False)
    return {k: _from_scipy(v, path, k, 0) for k, v in raw.items() if not k.startswith('__')}


# MAT v5 data types and array classes
_MI_DTYPES = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 9: 'f8', 12: 'i8', 13: 'u8',
              16: 'u1', 17: 'u2', 18: 'u4'}
_MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 14, 15, 16
_MX_DTYPES = {6: 'f8', 7: 'f4', 8: 'i1', 9: 'u1', 10: 'i2', 11: 'u2', 12: 'i4', 13: 'u4', 14: 'i8', 15: 'u8'}
_MX_CELL, _MX_STRUCT, _MX_OBJECT, _MX_CHAR, _MX_SPARSE, _MX_FUNCTION, _MX_OPAQUE = 1, 2, 3, 4, 5, 16, 17


class _V5Reader:
    """A MAT v5/v7 parser in plain Python. Every size is checked against its container,
    so a damaged file raises MatFileError (scipy's compiled reader can crash on one)."""

    def __init__(self, data, path, bo):
        self.data = data
        self.path = path
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
                    inner = zlib.decompress(data[ds:de])
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

    def peek_name(self, head, where):
        try:
            _, ds, _, _ = self.tag(head, 0, len(head) + (1 << 40), where)
            _, _, _, p = self.tag(head, ds, len(head), where)  # array flags
            _, _, _, p = self.tag(head, p, len(head), where)  # dimensions
            _, nds, nde, _ = self.tag(head, p, len(head), where)
            return head[nds:nde].decode('latin-1')
        except MatFileError:
            return None

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
            rows = codes.reshape(shape[0], -1, order='F')
            strings = [''.join(chr(c) if c < 0x110000 else '?' for c in r) for r in rows.tolist()]
            return name, strings[0] if len(strings) == 1 else strings
        if cls == _MX_CELL:
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


def _read_h5(path, variable_names):
    import h5py
    out = {}
    with h5py.File(path, 'r') as f:
        names = [k for k in f.keys() if not k.startswith('#')]
        if variable_names is not None:
            wanted = [variable_names] if isinstance(variable_names, str) else list(variable_names)
            names = [n for n in names if n in wanted]
        for name in names:
            oid = h5py.h5o.open(f.id, name.encode('utf-8'))
            out[name] = _from_h5(oid, f.id, path, name, 0)
    return out


def _h5_child(gid, name, path, where):
    import h5py
    try:
        return h5py.h5o.open(gid, name.encode('utf-8'))
    except Exception as e:
        raise MatFileError(path, where, f'struct field {name!r} is listed but missing ({e})') from e


def _h5_read(dsid):
    import h5py
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


def _from_h5(oid, fid, path, where, depth):
    import h5py
    if depth > _MAX_DEPTH:
        raise MatFileError(path, where, f'nesting deeper than {_MAX_DEPTH} levels (cyclic references?)')
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
                elem[fn] = _from_h5(_h5_child(oid, fn, path, where), fid, path, f'{where}.{fn}', depth + 1)
            return MatStruct(fields, [elem], (1, 1))
        shape = _mshape(first.shape[::-1])
        n = _prod(shape)
        elements = [dict() for _ in range(n)]
        for fn in fields:
            ds = _h5_child(oid, fn, path, where)
            if not isinstance(ds, h5py.h5d.DatasetID) or not _is_refs(ds):
                raise MatFileError(path, f'{where}.{fn}', 'struct array field is not a reference array')
            refs = _h5_read(ds).reshape(-1)
            if refs.size != n:
                raise MatFileError(path, f'{where}.{fn}', f'{refs.size} references for a {shape} struct array')
            for i, r in enumerate(refs):
                w = f'{where}({i + 1}).{fn}'
                elements[i][fn] = _from_h5(_deref(r, fid, path, w), fid, path, w, depth + 1)
        return MatStruct(fields, elements, shape)

    if not isinstance(oid, h5py.h5d.DatasetID):
        raise MatFileError(path, where, f'unexpected HDF5 object {type(oid).__name__}')
    empty = _h5_attr(oid, b'MATLAB_empty')
    if empty is not None and empty.reshape(-1)[:1].any():
        dims = _h5_read(oid).reshape(-1)
        shape = _mshape(int(d) for d in dims) if dims.size >= 2 else (0, 0)
        if _prod(shape) != 0:
            shape = (0, 0)
        if cls == 'cell':
            return MatCell([], shape)
        if cls == 'struct':
            return MatStruct([], [], shape)
        if cls == 'char':
            return ''
        return np.zeros(shape, dtype=_H5_CLASSES.get(cls, np.float64), order='F')
    if _is_refs(oid):
        if cls not in (None, 'cell'):
            return MatObject(cls)
        data = _h5_read(oid)
        shape = _mshape(data.shape[::-1])
        items = []
        for i, r in enumerate(data.reshape(-1)):
            w = f'{where}{{{i + 1}}}'
            items.append(_from_h5(_deref(r, fid, path, w), fid, path, w, depth + 1))
        return MatCell(items, shape)
    if oid.get_type().get_class() in (h5py.h5t.STRING, h5py.h5t.VLEN, h5py.h5t.OPAQUE, h5py.h5t.ENUM):
        raise MatFileError(path, where, 'unsupported HDF5 data (not written by MATLAB)')
    data = _h5_read(oid)
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
        rows = codes.reshape(codes.shape[0], -1, order='F')
        strings = [r.astype('<u2').tobytes().decode('utf-16-le', 'replace') for r in rows]
        return strings[0] if len(strings) == 1 else strings
    if cls == 'logical':
        return arr.astype(bool)
    if cls in _H5_CLASSES and arr.dtype.kind in 'biuf':
        return arr.astype(_H5_CLASSES[cls], copy=False)
    if arr.dtype.kind not in 'biufc':
        raise MatFileError(path, where, f'unsupported HDF5 data of type {arr.dtype}')
    return arr


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
            if not isinstance(k, str) or not k:
                raise MatFileError(None, where, f'struct field names must be non-empty strings, got {k!r}')
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
    (mkstemp's 0600 would otherwise end up on the published file)."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_umask()
    d, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix='.tmp', dir=d)
    os.close(fd)
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


class _H5Writer:
    """Writes the v7.3 layout with h5py's low-level API (the high-level one costs
    about 0.3 ms per attribute, and a network has thousands)."""

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

    def _ref(self, value, where):
        h5py = self.h5py
        if self.refs is None:
            self.refs = h5py.h5g.create(self.fid, b'#refs#')
        name = _ref_name(self.count)
        self.count += 1
        self.write(self.refs, name, value, where)
        return h5py.h5r.create(self.refs, name.encode('ascii'), h5py.h5r.OBJECT)

    def _attr_str(self, oid, name, value):
        h5py = self.h5py
        b = value.encode('ascii')
        tid = self.str_types.get(len(b))
        if tid is None:
            tid = h5py.h5t.C_S1.copy()
            tid.set_size(len(b))
            tid.set_strpad(h5py.h5t.STR_NULLTERM)
            self.str_types[len(b)] = tid
        aid = h5py.h5a.create(oid, name, tid, self.scalar_space)
        aid.write(np.array(b, dtype=f'S{len(b)}'), mtype=tid)

    def _attr_num(self, oid, name, value):
        h5py = self.h5py
        arr = np.array(value)
        aid = h5py.h5a.create(oid, name, h5py.h5t.py_create(arr.dtype), self.scalar_space)
        aid.write(arr)

    def _class(self, oid, cls):
        self._attr_str(oid, b'MATLAB_class', cls)

    def _fields(self, oid, fields):
        h5py = self.h5py
        data = np.empty(len(fields), dtype=object)
        for i, fn in enumerate(fields):
            data[i] = np.frombuffer(fn.encode('ascii'), dtype='S1')
        h5py.AttributeManager(self._hl(oid)).create('MATLAB_fields', data, dtype=h5py.vlen_dtype(np.dtype('S1')))

    def _hl(self, oid):
        h5py = self.h5py
        return h5py.Group(oid) if isinstance(oid, h5py.h5g.GroupID) else h5py.Dataset(oid)

    def _dataset(self, parent, name, data, mtype=None, ftype=None, compress=False):
        h5py = self.h5py
        data = np.ascontiguousarray(data)
        space = h5py.h5s.create_simple(data.shape)
        tid = ftype if ftype is not None else h5py.h5t.py_create(data.dtype, logical=True)
        dcpl = None
        if compress:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            chunks = h5py.filters.guess_chunk(data.shape, None, data.dtype.itemsize)
            dcpl.set_chunk(chunks)
            dcpl.set_deflate(3)
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

    def write(self, parent, name, v, where):
        h5py = self.h5py
        if isinstance(v, MatStruct):
            if v.size == 0:
                return self._empty(parent, name, 'struct', v.shape, v.fields)
            g = h5py.h5g.create(parent, name.encode('utf-8'))
            self._class(g, 'struct')
            if v.fields:
                self._fields(g, v.fields)
            if v.shape == (1, 1):
                for fn in v.fields:
                    self.write(g, fn, v.elements[0][fn], f'{where}.{fn}')
            else:
                for fn in v.fields:
                    refs = [self._ref(e[fn], f'{where}({i + 1}).{fn}') for i, e in enumerate(v.elements)]
                    self._ref_dataset(g, fn, refs, v.shape)
            return g
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


def _write_h5(tmp, mvars, compress):
    import h5py
    with h5py.File(tmp, 'w', userblock_size=512, libver='earliest') as f:
        w = _H5Writer(f, compress)
        for name, v in mvars.items():
            w.write(f.id, name, v, name)
    header = _matlab_header()
    with open(tmp, 'rb+') as fh:
        fh.write(header + b'\x00' * (512 - len(header)))
