"""Convolution transpose (MatConvNet's ``vl_nnconvt`` and ``dagnn.ConvTranspose``), CPU and GPU.

``convt_forward(x, w, b=None, upsample=1, crop=0, num_groups=1) -> y``
``convt_backward(x, w, b, dy, upsample=1, crop=0, num_groups=1) -> (dx, dw, db)``

Semantics (``vl_nnconvt``): ``x`` is ``H x W x D x N``; the filter bank ``w`` is
``FH x FW x K x D`` -- filter ``k`` is ``w[:, :, k, :]`` (the transpose of ``vl_nnconv``'s
layout) and its depth is the input depth ``D``. With ``G = num_groups`` (which must divide
``D``) the bank holds ``K * G`` filters of depth ``D / G``: the input channels
``g*D/G .. (g+1)*D/G - 1`` produce the output channels ``g*K .. (g+1)*K - 1`` through
``w[:, :, :, g*D/G:(g+1)*D/G]``. ``b`` has ``K * G`` entries (or is None / empty).
``upsample`` = u or [uy ux]; ``crop`` = c or [top bottom left right] (MatConvNet's MEX
accepts 1 or 4 numbers; ``dagnn.ConvTranspose`` also turns 2 into [a a b b]). Output

    YH = uy * (H - 1) + FH - crop_top - crop_bottom,   YW = ux * (W - 1) + FW - crop_left - crop_right,

with ``K * G`` channels. The operator is the adjoint of ``vl_nnconv`` with stride
``upsample`` and padding ``crop`` applied to a ``YH x YW x K*G`` map: if
``u = vl_nnconv(v, w)`` is ``u(:) = M v(:)``, then ``y(:) = M' x(:)``.

Implementation, on either device (NumPy or CuPy arrays): the forward pass scatters one
batched GEMM per filter tap into the uncropped output (``xp`` array code); the backward
pass uses the convolution code of :mod:`pydagnn.layers.conv` (as MatConvNet does with its
``Convolution::forward``): the input derivative is the plain convolution of ``dy``;
the filter derivative gathers ``dy`` per tap and multiplies it with the input (one batched
GEMM per tap, ``xp`` array code). Grouping follows from the channel counts, as in
``vl_nnconv``.
"""
import math

import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers._common import (as4d, conv_bias, filter_ders, flag, parse_pad, parse_pair,
                                    shape4)
from pydagnn.layers.conv import conv_forward

__all__ = ['convt_forward', 'convt_backward', 'convt_output_size', 'parse_crop', 'ConvTranspose']


def parse_crop(crop, op='convt'):
    """crop as 1, 2 ([vertical horizontal], dagnn.ConvTranspose's setter) or 4
    ([top bottom left right]) numbers -> (top, bottom, left, right)."""
    try:
        return parse_pad(crop, op)
    except ValueError as err:
        raise ValueError(str(err).replace('pad', 'crop')) from None


def _groups(num_groups, op):
    a = np.asarray(num_groups, dtype=np.float64).ravel()
    if a.size != 1 or a[0] != round(a[0]) or a[0] < 1:
        raise ValueError(f'{op}: numGroups must be one integer >= 1, got {a.tolist()}')
    return int(a[0])


def convt_output_size(H, W, FH, FW, upsample=1, crop=0):
    """(YH, YW) of a convolution transpose, ``vl_nnconvt``'s formula."""
    uy, ux = parse_pair(upsample, 'upsample', 'convt')
    ct, cb, cl, cr = parse_crop(crop)
    return uy * (H - 1) + FH - ct - cb, ux * (W - 1) + FW - cl - cr


def _geometry(x, w, b, upsample, crop, num_groups, op):
    """Checked arrays and options: (x, w, b or None, (uy, ux), crop4, G, output shape)."""
    xp = get_array_module(x)
    x = as4d(x, 'x', op, xp)
    w = as4d(w, 'filters', op, xp)
    if x.dtype.kind != 'f':
        raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
    up = parse_pair(upsample, 'upsample', op)
    cr = parse_crop(crop, op)
    G = _groups(num_groups, op)
    H, W, D, N = x.shape
    FH, FW, K, FD = w.shape
    if min(FH, FW, K) < 1:
        raise ValueError(f'{op}: a dimension of the filters is void, shape {w.shape}')
    if FD % G != 0:
        raise ValueError(f'{op}: numGroups {G} does not divide the filter bank depth {FD} '
                         f'(filters {w.shape})')
    if FD != D:
        raise ValueError(f'{op}: the filter bank depth (4th dimension of filters {w.shape}) is {FD}, '
                         f'x has {D} channels (shape {x.shape})')
    YH = up[0] * (H - 1) + FH - cr[0] - cr[1]
    YW = up[1] * (W - 1) + FW - cr[2] - cr[3]
    if YH < 1 or YW < 1:
        raise ValueError(f'{op}: the output is empty ({YH} x {YW}): crop {list(cr)} is too large for '
                         f'x {x.shape}, filters {w.shape}, upsample {list(up)}')
    out = (YH, YW, K * G, N)
    if b is not None and np.size(b) > 0:
        b = xp.asarray(b)
        if b.size != K * G:
            raise ValueError(f'{op}: bias has {b.size} elements (shape {b.shape}), expected {K * G} '
                             f'(filters {w.shape}, numGroups {G})')
        b = b.reshape(-1)
    else:
        b = None
    return xp, x, w, b, up, cr, G, out


