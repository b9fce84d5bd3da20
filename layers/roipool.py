"""Region-of-interest pooling (MatConvNet's ``vl_nnroipool`` and ``dagnn.ROIPooling``).

``roipool_forward(x, rois, method='max', subdivisions=(1, 1), transform=1) -> y``
``roipool_backward(x, rois, dy, method='max', subdivisions=(1, 1), transform=1) -> dx``

x is ``H x W x C x N``; rois holds R regions as a ``5 x R`` array (any shape with 5R
elements, read column-major) ``[t u1 v1 u2 v2]``: 1-based image index t, upper-left
corner (u1, v1) and bottom-right corner (u2, v2), u horizontal, v vertical, 1-based.
y is ``SH x SW x C x R``.

Bins exactly as MatConvNet's CPU code (``nnroipooling.cu``):

* transform T (1, 2 or 6 numbers): the corners become ``u' = T1 u + T3 v + T5``,
  ``v' = T2 u + T4 v + T6`` (the 6 numbers are the column-major 2 x 3 matrix); a scalar or
  2-vector [a b] means ``[a 0 0 b 1-a 1-b]``, a scaling about (1, 1);
* ``start = round(v1') - 1``, ``end = round(v2') - 1`` (0-based; round half away from
  zero), ``height = max(end - start + 1, 1)``, likewise for u;
* ``bin = height / SH`` (in x's precision); tile i covers rows
  ``[floor(i bin), ceil((i+1) bin))`` shifted by start and clipped to ``[0, H]``;
* the image index is ``min(max(fix(t) - 1, 0), N - 1)``;
* 'max': the tile maximum (an empty tile gives 0); its derivative goes to the first
  maximum in column-major scan order; 'avg': the tile mean (sum / number of pixels).

Vectorised (separable masks over rows and columns; a weighted ``bincount`` or a matrix
product for the scatter), so the same code runs on CuPy. The bins are computed on the
host from the (small) rois array. Memory: one ``C x W x H`` copy of the image per region.
"""
import numpy as np

from pydagnn.backend import get_array_module, to_host
from pydagnn.layer import Layer, register
from pydagnn.layers._common import as_text

__all__ = ['roipool_forward', 'roipool_backward', 'roipool_transform', 'ROIPooling']


def roipool_transform(transform):
    """The 6 numbers ``[T11 T21 T12 T22 T13 T23]`` of a ``transform`` option."""
    t = np.asarray(to_host(transform) if not isinstance(transform, (int, float)) else transform,
                   dtype=np.float64).ravel(order='F')
    if t.size in (1, 2):
        a, b = t[0], t[min(t.size - 1, 1)]
        return np.array([a, 0.0, 0.0, b, 1.0 - a, 1.0 - b])
    if t.size == 6:
        return t
    raise ValueError(f'roipool: transform must have 1, 2 or 6 elements (a scalar, a 2-vector '
                     f'or a 2 x 3 matrix), got {t.size}')


def _subdivisions(s):
    a = np.asarray(s, dtype=np.float64).ravel()
    if a.size not in (1, 2):
        raise ValueError(f'roipool: subdivisions must have one or two elements, got {s!r}')
    sh, sw = (a[0], a[0]) if a.size == 1 else (a[0], a[1])
    sh, sw = int(sh), int(sw)
    if sh < 1 or sw < 1:
        raise ValueError(f'roipool: subdivisions has an element smaller than 1: {[sh, sw]}')
    return sh, sw


def _method(m):
    m = as_text(m).lower()
    if m not in ('max', 'avg'):
        raise ValueError(f"roipool: method must be 'max' or 'avg', got {m!r}")
    return m


def _round(v):
    """C's round(): half away from zero."""
    a = np.abs(v)
    r = np.floor(a)
    r = r + (a - r >= 0.5)
    return (np.sign(v) * r).astype(np.int64)


