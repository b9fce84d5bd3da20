"""numba kernels (CPU) for max and average pooling (MatConvNet's ``vl_nnpool``).

Arrays are the C-contiguous ``.T`` views of Fortran ``H x W x C x N`` maps, i.e.
``(N, C, W, H)``. Output ``(wo, ho)`` pools the window of input columns
``[wo*sx - pl, wo*sx - pl + pw)`` and rows ``[ho*sy - pt, ho*sy - pt + ph)``, clipped to
the image (padding never takes part):

* max: the largest value; in backward the derivative goes to the first maximum in
  MatConvNet's scan order (column by column, rows within a column), i.e. the first
  element that is strictly larger than everything before it.
* avg: the sum times ``1 / n`` where ``n`` is the number of window elements *inside the
  image* (MatConvNet's CPU and GPU code both divide by the clipped window size).

Every kernel is parallel over (image, channel) planes, so accumulation is race-free and
in a fixed order.
"""
import os

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # see im2col_cpu.py

import numpy as np  # noqa: E402,F401
from numba import njit, prange  # noqa: E402


@njit(cache=True, inline='always')
def _window(o, s, p, size, n):
    a = o * s - p
    b = a + size
    if b > n:
        b = n
    if a < 0:
        a = 0
    return a, b


@njit(parallel=True, cache=True, fastmath=False)
def max_forward(xT, yT, ph, pw, pt, pl, sy, sx):
    N, C, W, H = xT.shape
    Wo = yT.shape[2]
    Ho = yT.shape[3]
    ninf = -np.inf
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for wo in range(Wo):
            u1, u2 = _window(wo, sx, pl, pw, W)
            for ho in range(Ho):
                v1, v2 = _window(ho, sy, pt, ph, H)
                m = xT.dtype.type(ninf)
                for u in range(u1, u2):
                    for v in range(v1, v2):
                        val = xT[n, c, u, v]
                        if val > m:
                            m = val
                yT[n, c, wo, ho] = m


@njit(parallel=True, cache=True, fastmath=False)
def max_backward(xT, dyT, dxT, ph, pw, pt, pl, sy, sx):
    N, C, W, H = xT.shape
    Wo = dyT.shape[2]
    Ho = dyT.shape[3]
    ninf = -np.inf
    zero = dxT.dtype.type(0)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for a in range(W):
            for b in range(H):
                dxT[n, c, a, b] = zero
        for wo in range(Wo):
            u1, u2 = _window(wo, sx, pl, pw, W)
            for ho in range(Ho):
                v1, v2 = _window(ho, sy, pt, ph, H)
                m = xT.dtype.type(ninf)
                bu = -1
                bv = -1
                for u in range(u1, u2):
                    for v in range(v1, v2):
                        val = xT[n, c, u, v]
                        if val > m:
                            m = val
                            bu = u
                            bv = v
                if bu >= 0:
                    dxT[n, c, bu, bv] += dyT[n, c, wo, ho]


@njit(parallel=True, cache=True, fastmath=False)
def avg_forward(xT, yT, ph, pw, pt, pl, sy, sx):
    N, C, W, H = xT.shape
    Wo = yT.shape[2]
    Ho = yT.shape[3]
    one = xT.dtype.type(1)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for wo in range(Wo):
            u1, u2 = _window(wo, sx, pl, pw, W)
            for ho in range(Ho):
                v1, v2 = _window(ho, sy, pt, ph, H)
                s = xT.dtype.type(0)
                for u in range(u1, u2):
                    for v in range(v1, v2):
                        s += xT[n, c, u, v]
                scale = one / xT.dtype.type((u2 - u1) * (v2 - v1))
                yT[n, c, wo, ho] = s * scale


@njit(parallel=True, cache=True, fastmath=False)
def avg_backward(dyT, dxT, ph, pw, pt, pl, sy, sx):
    N, C, W, H = dxT.shape
    Wo = dyT.shape[2]
    Ho = dyT.shape[3]
    one = dxT.dtype.type(1)
    zero = dxT.dtype.type(0)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for a in range(W):
            for b in range(H):
                dxT[n, c, a, b] = zero
        for wo in range(Wo):
            u1, u2 = _window(wo, sx, pl, pw, W)
            for ho in range(Ho):
                v1, v2 = _window(ho, sy, pt, ph, H)
                scale = one / dxT.dtype.type((u2 - u1) * (v2 - v1))
                d = dyT[n, c, wo, ho] * scale
                for u in range(u1, u2):
                    for v in range(v1, v2):
                        dxT[n, c, u, v] += d
