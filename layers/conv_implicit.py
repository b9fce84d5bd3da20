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

Kept from call to call: a geometry's form (:meth:`Implicit.of`: tables, kernels) and, per
thread, its work buffers and checked kernel calls (detached: they hold no operand), within
FORM_CACHE_SIZE forms and FORM_CACHE_BYTES of buffers. Per call only the filters are packed
again. A part of one-image chunks runs as one numba call (:mod:`.kernels.implicit_cpu`).
"""
import collections
import threading
import weakref

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
           'ONE_IMAGE_DRIVERS', 'Geometry', 'FORM_CACHE_SIZE', 'clear_forms', 'phase_filters']

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
#: buffers and prepared kernel calls from part to part and call to call; a part
#: costs one filter-derivative sum more in the backward pass.
ONE_IMAGE_PARTS_PER_WORKER = 8
#: a part of one-image chunks runs as one numba call (:mod:`.kernels.implicit_cpu`: the
#: loop over its images, their copies and GEMM calls without the GIL) where this is True;
#: False runs the same steps from Python, image by image (the form the drivers replace,
#: kept for the tests that compare the two)
ONE_IMAGE_DRIVERS = True


#: implicit forms kept from call to call (each with its tables, kernels and, per thread,
#: its work buffers and checked kernel calls), the least recently used dropped first.
#: Why: before each call's parallel region its form took 50 us of Python warm and
#: 300-750 us after a big kernel had swept the caches, and each thread's first part
#: another 200-900 us to make its buffers and check its kernel calls, holding the GIL
#: (ResNet18's 8x8x128 backward: the first GEMM started ~1 ms into a 7 ms call).
FORM_CACHE_SIZE = 64
#: and no more than this many bytes of work buffers in all (the least recently used
#: forms dropped first; the one in use is kept whatever its size)
FORM_CACHE_BYTES = 256 << 20

_forms = collections.OrderedDict()
_forms_lock = threading.Lock()


def clear_forms():
    """Drop the kept forms (and their work buffers)."""
    with _forms_lock:
        _forms.clear()


#: False: every call makes its forms anew (nothing kept; to time the difference)
KEEP_FORMS = True


def _kept(key, make):
    """The kept value for ``key``, else ``make()`` kept (FORM_CACHE_SIZE at most)."""
    if not KEEP_FORMS:
        return make()
    with _forms_lock:
        if key in _forms:
            _forms.move_to_end(key)
            return _forms[key]
    value = make()
    with _forms_lock:
        value = _forms.setdefault(key, value)   # another thread may have made it first
        if value is not None:
            value.cache_key = key
        _trim(key)
    return value


def _trim(key):
    """Drop the least recently used forms, not ``key``'s, while there are more than
    FORM_CACHE_SIZE or their buffers exceed FORM_CACHE_BYTES (``_forms_lock`` held)."""
    def over():
        return len(_forms) > FORM_CACHE_SIZE or sum(
            getattr(f, 'nbytes', 0) for f in _forms.values()) > FORM_CACHE_BYTES
    while len(_forms) > 1 and over():
        oldest = next(iter(_forms))
        if oldest == key:
            _forms.move_to_end(key)
            oldest = next(iter(_forms))
        del _forms[oldest]
    if len(_forms) > FORM_CACHE_SIZE:   # FORM_CACHE_SIZE 0: keep none
        _forms.pop(key, None)


def _thread_state(form, local, size, make):
    """This thread's chunk state of ``size`` in ``local`` (made by ``make()`` on first
    use), its buffers counted in ``form.nbytes``; the forms are trimmed to the budget
    when a new state is made."""
    st = local.states.get(size)
    if st is None:
        st = local.states.setdefault(size, make())
        form.add_bytes(_nbytes(st))
        with _forms_lock:
            if _forms.get(form.cache_key) is form:
                _trim(form.cache_key)
    return st


def _nbytes(obj):
    """Bytes of the arrays an object of lists and tuples holds (views counted once per
    base)."""
    seen, total, todo = set(), 0, [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, (list, tuple)):
            todo.extend(o)
        elif isinstance(o, np.ndarray):
            base = o if o.base is None else o.base
            if isinstance(base, np.ndarray) and id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
    return total


class Geometry:
    """The shapes and options of a checked call (``conv._Geom``) without its arrays: what
    a kept form may hold (it must keep no feature map or filter bank alive)."""

    FIELDS = ('dtype', 'H', 'W', 'C', 'N', 'FH', 'FW', 'Cin', 'Cout', 'pt', 'pb', 'pl', 'pr',
              'sy', 'sx', 'ry', 'rx', 'G', 'fhe', 'fwe', 'Ho', 'Wo', 'P', 'Kg', 'K', 'fc',
              'pointwise')
    __slots__ = FIELDS

    def __init__(self, g):
        for f in self.FIELDS:
            setattr(self, f, getattr(g, f))

    def key(self):
        return tuple(getattr(self, f) for f in self.FIELDS)


def _settings():
    """What else decides a form (the tests change some of it)."""
    return (_gemm.enabled(), _gemm.vector_registers(), _threads.num_workers(),
            _threads.PARTS_PER_WORKER, IMPLICIT_MAX_PAD_RATIO, IMPLICIT_MIN_K_BACKWARD,
            IMPLICIT_STRIDED_MIN_HO, IMPLICIT_STRIDED_BACKWARD, IMPLICIT_AVX2_MIN_PIXELS,
            IMPLICIT_STACK_BELOW, IMPLICIT_STACK_ROWS)


class _ThreadState(threading.local):
    """Per thread, kept from call to call: chunk states (work buffers, checked kernel
    calls) by chunk size."""

    def __init__(self):
        self.states = {}


class Implicit:
    """The implicit form of a convolution geometry (a :class:`Geometry` of a checked call);
    :meth:`of` keeps one per geometry, with per thread the buffers of its forward
    (``forward_threads``) and backward (``backward_threads``) parts."""

    @classmethod
    def of(cls, g, backward=False):
        """The (kept) form for a checked call, or None where it does not apply or is
        slower than im2col + OpenBLAS. Measured (ResNet18's layers, batch 32, one and two
        cores): stride 1 at 64x64-8x8 (small maps stacked) 1.2-2.3x faster forward and
        backward, the 3-channel input layer too; most strided convolutions are not
        (IMPLICIT_STRIDED_*), nor backward GEMMs of very few rows."""
        geo = Geometry(g)
        return _kept(('implicit', backward, geo.key(), _settings()),
                     lambda: cls._make(geo, backward))

    @classmethod
    def _make(cls, g, backward):
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
        g = g if isinstance(g, Geometry) else Geometry(g)
        self.g = g
        sx, sy = g.sx, g.sy
        # m images stacked along H with z zero rows between them: one tall image of
        # height H (its own zero rows keep each image's padding; see _stack_count)
        self.m = m
        self.z = max(g.pt, g.pb) if m > 1 else 0
        self.step = g.H + self.z   # rows from one image to the next
        self.H = m * self.step - self.z
        self.Ho = g.Ho + (m - 1) * self.step   # stride 1 when m > 1
        self._chunks = {}   # shorter chunks' forms (not self: no reference cycle)
        self._dx_step = None   # made by dx_step on first use
        self._lock = threading.Lock()
        self.forward_threads, self.backward_threads = _ThreadState(), _ThreadState()
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
        self.kernels = {}   # (M, N, mode) -> kernel, chosen once
        self.nbytes = 0     # the work buffers its threads keep (see _thread_state)
        self.cache_key = None   # its key among the kept forms (_kept)

    def add_bytes(self, n):
        with self._lock:
            self.nbytes += n

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

    def kernel(self, M, N, mode):
        """The GEMM kernel for an (M, N) product of this form (kept), or None."""
        key = (M, N, mode)
        if key not in self.kernels:
            self.kernels[key] = _gemm.kernel_for(M, N, self.g.dtype, mode=mode)
        return self.kernels[key]

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

    def dx_step(self):
        """This chunk form's input-derivative step (kept; its filters come per call)."""
        with self._lock:
            if self._dx_step is None:
                self._dx_step = _FlipDx(self) if self.flip_dx else _PhaseDx(self)
            return self._dx_step

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

    def flipped_filters(self, w):
        """Stride 1: the filters ``w`` (FH, FW, Cin, Cout) as ``Wd`` (Cin, Cout * FW * FH),
        ``Wd[c, (co * FW + fw) * FH + fh] = w[FH-1-fh, FW-1-fw, c, co]``."""
        g = self.g
        wT = w.T   # (Cout, Cin, FW, FH)
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
        """Any stride: per phase (a, b) with taps, ``(a, b, fws, fhs, table, u0, nu, v0,
        nv)``: the phase's filter taps, the offsets of its rows in the padded dy (Cout, Wd,
        Hd), and the phase-plane columns ``u0 .. u0+nu`` and rows ``v0 .. v0+nv`` that
        hold image pixels (the GEMM's output grid, of column stride Hd)."""
        g = self.g
        out = []
        for a in range(g.sx):
            fws = [f for f in range(g.FW) if f * g.rx % g.sx == a]
            u0, u1 = _image_range(a, g.pl, g.sx, g.W, self.Wph)
            for b in range(g.sy):
                fhs = [f for f in range(g.FH) if f * g.ry % g.sy == b]
                v0, v1 = _image_range(b, g.pt, g.sy, g.H, self.Hph)
                if not fws or not fhs or u1 <= u0 or v1 <= v0:
                    continue
                du = self.dpl - np.array(fws) * g.rx // g.sx
                dv = self.dpt - np.array(fhs) * g.ry // g.sy
                table = (np.arange(g.Cout, dtype=np.int64)[:, None, None] * (self.Wd * self.Hd)
                         + (du[None, :, None] + u0) * self.Hd + (dv[None, None, :] + v0)).ravel()
                out.append((a, b, fws, fhs, table.astype(np.int64), u0, u1 - u0, v0, v1 - v0))
        return out