def _over_images(part, N, xp):
    """[part(0, N)] on the GPU; on the CPU the images split over the worker threads of
    :func:`pydagnn.layers.kernels.threads_cpu.parallel_for` (single-threaded BLAS in each:
    multi-threaded GEMMs stall on a loaded small machine), a list of the parts' results."""
    if xp is np:
        try:
            from pydagnn.layers.kernels.threads_cpu import parallel_for
        except ImportError:   # pragma: no cover - the helper moved: run in this thread
            parallel_for = None
        if parallel_for is not None:
            return parallel_for(lambda a, b, _: part(a, b), N)
    return [part(0, N)]


def _taps(x, w, up, G):
    """The sizes both directions use: ``(H, W, D, N, FH, FW, K, Dg, Hf, Wf, rows, cols)``,
    ``Hf x Wf`` the uncropped output, ``rows x cols`` the span one filter tap covers in it
    (every ``uy``-th row, ``ux``-th column)."""
    H, W, D, N = x.shape
    FH, FW, K, _ = w.shape
    uy, ux = up
    return (H, W, D, N, FH, FW, K, D // G, uy * (H - 1) + FH, ux * (W - 1) + FW,
            (H - 1) * uy + 1, (W - 1) * ux + 1)


def _scatter_forward(x, w, up, cr, G, xp):
    """y = M' x directly: every filter tap (i, j) multiplies the whole input (one batched
    GEMM over images and groups; a broadcast product when groups have depth 1) and adds it
    at rows i, i+uy, ... and columns j, j+ux, ... of the uncropped output; then the crop.
    Array code over ``xp``; the same arithmetic as the conv adjoint without its unused
    filter derivative."""
    H, W, D, N, FH, FW, K, Dg, Hf, Wf, rows, cols = _taps(x, w, up, G)
    uy, ux = up
    ct, cb, cl, cr_ = cr
    dt = x.dtype
    xg = xp.ascontiguousarray(x.T).reshape(N, G, Dg, W * H)            # x.T: (N, D, W, H)
    # w[i, j] is (K, D) = (K, G, Dg): per tap a (G, K, Dg) stack of group matrices
    wg = xp.ascontiguousarray(w.astype(dt, copy=False).reshape(FH, FW, K, G, Dg).transpose(0, 1, 3, 2, 4))
    full = xp.zeros((N, G, K, Wf, Hf), dtype=dt)

    def part(a, b):
        xa, m = xg[a:b], b - a
        for i in range(FH):
            for j in range(FW):
                if Dg == 1:
                    c = wg[i, j] * xa                                # (G, K, 1) * (m, G, 1, WH)
                else:
                    c = xp.matmul(wg[i, j], xa)                      # (m, G, K, WH)
                full[a:b, :, :, j:j + cols:ux, i:i + rows:uy] += c.reshape(m, G, K, W, H)
    _over_images(part, N, xp)
    y = full.reshape(N, G * K, Wf, Hf)[:, :, cl:Wf - cr_, ct:Hf - cb].T
    return xp.asfortranarray(y)


