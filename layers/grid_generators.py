"""Sampling-grid generators for :mod:`pydagnn.layers.bilinear_sampler`:
MatConvNet's ``dagnn.AffineGridGenerator`` and ``dagnn.UniformScalingGridGenerator``.

Both produce a grid ``2 x Ho x Wo x N`` (vertical, horizontal coordinates in [-1, 1])
from the output-pixel coordinates ``v_b = linspace(-1, 1, Ho)(b)``,
``u_a = linspace(-1, 1, Wo)(a)`` (MATLAB's linspace: a single point is the end point, 1).

* ``affine_grid_forward(A, Ho, Wo)``: A ``1 x 1 x 6 x N``, read column-major as the
  2 x 3 matrix ``[L t]`` of AffineGridGenerator.m; the grid is
  ``[v_b u_a] L + t'``, i.e. ``g_v = A11 v + A21 u + A13``, ``g_u = A12 v + A22 u + A23``.
* ``uniform_scaling_grid_forward(T, Ho, Wo)``: T ``1 x 1 x 3 x N`` = [s, t_v, t_u];
  ``g_v = s v + t_v``, ``g_u = s u + t_u``.
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers.loss import as_scalar

__all__ = ['affine_grid_forward', 'affine_grid_backward', 'uniform_scaling_grid_forward',
           'uniform_scaling_grid_backward', 'AffineGridGenerator',
           'UniformScalingGridGenerator']


def _linspace(n, xp, dtype):
    """MATLAB's linspace(-1, 1, n)."""
    if n == 1:
        return xp.ones(1, dtype=dtype)
    return xp.linspace(-1, 1, n).astype(dtype)


def _size(v, name, op):
    n = as_scalar(v)
    if n != int(n) or n < 1:
        raise ValueError(f'{op}: {name} must be a positive integer, got {v!r}')
    return int(n)


def _coords(Ho, Wo, xp, dtype):
    """(v, u), each (Ho, Wo): the normalised coordinates of every output pixel."""
    v = _linspace(Ho, xp, dtype)
    u = _linspace(Wo, xp, dtype)
    return xp.broadcast_to(v[:, None], (Ho, Wo)), xp.broadcast_to(u[None, :], (Ho, Wo))


def _params(a, k, op):
    xp = get_array_module(a)
    a = xp.asarray(a)
    if a.dtype.kind != 'f':
        raise ValueError(f'{op}: the transforms must be float32 or float64, got {a.dtype}')
    N = a.shape[3] if a.ndim == 4 else 1
    if a.size != k * N or (a.ndim >= 3 and a.shape[:3] != (1, 1, k)[:a.ndim]):
        raise ValueError(f'{op}: the transforms must be 1 x 1 x {k} x N, got shape {a.shape}')
    return xp, a.reshape(k, N, order='F'), N


def _setup(P, k, Ho, Wo, op):
    """``(xp, params as k x N, N, Ho, Wo, v, u)``: the checked inputs of a generator
    and its output-pixel coordinates."""
    xp, p, N = _params(P, k, op)
    Ho, Wo = _size(Ho, 'Ho', op), _size(Wo, 'Wo', op)
    v, u = _coords(Ho, Wo, xp, p.dtype)
    return xp, p, N, Ho, Wo, v, u


def _dgrid(dgrid, dtype, Ho, Wo, N, xp, op):
    """The grid derivative as ``2 x Ho x Wo x N`` of ``dtype``; another size is an error."""
    d = xp.asarray(dgrid, dtype=dtype)
    if d.size != 2 * Ho * Wo * N:
        raise ValueError(f'{op}: dgrid has shape {d.shape}, expected {(2, Ho, Wo, N)}')
    return d.reshape(2, Ho, Wo, N, order='F')