def phase_filters(w, fws, fhs):
    """The filters ``w`` (FH, FW, Cin, Cout) of one phase's taps as (Cin, Cout * taps)."""
    wT = w.T   # (Cout, Cin, FW, FH)
    ap = np.ascontiguousarray(wT[:, :, fws][:, :, :, fhs].transpose(1, 0, 2, 3))
    return ap.reshape(ap.shape[0], -1)


_NO_BIAS = {'f': np.zeros(0, np.float32), 'd': np.zeros(0, np.float64)}
_EMPTY3 = {'f': np.zeros((0, 0, 0), np.float32), 'd': np.zeros((0, 0, 0), np.float64)}


def parts_per_worker(im):
    """The ``parallel_for`` parts per thread of an implicit call: ONE_IMAGE_PARTS_PER_WORKER
    when its chunks are single images, else the default (None): stacked chunks are
    already a worker's part or a half of it (_stack_count)."""
    return ONE_IMAGE_PARTS_PER_WORKER if im.m == 1 else None


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


class _Packed:
    """A call's filters packed as row blocks, per kernel row count, on first use (by
    whichever thread asks first; the others wait)."""

    def __init__(self, matrix):
        self.matrix, self.blocks, self.lock = matrix, {}, threading.Lock()

    def __call__(self, kern):
        with self.lock:
            return self._packed(kern)

    def warm(self, kern):
        """Pack for ``kern`` now unless another thread is at it (then go on: it will be
        ready, or waited for, at the first use)."""
        if self.lock.acquire(blocking=False):
            try:
                self._packed(kern)
            finally:
                self.lock.release()

    def _packed(self, kern):   # self.lock held
        if kern.mr not in self.blocks:
            self.blocks[kern.mr] = self.pack(kern)
        return self.blocks[kern.mr]

    def pack(self, kern):
        return row_blocks(kern, self.matrix())


