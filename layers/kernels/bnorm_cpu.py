"""numba kernels (CPU) for batch normalization with batch statistics, for a batch
normalization fused with the ReLU after it (:func:`normalize_relu`), and for the residual
tail BN -> Sum -> ReLU (:func:`normalize_sum_relu`); both fused backward passes are
:func:`backward_sums_masked` then :func:`backward_dx`.

Layout: ``x3`` is the C-contiguous ``(N, C, HW)`` view of an ``H x W x C x N``
Fortran-order map (``x.T.reshape(N, C, W*H)``): per image and channel one contiguous
*plane* of HW values; plane ``p = n * C + c`` starts at element ``p * HW``. Each kernel
works on the planes ``[p0, p1)`` only, in memory order, so that the callers split the
N * C planes over worker threads (:mod:`threads_cpu`) into contiguous runs of memory; the
kernels are serial and release the GIL. The per-channel sums are written per plane
(``out[p]``, float64) and summed over the images by the caller, in image order.

Why planes in memory order: a split by channels reads, for each channel, N runs of HW
values that lie C * HW apart; at 16x16 and 8x8 (runs of 1 KB and 256 B) the hardware
prefetcher does not follow such jumps and the passes wait on memory (measured on 2
cores, BN+ReLU backward at batch 32: 16x16x64 0.75-0.86 -> 0.57-0.59 ms, 8x8x128
0.50-0.54 -> 0.39 ms).

Why kernels: the numpy formulas take six or seven passes over the map and two or three
temporaries the size of the map, single-threaded; these take two streaming passes
(forward: the statistics, then the normalisation; backward: sums, dx), on every core.

Sums are accumulated in float64 whatever the map's dtype (more accurate than the
float32 pairwise sums they replace); the variance is two-pass per plane (its mean first,
then its squared deviations), the planes combined exactly (:func:`plane_stats`).
``fastmath`` allows only reassociation, so that LLVM vectorises the sums; NaN and Inf
propagate as without it (the engine's finite checks rely on that).

The inner loops index raveled arrays with unsigned offsets, as in :mod:`im2col_cpu`
(no negative-index wraparound code, vectorised loops).
"""
import numpy as np
from numba import njit

_U = np.uint64
_FM = {'reassoc'}


@njit(nogil=True, cache=True, fastmath=_FM)
def plane_stats(x3, p0, p1, sums, sqdevs):
    """Per plane ``p`` in ``[p0, p1)``: ``sums[p]`` its sum and ``sqdevs[p]`` the sum of
    its squared deviations from its own mean (two passes over the plane while it is in
    the L1 cache; float64). The channel's variance is then Chan et al.'s pairwise
    combination of the planes' (:func:`bnorm.channel_moments`), as stable as two passes
    over the whole channel."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    uHW = _U(HW)
    for p in range(p0, p1):
        o = _U(p) * uHW
        s = 0.0
        for i in range(uHW):
            s += xf[o + i]
        m = s / HW
        q = 0.0
        for i in range(uHW):
            d = xf[o + i] - m
            q += d * d
        sums[p] = s
        sqdevs[p] = q


@njit(nogil=True, cache=True)
def normalize(x3, y3, p0, p1, mu, scale, shift):
    """``y = (x - mu[c]) * scale[c] + shift[c]`` on the planes ``[p0, p1)`` (``scale = g
    / sigma``, ``shift = b``, in x's dtype; centred first, as the numpy formula, so that a
    large mean cancels exactly)."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    yf = y3.ravel()
    uHW = _U(HW)
    for p in range(p0, p1):
        o = _U(p) * uHW
        c = p % C
        m = mu[c]
        a = scale[c]
        b = shift[c]
        for i in range(uHW):
            yf[o + i] = (xf[o + i] - m) * a + b


