"""Convolution (MatConvNet's ``vl_nnconv`` and ``dagnn.Conv``), CPU and GPU.

``conv_forward(x, w, b=None, pad=0, stride=1, dilate=1) -> y``
``conv_backward(x, w, b, dy, pad=0, stride=1, dilate=1) -> (dx, dw, db)``

Semantics (MatConvNet): ``x`` is ``H x W x C x N``, ``w`` is ``FH x FW x Cin x Cout``,
``b`` has ``Cout`` entries (or is None / empty: no bias). Cross-correlation (no kernel
flip) with zero padding ``pad`` = p, [vertical horizontal] or [top bottom left right],
``stride`` = s or [sy sx], ``dilate`` = d or [dy dx]. Output
``Ho = floor((H + pt + pb - ((FH-1)*dy + 1)) / sy) + 1`` (same for Wo).
Grouped convolution as in ``vl_nnconv``: when ``C`` is a multiple of ``Cin``, the
``G = C / Cin`` groups of input channels are convolved with consecutive groups of
``Cout / G`` filters.

Implementation: Fortran-order maps (``x.T`` is a C-contiguous ``(N, C, W, H)`` view).
1x1 stride-1 unpadded convolutions and "fully connected" ones (a filter covering the
whole unpadded input) are GEMMs on the input itself, without any copy. Stride-1
convolutions (and strided ones to large maps, forward) run as an *implicit GEMM* on
generated register-blocked kernels, with no column matrix
(:mod:`pydagnn.layers.conv_implicit`, :mod:`pydagnn.layers.kernels.gemm_cpu`), where
that is faster. Everything else is im2col (numba) + one OpenBLAS GEMM per chunk of
images, with chunks sized so the column matrix stays in cache; the backward pass is one
GEMM for ``dw`` and one for ``dx`` per chunk, then col2im (numba). The batch is split
over worker threads, each streaming through its own images with single-threaded
kernels (see :mod:`pydagnn.layers.kernels.threads_cpu`). The dtype of ``x`` is kept
(float32 or float64); the results are Fortran-contiguous. ``$PYDAGNN_CONV_GEMM=blas``
turns the implicit path off.

CuPy inputs take the GPU path (``_conv_forward_gpu`` / ``_conv_backward_gpu`` below): the
same geometry and checks, CUDA im2col / col2im (:mod:`pydagnn.layers.kernels.im2col_gpu`)
around cuBLAS GEMMs.
"""
import math

import numpy as np

from pydagnn.backend import is_gpu_array
from pydagnn.layer import Layer, check_filter_params, register
from pydagnn.layers._common import (as4d, conv_bias, filter_ders, flag, float_map, fortran,
                                    output_derivative, parse_pad, parse_pair, shape4,
                                    window_outputs)
from pydagnn.layers import conv_implicit as _implicit
from pydagnn.layers.kernels import im2col_cpu as _k
from pydagnn.layers.kernels import im2col_gpu as _kg
from pydagnn.layers.kernels.threads_cpu import matmul, parallel_for

__all__ = ['conv_forward', 'conv_backward', 'conv_output_size', 'parse_pad', 'parse_pair', 'Conv']

#: target size in bytes of the im2col buffer of one chunk of images: the images of a chunk
#: share one GEMM, and the buffer stays in cache between im2col and the GEMM. Maps of
#: 32x32 and larger (or many channels) get one image per chunk.
COL_CHUNK_BYTES = 2 << 20

#: filter derivatives of at least this many elements are summed over the workers
SUM_PARTS_PARALLEL_MIN = 1 << 16

#: GPU: upper bound in bytes of the im2col buffer of one chunk of images (the CuPy memory
#: pool reuses it from call to call)
COL_BYTES = 128 << 20


