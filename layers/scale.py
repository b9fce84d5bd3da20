"""Broadcast multiply (and add): ``dagnn.Scale``.

``y = x .* w (+ b)`` with MATLAB ``bsxfun`` broadcasting: every array is read as
4-D with trailing singleton dimensions (a MATLAB ``1 x 1 x C`` scale multiplies the
channels). Backward: ``dx = dy .* w``; ``dw = sum(dy .* x)`` and ``db = sum(dy)`` over
the dimensions where w is a singleton.
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers._common import as4d, dy_like

__all__ = ['scale_forward', 'scale_backward', 'Scale']


def _as4(a, shape=None):
    """Read ``a`` as a 4-D MATLAB array (``shape``: its MATLAB size, e.g. the block's size)."""
    if shape is not None:
        s = tuple(int(v) for v in shape)
        if int(np.prod(s)) == a.size and len(s) <= 4:
            return a.reshape(s + (1,) * (4 - len(s)), order='F')
    return as4d(a, 'arrays', 'scale')


def _check_bcast(x4, w4, name):
    for i in range(4):
        if w4.shape[i] not in (1, x4.shape[i]):
            raise ValueError(f'scale: {name} of shape {w4.shape} does not broadcast against x of '
                             f'shape {x4.shape} (dimension {i + 1})')


def scale_forward(x, w, b=None, size=None):
    """``bsxfun(@plus, bsxfun(@times, x, w), b)``; ``size`` (optional) is the MATLAB shape
    of w and b (so that a 1-D ``(C,)`` array can stand for ``1 x 1 x C``)."""
    xp = get_array_module(x)
    x4 = _as4(x)
    w4 = _as4(w, size)
    _check_bcast(x4, w4, 'w')
    y = x4 * w4
    if b is not None:
        b4 = _as4(b, size)
        _check_bcast(x4, b4, 'b')
        y = y + b4
    return xp.asfortranarray(y.astype(x.dtype, copy=False))


def scale_backward(x, w, dy, has_bias=True, size=None, b_shape=None):
    """``(dx, dw, db)``; dw has w's shape, db ``b_shape`` (default w's shape), None
    without a bias."""
    xp = get_array_module(x)
    x4 = _as4(x)
    w4 = _as4(w, size)
    _check_bcast(x4, w4, 'w')
    dy4 = dy_like(x4, dy, 'scale_backward')
    axes = tuple(i for i in range(4) if w4.shape[i] == 1)
    dx = xp.asfortranarray((dy4 * w4).astype(x.dtype, copy=False)).reshape(x.shape, order='F')
    dw = (dy4 * x4).sum(axis=axes, keepdims=True) if axes else dy4 * x4
    dw = dw.reshape(w.shape, order='F')
    db = None
    if has_bias:
        db = dy4.sum(axis=axes, keepdims=True) if axes else dy4.copy(order='F')
        db = db.reshape(w.shape if b_shape is None else b_shape, order='F')
    return dx, dw, db


@register('dagnn.Scale')
class Scale(Layer):
    """``dagnn.Scale``: ``y = x .* w (+ b)``; properties ``size`` (MATLAB shape of w) and
    ``hasBias``. As in Scale.m, the operands are ``inputs + params`` in that order, so w
    and b may be params (the usual form) or extra inputs."""
    properties = {'size': None, 'hasBias': True}

    def _size(self):
        if self.size is None:
            return None
        s = np.asarray(self.size).reshape(-1)
        return tuple(int(v) for v in s) if s.size else None

    def forward(self, inputs, params):
        args = list(inputs) + list(params)
        b = args[2] if bool(self.hasBias) else None
        return [scale_forward(args[0], args[1], b, size=self._size())]

    def backward(self, inputs, params, der_outputs, outputs):
        args = list(inputs) + list(params)
        has_bias = bool(self.hasBias)
        dx, dw, db = scale_backward(args[0], args[1], der_outputs[0], has_bias=has_bias,
                                    size=self._size(),
                                    b_shape=args[2].shape if has_bias else None)
        dargs = [dx, dw] + ([db] if has_bias else [])
        dargs += [None] * (len(args) - len(dargs))
        ni = len(inputs)
        return dargs[:ni], dargs[ni:ni + len(params)]

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]

    def init_params(self, rng, dtype=np.float32):
        """Not in Scale.m (it has no initParams): w = 1, b = 0 of shape ``size``."""
        s = self._size()
        if s is None:
            raise ValueError('Scale.init_params: size is not set')
        w = np.ones(s, dtype, order='F')
        return [w, np.zeros(s, dtype, order='F')] if bool(self.hasBias) else [w]
