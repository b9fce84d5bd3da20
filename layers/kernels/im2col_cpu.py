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
    """``m`` (M, K) C-contiguous into row blocks ``ap`` (blocks, K, MR): ``ap[i // MR, k,
    i % MR] = m[i, k]``, rows past M zero (flat unsigned offsets)."""
    M, K = m.shape
    T, _, MR = ap.shape
    s = m.ravel()
    d = ap.ravel()
    zero = ap.dtype.type(0)
    uK, uMR = _U(K), _U(MR)
    for t in range(T):
        rows = _U(min(MR, M - t * MR))
        so = _U(t) * uMR * uK
        do = _U(t) * uK * uMR
        for k in range(uK):
            dk = do + k * uMR
            for r in range(rows):
                d[dk + r] = s[so + r * uK + k]
            for r in range(rows, uMR):
                d[dk + r] = zero


@njit(nogil=True, cache=True)
def pack_flipped_row_blocks(wT, ap):
    """The filters ``wT`` (Cout, Cin, FW, FH) (the C-contiguous view of a Fortran filter
    bank), flipped in both directions and transposed, ``Wd[c, (co * FW + fw) * FH + fh]
    = wT[co, c, FW-1-fw, FH-1-fh]`` (Cin, Cout * FW * FH), straight into row blocks
    ``ap`` (blocks, K, MR) as :func:`pack_row_blocks` (one pass instead of a strided
    copy and a pack: 590 KB of 3x3x128x128 filters took 480 us, most of it numpy's copy
    through negative strides)."""
    Cout, Cin, FW, FH = wT.shape
    T, K, MR = ap.shape
    s = wT.ravel()
    d = ap.ravel()
    zero = ap.dtype.type(0)
    uMR, uK = _U(MR), _U(K)
    taps = _U(FW) * _U(FH)
    for t in range(T):
        rows = _U(min(MR, Cin - t * MR))
        do = _U(t) * uK * uMR
        for co in range(Cout):
            for fw in range(FW):
                for fh in range(FH):
                    k = (_U(co) * _U(FW) + _U(fw)) * _U(FH) + _U(fh)
                    dk = do + k * uMR
                    so = _U(FW - 1 - fw) * _U(FH) + _U(FH - 1 - fh)
                    for r in range(rows):
                        c = _U(t) * uMR + r
                        d[dk + r] = s[(_U(co) * _U(Cin) + c) * taps + so]
                    for r in range(rows, uMR):
                        d[dk + r] = zero


@njit(nogil=True, cache=True)
def pack_grid_transposed(d3, bp, Hp):
    """Output derivatives of one image, ``d3`` (R, Wo, Ho) C-contiguous, transposed onto
    the padded pixel grid of an implicit convolution: panels ``bp`` (tiles, Q, NR) of the
    (Q, R) matrix with row ``q = wo * Hp + ho`` holding ``d3[:, wo, ho]`` for ``ho < Ho``
    and zeros for the ``Hp - Ho`` padding rows between columns (Q = (Wo - 1) * Hp + Ho);
    a last tile's lanes past R are not written (the kernels mask them). Each panel row
    is written contiguously from R strided reads (flat unsigned offsets: 2-2.7x faster
    than the 3-D indexing it replaces, 5.7 -> 11-16 GB/s)."""
    R, Wo, Ho = d3.shape
    T, Q, NR = bp.shape
    s = d3.ravel()
    d = bp.ravel()
    zero = bp.dtype.type(0)
    uNR = _U(NR)
    plane = _U(Wo) * _U(Ho)
    for t in range(T):
        r0 = t * NR
        w = _U(min(NR, R - r0))
        tb = _U(t) * _U(Q)
        for wo in range(Wo):
            q0 = wo * Hp
            base = _U(r0) * plane + _U(wo * Ho)
            for h in range(Ho):
                do = (tb + _U(q0 + h)) * uNR
                so = base + _U(h)
                for u in range(w):
                    d[do + u] = s[so + u * plane]
            for h in range(Ho, Hp):
                if q0 + h < Q:
                    do = (tb + _U(q0 + h)) * uNR
                    for u in range(w):
                        d[do + u] = zero


