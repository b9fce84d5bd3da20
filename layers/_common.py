"""Option and shape helpers shared by the layer modules (one copy each).

* options as a ``.mat`` file stores them: :func:`ints`, :func:`parse_pad`,
  :func:`parse_pair`, :func:`int_option`, :func:`flag`, :func:`first_value`,
  :func:`as_scalar`, :func:`opts_to_dict`;
* shapes: :func:`window_outputs` (MatConvNet's output-size formula), :func:`as4d` (MATLAB
  drops trailing singleton dimensions: every map is read back as 4-D), :func:`float_map`,
  :func:`shape4`,
  :func:`fortran` (a Fortran-contiguous cast without a needless copy), :func:`dy_like`
  and :func:`output_derivative` (checks of an output derivative).

Errors are ``ValueError`` naming the op (``op``) and what it got.
"""
import numpy as np

from pydagnn.backend import get_array_module

__all__ = ['ints', 'parse_pad', 'parse_pair', 'int_option', 'flag', 'first_value', 'as_scalar',
           'opts_to_dict', 'window_outputs', 'as4d', 'float_map', 'shape4', 'fortran', 'dy_like',
           'output_derivative']


# --------------------------------------------------------------------------- options
def ints(v, name, op):
    """Flatten an option (number, list, numpy array of any shape) to a tuple of ints."""
    if v is None:
        raise ValueError(f'{op}: {name} is None')
    a = np.asarray(v, dtype=np.float64).ravel()
    if a.size and not np.all(a == np.round(a)):
        raise ValueError(f'{op}: {name} must be integers, got {a.tolist()}')
    return tuple(int(t) for t in a)


def parse_pad(pad, op='conv'):
    """pad as 1, 2 ([vertical horizontal]) or 4 ([top bottom left right]) numbers
    -> (top, bottom, left, right)."""
    p = ints(pad, 'pad', op)
    if len(p) == 1:
        p = p * 4
    elif len(p) == 2:
        p = (p[0], p[0], p[1], p[1])
    elif len(p) != 4:
        raise ValueError(f'{op}: pad must have 1, 2 or 4 elements, got {list(p)}')
    if min(p) < 0:
        raise ValueError(f'{op}: pad must be non-negative, got {list(p)}')
    return p


def parse_pair(v, name, op='conv'):
    """stride / dilate / pool size as 1 or 2 numbers -> (vertical, horizontal), each >= 1."""
    p = ints(v, name, op)
    if len(p) == 1:
        p = p * 2
    elif len(p) != 2:
        raise ValueError(f'{op}: {name} must have 1 or 2 elements, got {list(p)}')
    if min(p) < 1:
        raise ValueError(f'{op}: {name} must be >= 1, got {list(p)}')
    return p


def int_option(v, name, op):
    """A positive integer option (the mex casts to int and rejects <= 0)."""
    a = np.asarray(v).ravel()
    if a.size != 1:
        raise ValueError(f'{op}: {name} must be a scalar, got {v!r}')
    f = float(a[0])
    if f != int(f) or f <= 0:
        raise ValueError(f'{op}: {name} must be a positive integer, got {v!r}')
    return int(f)


def flag(v):
    """A MATLAB logical as loaded (bool, 0/1, uint8 array) -> bool."""
    a = np.asarray(v).ravel()
    if a.size == 0:
        return False
    return bool(a[0])


def first_value(v):
    """The first element of a property as loaded (MATLAB scalars load as 1x1 arrays)."""
    return np.asarray(v).ravel()[0]


def as_scalar(v):
    """A Python number from a number or a one-element array (MATLAB scalars load as 1x1)."""
    if isinstance(v, (bool, int, float)):
        return v
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f'expected a scalar, got an array of shape {a.shape}')
    return a.reshape(-1)[0].item()


#: option names that stand alone (no value follows them)
_FLAGS = ('nocudnn', 'cudnn')