def conv_output_size(H, W, FH, FW, pad=0, stride=1, dilate=1):
    """(Ho, Wo) of a convolution, MatConvNet's formula."""
    ry, rx = parse_pair(dilate, 'dilate')
    return window_outputs(H, W, parse_pad(pad), (FH - 1) * ry + 1, (FW - 1) * rx + 1,
                          *parse_pair(stride, 'stride'))


# --------------------------------------------------------------------------- geometry

class _Geom:
    """Checked shapes and options of one convolution call, on either device: the arrays
    (``x``, ``w``, ``b``) are those of ``xp``, the module of ``x`` (numpy or cupy); the GPU
    path and its kernels (:mod:`pydagnn.layers.kernels.im2col_gpu`) read it as the CPU
    path does."""

    def __init__(self, x, w, b, pad, stride, dilate, op):
        x, xp = float_map(x, op)
        self.xp = xp
        w = as4d(w, 'filters', op, xp)
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
            raise ValueError(f'{op}: grouped convolution: x has {self.C} channels = {self.G} '
                             f'groups of {self.Cin}, but the {self.Cout} filters (shape {w.shape}) '
                             f'do not divide into {self.G} groups')
        self.fhe = (self.FH - 1) * self.ry + 1
        self.fwe = (self.FW - 1) * self.rx + 1
        if self.H + self.pt + self.pb < self.fhe or self.W + self.pl + self.pr < self.fwe:
            raise ValueError(f'{op}: filters of shape {w.shape} (dilated {self.fhe}x{self.fwe}) '
                             f'are larger than the padded input: x shape {x.shape}, pad '
                             f'{[self.pt, self.pb, self.pl, self.pr]}')
        self.Ho, self.Wo = window_outputs(self.H, self.W, (self.pt, self.pb, self.pl, self.pr),
                                          self.fhe, self.fwe, self.sy, self.sx)
        self.P = self.Ho * self.Wo
        self.Kg = self.Cin * self.FW * self.FH
        self.K = self.C * self.FW * self.FH
        self.x = fortran(x, self.dtype, xp)
        self.w = fortran(w, self.dtype, xp)
        self.w_dtype = w.dtype if w.dtype.kind == 'f' else self.dtype
        self.b = None
        self.b_dtype = None
        if b is not None and np.size(b) > 0:
            barr = xp.asarray(b)
            if barr.size != self.Cout:
                raise ValueError(f'{op}: bias has {barr.size} elements (shape {barr.shape}), '
                                 f'expected {self.Cout} (filters {w.shape})')
            self.b_dtype = barr.dtype if barr.dtype.kind == 'f' else self.dtype
            self.b = xp.ascontiguousarray(barr.reshape(-1), dtype=self.dtype)
        nopad = self.pt == self.pb == self.pl == self.pr == 0
        # the column matrix of every image is the image itself: one GEMM on x
        self.fc = (nopad and self.G == 1 and self.fhe == self.H and self.fwe == self.W
                   and self.ry == 1 and self.rx == 1)
        self.pointwise = (nopad and self.G == 1 and self.FH == 1 and self.FW == 1
                          and self.sy == 1 and self.sx == 1)

    @property
    def out_shape(self):
        return (self.Ho, self.Wo, self.Cout, self.N)

    def wmat(self):
        """Filters as the (Cout, Kg) matrix (a view of the Fortran array)."""
        return self.w.T.reshape(self.Cout, self.Kg)

    def chunk(self, budget=None):
        """Images per im2col chunk: as many as keep the column buffer under ``budget`` bytes
        (default :data:`COL_CHUNK_BYTES`, read at call time; the GPU passes its own)."""
        budget = COL_CHUNK_BYTES if budget is None else budget
        per_image = max(1, self.K * self.P * self.dtype.itemsize)
        return max(1, min(self.N, budget // per_image))

    def dy(self, dy, op):
        """``dy`` checked against the output shape, Fortran-contiguous in x's dtype."""
        return output_derivative(self, dy, op)

    def describe(self):
        return f'x {self.x.shape}, filters {self.w.shape}'

    def kargs(self):
        """The geometry arguments of the numba kernels (:mod:`im2col_cpu`)."""
        return (self.FH, self.FW, self.Ho, self.Wo, self.pt, self.pl,
                self.sy, self.sx, self.ry, self.rx)


def _view(flat, rows, cols):
    """A C-contiguous (rows, cols) matrix at the start of a flat work buffer."""
    return flat[:rows * cols].reshape(rows, cols)


# --------------------------------------------------------------------------- forward
def conv_forward(x, w, b=None, pad=0, stride=1, dilate=1):
    """MatConvNet ``vl_nnconv(x, w, b, 'pad', pad, 'stride', stride, 'dilate', dilate)``.

    x: (H, W, C, N); w: (FH, FW, Cin, Cout) with C a multiple of Cin (groups); b: Cout
    values or None/empty. Returns y (Ho, Wo, Cout, N), Fortran-contiguous, x's dtype.
    """
    g = _Geom(x, w, b, pad, stride, dilate, 'conv_forward')
    if is_gpu_array(g.x):
        return _conv_forward_gpu(g)
    return _conv_forward_cpu(g)


def _conv_forward_cpu(g):
    """CPU forward of a checked call: GEMMs on x itself or im2col (numba) + GEMM per chunk,
    the images split over worker threads."""
    y = np.empty(g.out_shape, dtype=g.dtype, order='F')
    if g.N == 0:
        return y
    N, P = g.N, g.P
    yT3 = y.T.reshape(N, g.Cout, P)
    xT = g.x.T
    wm = g.wmat()
    bcol = None if g.b is None else g.b[:, None]
    if g.fc:
        # every image is one row of x.T: y.T (N, Cout) = X (N, K) @ Wm.T, one GEMM
        matmul(xT.reshape(N, g.K), wm.T, yT3.reshape(N, g.Cout))
        if bcol is not None:
            yT3 += bcol
        return y
    if g.pointwise:
        x3 = xT.reshape(N, g.C, P)

        def part(a, b, _):
            np.matmul(wm, x3[a:b], out=yT3[a:b])   # one GEMM per image, on x itself
            if bcol is not None:
                yT3[a:b] += bcol
        parallel_for(part, N)
        return y
    mi = _implicit.interleave_count(g)
    if mi > 1 and _implicit.forward_interleaved(g, mi, y):
        return y
    im = _implicit.Implicit.of(g)
    if im is not None and _implicit.forward(g, im, y):
        return y
    nc = g.chunk()
    P, Cog, Kg = g.P, g.Cout // g.G, g.Kg
    direct = nc == 1 and g.G == 1   # GEMM straight into the output

    def part(a, b, _):
        col = np.empty(g.K * nc * P, dtype=g.dtype)
        tmp = None if direct else np.empty(g.Cout * nc * P, dtype=g.dtype)
        for n0 in range(a, b, nc):
            m = min(nc, b - n0)
            c = _view(col, g.K, m * P)
            _k.im2col(xT, c, n0, *g.kargs())
            if direct:
                out = yT3[n0]
                np.matmul(wm, c, out=out)
                if bcol is not None:
                    out += bcol
                continue
            t = _view(tmp, g.Cout, m * P)
            for gi in range(g.G):
                np.matmul(wm[gi * Cog:(gi + 1) * Cog], c[gi * Kg:(gi + 1) * Kg],
                          out=t[gi * Cog:(gi + 1) * Cog])
            t3 = t.reshape(g.Cout, m, P).transpose(1, 0, 2)   # (Cout, m, P) -> (m, Cout, P)
            if bcol is not None:
                np.add(t3, bcol, out=yT3[n0:n0 + m])
            else:
                yT3[n0:n0 + m] = t3
    parallel_for(part, N)
    return y


# --------------------------------------------------------------------------- backward
def conv_backward(x, w, b, dy, pad=0, stride=1, dilate=1):
    """Derivatives of ``conv_forward`` projected on ``dy`` (Ho, Wo, Cout, N).

    Returns ``(dx, dw, db)``: dx like x (x's dtype), dw like w, db of shape (Cout,)
    (None when b is None or empty). All Fortran-contiguous.
    """
    g = _Geom(x, w, b, pad, stride, dilate, 'conv_backward')
    dy = g.dy(dy, 'conv_backward')
    if is_gpu_array(g.x):
        return _conv_backward_gpu(g, dy)
    return _conv_backward_cpu(g, dy)


def _conv_backward_cpu(g, dy):
    """CPU backward of a checked call (``dy`` checked by the geometry)."""
    N, P = g.N, g.P
    dx = np.empty(g.x.shape, dtype=g.dtype, order='F')
    dw = np.zeros(g.w.shape, dtype=g.dtype, order='F')
    db = None if g.b is None else np.zeros(g.Cout, dtype=g.dtype)
    if N == 0:
        return dx, dw.astype(g.w_dtype, copy=False), _cast(db, g.b_dtype)
    xT, dxT = g.x.T, dx.T
    dyT3 = dy.T.reshape(N, g.Cout, P)
    wm = g.wmat()
    dwm = dw.T.reshape(g.Cout, g.Kg)
    if g.fc:
        x2 = xT.reshape(N, g.K)
        dy2 = dyT3.reshape(N, g.Cout)
        matmul(dy2, wm, dxT.reshape(N, g.K))
        matmul(dy2.T, x2, dwm)
        if db is not None:
            np.sum(dy2, axis=0, out=db)
    else:
        im = _implicit.Implicit.of(g, backward=True)   # None for the pointwise ones
        part = im and _implicit.backward_part(g, im, dxT, dyT3)
        blas = not part   # the implicit part calls no BLAS
        if g.pointwise:
            part = _pointwise_backward_part(g, xT.reshape(N, g.C, P), dxT.reshape(N, g.C, P),
                                            dyT3, wm)
        elif not part:
            part = _im2col_backward_part(g, xT, dxT, dyT3, wm)
        # each part returns its own sums over its images: (dW, db)
        sums = parallel_for(part, N, uses_blas=blas,
                            parts_per_worker=None if blas else _implicit.parts_per_worker(im))
        _sum_parts([pdw for pdw, _ in sums], dwm)
        if db is not None:
            for _, pdb in sums:
                db += pdb
    return dx, dw.astype(g.w_dtype, copy=False), _cast(db, g.b_dtype)


def _sum_parts(parts, dwm):
    """``dwm (Cout, Kg) = parts[0] + parts[1] + ...`` (``dwm`` zero before), added in part
    order (so the sum does not depend on the threads). The parts are transposed views of
    C-contiguous (Kg, Cout) arrays; numpy's strided ``+=`` of them took 0.7 ms of the main
    thread for ResNet18's 8x8x128 layer (4 parts): the workers share the rows instead.
    ``dwm`` is a C-contiguous view (of ``dw.T``)."""
    srcs = tuple(np.ascontiguousarray(p.T) for p in parts)   # no copy: the parts' own arrays
    if dwm.size < SUM_PARTS_PARALLEL_MIN:   # a region costs more than the sum (~30 us)
        _k.sum_transposed(srcs, dwm, 0, dwm.shape[1])
        return

    def rows(a, b, _):
        _k.sum_transposed(srcs, dwm, a, b)
    parallel_for(rows, dwm.shape[1], uses_blas=False)


def _cast(a, dtype):
    return None if a is None else a.astype(dtype, copy=False)


def _pointwise_backward_part(g, x3, dx3, dyT3, wm):
    """dX_n = Wm.T @ dY_n on dy itself; dW = sum_n dY_n @ X_n.T, one GEMM per chunk of
    images after packing the chunk's dY and X side by side (cheap next to the GEMM)."""
    P = g.P
    nc = max(1, COL_CHUNK_BYTES // ((g.C + g.Cout) * P * g.dtype.itemsize))

    def part(a, b, _):
        np.matmul(wm.T, dyT3[a:b], out=dx3[a:b])
        pdb = None if g.b is None else dyT3[a:b].sum(axis=(0, 2))
        pdwT = np.zeros((g.C, g.Cout), dtype=g.dtype)   # transposed: see _im2col_backward_part
        step = min(nc, b - a)
        if step == 1:
            for n in range(a, b):
                pdwT += x3[n] @ dyT3[n].T
            return pdwT.T, pdb
        xc = np.empty(g.C * step * P, dtype=g.dtype)
        dc = np.empty(g.Cout * step * P, dtype=g.dtype)
        for n0 in range(a, b, step):
            m = min(step, b - n0)
            xcm, dcm = _view(xc, g.C, m * P), _view(dc, g.Cout, m * P)
            xcm.reshape(g.C, m, P)[...] = x3[n0:n0 + m].transpose(1, 0, 2)
            dcm.reshape(g.Cout, m, P)[...] = dyT3[n0:n0 + m].transpose(1, 0, 2)
            pdwT += xcm @ dcm.T
        return pdwT.T, pdb
    return part


def _im2col_backward_part(g, xT, dxT, dyT3, wm):
    """Per chunk: im2col, dW.T += col @ dY.T (one GEMM), dcol = Wm.T @ dY (one GEMM)
    written over the column buffer, col2im.

    dW is accumulated transposed, ``(Kg, Cout)`` C-order: OpenBLAS computes that product
    about twice as fast as ``dY @ col.T`` into ``(Cout, Kg)`` for few channels (measured
    on one core: 0.27 against 0.52 ms for 16 channels at 64 x 64, 0.22 against 0.35 ms for
    32 at 32 x 32, the same from 64 channels on)."""
    P, Cog, Kg = g.P, g.Cout // g.G, g.Kg
    nc = g.chunk()
    direct = nc == 1

    def part(a, b, _):
        col = np.empty(g.K * nc * P, dtype=g.dtype)
        dyc = None if direct else np.empty(g.Cout * nc * P, dtype=g.dtype)
        pdwT = np.zeros((Kg, g.Cout), dtype=g.dtype)
        tmpT = np.empty((Kg, Cog), dtype=g.dtype)
        pdb = None if g.b is None else dyT3[a:b].sum(axis=(0, 2))
        for n0 in range(a, b, nc):
            m = min(nc, b - n0)
            c = _view(col, g.K, m * P)
            _k.im2col(xT, c, n0, *g.kargs())
            if direct:
                d = dyT3[n0]
            else:
                d = _view(dyc, g.Cout, m * P)
                d.reshape(g.Cout, m, P)[...] = dyT3[n0:n0 + m].transpose(1, 0, 2)
            for gi in range(g.G):
                rs, ks = slice(gi * Cog, (gi + 1) * Cog), slice(gi * Kg, (gi + 1) * Kg)
                np.matmul(c[ks], d[rs].T, out=tmpT)
                pdwT[:, rs] += tmpT
            for gi in range(g.G):
                rs, ks = slice(gi * Cog, (gi + 1) * Cog), slice(gi * Kg, (gi + 1) * Kg)
                np.matmul(wm[rs].T, d[rs], out=c[ks])
            _k.col2im(c, dxT, n0, *g.kargs())
        return pdwT.T, pdb
    return part


# --------------------------------------------------------------------------- GPU
# CuPy arrays: im2col / col2im CUDA kernels (:mod:`pydagnn.layers.kernels.im2col_gpu`)
# around cuBLAS GEMMs, with the CPU path's layout (``xT = x.T`` is the C-contiguous
# ``(N, C, W, H)`` view; a chunk of ``m`` images unfolds into ``col`` of shape
# ``(K, m * P)``, so the filters are the matrix ``w.T.reshape(Cout, K)``).
# Forward per chunk: im2col, one GEMM ``(Cout, K) @ (K, m*P)``, one strided copy (with the
# bias) into the output. Backward per chunk: ``dY`` of the chunk as ``(Cout, m*P)``,
# ``dW += dY @ col.T`` (cuBLAS reads ``col.T`` transposed, no copy), ``dcol = W.T @ dY``
# written over the column buffer, col2im (a gather: no atomics, deterministic).
# 1x1 stride-1 unpadded convolutions are batched GEMMs on x itself, "fully connected"
# ones one GEMM, as on the CPU. Chunks keep the column buffer under :data:`COL_BYTES`.
def _conv_forward_gpu(g):
    """GPU forward of a checked call."""
    import cupy as cp
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
            _kg.im2col(xT, c, n0, m, g)
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


def _conv_backward_gpu(g, dy):
    """GPU backward of a checked call: ``(dx, dw, db)``."""
    import cupy as cp
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
            _kg.im2col(xT, c, n0, m, g)
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
            _kg.col2im(c, dxT, n0, m, g)
    return dx, dw.astype(g.w_dtype, copy=False), _cast(db, g.b_dtype)


# --------------------------------------------------------------------------- block
@register('dagnn.Conv')
class Conv(Layer):
    """``dagnn.Conv``: inputs [x], params [filters] or [filters, biases], outputs [y]."""
    #: backward reads x, not y: the engine may free y (conv -> ReLU)
    backward_needs_outputs = False
    #: each image is convolved on its own (the batched mixture may stack components)
    batch_independent = True
    param_roles = ('filter', 'vector')
    properties = {
        'size': [0, 0, 0, 0],
        'hasBias': True,
        'opts': [],
        'pad': 0,
        'stride': 1,
        'dilate': 1,
    }

    def _size4(self):
        s = [int(v) for v in np.asarray(self.size, dtype=np.float64).ravel()]
        return (s + [1, 1, 1, 1])[:4]

    def check_param_shapes(self, values, names):
        """The filters against ``size``, the biases against the filters' Cout."""
        check_filter_params(values, names, self.size, out_axis=3)

    def forward(self, inputs, params):
        return [conv_forward(inputs[0], params[0], conv_bias(self.hasBias, params),
                             pad=self.pad, stride=self.stride, dilate=self.dilate)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        b = conv_bias(self.hasBias, params)
        dx, dw, db = conv_backward(inputs[0], params[0], b, der_outputs[0],
                                   pad=self.pad, stride=self.stride, dilate=self.dilate)
        return filter_ders(inputs, params, dx, dw, db)

    def get_output_sizes(self, input_sizes):
        if not input_sizes or input_sizes[0] is None:
            return [None]
        s = shape4(input_sizes[0], 'the input size', 'Conv')
        fh, fw, _, cout = self._size4()
        pt, pb, pl, pr = parse_pad(self.pad, 'Conv')
        sy, sx = parse_pair(self.stride, 'stride', 'Conv')
        ry, rx = parse_pair(self.dilate, 'dilate', 'Conv')
        fhe, fwe = (fh - 1) * ry + 1, (fw - 1) * rx + 1
        # MATLAB's fix(): truncation towards zero
        ho = math.trunc((s[0] + pt + pb - fhe) / sy) + 1
        wo = math.trunc((s[1] + pl + pr - fwe) / sx) + 1
        return [(ho, wo, cout, s[3])]

    def init_params(self, rng, dtype=np.float32):
        fh, fw, cin, cout = self._size4()
        sc = math.sqrt(2.0 / (fh * fw * cin))
        f = np.asfortranarray((rng.standard_normal((fh, fw, cin, cout)) * sc).astype(dtype))
        if flag(self.hasBias):
            return [f, np.zeros(cout, dtype=dtype)]
        return [f]