class _Bins:
    def __init__(self, x, rois, subdivisions, transform, op):
        self.xp = xp = get_array_module(x)
        if x.ndim > 4:
            raise ValueError(f'{op}: x must be H x W x C x N, got shape {x.shape}')
        x = x.reshape(x.shape + (1,) * (4 - x.ndim)) if x.ndim < 4 else x
        if x.dtype.kind != 'f':
            raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
        self.x, self.dtype = x, x.dtype
        self.H, self.W, self.C, self.N = H, W, C, N = x.shape
        r = np.asarray(to_host(rois), dtype=np.float64)
        if r.size == 0 or r.size % 5:
            raise ValueError(f'{op}: rois must be a 5 x R array (R >= 1), got shape {r.shape}')
        r = r.reshape(5, -1, order='F')
        self.R = R = r.shape[1]
        self.SH, self.SW = SH, SW = _subdivisions(subdivisions)
        T = roipool_transform(transform)
        t = self.dtype.type
        # corners in double, stored in x's precision (as the C code's `type u1 = ...`)
        u1 = (T[0] * r[1] + T[2] * r[2] + T[4]).astype(self.dtype)
        v1 = (T[1] * r[1] + T[3] * r[2] + T[5]).astype(self.dtype)
        u2 = (T[0] * r[3] + T[2] * r[4] + T[4]).astype(self.dtype)
        v2 = (T[1] * r[3] + T[3] * r[4] + T[5]).astype(self.dtype)
        img = np.trunc(r[0]).astype(np.int64)
        self.img_host = np.minimum(np.maximum(img - 1, 0), N - 1)
        sh0, sw0 = _round(v1) - 1, _round(u1) - 1
        rh = np.maximum(_round(v2) - 1 - sh0 + 1, 1)
        rw = np.maximum(_round(u2) - 1 - sw0 + 1, 1)
        bh = (rh.astype(np.float64) / SH).astype(self.dtype)
        bw = (rw.astype(np.float64) / SW).astype(self.dtype)

        def edges(b, n, start, size):
            i = np.arange(n, dtype=self.dtype)
            lo = np.floor(i[None, :] * b[:, None]).astype(np.int64)
            hi = np.ceil((i[None, :] + t(1)) * b[:, None]).astype(np.int64)
            lo = np.clip(lo + start[:, None], 0, size)
            hi = np.clip(hi + start[:, None], 0, size)
            return lo, hi                                   # (R, n) each

        self.hs, self.he = edges(bh, SH, sh0, H)
        self.ws, self.we = edges(bw, SW, sw0, W)
        mh = (np.arange(H)[None, None, :] >= self.hs[:, :, None]) & \
             (np.arange(H)[None, None, :] < self.he[:, :, None])          # (R, SH, H)
        mw = (np.arange(W)[None, None, :] >= self.ws[:, :, None]) & \
             (np.arange(W)[None, None, :] < self.we[:, :, None])          # (R, SW, W)
        area = (self.he - self.hs)[:, :, None] * (self.we - self.ws)[:, None, :]  # (R, SH, SW)
        self.mh, self.mw = xp.asarray(mh), xp.asarray(mw)
        self.nonempty = xp.asarray(area > 0)
        with np.errstate(divide='ignore'):
            self.inv_area = xp.asarray(np.where(area > 0, 1.0 / np.maximum(area, 1), 0)
                                       .astype(self.dtype))
        self.img = xp.asarray(self.img_host)

    @property
    def out_shape(self):
        return (self.SH, self.SW, self.C, self.R)

    def per_roi(self):
        """(R, C, W, H): the image of every region."""
        return self.x.T.reshape(self.N, self.C, self.W, self.H)[self.img]

    def max_parts(self):
        """(values (R, C, SH, SW), flat positions w*H + h of the first maxima)."""
        xp = self.xp
        xr = self.per_roi()
        ninf = self.dtype.type(-np.inf)
        cols, hidx = [], []
        for p in range(self.SH):
            m = xp.where(self.mh[:, None, None, p, :], xr, ninf)        # (R, C, W, H)
            hidx.append(xp.argmax(m, axis=3))
            cols.append(m.max(axis=3))
        t1 = xp.stack(cols, axis=3)                                      # (R, C, W, SH)
        h1 = xp.stack(hidx, axis=3)
        m2 = xp.where(self.mw.transpose(0, 2, 1)[:, None, :, None, :], t1[..., None], ninf)
        val = m2.max(axis=2)                                             # (R, C, SH, SW)
        wst = xp.argmax(m2, axis=2)                                      # (R, C, SH, SW)
        hst = xp.take_along_axis(h1, wst.transpose(0, 1, 3, 2), axis=2)  # (R, C, SW, SH)
        pos = wst * self.H + hst.transpose(0, 1, 3, 2)
        return val, pos


