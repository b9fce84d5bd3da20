"""Norm-dependent offset (MatConvNet's ``vl_nnnoffset`` and ``dagnn.NormOffset``), CPU and GPU.

``noffset_forward(x, param) -> y``, ``noffset_backward(x, param, dy) -> dx``, ``param = [a b]``.

Semantics (``vl_nnnoffset.m``): with ``L(i,j) = max(sum_k x(i,j,k)^2, 1e-8)``,

    y(i,j,k) = x(i,j,k) - a * L(i,j)^b,
    dx(i,j,k) = dy(i,j,k) - 2 a b x(i,j,k) * L(i,j)^(b-1) * sum_k dy(i,j,k).

The derivative is MatConvNet's formula, which ignores the clamp of L at 1e-8 (it is the
exact derivative wherever ``sum x^2 > 1e-8``). Array code over ``xp`` (NumPy or CuPy).
"""
import numpy as np

from pydagnn.layer import register
from pydagnn.layers._common import ParamMapLayer, float_map, map_and_derivative

__all__ = ['noffset_forward', 'noffset_backward', 'NormOffset']


def _param(param, op):
    p = np.asarray(param, dtype=np.float64).ravel()
    if p.size < 2:
        raise ValueError(f'{op}: param must be [a b] (2 numbers), got {p.tolist()}')
    return float(p[0]), float(p[1])


def _sumsq(x4, xp):
    return xp.maximum((x4 * x4).sum(axis=2, keepdims=True), x4.dtype.type(1e-8))


def noffset_forward(x, param):
    """``vl_nnnoffset(x, param)``; Fortran-contiguous, x's dtype and shape."""
    a, b = _param(param, 'noffset_forward')
    x4, xp = float_map(x, 'noffset_forward')
    dt = x4.dtype.type
    y = x4 - dt(a) * _sumsq(x4, xp) ** dt(b)
    return xp.asfortranarray(y.reshape(np.shape(x), order='F'))


def noffset_backward(x, param, dy):
    """``vl_nnnoffset(x, param, dy)``."""
    a, b = _param(param, 'noffset_backward')
    x4, dy4, xp = map_and_derivative(x, dy, 'noffset_backward')
    dt = x4.dtype.type
    L = _sumsq(x4, xp)
    dx = dy4 - dt(2 * a * b) * x4 * (dy4.sum(axis=2, keepdims=True) * L ** dt(b - 1))
    return xp.asfortranarray(dx.reshape(np.shape(x), order='F'))


@register('dagnn.NormOffset')
class NormOffset(ParamMapLayer):
    """``dagnn.NormOffset``: inputs [x], outputs [y]; ``param = [a b]``."""
    properties = {'param': [1, 0.5]}
    forward_op = staticmethod(noffset_forward)
    backward_op = staticmethod(noffset_backward)
