"""What one read of an untrusted file may cost: the caps of :func:`pydagnn.io.matfile.read_mat`.

A file declares its sizes; a hostile or damaged one declares sizes it does not hold (a
208-byte struct of 2^40 elements, a 2 MB zlib stream of 2 GB, a cell whose references all
point at one subtree, 48 levels deep). The readers check every declared size against a
:class:`Budget` *before* allocating, so such a file fails with a clear
:class:`~pydagnn.io.errors.MatFileError` in bounded time and memory.

* ``max_bytes``: the bytes one read may decode into memory, all arrays together, each
  shared reference counted as often as it is reached (what a caller that walks the tree
  would copy). Default 8 GiB; ``PYDAGNN_MAX_ARRAY_BYTES`` (bytes, or with a K/M/G/T suffix,
  binary units) or a loader's ``max_bytes=`` changes it. Arrays left on disk (an imdb's
  lazy ``images.data``) are not counted: they are never read whole.
* ``max_elements``: the values one read may decode (cell items, struct field values,
  arrays), counted the same way. Default 2^24 (ImageNet's 1.3 M image names fit ten times);
  ``PYDAGNN_MAX_ELEMENTS`` or ``max_elements=`` changes it.
"""
import os
import re

from .errors import MatFileError

__all__ = ['Budget', 'resolve_max_bytes', 'resolve_max_elements', 'parse_size',
           'DEFAULT_MAX_BYTES', 'DEFAULT_MAX_ELEMENTS', 'ENV_MAX_BYTES', 'ENV_MAX_ELEMENTS']

DEFAULT_MAX_BYTES = 8 << 30
DEFAULT_MAX_ELEMENTS = 1 << 24
ENV_MAX_BYTES = 'PYDAGNN_MAX_ARRAY_BYTES'
ENV_MAX_ELEMENTS = 'PYDAGNN_MAX_ELEMENTS'

_UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}


def parse_size(text, name):
    """``'4096'``, ``'512M'``, ``'1.5G'``, ``'8GiB'`` -> int bytes (binary units). ``name`` (the
    variable or argument) is named in the ValueError for anything else."""
    m = re.fullmatch(r'\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:I?B)?\s*', str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f'{name}={text!r}: expected a positive size in bytes, e.g. 4294967296 or 4G')
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f'{name}={text!r}: expected a positive size in bytes, e.g. 4294967296 or 4G')
    return value


def _resolve(value, env, default, arg):
    if value is not None:
        if isinstance(value, str):
            return parse_size(value, arg)
        if isinstance(value, bool) or int(value) != value or value <= 0:
            raise ValueError(f'{arg}={value!r}: expected a positive integer')
        return int(value)
    text = os.environ.get(env)
    if text is None or not text.strip():
        return default
    return parse_size(text, env)


def resolve_max_bytes(value=None):
    """The byte cap: ``value`` if given, else ``$PYDAGNN_MAX_ARRAY_BYTES``, else 8 GiB."""
    return _resolve(value, ENV_MAX_BYTES, DEFAULT_MAX_BYTES, 'max_bytes')


def resolve_max_elements(value=None):
    """The element cap: ``value`` if given, else ``$PYDAGNN_MAX_ELEMENTS``, else 2^24."""
    return _resolve(value, ENV_MAX_ELEMENTS, DEFAULT_MAX_ELEMENTS, 'max_elements')


def _human(n):
    for unit, size in (('TiB', 1 << 40), ('GiB', 1 << 30), ('MiB', 1 << 20), ('KiB', 1 << 10)):
        if n >= size:
            return f'{n / size:.3g} {unit}'
    return f'{n} bytes'


class Budget:
    """The bytes and values one read has decoded so far, against its caps.

    :meth:`take` is called with what a value *will* cost, before it is allocated; past a
    cap it raises MatFileError naming the file and the field.
    """
    __slots__ = ('path', 'max_bytes', 'max_elements', 'bytes', 'elements')

    def __init__(self, path, max_bytes=None, max_elements=None):
        self.path = path
        self.max_bytes = resolve_max_bytes(max_bytes)
        self.max_elements = resolve_max_elements(max_elements)
        self.bytes = 0
        self.elements = 0

    def check_bytes(self, nbytes, where, what='an array'):
        """Refuse a single allocation of ``nbytes`` (a buffer that is not kept) over the cap."""
        if nbytes > self.max_bytes:
            raise MatFileError(self.path, where, f'{what} of {_human(nbytes)} is over the cap of '
                               f'{_human(self.max_bytes)} one read may decode (damaged file? '
                               f'raise it with {ENV_MAX_BYTES} or max_bytes=)')

    def check_elements(self, nelements, where):
        """Refuse ``nelements`` more values over the cap, without charging them."""
        if self.elements + nelements > self.max_elements:
            raise MatFileError(self.path, where, f'declares {nelements} values, over the cap of '
                               f'{self.max_elements} one read may decode (damaged file? raise it '
                               f'with {ENV_MAX_ELEMENTS} or max_elements=)')

    def take(self, nbytes, nelements, where):
        """Charge ``nbytes`` bytes and ``nelements`` values (ints >= 0), or raise."""
        if self.bytes + nbytes > self.max_bytes:
            raise MatFileError(self.path, where, f'decoding needs {_human(self.bytes + nbytes)}, over '
                               f'the cap of {_human(self.max_bytes)} one read may decode (damaged '
                               f'file? raise it with {ENV_MAX_BYTES} or max_bytes=)')
        if self.elements + nelements > self.max_elements:
            raise MatFileError(self.path, where, f'decoding needs {self.elements + nelements} values, '
                               f'over the cap of {self.max_elements} one read may decode (damaged '
                               f'file? raise it with {ENV_MAX_ELEMENTS} or max_elements=)')
        self.bytes += nbytes
        self.elements += nelements

    def mark(self):
        """The budget used so far (give it to :meth:`since`)."""
        return self.bytes, self.elements

    def since(self, mark):
        """``(bytes, values)`` taken since ``mark``."""
        return self.bytes - mark[0], self.elements - mark[1]