def roipool_forward(x, rois, method='max', subdivisions=(1, 1), transform=1):
    """``vl_nnroipool(x, rois, 'method', method, 'subdivisions', s, 'transform', t)``
    -> y ``SH x SW x C x R`` (x's dtype, Fortran-contiguous)."""
    b = _Bins(x, rois, subdivisions, transform, 'roipool_forward')
    xp = b.xp
    if _method(method) == 'max':
        val, _ = b.max_parts()
        val = xp.where(b.nonempty[:, None], val, 0)
    else:
        xr = b.per_roi()
        s1 = xr @ b.mh.astype(b.dtype).transpose(0, 2, 1)[:, None]      # (R, C, W, SH)
        s2 = s1.swapaxes(2, 3) @ b.mw.astype(b.dtype).transpose(0, 2, 1)[:, None]
        val = s2 * b.inv_area[:, None]                                   # (R, C, SH, SW)
    return xp.asfortranarray(val.transpose(2, 3, 1, 0).astype(b.dtype, copy=False))


def roipool_backward(x, rois, dy, method='max', subdivisions=(1, 1), transform=1):
    """Derivative of :func:`roipool_forward` with respect to x, projected on dy."""
    b = _Bins(x, rois, subdivisions, transform, 'roipool_backward')
    xp = b.xp
    dy = xp.asarray(dy, dtype=b.dtype)
    if dy.size != int(np.prod(b.out_shape)):
        raise ValueError(f'roipool_backward: dy has shape {dy.shape}, expected {b.out_shape}')
    g = dy.reshape(b.out_shape, order='F').transpose(3, 2, 0, 1)          # (R, C, SH, SW)
    HW = b.H * b.W
    if _method(method) == 'max':
        _, pos = b.max_parts()
        lin = (b.img[:, None, None, None] * b.C
               + xp.arange(b.C)[None, :, None, None]) * HW + pos
        w = xp.where(b.nonempty[:, None], g, 0)
        acc = xp.bincount(lin.ravel(), weights=w.ravel(), minlength=b.N * b.C * HW)
        dxt = acc.astype(b.dtype, copy=False).reshape(b.N, b.C, b.W, b.H)
    else:
        g = g * b.inv_area[:, None]
        t1 = g @ b.mw.astype(b.dtype)[:, None]                           # (R, C, SH, W)
        dxr = t1.swapaxes(2, 3) @ b.mh.astype(b.dtype)[:, None]          # (R, C, W, H)
        onehot = (b.img[None, :] == xp.arange(b.N)[:, None]).astype(b.dtype)
        dxt = (onehot @ dxr.reshape(b.R, -1)).reshape(b.N, b.C, b.W, b.H)
    return xp.asfortranarray(dxt.T)


@register('dagnn.ROIPooling')
class ROIPooling(Layer):
    """``dagnn.ROIPooling``: inputs [x, rois], outputs [y]. Properties ``method``
    ('max'), ``subdivisions`` ([6 6]), ``transform`` (1), ``flatten`` (False: y is
    ``SH x SW x C x R``; True: ``1 x 1 x SH*SW*C x R``). No derivative for rois."""
    properties = {'method': 'max', 'subdivisions': [6, 6], 'transform': 1, 'flatten': False}

    def forward(self, inputs, params):
        y = roipool_forward(inputs[0], inputs[1], self.method, self.subdivisions,
                            self.transform)
        if bool(np.asarray(self.flatten).ravel()[0]):
            y = y.reshape(1, 1, -1, y.shape[3], order='F')
        return [y]

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None, None], []
        dx = roipool_backward(inputs[0], inputs[1], der_outputs[0], self.method,
                              self.subdivisions, self.transform)
        return [dx.reshape(np.shape(inputs[0]), order='F'), None], []

    def get_output_sizes(self, input_sizes):
        xs, rs = (list(input_sizes) + [None, None])[:2]
        if xs is None or rs is None:
            return [None]
        n = int(np.prod(rs)) // 5
        sh, sw = _subdivisions(self.subdivisions)
        C = int(xs[2]) if len(xs) > 2 else 1
        if bool(np.asarray(self.flatten).ravel()[0]):
            return [(1, 1, sh * sw * C, n)]
        return [(sh, sw, C, n)]
