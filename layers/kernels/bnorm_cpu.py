"""numba kernels (CPU) for batch normalization with batch statistics, for a batch
normalization fused with the ReLU after it (:func:`normalize_relu`), and for the residual
tail BN -> Sum -> ReLU (:func:`normalize_sum_relu`); both fused backward passes are
:func:`backward_sums_masked` then :func:`backward_dx`.

Layout: ``x3`` is the C-contiguous ``(N, C, HW)`` view of an ``H x W x C x N``
Fortran-order map (``x.T.reshape(N, C, W*H)``): per image and channel one contiguous
plane of HW values. Each kernel works on the channels ``[c0, c1)`` only, so that the
callers split the channels over worker threads (:mod:`threads_cpu`); the kernels are
serial and release the GIL.

Why kernels: the numpy formulas take six or seven passes over the map and two or three
temporaries the size of the map, single-threaded; these take two (forward: the
statistics, then the normalisation) or three (backward: statistics, sums, dx) streaming
passes per channel, on every core.

Sums are accumulated in float64 whatever the map's dtype (more accurate than the
float32 pairwise sums they replace); the variance is two-pass (mean first, then the mean
squared deviation). ``fastmath`` allows only reassociation, so that LLVM vectorises the
sums; NaN and Inf propagate as without it (the engine's finite checks rely on that).

The inner loops index raveled arrays with unsigned offsets, as in :mod:`im2col_cpu`
(no negative-index wraparound code, vectorised loops).
"""
import math

import numpy as np
from numba import njit

_U = np.uint64
_FM = {'reassoc'}


@njit(nogil=True, cache=True, fastmath=_FM)
def _plane_sum(xf, o, HW):
    s = 0.0
    for i in range(HW):
        s += xf[o + i]
    return s


@njit(nogil=True, cache=True, fastmath=_FM)
def _plane_sqdev(xf, o, HW, m):
    s = 0.0
    for i in range(HW):
        d = xf[o + i] - m
        s += d * d
    return s


@njit(nogil=True, cache=True, fastmath=_FM)
def stats(x3, c0, c1, epsilon, mu, sigma):
    """Batch mean and ``sqrt(var + epsilon)`` of channels ``[c0, c1)`` into ``mu`` and
    ``sigma`` (C,) (float64 accumulation, two-pass variance, biased 1/M)."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    M = N * HW
    uHW = _U(HW)
    for c in range(c0, c1):
        s = 0.0
        for n in range(N):
            s += _plane_sum(xf, _U((n * C + c) * HW), uHW)
        m = s / M
        v = 0.0
        for n in range(N):
            v += _plane_sqdev(xf, _U((n * C + c) * HW), uHW, m)
        mu[c] = m
        sigma[c] = math.sqrt(v / M + epsilon)


@njit(nogil=True, cache=True)
def normalize(x3, y3, c0, c1, mu, scale, shift):
    """``y = (x - mu[c]) * scale[c] + shift[c]`` on channels ``[c0, c1)`` (``scale = g /
    sigma``, ``shift = b``, in x's dtype; centred first, as the numpy formula, so that a
    large mean cancels exactly)."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    yf = y3.ravel()
    uHW = _U(HW)
    for c in range(c0, c1):
        m = mu[c]
        a = scale[c]
        b = shift[c]
        for n in range(N):
            o = _U((n * C + c) * HW)
            for i in range(uHW):
                yf[o + i] = (xf[o + i] - m) * a + b