class _FlippedPacked(_Packed):
    """The flipped and transposed filters of a stride-1 input derivative (see
    :meth:`Implicit.flipped_filters`), packed per kernel on first use in one pass."""

    def __init__(self, w):
        super().__init__(None)
        self.w = w

    def pack(self, kern):
        FH, FW, Cin, Cout = self.w.shape
        ap = np.empty(kern.a_panel_shape(Cin, Cout * FW * FH), dtype=self.w.dtype)
        _k.pack_flipped_row_blocks(np.ascontiguousarray(self.w.T), ap)
        return ap


# --------------------------------------------------------------------------- forward
def forward(g, im, y):
    """``y`` (Ho, Wo, Cout, N), Fortran, from a checked call ``g``; False when no kernel
    is available (the caller then takes the im2col path).

    A chunk of one image writes straight into ``y``: the kernel's column groups (one
    per output column, see :meth:`gemm_cpu.Kernel.prepare`) skip the grid's dropped rows
    without computing them. A stacked chunk computes its tall grid and copies the
    images out (their output columns are too short for groups). Each thread's buffers
    and checked kernel calls are kept in ``im`` for the next call."""
    kern1 = im.kernel(g.Cout, g.Ho, 'btab')
    if kern1 is None:
        return False
    kernm = im.kernel(g.Cout, im.ncols, 'btab') if im.m > 1 else kern1
    filters = _Packed(g.wmat)
    xT = g.x.T
    yT3 = y.T.reshape(g.N, g.Cout, g.P)
    y4 = y.T.reshape(g.N, g.Cout, g.Wo, g.Ho)
    bias = _NO_BIAS[g.dtype.char] if g.b is None else g.b
    local = im.forward_threads

    def chunk_state(c, n0):
        """[buffer, ypad, its grid view, the checked call (detached)] of chunk form c."""
        buf = c.phase_buffer()
        src = xT[n0].reshape(-1) if buf is None else buf.reshape(-1)
        if c.m == 1:
            call = kern1.prepare(filters(kern1), src, yT3[n0], a_panels=True, b_offsets=c.boff,
                                 groups=(g.Wo, g.Ho, c.Hph, g.Ho))
            return [buf, None, None, call.detach()]
        ypad = np.empty((g.Cout, g.Wo * c.Hph), dtype=g.dtype)
        call = kernm.prepare(filters(kernm), src, ypad[:, :c.ncols], a_panels=True,
                             b_offsets=c.boff)
        return [buf, ypad, ypad.reshape(g.Cout, g.Wo, c.Hph), call.detach()]

    def state(c, n0):
        return _thread_state(im, local, c.m, lambda: chunk_state(c, n0))

    def driven_part(a, b):   # one-image chunks, the whole part in one numba call
        buf, _, _, call = state(im, a)
        src = xT[a].reshape(-1) if buf is None else buf.reshape(-1)
        args = call.addresses(a=filters(kern1), b=src, c=yT3[a])
        if args is None:   # an empty product: the Python loop handles it
            return False
        if (g.sx, g.sy) == (1, 1):
            buf3 = _EMPTY3[g.dtype.char] if buf is None else buf.reshape(g.C, im.Wp, im.Hp)
            _drv.forward_images(kern1.fn_int, args, xT, a, b, buf3, g.pl, g.pt, yT3, bias)
        else:
            _drv.forward_phase_images(kern1.fn_int, args, xT, a, b, buf, g.pt, g.pl, yT3, bias)
        return True

    def part(a, b, _):
        if im.m == 1 and ONE_IMAGE_DRIVERS and driven_part(a, b):
            return
        for n0 in range(a, b, im.m):
            c = im.chunk(min(im.m, b - n0))
            buf, ypad, grid, call = state(c, n0)
            src = c.source(buf, xT, n0)
            if c.m == 1:
                call(a=filters(kern1), b=src, c=yT3[n0])
                if g.b is not None:
                    yT3[n0] += g.b[:, None]
                continue
            call(a=filters(kernm), b=src, c=ypad[:, :c.ncols])
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
    images and, strided, runs groups of Ho columns). False when no kernel is available.
    The one-image grid, the kernel and each thread's buffers are kept for the next call."""
    geo = Geometry(g)
    one = _kept(('interleaved', m, geo.key(), _settings()), lambda: Implicit(geo, 1))
    kern = one.kernel(g.Cout, g.Ho * m, 'btab')
    if kern is None:
        return False
    packed = row_blocks(kern, g.wmat())
    xT = g.x.T
    y4 = y.T.reshape(g.N, g.Cout, g.Wo, g.Ho)
    bias = _NO_BIAS[g.dtype.char] if g.b is None else g.b
    local = one.forward_threads

    def chunk_state(mc):
        buf = np.empty((g.C, g.sx, g.sy, one.Wph, one.Hph, mc), dtype=g.dtype)
        out = np.empty((g.Cout, g.Wo, g.Ho, mc), dtype=g.dtype)
        call = kern.prepare(packed, buf.reshape(-1), out.reshape(g.Cout, -1), a_panels=True,
                            b_offsets=one.boff * mc,
                            groups=(g.Wo, g.Ho * mc, one.Hph * mc, g.Ho * mc))
        return buf, out, call.detach()

    def part(a, b, _):
        for n0 in range(a, b, m):
            mc = min(m, b - n0)
            buf, out, call = _thread_state(one, local, mc, lambda: chunk_state(mc))
            _k.to_phases_interleaved(xT, n0, buf, g.pt, g.pl)
            call(a=packed, b=buf.reshape(-1), c=out.reshape(g.Cout, -1))
            _k.from_interleaved(out, y4, n0, bias)
    parallel_for(part, g.N, uses_blas=False)
    return True


