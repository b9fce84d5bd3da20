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

The kernels are serial, release the GIL and work on the images ``[n0, n1)``: callers
split the batch over worker threads (:mod:`threads_cpu`); every image's planes are
written by one thread, in a fixed order. Inner loops index raveled arrays with uint64
offsets (no wraparound code; see im2col_cpu.py).
"""
import numpy as np
from numba import njit


_U = np.uint64


@njit(cache=True)
def _window(o, s, p, size, n):
    a = o * s - p
    b = a + size
    if b > n:
        b = n
    if a < 0:
        a = 0
    return a, b


@njit(nogil=True, cache=True, fastmath=False)
def max_forward(xT, yT, n0, n1, ph, pw, pt, pl, sy, sx):
    N, C, W, H = xT.shape
    Wo = yT.shape[2]
    Ho = yT.shape[3]
    xf = xT.ravel()
    yf = yT.ravel()
    ninf = xT.dtype.type(-np.inf)
    for t in range(n0 * C, n1 * C):
        xp = t * W * H
        yp = t * Wo * Ho
        for wo in range(Wo):
            u1, u2 = _window(wo, sx, pl, pw, W)
            for ho in range(Ho):
                v1, v2 = _window(ho, sy, pt, ph, H)
                m = ninf
                for u in range(u1, u2):
                    base = _U(xp + u * H)
                    for v in range(_U(v1), _U(v2)):
                        val = xf[base + v]
                        if val > m:
                            m = val
                yf[_U(yp + wo * Ho + ho)] = m


@njit(nogil=True, cache=True, fastmath=False)
def max_backward(xT, dyT, dxT, n0, n1, ph, pw, pt, pl, sy, sx):
    N, C, W, H = xT.shape
    Wo = dyT.shape[2]
    Ho = dyT.shape[3]
    xf = xT.ravel()
    dyf = dyT.ravel()
    dxf = dxT.ravel()
    ninf = xT.dtype.type(-np.inf)
    zero = dxT.dtype.type(0)
    WH = _U(W * H)
    for t in range(n0 * C, n1 * C):
        xp = t * W * H
        yp = t * Wo * Ho
        uxp = _U(xp)
        for a in range(WH):
            dxf[uxp + a] = zero
        for wo in range(Wo):
            u1, u2 = _window(wo, sx, pl, pw, W)
            for ho in range(Ho):
                v1, v2 = _window(ho, sy, pt, ph, H)
                m = ninf
                best = _U(0)
                found = False
                for u in range(u1, u2):
                    base = _U(xp + u * H)
                    for v in range(_U(v1), _U(v2)):
                        val = xf[base + v]
                        if val > m:
                            m = val
                            best = base + v
                            found = True
                if found:
                    dxf[best] += dyf[_U(yp + wo * Ho + ho)]


@njit(nogil=True, cache=True, fastmath=False)
def avg_forward(xT, yT, n0, n1, ph, pw, pt, pl, sy, sx):
    N, C, W, H = xT.shape
    Wo = yT.shape[2]
    Ho = yT.shape[3]
    xf = xT.ravel()
    yf = yT.ravel()
    one = xT.dtype.type(1)
    for t in range(n0 * C, n1 * C):
        xp = t * W * H
        yp = t * Wo * Ho
        for wo in range(Wo):
            u1, u2 = _window(wo, sx, pl, pw, W)
            for ho in range(Ho):
                v1, v2 = _window(ho, sy, pt, ph, H)
                s = xT.dtype.type(0)
                for u in range(u1, u2):
                    base = _U(xp + u * H)
                    for v in range(_U(v1), _U(v2)):
                        s += xf[base + v]
                scale = one / xT.dtype.type((u2 - u1) * (v2 - v1))
                yf[_U(yp + wo * Ho + ho)] = s * scale


@njit(nogil=True, cache=True, fastmath=False)
def avg_backward(dyT, dxT, n0, n1, ph, pw, pt, pl, sy, sx):
    N, C, W, H = dxT.shape
    Wo = dyT.shape[2]
    Ho = dyT.shape[3]
    dyf = dyT.ravel()
    dxf = dxT.ravel()
    one = dxT.dtype.type(1)
    zero = dxT.dtype.type(0)
    WH = _U(W * H)
    for t in range(n0 * C, n1 * C):
        xp = t * W * H
        yp = t * Wo * Ho
        uxp = _U(xp)
        for a in range(WH):
            dxf[uxp + a] = zero
        for wo in range(Wo):
            u1, u2 = _window(wo, sx, pl, pw, W)
            for ho in range(Ho):
                v1, v2 = _window(ho, sy, pt, ph, H)
                scale = one / dxT.dtype.type((u2 - u1) * (v2 - v1))
                d = dyf[_U(yp + wo * Ho + ho)] * scale
                for u in range(u1, u2):
                    base = _U(xp + u * H)
                    for v in range(_U(v1), _U(v2)):
                        dxf[base + v] += d
