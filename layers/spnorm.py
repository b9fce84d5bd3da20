"""Spatial normalization (MatConvNet's ``vl_nnspnorm`` and ``dagnn.SpatialNorm``), CPU and GPU.

``spnorm_forward(x, param) -> y``, ``spnorm_backward(x, param, dy) -> dx``,
``param = [PH PW alpha beta]``.

Semantics (``vl_nnspnorm.m``): per channel, ``n2`` is the average of ``x^2`` over a
``PH x PW`` window -- ``vl_nnpool(x.^2, [PH PW], 'method', 'avg')`` at stride 1 with pad
``floor((P-1)/2)`` before and ``P - 1 - floor((P-1)/2)`` after, so the output keeps the
input size; at the borders the average is over the window's pixels inside the image, as
``vl_nnpool`` computes it -- and

    y = x * (1 + alpha * n2)^(-beta),
    dx = f^(-beta) dy - 2 alpha beta x * pool_avg_backward(f^(-beta-1) dy x),   f = 1 + alpha n2.

Implementation: the average pooling of :mod:`pydagnn.layers.pool` (numba on the CPU, its
CUDA kernels for CuPy inputs) plus elementwise ``xp`` array code.
"""
import numpy as np

from pydagnn.layer import register
from pydagnn.layers._common import ParamMapLayer, float_map, map_and_derivative
from pydagnn.layers.pool import pool_backward, pool_forward

__all__ = ['spnorm_forward', 'spnorm_backward', 'parse_spnorm_param', 'SpatialNorm']


def parse_spnorm_param(param, op='spnorm'):
    """[PH PW alpha beta] -> ((PH, PW), pad [top bottom left right], alpha, beta)."""
    p = np.asarray(param, dtype=np.float64).ravel()
    if p.size != 4:
        raise ValueError(f'{op}: param must be [PH PW alpha beta] (4 numbers), got {p.tolist()}')
    if p[0] != round(p[0]) or p[1] != round(p[1]) or min(p[0], p[1]) < 1:
        raise ValueError(f'{op}: the window size must be integers >= 1, got param {p.tolist()}')
    ph, pw = int(p[0]), int(p[1])
    t, l = (ph - 1) // 2, (pw - 1) // 2
    return (ph, pw), (t, ph - 1 - t, l, pw - 1 - l), float(p[2]), float(p[3])


def spnorm_forward(x, param):
    """``vl_nnspnorm(x, param)``; Fortran-contiguous, x's dtype and shape."""
    size, pad, alpha, beta = parse_spnorm_param(param, 'spnorm_forward')
    x4, xp = float_map(x, 'spnorm_forward')
    dt = x4.dtype.type
    n2 = pool_forward(x4 * x4, size, 'avg', pad, 1)
    y = (dt(1) + dt(alpha) * n2) ** dt(-beta) * x4
    return xp.asfortranarray(y.reshape(np.shape(x), order='F'))


def spnorm_backward(x, param, dy):
    """``vl_nnspnorm(x, param, dy)``."""
    size, pad, alpha, beta = parse_spnorm_param(param, 'spnorm_backward')
    x4, dy4, xp = map_and_derivative(x, dy, 'spnorm_backward')
    dt = x4.dtype.type
    x2 = x4 * x4
    f = dt(1) + dt(alpha) * pool_forward(x2, size, 'avg', pad, 1)
    fb = f ** dt(-beta)
    t = pool_backward(x2, fb / f * dy4 * x4, size, 'avg', pad, 1)
    dx = fb * dy4 - dt(2 * alpha * beta) * x4 * t
    return xp.asfortranarray(dx.reshape(np.shape(x), order='F'))


@register('dagnn.SpatialNorm')
class SpatialNorm(ParamMapLayer):
    """``dagnn.SpatialNorm``: inputs [x], outputs [y]; ``param = [PH PW alpha beta]``."""
    properties = {'param': [2, 2, 10, 2]}
    forward_op = staticmethod(spnorm_forward)
    backward_op = staticmethod(spnorm_backward)