@njit(nogil=True, cache=True, fastmath=_FM)
def backward_sums(x3, dy3, p0, p1, mu, db, dot):
    """Per plane ``p = n * C + c`` in ``[p0, p1)``: ``db[p] = sum(dy)``, ``dot[p] =
    sum(dy * (x - mu[c]))`` (float64 accumulation)."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    df = dy3.ravel()
    uHW = _U(HW)
    for p in range(p0, p1):
        o = _U(p) * uHW
        m = mu[p % C]
        s = 0.0
        t = 0.0
        for i in range(uHW):
            d = df[o + i]
            s += d
            t += d * (xf[o + i] - m)
        db[p] = s
        dot[p] = t


@njit(nogil=True, cache=True)
def backward_dx(x3, dy3, dx3, p0, p1, mu, muz, g1, g2):
    """``dx = g1[c] (dy - muz[c]) - g2[c] (x - mu[c])`` on the planes ``[p0, p1)``
    (``muz = db / M``; ``g1``, ``g2``: bnorm.py's G1, G2), in x's dtype."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    df = dy3.ravel()
    of = dx3.ravel()
    uHW = _U(HW)
    for p in range(p0, p1):
        o = _U(p) * uHW
        c = p % C
        m = mu[c]
        mz = muz[c]
        a = g1[c]
        b = g2[c]
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
def normalize_relu(x3, y3, p0, p1, mu, scale, shift, leaky, spos, sneg):
    """``y = relu((x - mu[c]) * scale[c] + shift[c])`` on the planes ``[p0, p1)``: with
    ``leaky`` False ``max(v, 0)`` as :func:`eltwise_cpu.relu_forward` (NaN kept, -inf
    to 0), else ``v * (spos if v > 0 else sneg)`` as the leaky ReLU's product."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    yf = y3.ravel()
    uHW = _U(HW)
    zero = yf.dtype.type(0)
    for p in range(p0, p1):
        o = _U(p) * uHW
        c = p % C
        m = mu[c]
        a = scale[c]
        b = shift[c]
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
def normalize_sum_relu(x3, s3, z3, p0, p1, mu, scale, shift, leaky, spos, sneg):
    """``z = relu((x - mu[c]) * scale[c] + shift[c] + s)`` on the planes ``[p0, p1)``:
    the BN value rounded to the map's dtype, plus ``s``, then the ReLU as
    :func:`normalize_relu` applies it (``leaky`` False: ``max(v, 0)``, NaN kept)."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    sf = s3.ravel()
    zf = z3.ravel()
    uHW = _U(HW)
    zero = zf.dtype.type(0)
    for p in range(p0, p1):
        o = _U(p) * uHW
        c = p % C
        m = mu[c]
        a = scale[c]
        b = shift[c]
        if leaky:
            for i in range(uHW):
                v = (xf[o + i] - m) * a + b + sf[o + i]
                zf[o + i] = v * (spos if v > zero else sneg)
        else:
            for i in range(uHW):
                v = (xf[o + i] - m) * a + b + sf[o + i]
                zf[o + i] = zero if v <= zero else v


@njit(nogil=True, cache=True, fastmath=_FM)
def backward_sums_masked(x3, z3, dz3, ds3, p0, p1, mu, spos, sneg, db, dot):
    """Per plane ``p = n * C + c`` in ``[p0, p1)``: the ReLU-masked ``ds = dz * (spos if
    z > 0 else sneg)`` written out (``z`` the fused output: of BN+ReLU or BN+Sum+ReLU),
    and :func:`backward_sums` of it: ``db[p] = sum(ds)``, ``dot[p] = sum(ds * (x -
    mu[c]))``. The dx pass is then :func:`backward_dx` reading ``ds``."""
    N, C, HW = x3.shape
    xf = x3.ravel()
    zf = z3.ravel()
    df = dz3.ravel()
    sf = ds3.ravel()
    uHW = _U(HW)
    zero = zf.dtype.type(0)
    for p in range(p0, p1):
        o = _U(p) * uHW
        m = mu[p % C]
        s = 0.0
        t = 0.0
        for i in range(uHW):
            d = df[o + i] * (spos if zf[o + i] > zero else sneg)
            sf[o + i] = d
            s += d
            t += d * (xf[o + i] - m)
        db[p] = s
        dot[p] = t
