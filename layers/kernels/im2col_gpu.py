"""im2col / col2im as CUDA kernels (CuPy), the GPU twins of :mod:`im2col_cpu`, launched by
the GPU path of :mod:`pydagnn.layers.conv` (which holds the algorithm: chunking and the
cuBLAS GEMMs) with the same layout conventions:

* ``xT = x.T`` is the C-contiguous ``(N, C, W, H)`` view of a Fortran ``H x W x C x N`` map;
* a chunk of ``m`` images starting at ``n0`` unfolds into ``col`` of shape ``(K, m * P)``,
  ``K = C * FW * FH`` (row ``(c * FW + fw) * FH + fh``), ``P = Wo * Ho`` (column
  ``j * P + wo * Ho + ho``), so the filters are the matrix ``w.T.reshape(Cout, K)``.

col2im is a gather (each input pixel sums its taps in the CPU kernel's order), so it
needs no atomics and is deterministic.

The launchers take a geometry object ``g`` with the integer attributes ``C, H, W, Ho, Wo,
FH, FW, pt, pl, sy, sx, ry, rx, K, P`` (the conv geometry has them); this module imports
no layer.
"""
from . import gpu_common as _g

__all__ = ['im2col', 'col2im', 'SRC']

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

