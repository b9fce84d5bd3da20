"""Reading the downsampled-ImageNet batches (pickled dicts) without running code from them.

``pickle.load`` calls whatever callable a pickle names (``os.system`` included), so a
crafted ``train_data_batch_1`` would run any command during ``python -m pydagnn.imdb
convert``. :func:`load_batch_pickle` admits only what the format needs:

* the plain containers and scalars pickle builds without naming a global (dict, list,
  tuple, str, bytes, int, float, bool, None);
* NumPy arrays of a numeric dtype (bool, int*, uint*, float*), through NumPy's own
  reconstruction (``numpy.core.multiarray._reconstruct`` with ``numpy.ndarray``,
  ``numpy.dtype``, ``numpy.core.multiarray.scalar``, ``numpy.core.numeric._frombuffer``;
  the same under ``numpy._core``), each checked before it is called;
* ``_codecs.encode(text, 'latin1')``, how Python 3 pickles bytes in protocol 2.

Any other global, an object or structured dtype, or a subclass of ndarray is a
:class:`~pydagnn.io.errors.MatFileError` naming the file. Reads never ask the file for
more bytes than it has, so a declared length cannot allocate past the file's size.
"""
import os
import pickle

import numpy as np

from .errors import MatFileError

__all__ = ['load_batch_pickle']

_NUMPY_MODULES = ('numpy.core.multiarray', 'numpy._core.multiarray', 'numpy.core.numeric',
                  'numpy._core.numeric')


class _NdarrayType:
    """Stands for ``numpy.ndarray`` inside the pickle: only :func:`_reconstruct` accepts it,
    so the pickle cannot call ``ndarray(shape)`` itself (NEWOBJ with a huge shape)."""


_NDARRAY = _NdarrayType()


def _numeric_dtype(spec):
    dt = np.dtype(spec)
    if dt.kind not in 'biuf' or dt.names is not None or dt.subdtype is not None:
        raise pickle.UnpicklingError(f'array of dtype {dt} (only numeric arrays are read)')
    return dt


def _dtype(spec, align=False, copy=True):
    """``numpy.dtype`` for numeric types only (an object dtype would unpickle objects)."""
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f'dtype from {type(spec).__name__}')
    return np.dtype(_numeric_dtype(spec), align=bool(align), copy=bool(copy))


def _reconstruct(subtype, shape, typecode):
    """NumPy's empty-array start of an ndarray pickle (its data comes with __setstate__,
    which checks it against the shape)."""
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError('array of a subclass of numpy.ndarray')
    if tuple(shape) != (0,):
        raise pickle.UnpicklingError(f'array reconstruction with shape {shape!r}')
    return np.ndarray((0,), dtype=np.uint8)


def _scalar(dtype, data=b''):
    dt = _numeric_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise pickle.UnpicklingError('malformed numpy scalar')
    return np.frombuffer(data, dt)[0]


def _frombuffer(buf, dtype, shape, order):
    dt = _numeric_dtype(dtype)
    arr = np.frombuffer(bytes(buf), dt)           # checks the length against the dtype
    return arr.reshape(shape, order=order)        # checks the shape against the length


def _encode(text, encoding='latin1'):
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError(f'_codecs.encode with encoding {encoding!r}')
    return text.encode('latin1')


_ALLOWED = {('numpy', 'ndarray'): _NDARRAY, ('numpy', 'dtype'): _dtype,
            ('_codecs', 'encode'): _encode}
for _m in _NUMPY_MODULES:
    _ALLOWED[(_m, '_reconstruct')] = _reconstruct
    _ALLOWED[(_m, 'scalar')] = _scalar
    _ALLOWED[(_m, '_frombuffer')] = _frombuffer


def _build_array(arr, state):
    """BUILD on an array from :func:`_reconstruct`: NumPy's ``(version, shape, dtype,
    fortran, data)`` with the dtype rebuilt from its name (no flags from the file) and the
    data's length checked against the shape before NumPy sees it."""
    if not (isinstance(state, tuple) and len(state) == 5):
        raise pickle.UnpicklingError('malformed ndarray state')
    version, shape, dt, fortran, raw = state
    if not isinstance(dt, np.dtype) or not isinstance(shape, tuple) or \
            not all(isinstance(d, int) and d >= 0 for d in shape):
        raise pickle.UnpicklingError('malformed ndarray state')
    dt = np.dtype(_numeric_dtype(dt.str))
    if isinstance(raw, str):             # Python 2's str, decoded as latin1 by the reader
        raw = raw.encode('latin1')
    if not isinstance(raw, (bytes, bytearray)):
        raise pickle.UnpicklingError(f'ndarray data of type {type(raw).__name__}')
    n = 1
    for d in shape:
        n *= d
    if n * dt.itemsize != len(raw):
        raise pickle.UnpicklingError(f'ndarray of shape {shape} of {dt} with {len(raw)} bytes')
    arr.__setstate__((version, shape, dt, bool(fortran), bytes(raw)))
    return arr


def _build_dtype(dt, state):
    """BUILD on a dtype: only its byte order is taken from the file (a numeric dtype
    has nothing else; fields or flags from a file could make NumPy read objects)."""
    order = state[1] if isinstance(state, tuple) and len(state) > 1 else '|'
    if order not in ('<', '>', '|', '='):
        raise pickle.UnpicklingError(f'dtype byte order {order!r}')
    return dt.newbyteorder(order) if order in '<>' else dt


class _BatchUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with :data:`_ALLOWED`: the C one (``pickle.Unpickler``)
    lets ``find_class`` be overridden but not BUILD, and BUILD on a NumPy dtype would let
    the file set its fields and flags (a 1.3 GB batch is one bytes object: the pure-Python
    reader is as fast on it)."""
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f'refuses the global {module}.{name} (a batch holds '
                                         'only dicts, lists, numbers, strings and numeric '
                                         'arrays)') from None

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.ndarray) and inst.shape == (0,):
            self.stack[-1] = _build_array(inst, state)
        elif isinstance(inst, np.dtype):
            self.stack[-1] = _build_dtype(inst, state)
        else:
            raise pickle.UnpicklingError(f'refuses to set the state of a {type(inst).__name__}')
    dispatch[pickle.BUILD[0]] = load_build


class _Bounded:
    """A read-only file that never hands out more than what is left of it: pickle's
    length-prefixed opcodes ask for what they declare, and a buffered read of 2^40 bytes
    would allocate that much before finding the end."""

    def __init__(self, fh, size):
        self.fh = fh
        self.left = size

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data

    def readline(self, limit=-1):
        data = self.fh.readline(self.left)
        self.left -= len(data)
        return data


def load_batch_pickle(path):
    """The object pickled in ``path`` (a downsampled-ImageNet batch), read with only the
    globals above admitted. Raises MatFileError naming the file for anything else."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as fh:
            return _BatchUnpickler(_Bounded(fh, size), encoding='latin1').load()  # Python 2 or 3
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError, RecursionError, UnicodeError) as e:
        raise MatFileError(path, None, f'not a downsampled-ImageNet batch pickle '
                           f'({type(e).__name__}: {e})') from None
    except OSError as e:
        raise MatFileError(path, None, f'cannot read: {e}') from None