def opts_to_dict(opts, where='opts'):
    """A MatConvNet ``opts`` cell (``{'name', value, ...}``, as a list, tuple or object
    array; empty or None) or a dict -> dict with lower-case names (vl_argparse matches
    names case-insensitively). Lone flags such as ``'NoCuDNN'`` map to True."""
    if opts is None:
        return {}
    if isinstance(opts, dict):
        return {str(k).lower(): v for k, v in opts.items()}
    if isinstance(opts, np.ndarray):
        opts = list(opts.reshape(-1, order='F'))
    if isinstance(opts, str):
        opts = [opts]
    out = {}
    items = list(opts)
    i = 0
    while i < len(items):
        name = items[i]
        if isinstance(name, np.ndarray) and name.dtype.kind == 'U':
            name = str(name.reshape(-1)[0]) if name.size else ''
        if not isinstance(name, str):
            raise ValueError(f'{where}: expected an option name at position {i}, got {name!r}')
        key = name.lower()
        if key in _FLAGS or i + 1 == len(items):
            out[key] = True
            i += 1
        else:
            out[key] = items[i + 1]
            i += 2
    return out


# --------------------------------------------------------------------------- shapes
def window_outputs(H, W, pad, fh, fw, sy, sx):
    """(Ho, Wo): the positions of an ``fh x fw`` window at strides ``(sy, sx)`` over an
    ``H x W`` map padded by ``pad`` = (top, bottom, left, right), MatConvNet's formula
    (convolution with the dilated filter size, and pooling)."""
    pt, pb, pl, pr = pad
    return (H + pt + pb - fh) // sy + 1, (W + pl + pr - fw) // sx + 1


def as4d(a, name, op, xp=None):
    """``a`` with 4 dimensions: trailing singletons appended (MATLAB drops them); more than
    4 is an error, ``None`` too. With ``xp`` (numpy or cupy), ``a`` is first made an array
    of that module."""
    if a is None:
        raise ValueError(f'{op}: {name} is missing')
    if xp is not None:
        a = xp.asarray(a)
    if a.ndim > 4:
        raise ValueError(f'{op}: {name} must have at most 4 dimensions, got shape {a.shape}')
    if a.ndim < 4:
        a = a.reshape(a.shape + (1,) * (4 - a.ndim), order='F')
    return a


def float_map(x, op):
    """``(x4, xp)``: a feature map ``x`` as a 4-D array of its own module ``xp`` (numpy or
    cupy), which must be float32 or float64 (the geometries of conv and pooling)."""
    xp = get_array_module(x)
    x = as4d(x, 'x', op, xp)
    if x.dtype.kind != 'f':
        raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
    return x, xp


def shape4(s, name, op):
    """A shape tuple with 4 entries (trailing singletons appended), as :func:`as4d`."""
    s = tuple(int(v) for v in s)
    if len(s) > 4:
        raise ValueError(f'{op}: {name} must have at most 4 dimensions, got shape {s}')
    return s + (1,) * (4 - len(s))


def fortran(a, dtype, xp=np):
    """``a`` as a Fortran-contiguous array of ``dtype`` (no copy when it already is one)."""
    if a.dtype == dtype and a.flags.f_contiguous:
        return a
    return xp.asfortranarray(a, dtype=dtype)


def dy_like(x, dy, op, name='dy'):
    """``dy`` with ``x``'s shape (MATLAB may have dropped trailing singletons); a size
    mismatch is an error."""
    if dy.size != x.size:
        raise ValueError(f'{op}: {name} has shape {dy.shape}, x has shape {x.shape}')
    return dy if dy.shape == x.shape else dy.reshape(x.shape, order='F')


def output_derivative(g, dy, op):
    """``dy`` of a geometry ``g``'s call (conv or pool: ``g.out_shape``, ``g.dtype``, ``g.xp``,
    ``g.describe()``), checked against the output shape, Fortran-contiguous in g.dtype."""
    dy = as4d(dy, 'dy', op, g.xp)
    if dy.shape != g.out_shape:
        raise ValueError(f'{op}: dy has shape {dy.shape}, expected {g.out_shape} ({g.describe()})')
    return fortran(dy, g.dtype, g.xp)
