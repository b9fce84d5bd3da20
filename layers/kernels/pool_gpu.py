"""Max and average pooling on the GPU (CuPy): the CUDA twins of :mod:`pool_cpu`, behind
``pool_forward`` / ``pool_backward`` with the semantics of :mod:`pydagnn.layers.pool`.

Arrays are the C-contiguous ``(N, C, W, H)`` ``.T`` views of Fortran ``H x W x C x N``
maps. Windows are clipped to the image (padding never takes part); max: the first
maximum in MatConvNet's scan order (column by column, rows within a column) gets the
derivative; avg: divided by the number of window elements inside the image.

Forward: one thread per output. Backward: one thread per *input* element, summing over
the windows that contain it (a gather: no atomics, deterministic, every dx element
written once).
"""
from . import gpu_common as _g

__all__ = ['pool_forward', 'pool_backward', 'max_forward', 'max_backward', 'avg_forward',
           'avg_backward']

SRC = r'''
#ifndef PD_POOL_HELPERS
#define PD_POOL_HELPERS
#ifdef PD_CPU
static inline int pd_lo(int o, int s, int p) { int a = o * s - p; return a < 0 ? 0 : a; }
static inline int pd_hi(int o, int s, int p, int size, int n) { int b = o * s - p + size; return b > n ? n : b; }
#else
__device__ __forceinline__ int pd_lo(int o, int s, int p) { int a = o * s - p; return a < 0 ? 0 : a; }
__device__ __forceinline__ int pd_hi(int o, int s, int p, int size, int n) { int b = o * s - p + size; return b > n ? n : b; }
#endif
#endif

PD_KERNEL void pd_max_forward(const T* __restrict__ x, T* __restrict__ y, long long NC,
                              int H, int W, int Ho, int Wo, int ph, int pw, int pt, int pl,
                              int sy, int sx)
{
    PD_LOOP(i, NC * Wo * Ho) {
        const int ho = (int)(i % Ho);
        const long long t = i / Ho;
        const int wo = (int)(t % Wo);
        const long long nc = t / Wo;
        const T* plane = x + nc * W * (long long)H;
        const int u1 = pd_lo(wo, sx, pl), u2 = pd_hi(wo, sx, pl, pw, W);
        const int v1 = pd_lo(ho, sy, pt), v2 = pd_hi(ho, sy, pt, ph, H);
        T m = plane[(long long)u1 * H + v1];           // windows are never empty
        for (int u = u1; u < u2; ++u)
            for (int v = v1; v < v2; ++v) {
                const T val = plane[(long long)u * H + v];
                if (val > m) m = val;
            }
        y[i] = m;
    }
}

PD_KERNEL void pd_max_backward(const T* __restrict__ x, const T* __restrict__ dy,
                               T* __restrict__ dx, long long NC, int H, int W, int Ho, int Wo,
                               int ph, int pw, int pt, int pl, int sy, int sx)
{
    PD_LOOP(i, NC * W * H) {
        const int b = (int)(i % H);
        const long long t = i / H;
        const int a = (int)(t % W);
        const long long nc = t / W;
        const T* plane = x + nc * W * (long long)H;
        const T* dplane = dy + nc * Wo * (long long)Ho;
        // outputs whose window holds column a: wo*sx - pl <= a < wo*sx - pl + pw
        int wlo = a + pl - pw + 1;
        wlo = wlo <= 0 ? 0 : (wlo + sx - 1) / sx;
        int whi = (a + pl) / sx;                       // a + pl >= 0 (pl < pw)
        if (whi > Wo - 1) whi = Wo - 1;
        int hlo = b + pt - ph + 1;
        hlo = hlo <= 0 ? 0 : (hlo + sy - 1) / sy;
        int hhi = (b + pt) / sy;
        if (hhi > Ho - 1) hhi = Ho - 1;
        T s = (T)0;
        for (int wo = wlo; wo <= whi; ++wo) {
            const int u1 = pd_lo(wo, sx, pl), u2 = pd_hi(wo, sx, pl, pw, W);
            for (int ho = hlo; ho <= hhi; ++ho) {
                const int v1 = pd_lo(ho, sy, pt), v2 = pd_hi(ho, sy, pt, ph, H);
                T m = plane[(long long)u1 * H + v1];
                int bu = u1, bv = v1;
                for (int u = u1; u < u2; ++u)
                    for (int v = v1; v < v2; ++v) {
                        const T val = plane[(long long)u * H + v];
                        if (val > m) { m = val; bu = u; bv = v; }
                    }
                if (bu == a && bv == b) s += dplane[(long long)wo * Ho + ho];
            }
        }
        dx[i] = s;
    }
}

PD_KERNEL void pd_avg_forward(const T* __restrict__ x, T* __restrict__ y, long long NC,
                              int H, int W, int Ho, int Wo, int ph, int pw, int pt, int pl,
                              int sy, int sx)
{
    PD_LOOP(i, NC * Wo * Ho) {
        const int ho = (int)(i % Ho);
        const long long t = i / Ho;
        const int wo = (int)(t % Wo);
        const long long nc = t / Wo;
        const T* plane = x + nc * W * (long long)H;
        const int u1 = pd_lo(wo, sx, pl), u2 = pd_hi(wo, sx, pl, pw, W);
        const int v1 = pd_lo(ho, sy, pt), v2 = pd_hi(ho, sy, pt, ph, H);
        T s = (T)0;
        for (int u = u1; u < u2; ++u)
            for (int v = v1; v < v2; ++v)
                s += plane[(long long)u * H + v];
        y[i] = s * ((T)1 / (T)((u2 - u1) * (v2 - v1)));
    }
}

PD_KERNEL void pd_avg_backward(const T* __restrict__ dy, T* __restrict__ dx, long long NC,
                               int H, int W, int Ho, int Wo, int ph, int pw, int pt, int pl,
                               int sy, int sx)
{
    PD_LOOP(i, NC * W * H) {
        const int b = (int)(i % H);
        const long long t = i / H;
        const int a = (int)(t % W);
        const long long nc = t / W;
        const T* dplane = dy + nc * Wo * (long long)Ho;
        int wlo = a + pl - pw + 1;
        wlo = wlo <= 0 ? 0 : (wlo + sx - 1) / sx;
        int whi = (a + pl) / sx;
        if (whi > Wo - 1) whi = Wo - 1;
        int hlo = b + pt - ph + 1;
        hlo = hlo <= 0 ? 0 : (hlo + sy - 1) / sy;
        int hhi = (b + pt) / sy;
        if (hhi > Ho - 1) hhi = Ho - 1;
        T s = (T)0;
        for (int wo = wlo; wo <= whi; ++wo) {
            const int u1 = pd_lo(wo, sx, pl), u2 = pd_hi(wo, sx, pl, pw, W);
            for (int ho = hlo; ho <= hhi; ++ho) {
                const int v1 = pd_lo(ho, sy, pt), v2 = pd_hi(ho, sy, pt, ph, H);
                s += dplane[(long long)wo * Ho + ho] * ((T)1 / (T)((u2 - u1) * (v2 - v1)));
            }
        }
        dx[i] = s;
    }
}
'''