def affine_grid_forward(A, Ho, Wo):
    """A ``1 x 1 x 6 x N`` -> grid ``2 x Ho x Wo x N``."""
    op = 'affine_grid_forward'
    xp, a, N, Ho, Wo, v, u = _setup(A, 6, Ho, Wo, op)
    g = xp.empty((2, Ho, Wo, N), dtype=a.dtype, order='F')
    g[0] = v[:, :, None] * a[0] + u[:, :, None] * a[1] + a[4]
    g[1] = v[:, :, None] * a[2] + u[:, :, None] * a[3] + a[5]
    return g


def affine_grid_backward(A, dgrid, Ho, Wo):
    """Derivative of :func:`affine_grid_forward` with respect to A (A's shape)."""
    op = 'affine_grid_backward'
    xp, a, N, Ho, Wo, v, u = _setup(A, 6, Ho, Wo, op)
    d = _dgrid(dgrid, a.dtype, Ho, Wo, N, xp, op)
    dv, du = d[0], d[1]
    da = xp.stack([(dv * v[:, :, None]).sum(axis=(0, 1)), (dv * u[:, :, None]).sum(axis=(0, 1)),
                   (du * v[:, :, None]).sum(axis=(0, 1)), (du * u[:, :, None]).sum(axis=(0, 1)),
                   dv.sum(axis=(0, 1)), du.sum(axis=(0, 1))])
    return xp.asfortranarray(da).reshape(np.shape(A), order='F')


def uniform_scaling_grid_forward(T, Ho, Wo):
    """T ``1 x 1 x 3 x N`` ([scale, t_v, t_u]) -> grid ``2 x Ho x Wo x N``."""
    op = 'uniform_scaling_grid_forward'
    xp, t, N, Ho, Wo, v, u = _setup(T, 3, Ho, Wo, op)
    g = xp.empty((2, Ho, Wo, N), dtype=t.dtype, order='F')
    g[0] = v[:, :, None] * t[0] + t[1]
    g[1] = u[:, :, None] * t[0] + t[2]
    return g


def uniform_scaling_grid_backward(T, dgrid, Ho, Wo):
    """Derivative of :func:`uniform_scaling_grid_forward` with respect to T (T's shape)."""
    op = 'uniform_scaling_grid_backward'
    xp, t, N, Ho, Wo, v, u = _setup(T, 3, Ho, Wo, op)
    d = _dgrid(dgrid, t.dtype, Ho, Wo, N, xp, op)
    ds = (d[0] * v[:, :, None] + d[1] * u[:, :, None]).sum(axis=(0, 1))
    dt = xp.stack([ds, d[0].sum(axis=(0, 1)), d[1].sum(axis=(0, 1))])
    return xp.asfortranarray(dt).reshape(np.shape(T), order='F')


class _GridGenerator(Layer):
    properties = {'Ho': 0, 'Wo': 0}

    def forward(self, inputs, params):
        return [self._fwd(inputs[0], self.Ho, self.Wo)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None], []
        return [self._bwd(inputs[0], der_outputs[0], self.Ho, self.Wo)], []

    def get_output_sizes(self, input_sizes):
        s = input_sizes[0]
        if s is None:
            return [None]
        s = tuple(int(v) for v in s) + (1,) * (4 - len(s))
        return [(2, int(as_scalar(self.Ho)), int(as_scalar(self.Wo)), s[3])]


@register('dagnn.AffineGridGenerator')
class AffineGridGenerator(_GridGenerator):
    """``dagnn.AffineGridGenerator``: inputs [A (1 x 1 x 6 x N)], outputs [grid
    (2 x Ho x Wo x N)]. Properties ``Ho``, ``Wo`` (0)."""
    _fwd = staticmethod(affine_grid_forward)
    _bwd = staticmethod(affine_grid_backward)


@register('dagnn.UniformScalingGridGenerator')
class UniformScalingGridGenerator(_GridGenerator):
    """``dagnn.UniformScalingGridGenerator``: inputs [T (1 x 1 x 3 x N): scale, t_v,
    t_u], outputs [grid (2 x Ho x Wo x N)]. Properties ``Ho``, ``Wo`` (0)."""
    _fwd = staticmethod(uniform_scaling_grid_forward)
    _bwd = staticmethod(uniform_scaling_grid_backward)
