"""Option and shape helpers shared by the layer modules (one copy each).

* options as a ``.mat`` file stores them: :func:`ints`, :func:`parse_pad`,
  :func:`parse_pair`, :func:`int_option`, :func:`flag`, :func:`first_value`,
  :func:`as_scalar`, :func:`opts_to_dict`;
* shapes: :func:`window_outputs` (MatConvNet's output-size formula), :func:`as4d` (MATLAB
  drops trailing singleton dimensions: every map is read back as 4-D), :func:`float_map`,
  :func:`shape4`,
  :func:`fortran` (a Fortran-contiguous cast without a needless copy), :func:`dy_like`,
  :func:`map_and_derivative` and :func:`output_derivative` (checks of an output derivative);
* text: :func:`as_text` (a MATLAB char array as loaded -> str);
* filter-bank blocks (Conv, ConvTranspose): :func:`conv_bias`, :func:`filter_ders`;
* :class:`ParamMapLayer`, the block of an op ``y = f(x, param)`` with no params (LRN,
  NormOffset, SpatialNorm).

Errors are ``ValueError`` naming the op (``op``) and what it got.
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer

__all__ = ['ints', 'parse_pad', 'parse_pair', 'int_option', 'flag', 'first_value', 'as_scalar',
           'opts_to_dict', 'window_outputs', 'as4d', 'float_map', 'shape4', 'fortran', 'dy_like',
           'map_and_derivative', 'output_derivative', 'as_text', 'conv_bias', 'filter_ders',
           'ParamMapLayer']


# --------------------------------------------------------------------------- options
_NUMBERS = (int, float, np.integer, np.floating)


def ints(v, name, op):
    """Flatten an option (number, list, numpy array of any shape) to a tuple of ints.
    A number, a flat list or tuple of numbers and a numeric array skip the numpy
    conversion: every layer call parses its options, and after a big kernel has swept
    the caches the numpy form took 20-50 us of each convolution call."""
    if v is None:
        raise ValueError(f'{op}: {name} is None')
    if isinstance(v, np.ndarray) and v.dtype.kind in 'biuf':
        v = v.ravel().tolist()
    items = [v] if isinstance(v, _NUMBERS) else v
    if isinstance(items, (list, tuple)) and all(isinstance(t, _NUMBERS) for t in items):
        vals = [float(t) for t in items]
        if not all(t.is_integer() for t in vals):
            raise ValueError(f'{op}: {name} must be integers, got {vals}')
        return tuple(int(t) for t in vals)
    a = np.asarray(v, dtype=np.float64).ravel()
    if a.size and not np.all(np.isfinite(a) & (a == np.round(a))):
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


def float_map(x, op, name='x'):
    """``(x4, xp)``: a feature map ``x`` as a 4-D array of its own module ``xp`` (numpy or
    cupy), which must be float32 or float64 (the geometries of conv and pooling)."""
    xp = get_array_module(x)
    x = as4d(x, name, op, xp)
    if x.dtype.kind != 'f':
        raise ValueError(f'{op}: {name} must be float32 or float64, got {x.dtype}')
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


def map_and_derivative(x, dy, op):
    """``(x4, dy4, xp)`` of a backward: ``x`` as :func:`float_map` reads it, ``dy`` in its
    shape (see :func:`dy_like`) and dtype."""
    x4, xp = float_map(x, op)
    dy4 = dy_like(x4, xp.asarray(dy), op).astype(x4.dtype, copy=False)
    return x4, dy4, xp


def output_derivative(g, dy, op):
    """``dy`` of a geometry ``g``'s call (conv or pool: ``g.out_shape``, ``g.dtype``, ``g.xp``,
    ``g.describe()``), checked against the output shape, Fortran-contiguous in g.dtype."""
    dy = as4d(dy, 'dy', op, g.xp)
    if dy.shape != g.out_shape:
        raise ValueError(f'{op}: dy has shape {dy.shape}, expected {g.out_shape} ({g.describe()})')
    return fortran(dy, g.dtype, g.xp)


# --------------------------------------------------------------------------- text
def as_text(v):
    """A MATLAB string option as loaded (a str, or a char array of single characters) -> str."""
    if isinstance(v, np.ndarray):
        v = ''.join(str(c) for c in v.ravel().tolist()) if v.size else ''
    return str(v)


# --------------------------------------------------------------------------- filter-bank blocks
def conv_bias(has_bias, params):
    """The bias of a Conv / ConvTranspose layer: ``params[1]`` when ``hasBias`` and it is
    there and not empty, else None."""
    if flag(has_bias) and len(params) > 1 and params[1] is not None and np.size(params[1]) > 0:
        return params[1]
    return None


def filter_ders(inputs, params, dx, dw, db):
    """``(der_inputs, der_params)`` of a filter-bank block: the derivatives in the shapes
    of the values (MATLAB may have dropped their trailing singleton dimensions)."""
    der_params = [dw.reshape(np.shape(params[0]), order='F')] + [None] * (len(params) - 1)
    if db is not None:
        der_params[1] = db.reshape(np.shape(params[1]))
    return [dx.reshape(np.shape(inputs[0]), order='F')], der_params


# --------------------------------------------------------------------------- blocks
class ParamMapLayer(Layer):
    """The block of an op ``y = forward_op(x, self.param)`` with derivative
    ``backward_op(x, self.param, dy)`` and no params: inputs [x], outputs [y], y of x's
    size. Subclasses set ``properties = {'param': default}`` and the two ops
    (``staticmethod``)."""
    backward_needs_outputs = False
    forward_op = backward_op = None

    def forward(self, inputs, params):
        return [self.forward_op(inputs[0], self.param)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        return [self.backward_op(inputs[0], self.param, der_outputs[0])], []

    def get_output_sizes(self, input_sizes):
        return list(input_sizes[:1]) or [None]
