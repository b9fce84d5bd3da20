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
(kernel mode 'btab'). For one image the kernel runs one group of Ho columns per output
column, written straight into ``y``, so the ``Hph - Ho`` grid rows between output columns
cost nothing. Maps under IMPLICIT_STACK_BELOW rows are stacked instead, several images
to one tall image with zero rows between them (its grid's gap rows are computed and
dropped: 9/8 of the work at 8x8 with 3x3 filters), and copied out.

Forward of small maps, image-interleaved (:func:`forward_interleaved`): m images share
one phase buffer with their pixels side by side, ``buf[c, a, b, u, v, j]`` for image j, so
every tap offset is multiplied by m and output column ``wo`` of all m images is one
contiguous run of ``Ho * m`` grid entries; the column groups then compute exactly the
output pixels (no rows between images, full tiles at 8x8), strided or not.

Filter derivative: the phase buffer through the same table as the rows of A (mode
'atab'): ``dW.T (K, Cout) += col (K, Q) @ dY.T (Q, Cout)``, ``dY.T`` packed on the grid
with zero rows in the dropped columns.

Input derivative, stride 1: the stride-1 correlation of ``dy`` zero-padded by
``fhe - 1 - pt`` (top) etc. with the filters flipped in both directions and transposed,
again one GEMM on an offset table, by column groups into ``dx`` for one image (needs each
padding at most the dilated filter size minus one). Any stride (or larger padding): per phase ``(a, b)``, the derivative of that
phase plane is the correlation of the padded ``dy`` with the flipped taps of that
phase: one GEMM per phase, each pixel of ``dx`` in exactly one phase (phases no tap
reads are zero).
"""
import threading

import numpy as np

from pydagnn.layers.kernels import gemm_cpu as _gemm
from pydagnn.layers.kernels import im2col_cpu as _k
from pydagnn.layers.kernels import implicit_cpu as _drv
from pydagnn.layers.kernels import threads_cpu as _threads
from pydagnn.layers.kernels.threads_cpu import parallel_for

__all__ = ['Implicit', 'forward', 'backward_part', 'row_blocks', 'IMPLICIT_MAX_PAD_RATIO',
           'IMPLICIT_MIN_K_BACKWARD', 'IMPLICIT_STRIDED_MIN_HO', 'IMPLICIT_STRIDED_BACKWARD',
           'IMPLICIT_AVX2_MIN_PIXELS', 'IMPLICIT_STACK_BELOW', 'IMPLICIT_STACK_ROWS',
           'interleave_count', 'forward_interleaved', 'INTERLEAVE_BELOW', 'INTERLEAVE_STRIDE1_BELOW',
           'INTERLEAVE_COLUMNS', 'INTERLEAVE_MAX_BYTES', 'ONE_IMAGE_PARTS_PER_WORKER', 'parts_per_worker',
           'ONE_IMAGE_DRIVERS']

#: the implicit form runs where its grid is at most this many times the output pixels
#: (the extra rows are computed and dropped) and, for the backward pass, the column
#: matrix has at least IMPLICIT_MIN_K_BACKWARD rows (see Implicit.of)
IMPLICIT_MAX_PAD_RATIO = 1.2
IMPLICIT_MIN_K_BACKWARD = 16   # ResNet18's 3-channel input layer (K = 27): 4.7 vs 5.8 ms
#: strided convolutions: the implicit forward only from this output height on, and the
#: implicit backward only when this is True (measured, ResNet18's stride-2 layers at batch
#: 32 on 2 cores: forward 2.6-2.7 against 3.4-3.6 ms at 32x32 output, 2.5 against 2.6 at
#: 16x16, 3.7 against 1.9 at 8x8, slower for 1x1 filters; backward 30-90% slower: its
#: per-phase GEMMs are short). The phase code is exact either way (the tests run it with
#: these relaxed).
IMPLICIT_STRIDED_MIN_HO = 16
IMPLICIT_STRIDED_BACKWARD = False
#: without AVX-512 (16 vector registers: smaller tiles), only maps of at least this many
#: output pixels run implicit. Measured only with the 256-bit kernels forced on the
#: AVX-512 machine (PYDAGNN_GEMM_BITS=256) against AVX-512 OpenBLAS: 64x64 maps 1.5x
#: faster, 16x16 and 8x8 1.3-1.5x slower; on a real AVX2 machine OpenBLAS is slower too,
#: so this is the cautious side.
IMPLICIT_AVX2_MIN_PIXELS = 2048
#: stride-1 maps of fewer output rows than IMPLICIT_STACK_BELOW are stacked (see
#: _stack_count) up to IMPLICIT_STACK_ROWS rows. Measured at batch 32, 2 cores: 32x32x32
#: one image per GEMM (column groups) 2.9/6.3-6.7 ms forward/backward against 3.0/7.3-8.1
#: stacked by 2; 16x16x64 stacked by 4 2.9/6.4 against 3.6/7.3 by 2
IMPLICIT_STACK_BELOW = 32
IMPLICIT_STACK_ROWS = 64
#: the forward of strided maps under INTERLEAVE_BELOW output rows, and of stride-1 maps
#: under INTERLEAVE_STRIDE1_BELOW, interleaves about INTERLEAVE_COLUMNS / Ho images per
#: GEMM (see forward_interleaved). Measured at batch 32, one core, against the forms
#: before: 8x8x128 4.40 -> 4.00 ms, 32x32x32 -> 16x16x64 stride 2 3.32 -> 2.99,
#: 16x16x64 -> 8x8x128 stride 2 3.10 (im2col + OpenBLAS) -> 2.69; but 16x16x64 stride 1
#: 3.94 -> 4.18 (the stacked grid wastes only 8% there, less than the copies cost)
INTERLEAVE_BELOW = 32
INTERLEAVE_STRIDE1_BELOW = 16
INTERLEAVE_COLUMNS = 64
INTERLEAVE_MAX_BYTES = 8 << 20
#: parts per worker thread of the implicit forward and backward when a chunk is one
#: image (maps of 32x32 and larger): the threads take small parts in turn, so that the
#: one that finishes first waits less for the other at the end of the call (with 2 parts
#: per thread it waited half a part, ~1/8 of the call, on average). Each thread keeps its
#: buffers and prepared kernel calls from part to part (:class:`_ThreadState`); a part
#: costs one filter-derivative sum more in the backward pass.
ONE_IMAGE_PARTS_PER_WORKER = 8
#: a part of one-image chunks runs as one numba call (:mod:`.kernels.implicit_cpu`: the
#: loop over its images, their copies and GEMM calls without the GIL) where this is True;
#: False runs the same steps from Python, image by image (the form the drivers replace,
#: kept for the tests that compare the two)
ONE_IMAGE_DRIVERS = True


class Implicit:
    """The implicit form of one checked convolution call (a ``conv._Geom``)."""

    @classmethod
    def of(cls, g, backward=False):
        """The form for a checked call, or None where it does not apply or is slower
        than im2col + OpenBLAS. Measured (ResNet18's layers, batch 32, one and two
        cores): stride 1 at 64x64-8x8 (small maps stacked) 1.2-2.3x faster forward and
        backward, the 3-channel input layer too; most strided convolutions are not
        (IMPLICIT_STRIDED_*), nor backward GEMMs of very few rows."""
        if (g.G != 1 or g.fc or g.pointwise or not _gemm.enabled()
                or g.dtype not in (np.float32, np.float64)
                or (backward and g.K < IMPLICIT_MIN_K_BACKWARD)):
            return None
        if (g.sx, g.sy) != (1, 1) and (g.Ho < IMPLICIT_STRIDED_MIN_HO or g.FH * g.FW == 1
                                       or (backward and not IMPLICIT_STRIDED_BACKWARD)):
            return None
        if _gemm.vector_registers() < 32 and g.P < IMPLICIT_AVX2_MIN_PIXELS:
            return None
        im = cls(g, _stack_count(g))
        # grid columns computed per chunk of m images, against the output pixels
        if g.Wo * im.Hph > IMPLICIT_MAX_PAD_RATIO * g.P * im.m:
            return None
        return im

    def __init__(self, g, m=1):
        self.g = g
        sx, sy = g.sx, g.sy
        # m images stacked along H with z zero rows between them: one tall image of
        # height H (its own zero rows keep each image's padding; see _stack_count)
        self.m = m
        self.z = max(g.pt, g.pb) if m > 1 else 0
        self.step = g.H + self.z   # rows from one image to the next
        self.H = m * self.step - self.z
        self.Ho = g.Ho + (m - 1) * self.step   # stride 1 when m > 1
        self._chunks = {}   # shorter chunks' forms (not self: no reference cycle, which
        # would keep the geometry and its arrays alive until the garbage collector runs)
        self._lock = threading.Lock()
        self.Wp, self.Hp = g.W + g.pl + g.pr, self.H + g.pt + g.pb
        self.Wph, self.Hph = -(-self.Wp // sx), -(-self.Hp // sy)
        # stride 1 without padding: the image itself is the phase buffer
        self.direct = sx == sy == 1 and m == 1 and (g.pt, g.pb, g.pl, g.pr) == (0, 0, 0, 0)
        self.boff = self._forward_table()
        self.ncols = (g.Wo - 1) * self.Hph + self.Ho
        pads = (g.fhe - 1 - g.pt, g.fhe - 1 - g.pb, g.fwe - 1 - g.pl, g.fwe - 1 - g.pr)
        self.flip_dx = sx == sy == 1 and min(pads) >= 0
        if self.flip_dx:
            self.dpt, self.dpl = pads[0], pads[2]
            self.Wd, self.Hd = g.W + g.fwe - 1, self.H + g.fhe - 1
        else:   # per phase: dy padded by the largest tap shift
            self.dpl, self.dpt = (g.FW - 1) * g.rx // sx, (g.FH - 1) * g.ry // sy
            self.Wd, self.Hd = self.Wph + self.dpl, self.Hph + self.dpt

    def _forward_table(self):
        """``boff`` (int64, K): the offset of each column-matrix row in the flat phase
        buffer (the module docstring's formula)."""
        g = self.g
        fw, fh = np.arange(g.FW) * g.rx, np.arange(g.FH) * g.ry
        plane = self.Wph * self.Hph
        phase = (np.arange(g.C)[:, None, None] * g.sx + (fw % g.sx)[None, :, None]) * g.sy \
            + (fh % g.sy)[None, None, :]
        return (phase * plane + (fw // g.sx)[None, :, None] * self.Hph
                + (fh // g.sy)[None, None, :]).astype(np.int64).ravel()

    # ------------------------------------------------------------------ buffers
    def phase_buffer(self):
        """A phase buffer (C, sx, sy, Wph, Hph) for :meth:`source` (zeroed where
        :meth:`source` writes only the pixels), or None."""
        if self.direct:
            return None
        shape = (self.g.C, self.g.sx, self.g.sy, self.Wph, self.Hph)
        if (self.g.sx, self.g.sy) == (1, 1):   # rows_into writes every entry
            return np.empty(shape, dtype=self.g.dtype)
        return np.zeros(shape, dtype=self.g.dtype)

    def chunk(self, m):
        """The form for a chunk of ``m <= self.m`` images (the last of a part)."""
        if m == self.m:
            return self
        with self._lock:   # parts in several threads ask for it
            if m not in self._chunks:
                self._chunks[m] = Implicit(self.g, m)
            return self._chunks[m]

    def source(self, buf, xT, n0):
        """Images ``n0 .. n0+m-1`` of ``xT`` (N, C, W, H) as the flat phase buffer (their
        pixels written into ``buf``, the padding zero), or image n0 itself
        when direct."""
        if buf is None:
            return xT[n0].reshape(-1)
        g = self.g
        if (g.sx, g.sy) == (1, 1):   # one numba call for the chunk
            _k.rows_into(xT, n0, self.m, buf.reshape(g.C, self.Wp, self.Hp), g.pl, g.pt, self.step)
        else:
            _k.to_phases(xT[n0], buf, g.pt, g.pl)
        return buf.reshape(-1)

    def tall_dy(self, buf, dyT3, n0):
        """The derivatives of images ``n0..`` as the tall (Cout, Wo, Ho) map: image j's
        rows in ``buf`` (the rows between images zero), or image n0's own view."""
        g = self.g
        if self.m == 1:
            return dyT3[n0].reshape(g.Cout, g.Wo, g.Ho)
        _k.rows_into(dyT3.reshape(g.N, g.Cout, g.Wo, g.Ho), n0, self.m, buf, 0, 0, self.step)
        return buf

    def flipped_filters(self):
        """Stride 1: ``Wd`` (Cin, Cout * FW * FH), ``Wd[c, (co * FW + fw) * FH + fh] =
        w[FH-1-fh, FW-1-fw, c, co]``."""
        g = self.g
        wT = g.w.T   # (Cout, Cin, FW, FH)
        return np.ascontiguousarray(wT.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]).reshape(
            g.Cin, g.Cout * g.FW * g.FH)

    def flipped_table(self):
        """The offsets of the flipped filters' rows in the padded dy (Cout, Wd, Hd), and
        the number of grid columns of the dx GEMM."""
        g = self.g
        table = (np.arange(g.Cout, dtype=np.int64)[:, None, None] * (self.Wd * self.Hd)
                 + np.arange(g.FW, dtype=np.int64)[None, :, None] * (g.rx * self.Hd)
                 + np.arange(g.FH, dtype=np.int64)[None, None, :] * g.ry).ravel()
        return table, (g.W - 1) * self.Hd + self.H

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


_NO_BIAS = {'f': np.zeros(0, np.float32), 'd': np.zeros(0, np.float64)}
_EMPTY3 = {'f': np.zeros((0, 0, 0), np.float32), 'd': np.zeros((0, 0, 0), np.float64)}


def parts_per_worker(im):
    """The ``parallel_for`` parts per thread of an implicit call: ONE_IMAGE_PARTS_PER_WORKER
    when its chunks are single images, else the default (None): stacked chunks are
    already a worker's part or a half of it (_stack_count)."""
    return ONE_IMAGE_PARTS_PER_WORKER if im.m == 1 else None


class _ThreadState(threading.local):
    """Per worker thread, for one call: its chunk states (buffers, prepared kernel calls)
    by chunk size, kept from one of its parts to the next."""

    def __init__(self):
        self.states = {}


def _stack_count(g):
    """Images per implicit GEMM: stride-1 maps under IMPLICIT_STACK_BELOW rows high are
    stacked (up to IMPLICIT_STACK_ROWS output rows), so the dropped rows between output columns
    are shared by several images (8x8 with 3x3 filters: 9/8 of the work instead of 10/8)
    and a call has enough columns. Images are separated by max(pt, pb) zero rows, which
    give each its own padding and keep apart the derivatives of the backward pass (that
    needs each padding at most the dilated filter minus one, as the flipped dx does)."""
    if (g.sx, g.sy) != (1, 1) or g.Ho >= IMPLICIT_STACK_BELOW or max(g.pt, g.pb) > g.fhe - 1 \
            or max(g.pl, g.pr) > g.fwe - 1:
        return 1
    # no more than a worker's part of the batch (parallel_for's split), or every chunk
    # would be a short one
    parts = max(1, min(g.N, _threads.num_workers() * _threads.PARTS_PER_WORKER))
    return max(1, min(-(-g.N // parts), IMPLICIT_STACK_ROWS // g.Ho))


def _image_range(phase, pad, stride, size, nph):
    """Phase-plane indices u with ``0 <= u * stride + phase - pad < size``: [u0, u1)."""
    u0 = max(0, -(-(pad - phase) // stride))
    u1 = min(nph, -(-(size + pad - phase) // stride))
    return u0, max(u0, u1)


def row_blocks(kern, m):
    """``m`` (M, K) packed as the kernel's row blocks (one contiguous stream for its A)."""
    ap = np.empty(kern.a_panel_shape(*m.shape), dtype=m.dtype)
    _k.pack_row_blocks(np.ascontiguousarray(m), ap)
    return ap


def flipped_row_blocks(kern, w):
    """The filters ``w`` (FH, FW, Cin, Cout) flipped and transposed as
    :meth:`Implicit.flipped_filters` gives them, packed as the kernel's row blocks in
    one pass (the strided copy and the pack took 2-4x longer)."""
    FH, FW, Cin, Cout = w.shape
    ap = np.empty(kern.a_panel_shape(Cin, Cout * FW * FH), dtype=w.dtype)
    _k.pack_flipped_row_blocks(np.ascontiguousarray(w.T), ap)
    return ap


# --------------------------------------------------------------------------- forward
def forward(g, im, y):
    """``y`` (Ho, Wo, Cout, N), Fortran, from a checked call ``g``; False when no kernel
    is available (the caller then takes the im2col path).

    A chunk of one image writes straight into ``y``: the kernel's column groups (one
    per output column, see :meth:`gemm_cpu.Kernel.prepare`) skip the grid's dropped rows
    without computing them. A stacked chunk computes its tall grid and copies the
    images out (their output columns are too short for groups)."""
    kern1 = _gemm.kernel_for(g.Cout, g.Ho, g.dtype, mode='btab')
    if kern1 is None:
        return False
    kernm = _gemm.kernel_for(g.Cout, im.ncols, g.dtype, mode='btab') if im.m > 1 else kern1
    packed, lock = {}, threading.Lock()

    def filters(kern):   # packed on first use: kern1 serves only chunks of one image
        with lock:
            if kern.mr not in packed:
                packed[kern.mr] = row_blocks(kern, g.wmat())
            return packed[kern.mr]
    xT = g.x.T
    yT3 = y.T.reshape(g.N, g.Cout, g.P)
    y4 = y.T.reshape(g.N, g.Cout, g.Wo, g.Ho)
    bias = _NO_BIAS[g.dtype.char] if g.b is None else g.b
    bcol = None if g.b is None else g.b[:, None]

    def chunk_state(c):
        buf = c.phase_buffer()
        if c.m == 1:
            return [buf, None, None, None]
        ypad = np.empty((g.Cout, g.Wo * c.Hph), dtype=g.dtype)
        return [buf, ypad, ypad.reshape(g.Cout, g.Wo, c.Hph), None]

    local = _ThreadState()

    def driven_part(a, b):   # one-image chunks, the whole part in one numba call
        st = local.states.get(1) or local.states.setdefault(1, chunk_state(im))
        if st[3] is None:   # checked once per thread; the driver moves only B and C
            src = xT[a].reshape(-1) if st[0] is None else st[0].reshape(-1)
            call = kern1.prepare(filters(kern1), src, yT3[a], a_panels=True, b_offsets=im.boff,
                                 groups=(g.Wo, g.Ho, im.Hph, g.Ho))
            st[3] = call, call.addresses()
        call, args = st[3]
        if args is None:   # an empty product: the Python loop handles it
            return False
        if (g.sx, g.sy) == (1, 1):
            buf3 = _EMPTY3[g.dtype.char] if st[0] is None else st[0].reshape(g.C, im.Wp, im.Hp)
            _drv.forward_images(kern1.fn_int, args, xT, a, b, buf3, g.pl, g.pt, yT3, bias)
        else:
            _drv.forward_phase_images(kern1.fn_int, args, xT, a, b, st[0], g.pt, g.pl, yT3, bias)
        return True

    def part(a, b, _):
        if im.m == 1 and ONE_IMAGE_DRIVERS and driven_part(a, b):
            return
        states = local.states
        for n0 in range(a, b, im.m):
            c = im.chunk(min(im.m, b - n0))
            st = states.get(c.m) or states.setdefault(c.m, chunk_state(c))
            buf, ypad, grid, call = st
            src = c.source(buf, xT, n0)
            if c.m == 1:
                if isinstance(call, tuple):   # prepared by driven_part
                    call = call[0]
                if call is None:   # checked once; per image only the arrays move
                    call = st[3] = kern1.prepare(filters(kern1), src, yT3[n0], a_panels=True,
                                                 b_offsets=c.boff,
                                                 groups=(g.Wo, g.Ho, c.Hph, g.Ho))
                call(b=src, c=yT3[n0])
                if bcol is not None:
                    yT3[n0] += bcol
                continue
            if call is None:
                call = st[3] = kernm.prepare(filters(kernm), src, ypad[:, :c.ncols],
                                             a_panels=True, b_offsets=c.boff)
            call(b=src)
            _k.rows_from(grid, y4, n0, c.m, 0, c.step, bias)
    parallel_for(part, g.N, uses_blas=False, parts_per_worker=parts_per_worker(im))
    return True


# ------------------------------------------------------------- forward, interleaved
def interleave_count(g):
    """Images per GEMM of the image-interleaved forward (:func:`forward_interleaved`), or
    1 where it does not apply: small maps (INTERLEAVE_BELOW, INTERLEAVE_STRIDE1_BELOW), 3x3-like
    filters (not 1x1), the 32-register kernels. Enough images that a column group (an
    output column of every image) fills the kernel's 64-wide tiles, but no more than a
    worker's part of the batch."""
    if (g.G != 1 or g.fc or g.pointwise or not _gemm.enabled() or g.FH * g.FW == 1
            or g.dtype not in (np.float32, np.float64) or _gemm.vector_registers() < 32
            or g.Ho >= (INTERLEAVE_STRIDE1_BELOW if (g.sx, g.sy) == (1, 1) else INTERLEAVE_BELOW)):
        return 1
    parts = max(1, min(g.N, _threads.num_workers() * _threads.PARTS_PER_WORKER))
    # the padded phase buffer of one image: at most INTERLEAVE_MAX_BYTES for all m
    # (a large image with a tiny output, e.g. a big unpadded filter, gets fewer)
    one = g.C * (-(-(g.W + g.pl + g.pr) // g.sx) * g.sx) * (-(-(g.H + g.pt + g.pb) // g.sy) * g.sy)
    cap = INTERLEAVE_MAX_BYTES // max(1, one * g.dtype.itemsize)
    return max(1, min(-(-g.N // parts), -(-INTERLEAVE_COLUMNS // g.Ho), cap))


def forward_interleaved(g, m, y):
    """``y`` (Ho, Wo, Cout, N) from a checked call, ``m`` images per GEMM with their
    pixels interleaved (innermost): the phase buffer (C, sx, sy, Wph, Hph, m) holds for
    every padded pixel the m images' values side by side, so output column ``wo`` of all
    m images is one contiguous run of ``Ho * m`` grid entries per tap: the kernel's
    column groups (one per output column) compute exactly the output pixels, with full
    tiles even for 8x8 maps, any stride (the stacked form computes the rows between
    images and, strided, runs groups of Ho columns). False when no kernel is available."""
    kern = _gemm.kernel_for(g.Cout, g.Ho * m, g.dtype, mode='btab')
    if kern is None:
        return False
    one = Implicit(g, 1)              # the one-image phase grid and its tap offsets
    packed = row_blocks(kern, g.wmat())
    xT = g.x.T
    y4 = y.T.reshape(g.N, g.Cout, g.Wo, g.Ho)
    bias = _NO_BIAS[g.dtype.char] if g.b is None else g.b

    def chunk_state(mc):
        buf = np.empty((g.C, g.sx, g.sy, one.Wph, one.Hph, mc), dtype=g.dtype)
        out = np.empty((g.Cout, g.Wo, g.Ho, mc), dtype=g.dtype)
        call = kern.prepare(packed, buf.reshape(-1), out.reshape(g.Cout, -1), a_panels=True,
                            b_offsets=one.boff * mc,
                            groups=(g.Wo, g.Ho * mc, one.Hph * mc, g.Ho * mc))
        return buf, out, call

    local = _ThreadState()   # each thread's buffers and checked calls, from part to part

    def part(a, b, _):
        states = local.states
        for n0 in range(a, b, m):
            mc = min(m, b - n0)
            buf, out, call = states.get(mc) or states.setdefault(mc, chunk_state(mc))
            _k.to_phases_interleaved(xT, n0, buf, g.pt, g.pl)
            call()
            _k.from_interleaved(out, y4, n0, bias)
    parallel_for(part, g.N, uses_blas=False)
    return True


# --------------------------------------------------------------------------- backward
def backward_part(g, im, dxT, dyT3):
    """The per-images part for ``conv``'s backward loop (returns ``(dW, db)`` sums of its
    images, dx written), or None when no kernel is available."""
    kdw = _gemm.kernel_for(g.K, g.Cout, g.dtype, mode='atab')
    if kdw is None:
        return None
    steps, lock, packed = {}, threading.Lock(), {}

    def dx_step(c, wait=True):
        """Per chunk size, made on first use (by whichever thread) and shared; with
        ``wait`` False, made now unless another thread is at it (then None)."""
        if not lock.acquire(blocking=wait):
            return None
        try:
            if c.m not in steps:
                steps[c.m] = _flip_dx_step(g, c, packed) if c.flip_dx else _phase_dx_step(g, c)
            return steps[c.m]
        finally:
            lock.release()
    xT, Cout = g.x.T, g.Cout

    def chunk_state(c):
        dyt = np.empty(kdw.panel_shape(c.ncols, Cout), dtype=g.dtype)
        tall = np.empty((Cout, g.Wo, c.Ho), dtype=g.dtype) if c.m > 1 else None
        return [c.phase_buffer(), dyt, tall, list(dx_step(c).buffers()), None]

    local = _ThreadState()
    dyT4 = dyT3.reshape(g.N, Cout, g.Wo, g.Ho)

    def driven_part(a, b, pdwT):   # stride 1, one-image chunks: one numba call
        st = local.states.get(1) or local.states.setdefault(1, chunk_state(im))
        buf, dyt, _, dx_buffers, call = st
        step = dx_step(im)
        if call is None:
            src = xT[a].reshape(-1) if buf is None else buf.reshape(-1)
            call = st[4] = kdw.prepare(src, dyt, pdwT, accumulate=True, a_offsets=im.boff,
                                       b_panels=True)
        dx_call = step.one_image_call(dx_buffers, dxT[a].reshape(g.C, g.W * g.H))
        args_dw, args_dx = call.addresses(c=pdwT), dx_call.addresses()
        if args_dw is None or args_dx is None:   # an empty product: the Python loop
            return False
        buf3 = _EMPTY3[g.dtype.char] if buf is None else buf.reshape(g.C, im.Wp, im.Hp)
        _drv.backward_images(kdw.fn_int, args_dw, step.kern.fn_int, args_dx, xT, dyT4, dxT,
                             a, b, buf3, g.pl, g.pt, dyt, im.Hph, dx_buffers[0], im.dpl, im.dpt)
        return True

    def part(a, b, _):
        pdwT = np.zeros((g.K, Cout), dtype=g.dtype)
        pdb = None if g.b is None else dyT3[a:b].sum(axis=(0, 2))
        # the first thread here makes the dx step (packs its filters) while the others
        # start their first filter derivative; else all reach their first dx together
        # and wait for it (ResNet18's 8x8x128 backward: 250-430 us)
        dx_step(im, wait=False)
        if im.m == 1 and im.flip_dx and ONE_IMAGE_DRIVERS and driven_part(a, b, pdwT):
            return pdwT.T, pdb
        states = local.states
        for n0 in range(a, b, im.m):
            c = im.chunk(min(im.m, b - n0))
            st = states.get(c.m) or states.setdefault(c.m, chunk_state(c))
            buf, dyt, tall, dx_buffers, call = st
            d3 = c.tall_dy(tall, dyT3, n0)
            _k.pack_grid_transposed(d3, dyt, c.Hph)
            src = c.source(buf, xT, n0)
            if call is None:
                call = st[4] = kdw.prepare(src, dyt, pdwT, accumulate=True,
                                           a_offsets=c.boff, b_panels=True)
            call(a=src, c=pdwT)   # this part's sum
            dx_step(c)(d3, dxT, n0, dx_buffers)
        return pdwT.T, pdb
    return part


class _flip_dx_step:
    """Stride 1: ``dx`` of a chunk of images as one GEMM of the flipped filters on the
    padded dy: written straight into ``dx`` by column groups for one image, through the
    tall grid for a stacked chunk (as the forward)."""

    def __init__(self, g, im, packed):
        """``packed``: {MR: flipped filters as row blocks}, shared by the chunk sizes."""
        self.g, self.im = g, im
        self.table, self.ncols = im.flipped_table()
        self.kern = _gemm.kernel_for(g.Cin, g.H if im.m == 1 else self.ncols, g.dtype,
                                     mode='btab')
        if self.kern.mr not in packed:
            packed[self.kern.mr] = flipped_row_blocks(self.kern, g.w)
        self.wdp = packed[self.kern.mr]

    def buffers(self):
        g, im = self.g, self.im
        dypad = np.empty((g.Cout, im.Wd, im.Hd), dtype=g.dtype)   # rows_into writes it all
        if im.m == 1:
            return dypad, None, None
        dxpad = np.empty((g.C, g.W * im.Hd), dtype=g.dtype)
        call = self.kern.prepare(self.wdp, dypad.reshape(-1), dxpad[:, :self.ncols],
                                 a_panels=True, b_offsets=self.table)
        return dypad, call, dxpad.reshape(g.C, g.W, im.Hd)

    def one_image_call(self, bufs, out):
        """One image: the prepared GEMM from the padded dy of ``bufs`` into ``out`` (an
        image's dx as (C, W*H)), made on first use; per image only dx moves."""
        g, im = self.g, self.im
        if bufs[1] is None:
            bufs[1] = self.kern.prepare(self.wdp, bufs[0].reshape(-1), out, a_panels=True,
                                        b_offsets=self.table, groups=(g.W, g.H, im.Hd, g.H))
        return bufs[1]

    def __call__(self, d3, dxT, n0, bufs):
        """dx of the images n0.. of the chunk from their tall dy ``d3``."""
        g, im = self.g, self.im
        dypad, call, grid = bufs
        _k.rows_into(d3[None], 0, 1, dypad, im.dpl, im.dpt, 0)
        if im.m == 1:
            out = dxT[n0].reshape(g.C, g.W * g.H)
            self.one_image_call(bufs, out)(c=out)
            return
        call()
        _k.rows_from(grid, dxT, n0, im.m, 0, im.step, _NO_BIAS[g.dtype.char])


class _phase_dx_step:
    """Any stride: ``dx`` of one image as one GEMM per phase of the padded input (never
    stacked: _stack_count)."""

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

    def __call__(self, d3, dxT, n0, bufs):
        g, im = self.g, self.im
        dx_img = dxT[n0]
        dypad, calls = bufs
        dypad[:, im.dpl:im.dpl + g.Wo, im.dpt:im.dpt + g.Ho] = d3
        if not self.complete:
            dx_img[...] = 0
        for call, out, x0, y0, nu, nv in calls:
            call()
            _k.from_phase(out, dx_img, x0, y0, g.sx, g.sy, nu, nv)


