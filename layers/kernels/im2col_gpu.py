"""Convolution on the GPU (CuPy): im2col / col2im CUDA kernels around cuBLAS GEMMs.

The same functions as the CPU path (``conv_forward``, ``conv_backward``, ``im2col``,
``col2im``) with the same layout conventions as :mod:`im2col_cpu`:

* ``xT = x.T`` is the C-contiguous ``(N, C, W, H)`` view of a Fortran ``H x W x C x N`` map;
* a chunk of ``m`` images starting at ``n0`` unfolds into ``col`` of shape ``(K, m * P)``,
  ``K = C * FW * FH`` (row ``(c * FW + fw) * FH + fh``), ``P = Wo * Ho`` (column
  ``j * P + wo * Ho + ho``), so the filters are the matrix ``w.T.reshape(Cout, K)``.

Forward per chunk: im2col, one GEMM ``(Cout, K) @ (K, m*P)``, one strided copy (with the
bias) into the output. Backward per chunk: ``dY`` of the chunk as ``(Cout, m*P)``, ``dW +=
dY @ col.T`` (cuBLAS reads ``col.T`` transposed, no copy), ``dcol = W.T @ dY`` written over
the column buffer, col2im. col2im is a gather (each input pixel sums its taps in the CPU
kernel's order), so it needs no atomics and is deterministic.

1x1 stride-1 unpadded convolutions are batched GEMMs on x itself, "fully connected" ones
(a filter covering the whole unpadded input) one GEMM, as on the CPU.

Chunks are sized so that the column buffer stays under ``COL_BYTES`` (the CuPy memory
pool reuses it from call to call). Shapes and options are checked, and the output size
computed, by the CPU path's geometry (:class:`pydagnn.layers.conv._Geom`, which keeps
CuPy arrays on the device): the same rules and messages on both.
"""
from pydagnn.layers.conv import _cast, _Geom

from . import gpu_common as _g

__all__ = ['conv_forward', 'conv_backward', 'im2col', 'col2im', 'COL_BYTES']

#: upper bound in bytes of the im2col buffer of one chunk of images
COL_BYTES = 128 << 20

SRC = r'''
PD_KERNEL void pd_im2col(const T* __restrict__ x, T* __restrict__ col, long long n0, int m,
                         int C, int H, int W, int Ho, int Wo, int FH, int FW,
                         int pt, int pl, int sy, int sx, int ry, int rx)
{
    const int P = Ho * Wo;
    const long long L = (long long)m * P;
    const long long K = (long long)C * FW * FH;
    PD_LOOP(i, K * L) {
        const long long k = i / L;
        const int q = (int)(i - k * L);
        const int j = q / P;
        const int p = q - j * P;
        const int wo = p / Ho;
        const int ho = p - wo * Ho;
        const int kk = (int)k;
        const int fh = kk % FH;
        const int t = kk / FH;
        const int fw = t % FW;
        const int c = t / FW;
        const int yy = ho * sy + fh * ry - pt;
        const int xx = wo * sx + fw * rx - pl;
        T v = (T)0;
        if (yy >= 0 && yy < H && xx >= 0 && xx < W)
            v = x[(((n0 + j) * C + c) * (long long)W + xx) * H + yy];
        col[i] = v;
    }
}

PD_KERNEL void pd_col2im(const T* __restrict__ col, T* __restrict__ dx, long long n0, int m,
                         int C, int H, int W, int Ho, int Wo, int FH, int FW,
                         int pt, int pl, int sy, int sx, int ry, int rx)
{
    const int P = Ho * Wo;
    const long long L = (long long)m * P;
    const long long plane = (long long)W * H;
    PD_LOOP(i, (long long)m * C * plane) {
        const int yy = (int)(i % H);
        const long long t1 = i / H;
        const int xx = (int)(t1 % W);
        const long long t2 = t1 / W;
        const int c = (int)(t2 % C);
        const int j = (int)(t2 / C);
        T s = (T)0;
        for (int fw = 0; fw < FW; ++fw) {
            const int a = xx + pl - fw * rx;
            if (a < 0 || a % sx != 0) continue;
            const int wo = a / sx;
            if (wo >= Wo) continue;
            for (int fh = 0; fh < FH; ++fh) {
                const int b = yy + pt - fh * ry;
                if (b < 0 || b % sy != 0) continue;
                const int ho = b / sy;
                if (ho >= Ho) continue;
                const long long k = ((long long)c * FW + fw) * FH + fh;
                s += col[k * L + (long long)j * P + (long long)wo * Ho + ho];
            }
        }
        dx[n0 * C * plane + i] = s;
    }
}
'''


def _kargs(g):
    i32 = _g.i32
    return (i32(g.C), i32(g.H), i32(g.W), i32(g.Ho), i32(g.Wo), i32(g.FH), i32(g.FW),
            i32(g.pt), i32(g.pl), i32(g.sy), i32(g.sx), i32(g.ry), i32(g.rx))


def im2col(xT, col, n0, m, g):
    """Unfold images ``n0 .. n0+m-1`` of ``xT`` (N, C, W, H) into ``col`` (K, m*P)."""
    k = _g.get_kernel(SRC, 'pd_im2col', xT.dtype)
    _g.launch(k, g.K * m * g.P, (xT, col, _g.i64(n0), _g.i32(m)) + _kargs(g))


def col2im(col, dxT, n0, m, g):
    """Fold ``col`` (K, m*P) onto images ``n0 .. n0+m-1`` of ``dxT`` (overwritten)."""
    k = _g.get_kernel(SRC, 'pd_col2im', dxT.dtype)
    _g.launch(k, m * g.C * g.W * g.H, (col, dxT, _g.i64(n0), _g.i32(m)) + _kargs(g))


