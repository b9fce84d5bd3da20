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

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
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


def _as4d(x, xp, op):
    x = xp.asarray(x)
    if x.ndim > 4:
        raise ValueError(f'{op}: x must have at most 4 dimensions, got shape {x.shape}')
    if x.dtype.kind != 'f':
        raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
    return x.reshape(x.shape + (1,) * (4 - x.ndim), order='F')


def spnorm_forward(x, param):
    """``vl_nnspnorm(x, param)``; Fortran-contiguous, x's dtype and shape."""
    xp = get_array_module(x)
    size, pad, alpha, beta = parse_spnorm_param(param, 'spnorm_forward')
    x4 = _as4d(x, xp, 'spnorm_forward')
    dt = x4.dtype.type
    n2 = pool_forward(x4 * x4, size, 'avg', pad, 1)
    y = (dt(1) + dt(alpha) * n2) ** dt(-beta) * x4
    return xp.asfortranarray(y.reshape(np.shape(x), order='F'))


def spnorm_backward(x, param, dy):
    """``vl_nnspnorm(x, param, dy)``."""
    xp = get_array_module(x)
    size, pad, alpha, beta = parse_spnorm_param(param, 'spnorm_backward')
    x4 = _as4d(x, xp, 'spnorm_backward')
    if np.size(dy) != x4.size:
        raise ValueError(f'spnorm_backward: dy has shape {np.shape(dy)}, x has shape {np.shape(x)}')
    dy4 = xp.asarray(dy).reshape(x4.shape, order='F').astype(x4.dtype, copy=False)
    dt = x4.dtype.type
    x2 = x4 * x4
    f = dt(1) + dt(alpha) * pool_forward(x2, size, 'avg', pad, 1)
    fb = f ** dt(-beta)
    t = pool_backward(x2, fb / f * dy4 * x4, size, 'avg', pad, 1)
    dx = fb * dy4 - dt(2 * alpha * beta) * x4 * t
    return xp.asfortranarray(dx.reshape(np.shape(x), order='F'))


@register('dagnn.SpatialNorm')
class SpatialNorm(Layer):
    """``dagnn.SpatialNorm``: inputs [x], outputs [y]; ``param = [PH PW alpha beta]``."""
    properties = {'param': [2, 2, 10, 2]}
    backward_needs_outputs = False

    def forward(self, inputs, params):
        return [spnorm_forward(inputs[0], self.param)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        return [spnorm_backward(inputs[0], self.param, der_outputs[0])], []

    def get_output_sizes(self, input_sizes):
        return list(input_sizes[:1]) or [None]