def _args(xT, yT, g):
    N, C, W, H = xT.shape
    i32 = _g.i32
    return (_g.i64(N * C), i32(H), i32(W), i32(g.Ho), i32(g.Wo), i32(g.ph), i32(g.pw),
            i32(g.pt), i32(g.pl), i32(g.sy), i32(g.sx))


def max_forward(xT, yT, g):
    k = _g.get_kernel(SRC, 'pd_max_forward', xT.dtype)
    _g.launch(k, yT.size, (xT, yT) + _args(xT, yT, g))


def avg_forward(xT, yT, g):
    k = _g.get_kernel(SRC, 'pd_avg_forward', xT.dtype)
    _g.launch(k, yT.size, (xT, yT) + _args(xT, yT, g))


def max_backward(xT, dyT, dxT, g):
    k = _g.get_kernel(SRC, 'pd_max_backward', xT.dtype)
    _g.launch(k, dxT.size, (xT, dyT, dxT) + _args(xT, dyT, g))


def avg_backward(dyT, dxT, g):
    k = _g.get_kernel(SRC, 'pd_avg_backward', dxT.dtype)
    _g.launch(k, dxT.size, (dyT, dxT) + _args(dxT, dyT, g))


class _Geom:
    """The pooling geometry, checked as :class:`pydagnn.layers.pool._PoolGeom` does."""

    def __init__(self, x, pool_size, method, pad, stride, op):
        import cupy as cp
        from pydagnn.layers.conv import parse_pad, parse_pair
        from pydagnn.layers.pool import _method
        if x.ndim > 4:
            raise ValueError(f'{op}: x must have at most 4 dimensions, got shape {x.shape}')
        if x.ndim < 4:
            x = x.reshape(x.shape + (1,) * (4 - x.ndim), order='F')
        if x.dtype.kind != 'f':
            raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
        self.dtype = x.dtype
        self.x = cp.asfortranarray(x)
        self.H, self.W, self.C, self.N = x.shape
        self.method = _method(method, op)
        self.ph, self.pw = parse_pair(pool_size, 'pool size', op)
        self.pt, self.pb, self.pl, self.pr = parse_pad(pad, op)
        self.sy, self.sx = parse_pair(stride, 'stride', op)
        if self.pt >= self.ph or self.pb >= self.ph or self.pl >= self.pw or self.pr >= self.pw:
            raise ValueError(f'{op}: a padding value {[self.pt, self.pb, self.pl, self.pr]} is larger than or '
                             f'equal to the pooling window {[self.ph, self.pw]}')
        if self.H + self.pt + self.pb < self.ph or self.W + self.pl + self.pr < self.pw:
            raise ValueError(f'{op}: the pooling window {[self.ph, self.pw]} is larger than the input '
                             f'{x.shape} (including padding {[self.pt, self.pb, self.pl, self.pr]})')
        self.Ho = (self.H + self.pt + self.pb - self.ph) // self.sy + 1
        self.Wo = (self.W + self.pl + self.pr - self.pw) // self.sx + 1
        self.global_ = (self.ph == self.H and self.pw == self.W
                        and self.pt == self.pb == self.pl == self.pr == 0)

    @property
    def out_shape(self):
        return (self.Ho, self.Wo, self.C, self.N)