# --------------------------------------------------------------------------- backward
def backward_part(g, im, dxT, dyT3):
    """The per-images part for ``conv``'s backward loop (returns ``(dW, db)`` sums of its
    images, dx written), or None when no kernel is available. Each thread's buffers and
    checked kernel calls are kept in ``im`` for the next call."""
    kdw = im.kernel(g.K, g.Cout, 'atab')
    if kdw is None:
        return None
    w = g.w
    dx_filters = {}   # per chunk form: its step's filters for this call (packed on first use)
    lock = threading.Lock()

    def dx_step(c):
        step = c.dx_step()
        with lock:
            if c.m not in dx_filters:
                dx_filters[c.m] = step.filters(w)
            return step, dx_filters[c.m]
    xT, Cout = g.x.T, g.Cout
    dyT4 = dyT3.reshape(g.N, Cout, g.Wo, g.Ho)
    local = im.backward_threads

    def chunk_state(c, n0, pdwT):
        """[buffer, dy panels, tall dy, dx buffers, the dW call (detached)]."""
        buf = c.phase_buffer()
        dyt = np.empty(kdw.panel_shape(c.ncols, Cout), dtype=g.dtype)
        tall = np.empty((Cout, g.Wo, c.Ho), dtype=g.dtype) if c.m > 1 else None
        src = xT[n0].reshape(-1) if buf is None else buf.reshape(-1)
        call = kdw.prepare(src, dyt, pdwT, accumulate=True, a_offsets=c.boff, b_panels=True)
        step, filters = dx_step(c)
        return [buf, dyt, tall, step.buffers(filters, dxT, n0), call.detach()]

    def state(c, n0, pdwT):
        return _thread_state(im, local, c.m, lambda: chunk_state(c, n0, pdwT))

    def driven_part(a, b, pdwT):   # stride 1, one-image chunks: one numba call
        buf, dyt, _, dx_buffers, call = state(im, a, pdwT)
        step, filters = dx_step(im)
        src = xT[a].reshape(-1) if buf is None else buf.reshape(-1)
        dypad, dx_call, _ = dx_buffers
        args_dw = call.addresses(a=src, b=dyt, c=pdwT)
        args_dx = dx_call.addresses(a=filters(step.kern), b=dypad.reshape(-1),
                                    c=dxT[a].reshape(g.C, g.W * g.H))
        if args_dw is None or args_dx is None:   # an empty product: the Python loop
            return False
        buf3 = _EMPTY3[g.dtype.char] if buf is None else buf.reshape(g.C, im.Wp, im.Hp)
        _drv.backward_images(kdw.fn_int, args_dw, step.kern.fn_int, args_dx, xT, dyT4, dxT,
                             a, b, buf3, g.pl, g.pt, dyt, im.Hph, dypad, im.dpl, im.dpt)
        return True

    def part(a, b, _):
        pdwT = np.zeros((g.K, Cout), dtype=g.dtype)
        pdb = None if g.b is None else dyT3[a:b].sum(axis=(0, 2))
        step, filters = dx_step(im)
        if isinstance(filters, _Packed):   # the flipped filters (not the per-phase list)
            # the first thread here packs them while the others start their first filter
            # derivative (else all reach their first dx together and wait for the packing)
            filters.warm(step.kern)
        if im.m == 1 and im.flip_dx and ONE_IMAGE_DRIVERS and driven_part(a, b, pdwT):
            return pdwT.T, pdb
        for n0 in range(a, b, im.m):
            c = im.chunk(min(im.m, b - n0))
            buf, dyt, tall, dx_buffers, call = state(c, n0, pdwT)
            d3 = c.tall_dy(tall, dyT3, n0)
            _k.pack_grid_transposed(d3, dyt, c.Hph)
            src = c.source(buf, xT, n0)
            call(a=src, b=dyt, c=pdwT)   # this part's sum
            step, filters = dx_step(c)
            step(filters, d3, dxT, n0, dx_buffers)
        return pdwT.T, pdb
    return part