@njit(nogil=True, cache=True, fastmath=_FM)
def backward_sums(x3, dy3, c0, c1, mu, db, dot):
    """Per channel in ``[c0, c1)``: ``db = sum(dy)``, ``dot = sum(dy * (x - mu))``
    (float64 accumulation)."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    df = dy3.ravel()
    uHW = _U(HW)
    for c in range(c0, c1):
        m = mu[c]
        s = 0.0
        t = 0.0
        for n in range(N):
            o = _U((n * C + c) * HW)
            for i in range(uHW):
                d = df[o + i]
                s += d
                t += d * (xf[o + i] - m)
        db[c] = s
        dot[c] = t


@njit(nogil=True, cache=True)
def backward_dx(x3, dy3, dx3, c0, c1, mu, muz, g1, g2):
    """``dx = g1[c] (dy - muz[c]) - g2[c] (x - mu[c])`` on channels ``[c0, c1)``
    (``muz = db / M``; ``g1``, ``g2``: bnorm.py's G1, G2), in x's dtype."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    df = dy3.ravel()
    of = dx3.ravel()
    uHW = _U(HW)
    for c in range(c0, c1):
        m = mu[c]
        mz = muz[c]
        a = g1[c]
        b = g2[c]
        for n in range(N):
            o = _U((n * C + c) * HW)
            for i in range(uHW):
                of[o + i] = a * (df[o + i] - mz) - b * (xf[o + i] - m)


# ---------------------------------------------------------------------------- BN + ReLU
# The fused batch norm -> ReLU (:mod:`pydagnn.layers.bnorm_relu`). The ReLU is applied
# in the normalisation pass, so the BN output is not written out; backward masks ``dy``
# by the fused output ``y`` (the ReLU's sign pattern, leak >= 0) in the sums pass, which
# writes the masked ``dy`` for the dx pass (:func:`backward_sums_masked`). The slopes
# ``spos``, ``sneg`` (leak 0: 1 and 0) are scalars of the map's dtype, so that
# ``dy * slope`` is the ReLU's float product exactly.
@njit(nogil=True, cache=True)
def normalize_relu(x3, y3, c0, c1, mu, scale, shift, leaky, spos, sneg):
    """``y = relu((x - mu[c]) * scale[c] + shift[c])`` on channels ``[c0, c1)``: with
    ``leaky`` False ``max(v, 0)`` as :func:`eltwise_cpu.relu_forward` (NaN kept, -inf
    to 0), else ``v * (spos if v > 0 else sneg)`` as the leaky ReLU's product."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    yf = y3.ravel()
    uHW = _U(HW)
    zero = yf.dtype.type(0)
    for c in range(c0, c1):
        m = mu[c]
        a = scale[c]
        b = shift[c]
        for n in range(N):
            o = _U((n * C + c) * HW)
            if leaky:
                for i in range(uHW):
                    v = (xf[o + i] - m) * a + b
                    yf[o + i] = v * (spos if v > zero else sneg)
            else:
                for i in range(uHW):
                    v = (xf[o + i] - m) * a + b
                    yf[o + i] = zero if v <= zero else v


# ---------------------------------------------------------------------------- BN + Sum + ReLU
# The fused residual tail ``z = relu(bn(x) + s)`` (:mod:`pydagnn.layers.bnorm_sum_relu`).
# Forward adds the shortcut ``s`` in the normalisation pass; backward is the BN+ReLU one
# (:func:`backward_sums_masked`), whose masked ``ds = dz * slope(z)`` is also the
# shortcut's derivative. Same float64 sums, same dtype arithmetic and operation order as
# BN, then Sum, then ReLU.
@njit(nogil=True, cache=True)
def normalize_sum_relu(x3, s3, z3, c0, c1, mu, scale, shift, leaky, spos, sneg):
    """``z = relu((x - mu[c]) * scale[c] + shift[c] + s)`` on channels ``[c0, c1)``: the
    BN value rounded to the map's dtype, plus ``s``, then the ReLU as
    :func:`normalize_relu` applies it (``leaky`` False: ``max(v, 0)``, NaN kept)."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    sf = s3.ravel()
    zf = z3.ravel()
    uHW = _U(HW)
    zero = zf.dtype.type(0)
    for c in range(c0, c1):
        m = mu[c]
        a = scale[c]
        b = shift[c]
        for n in range(N):
            o = _U((n * C + c) * HW)
            if leaky:
                for i in range(uHW):
                    v = (xf[o + i] - m) * a + b + sf[o + i]
                    zf[o + i] = v * (spos if v > zero else sneg)
            else:
                for i in range(uHW):
                    v = (xf[o + i] - m) * a + b + sf[o + i]
                    zf[o + i] = zero if v <= zero else v


@njit(nogil=True, cache=True, fastmath=_FM)
def backward_sums_masked(x3, z3, dz3, ds3, c0, c1, mu, spos, sneg, db, dot):
    """Per channel in ``[c0, c1)``: the ReLU-masked ``ds = dz * (spos if z > 0 else
    sneg)`` written out (``z`` the fused output: of BN+ReLU or BN+Sum+ReLU), and
    :func:`backward_sums` of it: ``db = sum(ds)``, ``dot = sum(ds * (x - mu))``. The dx
    pass is then :func:`backward_dx` reading ``ds``."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    zf = z3.ravel()
    df = dz3.ravel()
    sf = ds3.ravel()
    uHW = _U(HW)
    zero = zf.dtype.type(0)
    for c in range(c0, c1):
        m = mu[c]
        s = 0.0
        t = 0.0
        for n in range(N):
            o = _U((n * C + c) * HW)
            for i in range(uHW):
                d = df[o + i] * (spos if zf[o + i] > zero else sneg)
                sf[o + i] = d
                s += d
                t += d * (xf[o + i] - m)
        db[c] = s
        dot[c] = t
