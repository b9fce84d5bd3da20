"""Max and average pooling on the GPU (CuPy): the CUDA twins of :mod:`pool_cpu`, launched
by the GPU path of :mod:`pydagnn.layers.pool` (which checks the options and allocates the
outputs for both devices). The launchers take a geometry object ``g`` with the integer
attributes ``Ho, Wo, ph, pw, pt, pl, sy, sx`` (the pooling geometry has them); this
module imports no layer.

Arrays are the C-contiguous ``(N, C, W, H)`` ``.T`` views of Fortran ``H x W x C x N``
maps. Windows are clipped to the image (padding never takes part); max: the first
maximum in MatConvNet's scan order (column by column, rows within a column) gets the
derivative; avg: divided by the number of window elements inside the image.

Forward: one thread per output. Backward: one thread per *input* element, summing over
the windows that contain it (a gather: no atomics, deterministic, every dx element
written once).
"""
from . import gpu_common as _g

__all__ = ['max_forward', 'max_backward', 'avg_forward', 'avg_backward']

SRC = r'''
#ifndef PD_POOL_HELPERS
#define PD_POOL_HELPERS
// the window of output o along one axis, [o*s - p, o*s - p + size), clipped to [0, n)
PD_DEVICE int pd_lo(int o, int s, int p) { int a = o * s - p; return a < 0 ? 0 : a; }
PD_DEVICE int pd_hi(int o, int s, int p, int size, int n) { int b = o * s - p + size; return b > n ? n : b; }
// the outputs lo..hi (of nout) whose window holds input index a: o*s - p <= a < o*s - p + size
PD_DEVICE void pd_cover(int a, int s, int p, int size, int nout, int* lo, int* hi)
{
    const int l = a + p - size + 1;
    *lo = l <= 0 ? 0 : (l + s - 1) / s;
    const int h = (a + p) / s;                     // a + p >= 0 (p < size)
    *hi = h > nout - 1 ? nout - 1 : h;
}
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
        int wlo, whi, hlo, hhi;                        // the outputs whose window holds (b, a)
        pd_cover(a, sx, pl, pw, Wo, &wlo, &whi);
        pd_cover(b, sy, pt, ph, Ho, &hlo, &hhi);
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
        int wlo, whi, hlo, hhi;                        // the outputs whose window holds (b, a)
        pd_cover(a, sx, pl, pw, Wo, &wlo, &whi);
        pd_cover(b, sy, pt, ph, Ho, &hlo, &hhi);
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