# --------------------------------------------------------------------------- forward
def conv_forward(x, w, b=None, pad=0, stride=1, dilate=1):
    """GPU ``conv_forward`` (see :func:`pydagnn.layers.conv.conv_forward`)."""
    import cupy as cp
    g = _Geom(x, w, b, pad, stride, dilate, 'conv_forward')
    y = cp.empty(g.out_shape, dtype=g.dtype, order='F')
    if g.N == 0:
        return y
    N, P, Cout = g.N, g.P, g.Cout
    yT3 = y.T.reshape(N, Cout, P)
    xT = g.x.T
    wm = g.wmat()
    if g.fc:
        cp.matmul(xT.reshape(N, g.K), wm.T, out=yT3.reshape(N, Cout))
    elif g.pointwise:
        cp.matmul(wm, xT.reshape(N, g.C, P), out=yT3)
    else:
        nc = g.chunk(COL_BYTES)
        col = cp.empty(g.K * nc * P, dtype=g.dtype)
        tmp = cp.empty(Cout * nc * P, dtype=g.dtype)
        Cog, Kg = Cout // g.G, g.Kg
        for n0 in range(0, N, nc):
            m = min(nc, N - n0)
            c = col[:g.K * m * P].reshape(g.K, m * P)
            im2col(xT, c, n0, m, g)
            t = tmp[:Cout * m * P].reshape(Cout, m * P)
            if g.G == 1:
                cp.matmul(wm, c, out=t)
            else:
                for gi in range(g.G):
                    cp.matmul(wm[gi * Cog:(gi + 1) * Cog], c[gi * Kg:(gi + 1) * Kg],
                              out=t[gi * Cog:(gi + 1) * Cog])
            tv = t.reshape(Cout, m, P).transpose(1, 0, 2)
            if g.b is not None:
                cp.add(tv, g.b[None, :, None], out=yT3[n0:n0 + m])
            else:
                yT3[n0:n0 + m] = tv
        return y
    if g.b is not None:
        yT3 += g.b[None, :, None]
    return y


# --------------------------------------------------------------------------- backward
def conv_backward(x, w, b, dy, pad=0, stride=1, dilate=1):
    """GPU ``conv_backward``: ``(dx, dw, db)`` (see :func:`pydagnn.layers.conv.conv_backward`)."""
    import cupy as cp
    g = _Geom(x, w, b, pad, stride, dilate, 'conv_backward')
    dy = g.dy(dy, 'conv_backward')
    N, P, Cout = g.N, g.P, g.Cout
    dx = cp.empty(g.x.shape, dtype=g.dtype, order='F')
    dw = cp.empty(g.w.shape, dtype=g.dtype, order='F')
    db = None
    if N == 0:
        dw[...] = 0
        if g.b is not None:
            db = cp.zeros(Cout, dtype=g.dtype)
        return dx, dw.astype(g.w_dtype, copy=False), _cast(db, g.b_dtype)
    xT, dxT = g.x.T, dx.T
    dyT3 = dy.T.reshape(N, Cout, P)
    wm = g.wmat()
    dwm = dw.T.reshape(Cout, g.Kg)
    if g.b is not None:
        # per (image, channel) plane first: a contiguous reduction, then over the images
        db = dyT3.sum(axis=2).sum(axis=0) if P > 1 else dyT3.reshape(N, Cout).sum(axis=0)
    if g.fc:
        x2 = xT.reshape(N, g.K)
        dy2 = dyT3.reshape(N, Cout)
        cp.matmul(dy2, wm, out=dxT.reshape(N, g.K))
        cp.matmul(dy2.T, x2, out=dwm)
    elif g.pointwise:
        x3 = xT.reshape(N, g.C, P)
        cp.matmul(cp.ascontiguousarray(wm.T), dyT3, out=dxT.reshape(N, g.C, P))
        dwm[...] = cp.tensordot(dyT3, x3, axes=([0, 2], [0, 2]))
    else:
        nc = g.chunk(COL_BYTES)
        Cog, Kg = Cout // g.G, g.Kg
        col = cp.empty(g.K * nc * P, dtype=g.dtype)
        dbuf = cp.empty(Cout * nc * P, dtype=g.dtype)
        part = cp.empty_like(dwm) if N > nc else None
        for n0 in range(0, N, nc):
            m = min(nc, N - n0)
            c = col[:g.K * m * P].reshape(g.K, m * P)
            im2col(xT, c, n0, m, g)
            d = dbuf[:Cout * m * P].reshape(Cout, m * P)
            d.reshape(Cout, m, P)[...] = dyT3[n0:n0 + m].transpose(1, 0, 2)
            target = dwm if n0 == 0 else part
            for gi in range(g.G):
                rs, ks = slice(gi * Cog, (gi + 1) * Cog), slice(gi * Kg, (gi + 1) * Kg)
                if g.G == 1:
                    cp.matmul(d, c.T, out=target)
                else:
                    target[rs] = cp.matmul(d[rs], c[ks].T)
            if n0 > 0:
                dwm += part
            # dcol = W.T @ dY over the column buffer, then fold it back
            for gi in range(g.G):
                rs, ks = slice(gi * Cog, (gi + 1) * Cog), slice(gi * Kg, (gi + 1) * Kg)
                if g.G == 1:
                    cp.matmul(wm.T, d, out=c)
                else:
                    c[ks] = cp.matmul(wm[rs].T, d[rs])
            col2im(c, dxT, n0, m, g)
    return dx, dw.astype(g.w_dtype, copy=False), _cast(db, g.b_dtype)