@njit(nogil=True, cache=True)
def to_phases(img, buf, pt, pl):
    """Image ``img`` (C, W, H) into the phase buffer ``buf`` (C, sx, sy, Wph, Hph) of an
    implicit convolution with padding ``pt`` (top) / ``pl`` (left) and stride (sx, sy):
    padded pixel ``(xw + pl, xh + pt)`` goes to phase ``((xw + pl) % sx, (xh + pt) % sy)``
    at ``((xw + pl) // sx, (xh + pt) // sy)``. Entries no pixel maps to are left as they
    are (zero: the padding). Writes run along the phase rows (contiguous)."""
    C, W, H = img.shape
    sx, sy, Wph, Hph = buf.shape[1], buf.shape[2], buf.shape[3], buf.shape[4]
    src = img.ravel()
    dst = buf.ravel()
    for c in range(C):
        for xw in range(W):
            pw = xw + pl
            a = pw % sx
            u = pw // sx
            s0 = (c * W + xw) * H
            for b in range(sy):
                # rows v of phase b hold xh = v * sy + b - pt, inside [0, H)
                v0 = max(0, (pt - b + sy - 1) // sy)
                v1 = min(Hph, (H + pt - b + sy - 1) // sy)
                d0 = (((c * sx + a) * sy + b) * Wph + u) * Hph
                if sy == 1:
                    for v in range(_U(v0), _U(v1)):
                        dst[_U(d0) + v] = src[_U(s0 - pt) + v]
                else:
                    for v in range(v0, v1):
                        dst[_U(d0 + v)] = src[_U(s0 + v * sy + b - pt)]


@njit(nogil=True, cache=True)
def from_phase(grid, dx_img, x0, y0, sx, sy, nu, nv):
    """The derivative of one phase plane back into the image: ``dx_img[:, x0 + i * sx,
    y0 + j * sy] = grid[:, i * Hd + j]`` for ``i < nu``, ``j < nv`` (``grid`` (C, nu * Hd)
    rows of column stride Hd; ``dx_img`` (C, W, H))."""
    C, W, H = dx_img.shape
    Hd = grid.shape[1] // nu if nu > 0 else 0
    g = grid.ravel()
    d = dx_img.ravel()
    L = grid.shape[1]
    for c in range(C):
        for i in range(nu):
            s0 = c * L + i * Hd
            d0 = (c * W + x0 + i * sx) * H + y0
            if sy == 1:
                for j in range(_U(nv)):
                    d[_U(d0) + j] = g[_U(s0) + j]
            else:
                for j in range(nv):
                    d[_U(d0 + j * sy)] = g[_U(s0 + j)]


@njit(nogil=True, cache=True)
def rows_into(src4, n0, m, dst3, c0, r0, step):
    """Images ``n0 .. n0+m-1`` of ``src4`` (N, R, Wx, h) stacked into the tall map ``dst3``
    (R, Wt, Ht) of an implicit convolution: ``dst3[r, c0 + w, r0 + j * step + i] =
    src4[n0 + j, r, w, i]``, and every other entry of ``dst3`` zero (its padding and the
    rows between images): the buffer need not be zeroed first (``np.zeros`` of a big
    buffer costs page faults on every call)."""
    R, Wx, h = src4.shape[1], src4.shape[2], src4.shape[3]
    Wt, Ht = dst3.shape[1], dst3.shape[2]
    s = src4.ravel()
    d = dst3.ravel()
    zero = d.dtype.type(0)
    for r in range(R):
        for w in range(Wt):
            do = _U((r * Wt + w) * Ht)
            wx = w - c0
            if wx < 0 or wx >= Wx:
                for i in range(_U(Ht)):
                    d[do + i] = zero
                continue
            pos = 0
            for j in range(m):
                start = r0 + j * step
                for i in range(_U(pos), _U(start)):
                    d[do + i] = zero
                so = _U(((n0 + j) * R + r) * Wx + wx) * _U(h)
                ds = do + _U(start)
                for i in range(_U(h)):
                    d[ds + i] = s[so + i]
                pos = start + h
            for i in range(_U(pos), _U(Ht)):
                d[do + i] = zero


@njit(nogil=True, cache=True)
def rows_from(src3, dst4, n0, m, r0, step, bias):
    """The inverse for outputs: ``dst4[n0 + j, r, w, i] = src3[r, w, r0 + j * step + i]``
    (+ ``bias[r]`` when ``bias`` has R entries) for ``j < m``, ``i < h``, ``w < Wx`` with
    ``dst4`` (N, R, Wx, h) and ``src3`` (R, Ws, Hs)."""
    R, Wx, h = dst4.shape[1], dst4.shape[2], dst4.shape[3]
    Ws, Hs = src3.shape[1], src3.shape[2]
    s = src3.ravel()
    d = dst4.ravel()
    with_bias = bias.size == R
    for j in range(m):
        for r in range(R):
            add = bias[r] if with_bias else s.dtype.type(0)
            for w in range(Wx):
                so = _U((r * Ws + w) * Hs + r0 + j * step)
                do = _U(((n0 + j) * R + r) * Wx + w) * _U(h)
                for i in range(_U(h)):
                    d[do + i] = s[so + i] + add


@njit(nogil=True, cache=True)
def sum_transposed(parts, out, k0, k1):
    """``out[:, k0:k1] = (parts[0] + parts[1] + ...)[k0:k1, :].T``, added left to right,
    for a tuple of C-contiguous (K, R) ``parts`` and a C-contiguous (R, K) ``out``: a
    worker's share of the per-part filter derivatives, which the parts accumulate
    transposed (see ``conv._im2col_backward_part``). Per block of 16 rows the parts are
    summed contiguously into an L1 buffer, which is then written out transposed."""
    R, K = out.shape
    o = out.ravel()
    tmp = np.empty(16 * R, dtype=out.dtype)
    for kb in range(k0, k1, 16):
        n = _U(min(kb + 16, k1) - kb)
        base = _U(kb) * _U(R)
        first = True
        for p in parts:
            pf = p.ravel()
            if first:
                for i in range(n * _U(R)):
                    tmp[i] = pf[base + i]
                first = False
            else:
                for i in range(n * _U(R)):
                    tmp[i] += pf[base + i]
        for r in range(R):
            ro = _U(r) * _U(K) + _U(kb)
            for k in range(n):
                o[ro + k] = tmp[k * _U(R) + _U(r)]


@njit(nogil=True, cache=True)
def to_phases_interleaved(xT, n0, buf, pt, pl):
    """Images ``n0 .. n0+m-1`` of ``xT`` (N, C, W, H) into the *image-interleaved* phase
    buffer ``buf`` (C, sx, sy, Wph, Hph, m) of an implicit convolution: ``buf[c, a, b, u,
    v, j]`` is padded pixel ``(u * sx + a, v * sy + b)`` of image ``n0 + j`` (padding
    ``pl`` left, ``pt`` top), zero outside the image. Every entry is written (the buffer
    need not be zeroed first). Per image column the m images' rows are read contiguously
    and written into one small block (in L1) with stride m."""
    C, W, H = xT.shape[1], xT.shape[2], xT.shape[3]
    sx, sy, Wph, Hph, m = buf.shape[1], buf.shape[2], buf.shape[3], buf.shape[4], buf.shape[5]
    src = xT.ravel()
    dst = buf.ravel()
    dst[:] = 0
    img = _U(C) * _U(W) * _U(H)
    M = _U(m)
    for c in range(C):
        for xw in range(W):
            pw = xw + pl
            a, u = pw % sx, pw // sx
            s0 = _U(n0) * img + _U((c * W + xw) * H)
            for b in range(sy):
                # rows v of phase b hold xh = v * sy + b - pt, inside [0, H)
                v0 = max(0, (pt - b + sy - 1) // sy)
                v1 = min(Hph, (H + pt - b + sy - 1) // sy)
                d0 = _U((((c * sx + a) * sy + b) * Wph + u) * Hph) * M
                for j in range(M):
                    sj = s0 + j * img
                    for v in range(v0, v1):
                        dst[d0 + _U(v) * M + j] = src[sj + _U(v * sy + b - pt)]


@njit(nogil=True, cache=True)
def from_interleaved(src, yT4, n0, bias):
    """The inverse for outputs: ``yT4[n0 + j, r, w, h] = src[r, w, h, j]`` (+ ``bias[r]``
    when ``bias`` has R entries) for the m images of ``src`` (R, Wo, Ho, m); ``yT4``
    (N, R, Wo, Ho). Per output column its block of Ho * m values (in L1) is written out
    as m contiguous rows."""
    R, Wo, Ho, m = src.shape
    s = src.ravel()
    d = yT4.ravel()
    with_bias = bias.size == R
    img = _U(R) * _U(Wo) * _U(Ho)
    M = _U(m)
    for r in range(R):
        add = bias[r] if with_bias else s.dtype.type(0)
        for w in range(Wo):
            base = _U((r * Wo + w) * Ho)
            d0 = _U(n0) * img + base
            for j in range(M):
                dj = d0 + j * img
                for h in range(_U(Ho)):
                    d[dj + h] = s[(base + h) * M + j] + add
