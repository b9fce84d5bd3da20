"""Batch normalization on the GPU (CuPy): the statistics and the backward sums as fused
reductions, the normalization and the input derivative as one elementwise pass each.

Same functions and semantics as :mod:`pydagnn.layers.bnorm` (which dispatches here for
CuPy inputs): a map ``x`` (H x W x C x N, Fortran order) is read as the C-contiguous
``(N, C, H*W)`` array ``x3``. Every per-channel sum is computed in two steps: a
reduction over each ``(image, channel)`` plane (the contiguous last axis: one
``ReductionKernel`` launch with N*C outputs, which keeps the whole GPU busy, unlike a
reduction over axes (0, 2) with only C outputs), then a sum over the N images.

Statistics as on the CPU: the mean first, then the mean of the squared deviations
(two-pass variance), biased (1/M), in x's dtype. The checks (shapes, ``test_mode``, dy's
shape) are :mod:`pydagnn.layers.bnorm`'s, before it dispatches here.
"""
import functools

from pydagnn.layers.bnorm import _channels, _split_moments

__all__ = ['bnorm_forward', 'bnorm_backward', 'bnorm_backward_fixed_moments', 'bnorm_moments']


@functools.lru_cache(maxsize=None)
def _k():
    import cupy as cp
    return {
        'sum': cp.ReductionKernel('T x', 'T y', 'x', 'a + b', 'y = a', '0', 'pd_bn_plane_sum'),
        'sqdev': cp.ReductionKernel('T x, T m', 'T y', '(x - m) * (x - m)', 'a + b', 'y = a', '0',
                                    'pd_bn_plane_sqdev'),
        'dotdev': cp.ReductionKernel('T d, T x, T m', 'T y', 'd * (x - m)', 'a + b', 'y = a', '0',
                                     'pd_bn_plane_dotdev'),
        'norm': cp.ElementwiseKernel('T x, T m, T s, T b', 'T y', 'y = (x - m) * s + b',
                                     'pd_bn_normalize'),
        'dx': cp.ElementwiseKernel('T d, T x, T m, T g1, T g2, T mz', 'T dx',
                                   'dx = g1 * (d - mz) - g2 * (x - m)', 'pd_bn_dx'),
        'scale': cp.ElementwiseKernel('T d, T s', 'T dx', 'dx = d * s', 'pd_bn_scale'),
    }


def _x3(x, cp, dtype=None):
    """(F-contiguous x, its (N, C, H*W) view)."""
    x = cp.asfortranarray(x, dtype=dtype)
    H, W, C, N = x.shape
    return x, x.T.reshape(N, C, W * H)


def _ch(v):
    """A (C,) vector as (1, C, 1) for broadcasting against (N, C, H*W)."""
    return v.reshape(1, -1, 1)


def _channel_sum(plane_values):
    """(N, C) per-plane values -> (C,) sums over the images."""
    return plane_values.sum(axis=0)


def _stats(x3, epsilon):
    k = _k()
    N, C, HW = x3.shape
    M = N * HW
    if M == 0:
        raise ValueError(f'bnorm: batch statistics of an empty batch (x shape {x3.shape[::-1]})')
    dt = x3.dtype.type
    mu = _channel_sum(k['sum'](x3, axis=2)) / dt(M)
    var = _channel_sum(k['sqdev'](x3, _ch(mu), axis=2)) / dt(M)
    import cupy as cp
    sigma = cp.sqrt(var + dt(epsilon))
    return mu, sigma


def _moments(x3, moments, epsilon, cp):
    """``(mu, sigma, m)``: the batch moments of x3 (``moments`` None) or the given ones, and
    the (C, 2) moments used."""
    if moments is None:
        mu, sigma = _stats(x3, epsilon)
        return mu, sigma, cp.stack([mu, sigma], axis=1)
    return _split_moments(moments, x3.shape[1], x3.dtype, cp)


def _x_dy(x, dy, cp):
    """x and dy (already x's shape) Fortran-contiguous in x's dtype: ``(x, x3, dy3)``."""
    x, x3 = _x3(x, cp)
    _, dy3 = _x3(dy, cp, x.dtype)
    return x, x3, dy3


def _db_dg(dy3, x3, mu, sigma):
    """``db = sum(dy)``, ``dg = sum(dy * (x - mu)) / sigma`` per channel."""
    k = _k()
    db = _channel_sum(k['sum'](dy3, axis=2))
    dg = _channel_sum(k['dotdev'](dy3, x3, _ch(mu), axis=2)) / sigma
    return db, dg


def bnorm_moments(x, epsilon=1e-5):
    import cupy as cp
    _, x3 = _x3(x, cp)
    mu, sigma = _stats(x3, epsilon)
    return cp.stack([mu, sigma], axis=1)


def bnorm_forward(x, g, b, moments=None, epsilon=1e-5):
    """GPU ``bnorm_forward`` -> ``(y, moments)`` (x already checked, 4-D; moments given
    unless the batch statistics are wanted)."""
    import cupy as cp
    x, x3 = _x3(x, cp)
    N, C, HW = x3.shape
    dt = x.dtype
    mu, sigma, out_moments = _moments(x3, moments, epsilon, cp)
    y3 = _k()['norm'](x3, _ch(mu), _ch(_channels(g, C, dt) / sigma), _ch(_channels(b, C, dt)))
    return y3.reshape(N, C, *x.shape[1::-1]).T, out_moments


def bnorm_backward(x, g, b, dy, moments=None, epsilon=1e-5):
    """GPU ``bnorm_backward`` -> ``(dx, dg, db, moments)`` (x checked, dy of x's shape)."""
    import cupy as cp
    x, x3, dy3 = _x_dy(x, dy, cp)
    N, C, HW = x3.shape
    dt = x.dtype
    mu, sigma, out_moments = _moments(x3, moments, epsilon, cp)
    M = dt.type(N * HW)
    db, dg = _db_dg(dy3, x3, mu, sigma)
    G1 = _channels(g, C, dt) / sigma
    G2 = G1 * dg / (M * sigma)
    muz = db / M
    dx3 = _k()['dx'](dy3, x3, _ch(mu), _ch(G1), _ch(G2), _ch(muz))
    dx = dx3.reshape(N, C, *x.shape[1::-1]).T
    return dx, dg.reshape(g.shape), db.reshape(b.shape), out_moments


def bnorm_backward_fixed_moments(x, g, b, dy, moments):
    """GPU ``bnorm_backward_fixed_moments`` -> ``(dx, dg, db)`` (x checked, dy of x's shape)."""
    import cupy as cp
    x, x3, dy3 = _x_dy(x, dy, cp)
    N, C, HW = x3.shape
    dt = x.dtype
    mu, sigma, _ = _split_moments(moments, C, dt, cp)
    db, dg = _db_dg(dy3, x3, mu, sigma)
    dx3 = _k()['scale'](dy3, _ch(_channels(g, C, dt) / sigma))
    return dx3.reshape(N, C, *x.shape[1::-1]).T, dg.reshape(g.shape), db.reshape(b.shape)