class _FlipDx:
    """Stride 1: ``dx`` of a chunk of images as one GEMM of the flipped filters on the
    padded dy: written straight into ``dx`` by column groups for one image, through the
    tall grid for a stacked chunk (as the forward). Kept with its chunk form; the
    filters come per call (:meth:`filters`)."""

    def __init__(self, im):
        g = im.g
        # a proxy: the form keeps its step, and no cycle keeps the form
        self.g, self.im = g, weakref.proxy(im)
        self.table, self.ncols = im.flipped_table()
        self.kern = im.kernel(g.Cin, g.H if im.m == 1 else self.ncols, 'btab')

    def filters(self, w):
        """This call's flipped filters, packed for the step's kernel on first use."""
        return _FlippedPacked(w)

    def buffers(self, filters, dxT, n0):
        """[padded dy, the detached call, the dx grid (stacked chunks)] of one thread."""
        g, im = self.g, self.im
        dypad = np.empty((g.Cout, im.Wd, im.Hd), dtype=g.dtype)   # rows_into writes it all
        if im.m == 1:
            call = self.kern.prepare(filters(self.kern), dypad.reshape(-1),
                                     dxT[n0].reshape(g.C, g.W * g.H), a_panels=True,
                                     b_offsets=self.table, groups=(g.W, g.H, im.Hd, g.H))
            return [dypad, call.detach(), None]
        dxpad = np.empty((g.C, g.W * im.Hd), dtype=g.dtype)
        call = self.kern.prepare(filters(self.kern), dypad.reshape(-1), dxpad[:, :self.ncols],
                                 a_panels=True, b_offsets=self.table)
        return [dypad, call.detach(), dxpad]

    def __call__(self, filters, d3, dxT, n0, bufs):
        """dx of the images n0.. of the chunk from their tall dy ``d3``."""
        g, im = self.g, self.im
        dypad, call, dxpad = bufs
        _k.rows_into(d3[None], 0, 1, dypad, im.dpl, im.dpt, 0)
        if im.m == 1:
            call(a=filters(self.kern), b=dypad.reshape(-1), c=dxT[n0].reshape(g.C, g.W * g.H))
            return
        call(a=filters(self.kern), b=dypad.reshape(-1), c=dxpad[:, :self.ncols])
        _k.rows_from(dxpad.reshape(g.C, g.W, im.Hd), dxT, n0, im.m, 0, im.step,
                     _NO_BIAS[g.dtype.char])