def pool_forward(x, pool_size, method='max', pad=0, stride=1):
    """GPU ``pool_forward`` (see :func:`pydagnn.layers.pool.pool_forward`)."""
    import cupy as cp
    g = _Geom(x, pool_size, method, pad, stride, 'pool_forward')
    y = cp.empty(g.out_shape, dtype=g.dtype, order='F')
    if y.size == 0:
        return y
    xT, yT = g.x.T, y.T
    if g.global_ and g.method == 'avg':
        y2 = yT.reshape(g.N, g.C)
        cp.sum(xT.reshape(g.N, g.C, g.H * g.W), axis=2, out=y2)
        y2 *= g.dtype.type(1) / g.dtype.type(g.H * g.W)
        return y
    if g.method == 'max':
        max_forward(xT, yT, g)
    else:
        avg_forward(xT, yT, g)
    return y


def pool_backward(x, dy, pool_size, method='max', pad=0, stride=1):
    """GPU ``pool_backward`` (see :func:`pydagnn.layers.pool.pool_backward`)."""
    import cupy as cp
    g = _Geom(x, pool_size, method, pad, stride, 'pool_backward')
    if dy.ndim < 4:
        dy = dy.reshape(dy.shape + (1,) * (4 - dy.ndim), order='F')
    if dy.shape != g.out_shape:
        raise ValueError(f'pool_backward: dy has shape {dy.shape}, expected {g.out_shape} (x {g.x.shape}, '
                         f'pool {[g.ph, g.pw]}, pad {[g.pt, g.pb, g.pl, g.pr]}, stride {[g.sy, g.sx]})')
    dy = cp.asfortranarray(dy, dtype=g.dtype)
    dx = cp.empty(g.x.shape, dtype=g.dtype, order='F')
    if dx.size == 0:
        return dx
    xT, dyT, dxT = g.x.T, dy.T, dx.T
    if g.global_ and g.method == 'avg':
        scale = g.dtype.type(1) / g.dtype.type(g.H * g.W)
        cp.multiply(dyT.reshape(g.N, g.C, 1), scale, out=dxT.reshape(g.N, g.C, g.H * g.W))
        return dx
    if g.method == 'max':
        max_backward(xT, dyT, dxT, g)
    else:
        avg_backward(dyT, dxT, g)
    return dx

