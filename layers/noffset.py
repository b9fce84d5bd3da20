"""Norm-dependent offset (MatConvNet's ``vl_nnnoffset`` and ``dagnn.NormOffset``), CPU and GPU.

``noffset_forward(x, param) -> y``, ``noffset_backward(x, param, dy) -> dx``, ``param = [a b]``.

Semantics (``vl_nnnoffset.m``): with ``L(i,j) = max(sum_k x(i,j,k)^2, 1e-8)``,

    y(i,j,k) = x(i,j,k) - a * L(i,j)^b,
    dx(i,j,k) = dy(i,j,k) - 2 a b x(i,j,k) * L(i,j)^(b-1) * sum_k dy(i,j,k).

The derivative is MatConvNet's formula, which ignores the clamp of L at 1e-8 (it is the
exact derivative wherever ``sum x^2 > 1e-8``). Array code over ``xp`` (NumPy or CuPy).
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register

__all__ = ['noffset_forward', 'noffset_backward', 'NormOffset']


def _param(param, op):
    p = np.asarray(param, dtype=np.float64).ravel()
    if p.size < 2:
        raise ValueError(f'{op}: param must be [a b] (2 numbers), got {p.tolist()}')
    return float(p[0]), float(p[1])


def _as4d(x, xp, op):
    x = xp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f'{op}: x must have at most 4 dimensions, got shape {x.shape}')
    if x.dtype.kind != 'f':
        raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
    return x.reshape(x.shape + (1,) * (4 - x.ndim), order='F')


def _sumsq(x4, xp):
    return xp.maximum((x4 * x4).sum(axis=2, keepdims=True), x4.dtype.type(1e-8))


def noffset_forward(x, param):
    """``vl_nnnoffset(x, param)``; Fortran-contiguous, x's dtype and shape."""
    xp = get_array_module(x)
    a, b = _param(param, 'noffset_forward')
    x4 = _as4d(x, xp, 'noffset_forward')
    dt = x4.dtype.type
    y = x4 - dt(a) * _sumsq(x4, xp) ** dt(b)
    return xp.asfortranarray(y.reshape(np.shape(x), order='F'))


def noffset_backward(x, param, dy):
    """``vl_nnnoffset(x, param, dy)``."""
    xp = get_array_module(x)
    a, b = _param(param, 'noffset_backward')
    x4 = _as4d(x, xp, 'noffset_backward')
    if np.size(dy) != x4.size:
        raise ValueError(f'noffset_backward: dy has shape {np.shape(dy)}, x has shape {np.shape(x)}')
    dy4 = xp.asarray(dy).reshape(x4.shape, order='F').astype(x4.dtype, copy=False)
    dt = x4.dtype.type
    L = _sumsq(x4, xp)
    dx = dy4 - dt(2 * a * b) * x4 * (dy4.sum(axis=2, keepdims=True) * L ** dt(b - 1))
    return xp.asfortranarray(dx.reshape(np.shape(x), order='F'))


@register('dagnn.NormOffset')
class NormOffset(Layer):
    """``dagnn.NormOffset``: inputs [x], outputs [y]; ``param = [a b]``."""
    properties = {'param': [1, 0.5]}
    backward_needs_outputs = False

    def forward(self, inputs, params):
        return [noffset_forward(inputs[0], self.param)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        return [noffset_backward(inputs[0], self.param, der_outputs[0])], []

    def get_output_sizes(self, input_sizes):
        return list(input_sizes[:1]) or [None]