def _gather_filter_derivative(x, w, dy, up, cr, G, xp):
    """dw[i, j, k, d] = sum over images and input pixels (h, w') of
    dy_uncropped[i + uy h, j + ux w', g K + k] * x[h, w', d] (g the group of d): per tap one
    strided gather of ``dy`` (zero in the cropped border) and one GEMM per group, the
    images of a worker's share joining the contraction."""
    H, W, D, N, FH, FW, K, Dg, Hf, Wf, rows, cols = _taps(x, w, up, G)
    uy, ux = up
    ct, cb, cl, cr_ = cr
    dt = x.dtype
    xg = xp.ascontiguousarray(x.T).reshape(N, G, Dg, W * H)
    dyT = dy.T.reshape(N, G, K, Wf - cl - cr_, Hf - ct - cb)

    def part(a, b):
        m = b - a
        xa = xg[a:b]
        # (G, m*WH, Dg)
        xr = xp.ascontiguousarray(xa.transpose(1, 0, 3, 2)).reshape(G, m * W * H, Dg)
        full = xp.zeros((m, G, K, Wf, Hf), dtype=dt)
        full[:, :, :, cl:Wf - cr_, ct:Hf - cb] = dyT[a:b]
        dwg = xp.empty((FH, FW, G, K, Dg), dtype=dt)
        for i in range(FH):
            for j in range(FW):
                s = full[:, :, :, j:j + cols:ux, i:i + rows:uy].reshape(m, G, K, W * H)
                if Dg == 1:
                    dwg[i, j] = (s * xa).sum(axis=(0, 3))[..., None]
                else:
                    sr = xp.ascontiguousarray(s.transpose(1, 2, 0, 3)).reshape(G, K, m * W * H)
                    dwg[i, j] = xp.matmul(sr, xr)
        return dwg
    parts = _over_images(part, N, xp)
    dwg = parts[0]
    for p in parts[1:]:
        dwg += p
    # (FH, FW, G, K, Dg) -> (FH, FW, K, G, Dg) = (FH, FW, K, D)
    dw = dwg.transpose(0, 1, 3, 2, 4).reshape(FH, FW, K, D)
    return xp.asfortranarray(dw.astype(w.dtype if w.dtype.kind == 'f' else dt, copy=False))


def convt_forward(x, w, b=None, upsample=1, crop=0, num_groups=1):
    """``vl_nnconvt(x, w, b, 'upsample', upsample, 'crop', crop, 'numGroups', num_groups)``.

    Returns y (YH, YW, K*G, N), Fortran-contiguous, x's dtype."""
    xp, x, w, b, up, cr, G, out = _geometry(x, w, b, upsample, crop, num_groups, 'convt_forward')
    if out[3] == 0:
        return xp.zeros(out, dtype=x.dtype, order='F')
    y = _scatter_forward(x, w, up, cr, G, xp)
    if b is not None:
        y += b.astype(y.dtype, copy=False).reshape(1, 1, -1, 1)
    return xp.asfortranarray(y)


def convt_backward(x, w, b, dy, upsample=1, crop=0, num_groups=1):
    """Derivatives of ``convt_forward`` projected on ``dy`` (YH, YW, K*G, N).

    Returns ``(dx, dw, db)`` shaped like x (4-D), w (4-D) and (K*G,) (None without a bias)."""
    xp, x, w, b, up, cr, G, out = _geometry(x, w, b, upsample, crop, num_groups, 'convt_backward')
    dy = as4d(dy, 'dy', op='convt_backward', xp=xp)
    if tuple(dy.shape) != out:
        raise ValueError(f'convt_backward: dy has shape {dy.shape}, expected {out} '
                         f'(x {x.shape}, filters {w.shape})')
    dy = dy.astype(x.dtype, copy=False)
    if out[3] == 0:
        dx = xp.zeros(x.shape, dtype=x.dtype, order='F')
        dw = xp.zeros(w.shape, dtype=w.dtype if w.dtype.kind == 'f' else x.dtype, order='F')
    else:
        # <dy, M' x> = <M dy, x>: dx = M dy, dw = d<conv(dy; w), x>/dw
        dx = conv_forward(dy, w, None, pad=cr, stride=up)
        dw = _gather_filter_derivative(x, w, dy, up, cr, G, xp)
    db = None
    if b is not None:
        db = dy.sum(axis=(0, 1, 3)).astype(b.dtype if b.dtype.kind == 'f' else x.dtype, copy=False)
    return xp.asfortranarray(dx), xp.asfortranarray(dw), db


