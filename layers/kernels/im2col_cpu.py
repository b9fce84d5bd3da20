"""numba kernels (CPU) for convolution: im2col and col2im around the convolution GEMMs.

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

The kernels are serial and release the GIL (``nogil``): the callers split the batch
over worker threads (:mod:`threads_cpu`), each unfolding its own images into its own
buffer, so col2im accumulates without races and in a fixed order.

The inner loops index raveled arrays with unsigned (uint64) offsets: numba then emits no
negative-index wraparound code and LLVM vectorises the copies (5-7x faster than 4-D
indexing). Keep every term of such an offset uint64 (uint64 mixed with int64 is float64
in numba).
"""
import numpy as np
from numba import njit


_U = np.uint64


@njit(cache=True)
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


@njit(nogil=True, cache=True, fastmath=False)
def im2col(xT, col, n0, FH, FW, Ho, Wo, pt, pl, sy, sx, ry, rx):
    """Unfold images ``n0 .. n0 + nc - 1`` of ``xT`` (N, C, W, H) into ``col`` (K, nc*Ho*Wo).
    Both C-contiguous."""
    C = xT.shape[1]
    W = xT.shape[2]
    H = xT.shape[3]
    L = col.shape[1]
    P = Ho * Wo
    nc = L // P if P > 0 else 0
    xf = xT.ravel()
    cf = col.ravel()
    zero = col.dtype.type(0)
    usy = _U(sy)
    for t in range(nc * C):
        j = t // C
        c = t - j * C
        plane = ((n0 + j) * C + c) * W * H
        for fw in range(FW):
            for fh in range(FH):
                k = (c * FW + fw) * FH + fh
                oy = fh * ry - pt
                lo, hi = _valid_rows(H, Ho, oy, sy)
                ulo, uhi, uHo = _U(lo), _U(hi), _U(Ho)
                for wo in range(Wo):
                    xw = wo * sx + fw * rx - pl
                    o = _U(k * L + j * P + wo * Ho)
                    if xw < 0 or xw >= W:
                        for ho in range(uHo):
                            cf[o + ho] = zero
                        continue
                    for ho in range(ulo):
                        cf[o + ho] = zero
                    if sy == 1:
                        src = _U(plane + xw * H + oy)   # + ho >= 0 for ho >= lo
                        for ho in range(ulo, uhi):
                            cf[o + ho] = xf[src + ho]
                    else:
                        src = _U(plane + xw * H + lo * sy + oy)
                        for ho in range(ulo, uhi):
                            cf[o + ho] = xf[src + (ho - ulo) * usy]
                    for ho in range(uhi, uHo):
                        cf[o + ho] = zero


@njit(nogil=True, cache=True, fastmath=False)
def col2im(col, dxT, n0, FH, FW, Ho, Wo, pt, pl, sy, sx, ry, rx):
    """Fold ``col`` (K, nc*Ho*Wo) back onto images ``n0 .. n0 + nc - 1`` of ``dxT``
    (N, C, W, H): those planes are overwritten with the sum of their column entries."""
    C = dxT.shape[1]
    W = dxT.shape[2]
    H = dxT.shape[3]
    L = col.shape[1]
    P = Ho * Wo
    nc = L // P if P > 0 else 0
    df = dxT.ravel()
    cf = col.ravel()
    zero = dxT.dtype.type(0)
    usy = _U(sy)
    WH = _U(W * H)
    for t in range(nc * C):
        j = t // C
        c = t - j * C
        plane = ((n0 + j) * C + c) * W * H
        up = _U(plane)
        for a in range(WH):
            df[up + a] = zero
        for fw in range(FW):
            for fh in range(FH):
                k = (c * FW + fw) * FH + fh
                oy = fh * ry - pt
                lo, hi = _valid_rows(H, Ho, oy, sy)
                ulo, uhi = _U(lo), _U(hi)
                for wo in range(Wo):
                    xw = wo * sx + fw * rx - pl
                    if xw < 0 or xw >= W:
                        continue
                    o = _U(k * L + j * P + wo * Ho)
                    if sy == 1:
                        dst = _U(plane + xw * H + oy)
                        for ho in range(ulo, uhi):
                            df[dst + ho] += cf[o + ho]
                    else:
                        dst = _U(plane + xw * H + lo * sy + oy)
                        for ho in range(ulo, uhi):
                            df[dst + (ho - ulo) * usy] += cf[o + ho]


@njit(nogil=True, cache=True)
def pack_row_blocks(m, ap):
    """``m`` (M, K) into row blocks ``ap`` (blocks, K, MR): ``ap[i // MR, k, i % MR] =
    m[i, k]``, rows past M zero."""
    M, K = m.shape
    MR = ap.shape[2]
    for t in range(ap.shape[0]):
        for k in range(K):
            for r in range(MR):
                i = t * MR + r
                ap[t, k, r] = m[i, k] if i < M else 0


@njit(nogil=True, cache=True)
def pack_grid_transposed(d3, bp, Hp):
    """Output derivatives of one image, ``d3`` (R, Wo, Ho), transposed onto the padded
    pixel grid of an implicit convolution: panels ``bp`` (tiles, Q, NR) of the (Q, R)
    matrix with row ``q = wo * Hp + ho`` holding ``d3[:, wo, ho]`` for ``ho < Ho`` and zeros
    for the ``Hp - Ho`` padding rows between columns (Q = (Wo - 1) * Hp + Ho)."""
    R, Wo, Ho = d3.shape
    Q = bp.shape[1]
    NR = bp.shape[2]
    zero = bp.dtype.type(0)
    for t in range(bp.shape[0]):
        r0 = t * NR
        w = min(NR, R - r0)
        for wo in range(Wo):
            q0 = wo * Hp
            for h0 in range(0, Ho, 16):   # 16-pixel blocks keep the transposition in cache
                h1 = min(Ho, h0 + 16)
                for u in range(w):
                    for h in range(h0, h1):
                        bp[t, q0 + h, u] = d3[r0 + u, wo, h]
            for h in range(Ho, Hp):
                if q0 + h < Q:
                    for u in range(w):
                        bp[t, q0 + h, u] = zero
