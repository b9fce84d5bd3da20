"""Local response normalization (MatConvNet's ``vl_nnnormalize`` and ``dagnn.LRN``), CPU and GPU.

``lrn_forward(x, param) -> y``, ``lrn_backward(x, param, dy) -> dx``, ``param = [N kappa alpha beta]``.

Semantics (``vl_nnnormalize``): across the channels of every pixel,

    y(i,j,k) = x(i,j,k) * L(i,j,k)^(-beta),   L(i,j,k) = kappa + alpha * sum_{q in Q(k)} x(i,j,q)^2,
    Q(k) = [max(1, k - floor((N-1)/2)), min(D, k + ceil((N-1)/2))]   (1-based channels),

so for an even N the window reaches one channel further up than down (N = 4: k-1 .. k+2),
as the C++ code's ``m1 = (N-1)/2``, ``m2 = N - m1 - 1`` do. ``N >= 2D`` makes every window
the whole column (L2 normalization). The derivative is

    dx(q) = dy(q) L(q)^(-beta) - 2 alpha beta x(q) sum_{k : q in Q(k)} dy(k) x(k) L(k)^(-beta-1).

MatConvNet's CPU code uses an approximate ``pow`` (``fast_pow``); this is the exact one.

Implementation: array code over ``xp`` (NumPy or CuPy): the window sums are ``N`` shifted
slice additions along the channel axis (at most ``2D - 1``), so the same code runs on the GPU.
"""
import numpy as np

from pydagnn.layer import register
from pydagnn.layers._common import ParamMapLayer, float_map, map_and_derivative

__all__ = ['lrn_forward', 'lrn_backward', 'parse_lrn_param', 'LRN']


def parse_lrn_param(param, op='lrn'):
    """[N kappa alpha beta] -> (N as int, kappa, alpha, beta)."""
    p = np.asarray(param, dtype=np.float64).ravel()
    if p.size != 4:
        raise ValueError(f'{op}: param must be [N kappa alpha beta] (4 numbers), got {p.tolist()}')
    n = int(p[0])   # the MEX casts to size_t
    if n < 1:
        raise ValueError(f'{op}: the normalization depth N is smaller than 1 (param {p.tolist()})')
    return n, float(p[1]), float(p[2]), float(p[3])


def _window_sum(a, lo, hi, xp):
    """s[:, :, k] = sum of a[:, :, k + o] for o in lo..hi with 0 <= k + o < D."""
    D = a.shape[2]
    s = xp.zeros_like(a)
    for o in range(max(lo, -(D - 1)), min(hi, D - 1) + 1):
        if o >= 0:
            s[:, :, :D - o] += a[:, :, o:]
        else:
            s[:, :, -o:] += a[:, :, :D + o]
    return s


def _window(n):
    m1 = (n - 1) // 2
    return m1, n - m1 - 1


def _norm(x, n, kappa, alpha, xp):
    m1, m2 = _window(n)
    dt = x.dtype.type
    return dt(kappa) + dt(alpha) * _window_sum(x * x, -m1, m2, xp)


def lrn_forward(x, param):
    """``vl_nnnormalize(x, param)``; result Fortran-contiguous, x's dtype and shape."""
    shape = np.shape(x)
    n, kappa, alpha, beta = parse_lrn_param(param, 'lrn_forward')
    x4, xp = float_map(x, 'lrn_forward')
    L = _norm(x4, n, kappa, alpha, xp)
    y = x4 * L ** x4.dtype.type(-beta)
    return xp.asfortranarray(y.reshape(shape, order='F'))


def lrn_backward(x, param, dy):
    """``vl_nnnormalize(x, param, dy)``: the derivative projected on ``dy`` (like x)."""
    shape = np.shape(x)
    n, kappa, alpha, beta = parse_lrn_param(param, 'lrn_backward')
    x4, dy4, xp = map_and_derivative(x, dy, 'lrn_backward')
    dt = x4.dtype.type
    L = _norm(x4, n, kappa, alpha, xp)
    Lb = L ** dt(-beta)
    m1, m2 = _window(n)
    # q in Q(k) = [k-m1, k+m2]  <=>  k in [q-m2, q+m1]
    t = _window_sum(dy4 * x4 * Lb / L, -m2, m1, xp)
    dx = dy4 * Lb - dt(2 * alpha * beta) * x4 * t
    return xp.asfortranarray(dx.reshape(shape, order='F'))


@register('dagnn.LRN')
class LRN(ParamMapLayer):
    """``dagnn.LRN``: inputs [x], outputs [y]; ``param = [N kappa alpha beta]``."""
    properties = {'param': [5, 1, 0.0001 / 5, 0.75]}
    forward_op = staticmethod(lrn_forward)
    backward_op = staticmethod(lrn_backward)
