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
pool reuses it from call to call).
"""
import numpy as np

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


# --------------------------------------------------------------------------- geometry
class _Geom:
    """Checked shapes and options (the GPU twin of ``conv._Geom``; same messages)."""

    def __init__(self, x, w, b, pad, stride, dilate, op):
        import cupy as cp
        from pydagnn.layers.conv import parse_pad, parse_pair
        x = _as4(x, 'x', op, cp)
        w = _as4(w, 'filters', op, cp)
        if x.dtype.kind != 'f':
            raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
        self.dtype = x.dtype
        self.H, self.W, self.C, self.N = x.shape
        self.FH, self.FW, self.Cin, self.Cout = w.shape
        self.pt, self.pb, self.pl, self.pr = parse_pad(pad, op)
        self.sy, self.sx = parse_pair(stride, 'stride', op)
        self.ry, self.rx = parse_pair(dilate, 'dilate', op)
        if min(w.shape) < 1:
            raise ValueError(f'{op}: empty filter bank, shape {w.shape}')
        if self.C % self.Cin != 0:
            raise ValueError(f'{op}: x has {self.C} channels (shape {x.shape}), filters expect '
                             f'{self.Cin} (shape {w.shape}) or a multiple of it')
        self.G = self.C // self.Cin
        if self.Cout % self.G != 0:
            raise ValueError(f'{op}: grouped convolution: x has {self.C} channels = {self.G} groups of '
                             f'{self.Cin}, but the {self.Cout} filters (shape {w.shape}) do not divide '
                             f'into {self.G} groups')
        self.fhe = (self.FH - 1) * self.ry + 1
        self.fwe = (self.FW - 1) * self.rx + 1
        if self.H + self.pt + self.pb < self.fhe or self.W + self.pl + self.pr < self.fwe:
            raise ValueError(f'{op}: filters of shape {w.shape} (dilated {self.fhe}x{self.fwe}) are larger '
                             f'than the padded input: x shape {x.shape}, pad '
                             f'{[self.pt, self.pb, self.pl, self.pr]}')
        self.Ho = (self.H + self.pt + self.pb - self.fhe) // self.sy + 1
        self.Wo = (self.W + self.pl + self.pr - self.fwe) // self.sx + 1
        self.P = self.Ho * self.Wo
        self.Kg = self.Cin * self.FW * self.FH
        self.K = self.C * self.FW * self.FH
        self.x = cp.asfortranarray(x, dtype=self.dtype)
        self.w_dtype = w.dtype if w.dtype.kind == 'f' else self.dtype
        self.w = cp.asfortranarray(w, dtype=self.dtype)
        self.b = None
        self.b_dtype = None
        if b is not None and b.size > 0:
            if b.size != self.Cout:
                raise ValueError(f'{op}: bias has {b.size} elements (shape {b.shape}), '
                                 f'expected {self.Cout} (filters {w.shape})')
            b = cp.asarray(b)
            self.b_dtype = b.dtype if b.dtype.kind == 'f' else self.dtype
            self.b = cp.ascontiguousarray(b.reshape(-1), dtype=self.dtype)
        nopad = self.pt == self.pb == self.pl == self.pr == 0
        self.fc = (nopad and self.G == 1 and self.fhe == self.H and self.fwe == self.W
                   and self.ry == 1 and self.rx == 1)
        self.pointwise = (nopad and self.G == 1 and self.FH == 1 and self.FW == 1
                          and self.sy == 1 and self.sx == 1)

    @property
    def out_shape(self):
        return (self.Ho, self.Wo, self.Cout, self.N)

    def wmat(self):
        return self.w.T.reshape(self.Cout, self.Kg)

    def chunk(self):
        per_image = max(1, self.K * self.P * self.dtype.itemsize)
        return max(1, min(self.N, COL_BYTES // per_image))


def _as4(a, name, op, cp):
    if not isinstance(a, cp.ndarray):
        a = cp.asarray(a)
    if a.ndim > 4:
        raise ValueError(f'{op}: {name} must have at most 4 dimensions, got shape {a.shape}')
    if a.ndim < 4:
        a = a.reshape(a.shape + (1,) * (4 - a.ndim), order='F')
    return a


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
        nc = g.chunk()
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
    dy = _as4(dy, 'dy', 'conv_backward', cp)
    if dy.shape != g.out_shape:
        raise ValueError(f'conv_backward: dy has shape {dy.shape}, expected {g.out_shape} '
                         f'(x {g.x.shape}, filters {g.w.shape})')
    dy = cp.asfortranarray(dy, dtype=g.dtype)
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
        nc = g.chunk()
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


def _cast(a, dtype):
    return None if a is None else a.astype(dtype, copy=False)