@register('dagnn.ConvTranspose')
class ConvTranspose(Layer):
    """``dagnn.ConvTranspose``: inputs [x], params [filters] or [filters, biases], outputs [y].

    ``size`` is the filter bank's shape ``[FH FW K D]``; the output has ``K * numGroups``
    channels (``vl_nnconvt``). MatConvNet's ``getOutputSizes`` and ``initParams`` use
    ``size(3)`` channels, which is what vl_nnconvt produces only for numGroups = 1; here
    both use ``K * numGroups`` (the channels the op really outputs, the bias count it
    checks). ``opts`` holds vl_nnconvt's backend switches (cuDNN, workspace limits); they
    do not change the result and are kept only to be saved."""
    backward_needs_outputs = False
    #: the engine's param roles (filters 4-D, bias 1-D); shape_param below applies them
    param_roles = ('filter', 'vector')
    properties = {
        'size': [0, 0, 0, 0],
        'hasBias': True,
        'upsample': [1, 1],
        'crop': [0, 0, 0, 0],
        'numGroups': 1,
        'opts': ['cuDNN'],
    }

    def load(self, props):
        """Set properties, then normalise them as ConvTranspose.m's setters do: ``size`` to
        4 numbers (trailing 1s added), ``upsample`` to 2, ``crop`` to 4 (1 -> [c c c c],
        2 -> [a a b b]). Values that are not numbers are left for forward to reject."""
        super().load(props)
        try:
            s = [float(v) for v in np.asarray(self.size, dtype=np.float64).ravel()]
            self.size = [int(v) if v == int(v) else v for v in (s + [1, 1, 1, 1])[:4]]
            u = [int(v) for v in np.asarray(self.upsample, dtype=np.float64).ravel()]
            if len(u) == 1:
                u = u * 2
            self.upsample = u
            c = [int(v) for v in np.asarray(self.crop, dtype=np.float64).ravel()]
            if len(c) == 1:
                c = c * 4
            elif len(c) == 2:
                c = [c[0], c[0], c[1], c[1]]
            self.crop = c
        except (TypeError, ValueError, OverflowError):
            pass

    def _size4(self):
        s = [int(v) for v in np.asarray(self.size, dtype=np.float64).ravel()]
        return tuple((s + [1, 1, 1, 1])[:4])

    def _groups(self):
        return _groups(self.numGroups, 'ConvTranspose')

    def _opts(self):
        return dict(upsample=self.upsample, crop=self.crop, num_groups=self.numGroups)

    def forward(self, inputs, params):
        return [convt_forward(inputs[0], params[0], conv_bias(self.hasBias, params), **self._opts())]

    def backward(self, inputs, params, der_outputs, outputs=None):
        b = conv_bias(self.hasBias, params)
        dx, dw, db = convt_backward(inputs[0], params[0], b, der_outputs[0], **self._opts())
        return filter_ders(inputs, params, dx, dw, db)

    def get_output_sizes(self, input_sizes):
        if not input_sizes or input_sizes[0] is None:
            return [None]
        s = shape4(input_sizes[0], 'the input size', 'ConvTranspose')
        fh, fw, k, _ = self._size4()
        yh, yw = convt_output_size(s[0], s[1], fh, fw, self.upsample, self.crop)
        return [(yh, yw, k * self._groups(), s[3])]

    def init_params(self, rng, dtype=np.float32):
        size = self._size4()
        sc = math.sqrt(2.0 / (size[0] * size[1] * size[3]))
        f = np.asfortranarray((rng.standard_normal(size) * sc).astype(dtype))
        if flag(self.hasBias):
            return [f, np.zeros(size[2] * self._groups(), dtype=dtype)]
        return [f]

    # -- param shapes (the engine's loaders call these) ------------------------------
    def shape_param(self, k, value):
        """Param ``k`` in its engine shape: the filter bank 4-D (the trailing singleton
        dimensions MATLAB drops restored), the bias 1-D."""
        xp = get_array_module(value)
        value = xp.asarray(value)
        if k == 0:
            if value.ndim > 4:
                raise ValueError(f'ConvTranspose: filters must have at most 4 dimensions, got shape {value.shape}')
            return xp.asfortranarray(value.reshape(value.shape + (1,) * (4 - value.ndim), order='F'))
        if sum(1 for s in value.shape if s != 1) > 1:
            raise ValueError(f'ConvTranspose: the bias must be a vector, got shape {value.shape}')
        return value.reshape(-1, order='F')

    def check_param_shapes(self, values, names):
        """ValueError when the filters disagree with ``size`` or the bias count with the
        ``size[2] * numGroups`` output channels (``vl_nnconvt``'s check)."""
        names = list(names) + [f'param{i + 1}' for i in range(len(names), len(values))]
        f = values[0] if values else None
        size = self._size4()
        G = self._groups()
        if f is not None and np.size(f) > 0:
            fs = tuple(np.shape(f)) + (1,) * (4 - np.ndim(f))
            if any(size) and fs != size:
                raise ValueError(f'ConvTranspose: param {names[0]!r} has shape {fs} but the block\'s size is '
                                 f'{list(size)}')
            if fs[3] % G != 0:
                raise ValueError(f'ConvTranspose: numGroups {G} does not divide the depth {fs[3]} of param '
                                 f'{names[0]!r} (shape {fs})')
            cout = fs[2] * G
        else:
            cout = size[2] * G if any(size) else None
        if len(values) > 1 and values[1] is not None and np.size(values[1]) > 0 and cout is not None:
            if np.size(values[1]) != cout:
                raise ValueError(f'ConvTranspose: param {names[1]!r} has {np.size(values[1])} elements but the '
                                 f'filters have {cout} output channels (size[2] * numGroups)')
