"""The CPU convolution as an *implicit GEMM*: no column matrix is built (the part of
:mod:`pydagnn.layers.conv`'s CPU path that runs on the generated kernels of
:mod:`pydagnn.layers.kernels.gemm_cpu`).

Forward. Zero-pad image ``n`` (``C x W x H`` in the ``xT[n]`` view) to ``Wp x Hp`` and
split it into its ``sx * sy`` *phases*: phase ``(a, b)`` holds the padded pixels
``(u * sx + a, v * sy + b)`` as a ``Wph x Hph`` plane (``Wph = ceil(Wp / sx)``); with stride
1 there is one phase, the padded image. Filter tap ``(fw, fh)`` of a dilated filter
reads padded column ``wo * sx + fw * rx``: phase ``a = fw * rx % sx``, shifted by
``du = fw * rx // sx``. So on the phase grid, where output pixel ``(wo, ho)`` is column
``q = wo * Hph + ho``, row ``k = (c * FW + fw) * FH + fh`` of the column matrix is the
phase buffer shifted by

    boff[k] = ((c * sx + a) * sy + b) * Wph * Hph + du * Hph + dv

and the GEMM ``Y (Cout, Q) = Wm @ col`` reads it in place through that offset table
(kernel mode 'btab'). The ``Hph - Ho`` columns between output columns are computed and
dropped (3% of the work at 64x64 with 3x3 filters, 25% at 8x8: see :meth:`Implicit.of`).

Filter derivative: the phase buffer through the same table as the rows of A (mode
'atab'): ``dW.T (K, Cout) += col (K, Q) @ dY.T (Q, Cout)``, ``dY.T`` packed on the grid
with zero rows in the dropped columns.

Input derivative, stride 1: the stride-1 correlation of ``dy`` zero-padded by
``fhe - 1 - pt`` (top) etc. with the filters flipped in both directions and transposed,
again one GEMM on an offset table (needs each padding at most the dilated filter size
minus one). Any stride (or larger padding): per phase ``(a, b)``, the derivative of that
phase plane is the correlation of the padded ``dy`` with the flipped taps of that
phase: one GEMM per phase, each pixel of ``dx`` in exactly one phase (phases no tap
reads are zero).
"""
import numpy as np

from pydagnn.layers.kernels import gemm_cpu as _gemm
from pydagnn.layers.kernels import im2col_cpu as _k
from pydagnn.layers.kernels.threads_cpu import parallel_for

__all__ = ['Implicit', 'forward', 'backward_part', 'row_blocks', 'IMPLICIT_MAX_PAD_RATIO',
           'IMPLICIT_MIN_K_BACKWARD']

#: the implicit form runs where the phase plane is at most this many times the output
#: height (the extra rows are computed and dropped) and, for the backward pass, the
#: column matrix has at least IMPLICIT_MIN_K_BACKWARD rows (see Implicit.of)
IMPLICIT_MAX_PAD_RATIO = 1.2
IMPLICIT_MIN_K_BACKWARD = 64
#: strided convolutions: the implicit forward only from this output height on, and the
#: implicit backward only when this is True (measured, ResNet18's stride-2 layers at batch
#: 32 on 2 cores: forward 2.9-3.1 against 3.8 ms at 32x32 output, no faster at 16x16,
#: slower at 8x8 and for 1x1 filters; backward 15-80% slower: its per-phase GEMMs are
#: short). The phase code is exact either way (the tests run it with these relaxed).
IMPLICIT_STRIDED_MIN_HO = 32
IMPLICIT_STRIDED_BACKWARD = False


