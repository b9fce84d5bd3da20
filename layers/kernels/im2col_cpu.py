"""numba kernels (CPU) for convolution: im2col / col2im and the batch <-> column
transposes around the convolution GEMMs.

Layout. A feature map ``x`` is ``H x W x C x N`` in Fortran order, so ``xT = x.T`` is a
C-contiguous ``(N, C, W, H)`` array: per image and channel a ``W x H`` plane with H (the
row index) fastest. A chunk of ``nc`` images starting at image ``n0`` is unfolded into a
column matrix ``col`` of shape ``(K, nc * P)`` with

* ``K = C * FW * FH`` rows, row ``k = (c * FW + fw) * FH + fh`` (the order of the
  C-contiguous ``w.T`` view of a Fortran ``FH x FW x Cin x Cout`` filter bank, so the
  filters are the matrix ``w.T.reshape(Cout, K)`` without a copy);
* ``P = Wo * Ho`` columns per image, column ``j * P + wo * Ho + ho`` for image ``n0 + j``
  (the order of the C-contiguous ``y.T`` view of the output).

Input pixel of output ``(ho, wo)`` and filter tap ``(fh, fw)``:
``row = ho * sy + fh * ry - pad_top``, ``col = wo * sx + fw * rx - pad_left``
(``ry``, ``rx``: dilation); outside the image it reads 0 (zero padding).

All kernels are parallel over (image, channel) pairs: every pair owns its own rows of
``col`` and its own plane of the image, so col2im accumulates without races, in a fixed
order (results do not depend on the number of threads).
"""
import os

# numba's OpenMP workers must sleep, not spin, between parallel regions: on a small
# machine they otherwise fight OpenBLAS's threads (which run the GEMMs between two
# kernels) and every handoff costs a scheduler tick (~4 ms). libgomp reads this when
# numba first starts its thread pool; an explicit user setting wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402


@njit(cache=True, inline='always')
def _valid_rows(H, Ho, oy, sy):
    """Output rows ``ho`` in ``[lo, hi)`` read input row ``ho * sy + oy`` inside ``[0, H)``."""
    if oy >= 0:
        lo = 0
    else:
        lo = (-oy + sy - 1) // sy
    hi = (H - 1 - oy) // sy + 1   # floor division: correct for negative numerators too
    if lo > Ho:
        lo = Ho
    if hi > Ho:
        hi = Ho
    if hi < lo:
        hi = lo
    return lo, hi


@njit(parallel=True, cache=True, fastmath=False)
def im2col(xT, col, n0, FH, FW, Ho, Wo, pt, pl, sy, sx, ry, rx):
    """Unfold images ``n0 .. n0 + nc - 1`` of ``xT`` (N, C, W, H) into ``col`` (K, nc*Ho*Wo)."""
    C = xT.shape[1]
    W = xT.shape[2]
    H = xT.shape[3]
    P = Ho * Wo
    nc = col.shape[1] // P if P > 0 else 0
    zero = col.dtype.type(0)
    for t in prange(nc * C):
        j = t // C
        c = t - j * C
        n = n0 + j
        base = j * P
        for fw in range(FW):
            for fh in range(FH):
                k = (c * FW + fw) * FH + fh
                oy = fh * ry - pt
                lo, hi = _valid_rows(H, Ho, oy, sy)
                for wo in range(Wo):
                    xw = wo * sx + fw * rx - pl
                    o = base + wo * Ho
                    if xw < 0 or xw >= W:
                        for ho in range(Ho):
                            col[k, o + ho] = zero
                    else:
                        for ho in range(lo):
                            col[k, o + ho] = zero
                        if sy == 1:
                            for ho in range(lo, hi):
                                col[k, o + ho] = xT[n, c, xw, ho + oy]
                        else:
                            for ho in range(lo, hi):
                                col[k, o + ho] = xT[n, c, xw, ho * sy + oy]
                        for ho in range(hi, Ho):
                            col[k, o + ho] = zero