class _PhaseDx:
    """Any stride: ``dx`` of one image as one GEMM per phase of the padded input (never
    stacked: _stack_count). Kept with its form; the phase filters come per call."""

    def __init__(self, im):
        g = im.g
        # a proxy: the form keeps its step, and no cycle keeps the form
        self.g, self.im = g, weakref.proxy(im)
        self.steps = []
        for a, b, fws, fhs, table, u0, nu, v0, nv in im.phases():
            ncols = (nu - 1) * im.Hd + nv
            kern = im.kernel(g.Cin, ncols, 'btab')
            self.steps.append((a, b, fws, fhs, kern, table, u0, nu, v0, nv, ncols))
        covered = sum(step[7] * step[9] for step in self.steps)   # nu * nv
        self.complete = covered == g.W * g.H   # else some pixels are read by no tap: zero

    def filters(self, w):
        """This call's per-phase filters, packed (a list in the order of the steps)."""
        return [row_blocks(kern, phase_filters(w, fws, fhs))
                for _, _, fws, fhs, kern, *_ in self.steps]

    def buffers(self, filters, dxT, n0):
        g, im = self.g, self.im
        dypad = np.zeros((g.Cout, im.Wd, im.Hd), dtype=g.dtype)
        dph = np.empty(g.C * im.Wph * im.Hd, dtype=g.dtype)
        calls = []
        for (a, b, _, _, kern, table, u0, nu, v0, nv, ncols), ap in zip(self.steps, filters):
            out = dph[:g.C * nu * im.Hd].reshape(g.C, nu * im.Hd)
            calls.append((kern.prepare(ap, dypad.reshape(-1), out[:, :ncols], a_panels=True,
                                       b_offsets=table).detach(),
                          out, ncols, u0 * g.sx + a - g.pl, v0 * g.sy + b - g.pt, nu, nv))
        return dypad, calls

    def __call__(self, filters, d3, dxT, n0, bufs):
        g, im = self.g, self.im
        dx_img = dxT[n0]
        dypad, calls = bufs
        dypad[:, im.dpl:im.dpl + g.Wo, im.dpt:im.dpt + g.Ho] = d3
        if not self.complete:
            dx_img[...] = 0
        for (call, out, ncols, x0, y0, nu, nv), ap in zip(calls, filters):
            call(a=ap, b=dypad.reshape(-1), c=out[:, :ncols])
            _k.from_phase(out, dx_img, x0, y0, g.sx, g.sy, nu, nv)