class Implicit:
    """The implicit form of one checked convolution call (a ``conv._Geom``)."""

    @classmethod
    def of(cls, g, backward=False):
        """The form for a checked call, or None where it does not apply or is slower
        than im2col + OpenBLAS (measured, per image on one core: 16-64 channels at
        64x64-16x16 1.3-2.3x faster; at 8x8 the dropped rows (Hp / Ho = 1.25) make it
        slower than OpenBLAS on several images at once, and so is the backward pass
        of a 3-channel input layer, whose GEMMs are too short)."""
        if (g.G != 1 or g.fc or g.pointwise or not _gemm.enabled()
                or g.dtype not in (np.float32, np.float64)
                or -(-(g.H + g.pt + g.pb) // g.sy) > IMPLICIT_MAX_PAD_RATIO * g.Ho
                or (backward and g.K < IMPLICIT_MIN_K_BACKWARD)):
            return None
        if (g.sx, g.sy) != (1, 1) and (g.Ho < IMPLICIT_STRIDED_MIN_HO or g.FH * g.FW == 1
                                       or (backward and not IMPLICIT_STRIDED_BACKWARD)):
            return None
        return cls(g)

    def __init__(self, g):
        self.g = g
        sx, sy = g.sx, g.sy
        self.Wp, self.Hp = g.W + g.pl + g.pr, g.H + g.pt + g.pb
        self.Wph, self.Hph = -(-self.Wp // sx), -(-self.Hp // sy)
        # stride 1 without padding: the image itself is the phase buffer
        self.direct = sx == sy == 1 and (g.pt, g.pb, g.pl, g.pr) == (0, 0, 0, 0)
        self.boff = self._forward_table()
        self.ncols = (g.Wo - 1) * self.Hph + g.Ho
        pads = (g.fhe - 1 - g.pt, g.fhe - 1 - g.pb, g.fwe - 1 - g.pl, g.fwe - 1 - g.pr)
        self.flip_dx = sx == sy == 1 and min(pads) >= 0
        if self.flip_dx:
            self.dpt, self.dpl = pads[0], pads[2]
            self.Wd, self.Hd = g.W + g.fwe - 1, g.H + g.fhe - 1
        else:   # per phase: dy padded by the largest tap shift
            self.dpl, self.dpt = (g.FW - 1) * g.rx // sx, (g.FH - 1) * g.ry // sy
            self.Wd, self.Hd = self.Wph + self.dpl, self.Hph + self.dpt

    def _forward_table(self):
        g = self.g
        fw, fh = np.arange(g.FW) * g.rx, np.arange(g.FH) * g.ry
        plane = self.Wph * self.Hph
        phase = (np.arange(g.C)[:, None, None] * g.sx + (fw % g.sx)[None, :, None]) * g.sy \
            + (fh % g.sy)[None, None, :]
        return (phase * plane + (fw // g.sx)[None, :, None] * self.Hph
                + (fh // g.sy)[None, None, :]).astype(np.int64).ravel()

    # ------------------------------------------------------------------ buffers
    def phase_buffer(self):
        """A zeroed phase buffer (C, sx, sy, Wph, Hph) for :meth:`source`, or None."""
        if self.direct:
            return None
        return np.zeros((self.g.C, self.g.sx, self.g.sy, self.Wph, self.Hph), dtype=self.g.dtype)

    def source(self, buf, img):
        """Image ``img`` (C, W, H) as the flat phase buffer (its pixels written into
        ``buf``, whose other entries stay zero), or itself when direct."""
        if buf is None:
            return img.reshape(-1)
        g = self.g
        _k.to_phases(img, buf, g.pt, g.pl)
        return buf.reshape(-1)

    # ------------------------------------------------------------------ dx
    def flipped_filters(self):
        """Stride 1: ``Wd`` (Cin, Cout * FW * FH), ``Wd[c, (co * FW + fw) * FH + fh] =
        w[FH-1-fh, FW-1-fw, c, co]``, and its offset table into the padded dy."""
        g = self.g
        wT = g.w.T   # (Cout, Cin, FW, FH)
        wd = np.ascontiguousarray(wT.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]).reshape(
            g.Cin, g.Cout * g.FW * g.FH)
        table = (np.arange(g.Cout, dtype=np.int64)[:, None, None] * (self.Wd * self.Hd)
                 + np.arange(g.FW, dtype=np.int64)[None, :, None] * (g.rx * self.Hd)
                 + np.arange(g.FH, dtype=np.int64)[None, None, :] * g.ry).ravel()
        return wd, table, (g.W - 1) * self.Hd + g.H

    def phases(self):
        """Any stride: per phase (a, b) with taps, ``(a, b, Ap, table, u0, nu, v0, nv)``:
        ``Ap`` (Cin, Cout * taps) the phase's filters, ``table`` the offsets of its rows
        in the padded dy (Cout, Wd, Hd), and the phase-plane columns ``u0 .. u0+nu`` and
        rows ``v0 .. v0+nv`` that hold image pixels (the GEMM's output grid, of column
        stride Hd)."""
        g = self.g
        wT = g.w.T   # (Cout, Cin, FW, FH)
        out = []
        for a in range(g.sx):
            fws = [f for f in range(g.FW) if f * g.rx % g.sx == a]
            u0, u1 = _image_range(a, g.pl, g.sx, g.W, self.Wph)
            for b in range(g.sy):
                fhs = [f for f in range(g.FH) if f * g.ry % g.sy == b]
                v0, v1 = _image_range(b, g.pt, g.sy, g.H, self.Hph)
                if not fws or not fhs or u1 <= u0 or v1 <= v0:
                    continue
                ap = np.ascontiguousarray(wT[:, :, fws][:, :, :, fhs].transpose(1, 0, 2, 3))
                du = self.dpl - np.array(fws) * g.rx // g.sx
                dv = self.dpt - np.array(fhs) * g.ry // g.sy
                table = (np.arange(g.Cout, dtype=np.int64)[:, None, None] * (self.Wd * self.Hd)
                         + (du[None, :, None] + u0) * self.Hd + (dv[None, None, :] + v0)).ravel()
                out.append((a, b, ap.reshape(g.Cin, -1), table.astype(np.int64),
                            u0, u1 - u0, v0, v1 - v0))
        return out


def _image_range(phase, pad, stride, size, nph):
    """Phase-plane indices u with ``0 <= u * stride + phase - pad < size``: [u0, u1)."""
    u0 = max(0, -(-(pad - phase) // stride))
    u1 = min(nph, -(-(size + pad - phase) // stride))
    return u0, max(u0, u1)


def row_blocks(kern, m):
    """``m`` (M, K) packed as the kernel's row blocks (one contiguous stream for its A)."""
    ap = np.empty(kern.a_panel_shape(*m.shape), dtype=m.dtype)
    _k.pack_row_blocks(m, ap)
    return ap


# --------------------------------------------------------------------------- forward
def forward(g, im, y):
    """``y`` (Ho, Wo, Cout, N), Fortran, from a checked call ``g``; False when no kernel
    is available (the caller then takes the im2col path)."""
    kern = _gemm.kernel_for(g.Cout, im.ncols, g.dtype, mode='btab')
    if kern is None:
        return False
    wp = row_blocks(kern, g.wmat())
    xT = g.x.T
    yT3 = y.T.reshape(g.N, g.Cout, g.P)
    b3 = None if g.b is None else g.b[:, None, None]

    def part(a, b, _):
        buf = im.phase_buffer()
        ypad = np.empty((g.Cout, g.Wo * im.Hph), dtype=g.dtype)
        grid = ypad.reshape(g.Cout, g.Wo, im.Hph)[:, :, :g.Ho]
        call = None
        for n in range(a, b):
            src = im.source(buf, xT[n])
            if call is None:   # checked once; per image only the source may move
                call = kern.prepare(wp, src, ypad[:, :im.ncols], a_panels=True,
                                    b_offsets=im.boff)
            call(b=src)
            out = yT3[n].reshape(g.Cout, g.Wo, g.Ho)
            if b3 is None:
                out[...] = grid
            else:
                np.add(grid, b3, out=out)
    parallel_for(part, g.N, uses_blas=False)
    return True


# --------------------------------------------------------------------------- backward
def backward_part(g, im, dxT, dyT3):
    """The per-images part for ``conv``'s backward loop (returns ``(dW, db)`` sums of its
    images, dx written), or None when no kernel is available."""
    kdw = _gemm.kernel_for(g.K, g.Cout, g.dtype, mode='atab')
    if kdw is None:
        return None
    dx_step = _flip_dx_step(g, im) if im.flip_dx else _phase_dx_step(g, im)
    xT, Cout = g.x.T, g.Cout

    def part(a, b, _):
        buf = im.phase_buffer()
        dyt = np.empty(kdw.panel_shape(im.ncols, Cout), dtype=g.dtype)
        pdwT = np.zeros((g.K, Cout), dtype=g.dtype)
        pdb = None if g.b is None else dyT3[a:b].sum(axis=(0, 2))
        dx_buffers = dx_step.buffers()
        call = None
        for n in range(a, b):
            d3 = dyT3[n].reshape(Cout, g.Wo, g.Ho)
            _k.pack_grid_transposed(d3, dyt, im.Hph)
            src = im.source(buf, xT[n])
            if call is None:
                call = kdw.prepare(src, dyt, pdwT, accumulate=True, a_offsets=im.boff,
                                   b_panels=True)
            call(a=src)
            dx_step(d3, dxT[n], dx_buffers)
        return pdwT.T, pdb
    part.uses_blas = False
    return part


class _flip_dx_step:
    """Stride 1: ``dx`` of one image as one GEMM of the flipped filters on padded dy."""

    def __init__(self, g, im):
        self.g, self.im = g, im
        wd, self.table, self.ncols = im.flipped_filters()
        self.kern = _gemm.kernel_for(g.Cin, self.ncols, g.dtype, mode='btab')
        self.wdp = row_blocks(self.kern, wd)

    def buffers(self):
        g, im = self.g, self.im
        dypad = np.zeros((g.Cout, im.Wd, im.Hd), dtype=g.dtype)
        dxpad = np.empty((g.C, g.W * im.Hd), dtype=g.dtype)
        call = self.kern.prepare(self.wdp, dypad.reshape(-1), dxpad[:, :self.ncols],
                                 a_panels=True, b_offsets=self.table)
        return dypad, call, dxpad.reshape(g.C, g.W, im.Hd)[:, :, :g.H]

    def __call__(self, d3, dx_img, bufs):
        g, im = self.g, self.im
        dypad, call, grid = bufs
        dypad[:, im.dpl:im.dpl + g.Wo, im.dpt:im.dpt + g.Ho] = d3
        call()
        dx_img[...] = grid


class _phase_dx_step:
    """Any stride: ``dx`` of one image as one GEMM per phase of the padded input."""

    def __init__(self, g, im):
        self.g, self.im = g, im
        self.steps = []
        for a, b, ap, table, u0, nu, v0, nv in im.phases():
            ncols = (nu - 1) * im.Hd + nv
            kern = _gemm.kernel_for(g.Cin, ncols, g.dtype, mode='btab')
            self.steps.append((a, b, kern, row_blocks(kern, ap), table, u0, nu, v0, nv, ncols))
        covered = sum(step[6] * step[8] for step in self.steps)   # nu * nv
        self.complete = covered == g.W * g.H   # else some pixels are read by no tap: zero

    def buffers(self):
        g, im = self.g, self.im
        dypad = np.zeros((g.Cout, im.Wd, im.Hd), dtype=g.dtype)
        dph = np.empty(g.C * im.Wph * im.Hd, dtype=g.dtype)
        calls = []
        for a, b, kern, ap, table, u0, nu, v0, nv, ncols in self.steps:
            out = dph[:g.C * nu * im.Hd].reshape(g.C, nu * im.Hd)
            calls.append((kern.prepare(ap, dypad.reshape(-1), out[:, :ncols], a_panels=True,
                                       b_offsets=table),
                          out, u0 * g.sx + a - g.pl, v0 * g.sy + b - g.pt, nu, nv))
        return dypad, calls

    def __call__(self, d3, dx_img, bufs):
        g, im = self.g, self.im
        dypad, calls = bufs
        dypad[:, im.dpl:im.dpl + g.Wo, im.dpt:im.dpt + g.Ho] = d3
        if not self.complete:
            dx_img[...] = 0
        for call, out, x0, y0, nu, nv in calls:
            call()
            _k.from_phase(out, dx_img, x0, y0, g.sx, g.sy, nu, nv)