@njit(parallel=True, cache=True, fastmath=False)
def col2im(col, dxT, n0, FH, FW, Ho, Wo, pt, pl, sy, sx, ry, rx):
    """Fold ``col`` (K, nc*Ho*Wo) back onto images ``n0 .. n0 + nc - 1`` of ``dxT``
    (N, C, W, H): those planes are overwritten with the sum of their column entries."""
    C = dxT.shape[1]
    W = dxT.shape[2]
    H = dxT.shape[3]
    P = Ho * Wo
    nc = col.shape[1] // P if P > 0 else 0
    zero = dxT.dtype.type(0)
    for t in prange(nc * C):
        j = t // C
        c = t - j * C
        n = n0 + j
        base = j * P
        for a in range(W):
            for b in range(H):
                dxT[n, c, a, b] = zero
        for fw in range(FW):
            for fh in range(FH):
                k = (c * FW + fw) * FH + fh
                oy = fh * ry - pt
                lo, hi = _valid_rows(H, Ho, oy, sy)
                for wo in range(Wo):
                    xw = wo * sx + fw * rx - pl
                    if xw < 0 or xw >= W:
                        continue
                    o = base + wo * Ho
                    if sy == 1:
                        for ho in range(lo, hi):
                            dxT[n, c, xw, ho + oy] += col[k, o + ho]
                    else:
                        for ho in range(lo, hi):
                            dxT[n, c, xw, ho * sy + oy] += col[k, o + ho]


@njit(parallel=True, cache=True, fastmath=False)
def cols_to_batch(tmp, yT3, n0, bias, add_bias):
    """``yT3[n0 + j, co, p] = tmp[co, j*P + p] (+ bias[co])``; tmp (Co, nc*P), yT3 (N, Co, P)."""
    Co = yT3.shape[1]
    P = yT3.shape[2]
    nc = tmp.shape[1] // P if P > 0 else 0
    for t in prange(nc * Co):
        j = t // Co
        co = t - j * Co
        o = j * P
        if add_bias:
            bb = bias[co]
            for p in range(P):
                yT3[n0 + j, co, p] = tmp[co, o + p] + bb
        else:
            for p in range(P):
                yT3[n0 + j, co, p] = tmp[co, o + p]


@njit(parallel=True, cache=True, fastmath=False)
def batch_to_cols(yT3, tmp, n0):
    """``tmp[co, j*P + p] = yT3[n0 + j, co, p]``; the inverse of :func:`cols_to_batch`."""
    Co = yT3.shape[1]
    P = yT3.shape[2]
    nc = tmp.shape[1] // P if P > 0 else 0
    for t in prange(nc * Co):
        j = t // Co
        co = t - j * Co
        o = j * P
        for p in range(P):
            tmp[co, o + p] = yT3[n0 + j, co, p]


@njit(parallel=True, cache=True, fastmath=False)
def add_bias(yT3, bias):
    """``yT3[n, co, :] += bias[co]`` for a C-contiguous (N, Co, P) array."""
    N = yT3.shape[0]
    Co = yT3.shape[1]
    P = yT3.shape[2]
    for t in prange(N * Co):
        n = t // Co
        co = t - n * Co
        bb = bias[co]
        for p in range(P):
            yT3[n, co, p] += bb


@njit(parallel=True, cache=True, fastmath=False)
def bias_grad(dyT3, out):
    """``out[co] = sum over n, p of dyT3[n, co, p]`` (pairwise per plane, planes in order)."""
    N = dyT3.shape[0]
    Co = dyT3.shape[1]
    P = dyT3.shape[2]
    for co in prange(Co):
        acc = 0.0
        for n in range(N):
            s = dyT3.dtype.type(0)
            for p in range(P):
                s += dyT3[n, co, p]
            acc += s
        out[co] = acc
