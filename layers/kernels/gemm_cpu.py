"""Register-blocked GEMM kernels (CPU) for the convolutions, generated as LLVM IR and
compiled for this machine with llvmlite (numba's own LLVM binding) at first use.

Why not OpenBLAS: the convolution GEMMs of small nets are thin (16-128 output channels,
K = 9 * channels), and an im2col copy feeds them. OpenBLAS runs them single-threaded at
74-127 GFLOP/s on the 2-core AVX-512 development machine, where these kernels run at
119-160 (one core, fp32) from a tile that fits the register file (8 rows x 48 columns =
24 accumulators of 16 floats with AVX-512). And they read an operand's rows through an
*offset table*, which lets a stride-1 convolution run as an implicit GEMM on the
zero-padded image itself, with no column matrix (see ``_Implicit`` in
:mod:`pydagnn.layers.conv`).

What a kernel computes: ``C[i, j] (=|+=) sum_k A[i, k] * B[k, j]`` for ``i < M``,
``j < N``, ``k < K``, the sum over ``k`` in increasing order with one fused multiply-add
per term (the same order in every variant, so the choice of variant does not change a
bit of the result). Operands are addressed by element strides:

* ``A[i, k]`` at ``A + (i // MR) * ais + (i % MR) * ars + k * aks``: a strided matrix
  (``ais = MR * ars``) or packed row blocks;
* ``B[k, j]`` at ``B + (j // NR) * bjs + k * ldb + j % NR``: a row-major matrix
  (``bjs = NR``) or panels of ``NR`` columns (``bjs = K * NR``, ``ldb = NR``, see
  :func:`panel_shape`); the ``j % NR`` run must be contiguous;
* ``C[i, j]`` at ``C + i * ldc + j``.

Edges: rows past ``M`` are computed from row ``M - 1`` and not stored; columns past ``N``
are masked (masked vector loads and stores: nothing outside the operands is read or
written).

Variants: ``MR`` rows x ``NV`` vectors of ``VW`` lanes (``NR = NV * VW`` columns),
``VW`` 16 floats / 8 doubles where the CPU has AVX-512, else 8 / 4 (AVX2, 16 vector
registers: fewer accumulators). :func:`kernel_for` picks one for a shape.

``$PYDAGNN_GEMM_BITS=256`` builds the 16-register variants on an AVX-512 machine too (to
test them; they are slower there). ``$PYDAGNN_CONV_GEMM=blas`` turns these kernels off (the convolutions then use numpy's
BLAS as before); so does a failure to compile them (with a warning).
"""
import ctypes
import os
import threading
import warnings

import numpy as np

_LOCK = threading.Lock()
_STATE = {'lib': None}   # None: not built yet; False: unavailable; else _Library

#: variants per number of vectors per row, for a 32-register (AVX-512) and a 16-register
#: (AVX2) vector file: MR rows x NV vectors, MR * NV accumulators
_MR = {32: {1: 16, 2: 8, 3: 8, 4: 6}, 16: {1: 8, 2: 6, 3: 4, 4: 3}}
#: relative speed of each NV on full tiles (measured, AVX-512): NV = 3 streams fastest
_NV_SPEED = {1: 0.75, 2: 0.95, 3: 1.0, 4: 0.95}

#: operand addressing of the variants: '' strided/packed, 'btab' / 'atab' rows of B / A
#: through an offset table (implicit im2col: the rows of the column matrix are shifted
#: views of one zero-padded image)
MODES = ('', 'btab', 'atab')

_TYPES = {np.dtype(np.float32): ('float', 4, 'f32'), np.dtype(np.float64): ('double', 8, 'f64')}


def enabled():
    """False when ``$PYDAGNN_CONV_GEMM`` is ``blas`` (read at call time)."""
    return os.environ.get('PYDAGNN_CONV_GEMM', '').strip().lower() != 'blas'


class Kernel:
    """One compiled variant: ``mr`` rows x ``nr`` columns per tile, element ``dtype``;
    ``mode`` '' (strided or packed operands), 'btab' (rows of B through an offset table)
    or 'atab' (rows of A through an offset table)."""

    def __init__(self, fn, dtype, mr, nv, vw, mode=''):
        self.fn, self.dtype, self.mr, self.nv, self.mode = fn, np.dtype(dtype), mr, nv, mode
        self.nr = nv * vw
        # the same function with every pointer as an int64 (the same registers on x86-64
        # and AArch64): numba code calls it so (:mod:`.implicit_cpu`)
        self.fn_int = INT_PROTO(ctypes.cast(fn, ctypes.c_void_p).value)

    def __repr__(self):
        return f'Kernel({self.dtype}, {self.mr}x{self.nr}{", " + self.mode if self.mode else ""})'

    def panel_shape(self, K, N):
        """Shape (tiles, K, NR) of B packed as panels of this kernel's NR columns."""
        return (-(-N // self.nr), K, self.nr)

    def a_panel_shape(self, M, K):
        """Shape (blocks, K, MR) of A packed as row blocks of this kernel's MR rows."""
        return (-(-M // self.mr), K, self.mr)

    def run(self, a, b, c, **kw):
        """``c (=|+=) A @ B`` now (:meth:`prepare`, then the call)."""
        return self.prepare(a, b, c, **kw)()

    def prepare(self, a, b, c, accumulate=False, a_panels=False, b_panels=False,
                a_offsets=None, b_offsets=None, groups=None):
        """The checked call ``c (=|+=) A @ B`` (a :class:`Prepared`: call it, again with
        other arrays of the same shapes and strides: a loop over images checks and
        builds the arguments once) for ``c`` (M, N), a view with unit column stride.

        ``groups=(G, N, gsb, gsc)`` (with ``b_offsets`` only): G products of N columns
        each, the g-th reading B's rows at ``b_offsets + g * gsb`` and writing columns
        ``g * gsc .. g * gsc + N`` of ``c`` (then any (M, L) view with unit column stride
        holding them): output columns that are not contiguous on the input grid (a
        convolution's output columns) without computing or copying the gaps.

        A: ``a`` (M, K) array view (any strides); with ``a_panels`` a C-contiguous
        (blocks, K, MR) array of row blocks; with ``a_offsets`` (mode 'atab', int64, M
        entries) a 1-D contiguous ``a`` with ``A[i, k] = a[a_offsets[i] + k]``.
        B: ``b`` (K, N) view with unit column stride; with ``b_panels`` a C-contiguous
        (tiles, K, NR) panel array; with ``b_offsets`` (mode 'btab', int64, K entries) a
        1-D contiguous ``b`` with ``B[k, j] = b[b_offsets[k] + j]``.
        Every row read through a table is checked to lie inside its operand before the
        call. Runs without the GIL (ctypes releases it)."""
        M, N = c.shape
        G, gsb, gsc = 1, 0, 0
        if groups is not None:
            G, N, gsb, gsc = (int(v) for v in groups)
            if b_offsets is None or G < 1 or N < 0 or gsb < 0 or gsc < 0 \
                    or (G - 1) * gsc + N > c.shape[1]:
                raise ValueError(f'gemm kernel {self}: groups {groups} for C {c.shape} '
                                 f'(B through offsets only)')
        it = self.dtype.itemsize
        for arr, what in ((a, 'a'), (b, 'b'), (c, 'c')):
            if arr.dtype != self.dtype:
                raise TypeError(f'gemm kernel {self}: {what} is {arr.dtype}')
        if (a_offsets is not None) != (self.mode == 'atab') or \
                (b_offsets is not None) != (self.mode == 'btab'):
            raise ValueError(f'gemm kernel {self}: offset tables do not match the mode')
        null = ctypes.c_void_p(0)
        aoff = boff = null
        # B
        if b_offsets is not None:
            K = len(b_offsets)
            _check_table(b_offsets, N + (G - 1) * gsb, b, self, 'B')
            bjs, ldb, boff = self.nr, 0, b_offsets.ctypes.data
        elif b_panels:
            tiles, K, nr = b.shape
            if nr != self.nr or tiles * nr < N or not b.flags.c_contiguous:
                raise ValueError(f'gemm kernel {self}: B panels {b.shape} for N = {N}')
            bjs, ldb = K * nr, nr
        else:
            K = b.shape[0]
            if b.shape[1] != N or (N > 1 and K > 0 and b.strides[1] != it):
                raise ValueError(f'gemm kernel {self}: B {b.shape} strides {b.strides}, N = {N}')
            bjs, ldb = self.nr, (b.strides[0] // it if K > 1 else 0)
        if M == 0 or N == 0 or K == 0:
            return Prepared(None, [], (a, b, c), accumulate)   # an empty sum
        # A
        if a_offsets is not None:
            if len(a_offsets) < M:
                raise ValueError(f'gemm kernel {self}: {len(a_offsets)} row offsets for M = {M}')
            _check_table(a_offsets[:M], K, a, self, 'A')
            ais, ars, aks, aoff = 0, 0, 1, a_offsets.ctypes.data
        elif a_panels:
            if a.shape != self.a_panel_shape(M, K) or not a.flags.c_contiguous:
                raise ValueError(f'gemm kernel {self}: A blocks {a.shape}, expected '
                                 f'{self.a_panel_shape(M, K)}')
            ais, ars, aks = K * self.mr, 1, self.mr
        else:
            if a.shape != (M, K):
                raise ValueError(f'gemm kernel {self}: A {a.shape}, expected {(M, K)}')
            ars, aks = a.strides[0] // it, a.strides[1] // it
            ais = self.mr * ars
        if N > 1 and c.strides[1] != it:
            raise ValueError(f'gemm kernel {self}: C strides {c.strides}')
        args = [a.ctypes.data, ais, ars, aks, aoff, b.ctypes.data, bjs, ldb, boff,
                c.ctypes.data, c.strides[0] // it, M, N, K, G, gsb, gsc, int(bool(accumulate))]
        return Prepared(self.fn, args, (a, b, c), accumulate, keep=(a_offsets, b_offsets))


#: the kernels' C signature with the pointers as int64 (:attr:`Kernel.fn_int`)
INT_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_int64] * 17), ctypes.c_int32)


def _layout(arr):
    return arr.dtype, arr.shape, arr.strides


class Prepared:
    """A checked kernel call; ``call(a=, b=, c=)`` runs it, on other arrays of the
    checked dtype, shape and strides if given (so only their data pointers change).
    Returns ``c``."""

    _SLOTS = (0, 5, 9)   # positions of the A, B, C pointers in the argument list

    def __init__(self, fn, args, arrays, accumulate, keep=()):
        self.fn, self.args, self.accumulate = fn, args, accumulate
        self.layouts = [_layout(x) for x in arrays]
        self.c = arrays[2]
        self._keep = (arrays, keep)   # the tables and the first arrays stay alive
        self.detached = False

    def detach(self):
        """Drop the operands of the checked call (keep only their layouts and the offset
        tables), so that a call kept from one convolution call to the next keeps no
        feature map alive; every later call must then give all three operands.
        Returns self."""
        self._keep = (None, self._keep[1])
        self.c, self.detached = None, True
        return self

    def _bound(self, a, b, c):
        """The argument list with the pointers of the operands given (each checked to
        have the prepared dtype, shape and strides)."""
        if self.detached and (a is None or b is None or c is None):
            raise ValueError('gemm kernel call: a detached call needs all of a, b, c')
        args = self.args
        for i, arr in enumerate((a, b, c)):
            if arr is not None:
                if _layout(arr) != self.layouts[i]:
                    raise ValueError(f'gemm kernel call: operand {"abc"[i]} has dtype, '
                                     f'shape, strides {_layout(arr)}, prepared for '
                                     f'{self.layouts[i]}')
                if self.fn is not None:
                    args = args if args is not self.args else list(args)
                    args[self._SLOTS[i]] = arr.ctypes.data
        return args

    def __call__(self, a=None, b=None, c=None):
        args = self._bound(a, b, c)
        out = self.c if c is None else c
        if self.fn is None:
            if not self.accumulate:
                out[...] = 0
            return out
        self.fn(*args)
        return out

    def addresses(self, a=None, b=None, c=None):
        """The call's arguments (with the operands given, checked as by a call) as an
        int64 vector, for numba code that calls :attr:`Kernel.fn_int` with them, moving
        only the pointers at :data:`A_SLOT`, :data:`B_SLOT`, :data:`C_SLOT` (to operands
        of the checked layouts: the caller's duty), or None for an empty product (no
        call to make, see ``__call__``)."""
        if self.fn is None:
            return None
        return np.array([v.value or 0 if isinstance(v, ctypes.c_void_p) else v
                         for v in self._bound(a, b, c)], dtype=np.int64)


#: positions of the A, B and C pointers in :meth:`Prepared.addresses`
A_SLOT, B_SLOT, C_SLOT = Prepared._SLOTS


def _check_table(offsets, run, arr, kern, what):
    """Rows read through ``offsets`` (each ``run`` elements) must lie inside ``arr``."""
    if offsets.dtype != np.int64 or offsets.ndim != 1 or not offsets.flags.c_contiguous:
        raise TypeError(f'gemm kernel {kern}: {what} offsets must be a contiguous int64 vector')
    if arr.ndim != 1 or not arr.flags.c_contiguous:
        raise ValueError(f'gemm kernel {kern}: {what} read through offsets must be a contiguous vector')
    if len(offsets) and (offsets.min() < 0 or offsets.max() + run > arr.size):
        raise ValueError(f'gemm kernel {kern}: {what} offsets reach outside its '
                         f'{arr.size} elements (rows of {run})')


def vector_registers():
    """32 where the kernels use AVX-512, 16 otherwise (0: not built)."""
    lib = _library()
    return lib.regs if lib else 0


def kernel_for(M, N, dtype, mode=''):
    """The variant of ``mode`` (see :data:`MODES`) for an (M, N) output of ``dtype``, or
    None (not float32/float64, or the kernels are off or failed to build): the column
    tile that wastes least of N (measured speeds of the tiles weigh in)."""
    dt = np.dtype(dtype)
    if dt not in _TYPES or not enabled():
        return None
    lib = _library()
    if not lib:
        return None
    vw = lib.lanes(dt)

    def score(nv):
        nr = nv * vw
        return N / (-(-N // nr) * nr) * _NV_SPEED[nv], nv
    best = max(score(nv) for nv in (3, 2, 4, 1))
    return lib.kernels[(dt, best[1], mode)]


# --------------------------------------------------------------------------- building
class _Library:
    """The compiled module: kept alive with its execution engine."""

    def __init__(self, regs, kernels, keep):
        self.regs, self.kernels, self._keep = regs, kernels, keep

    def lanes(self, dt):
        return (64 if self.regs == 32 else 32) // dt.itemsize


def _library():
    if _STATE['lib'] is None:
        with _LOCK:
            if _STATE['lib'] is None:
                try:
                    _STATE['lib'] = _build()
                except Exception as e:  # any failure: the BLAS path stays, said once
                    warnings.warn(f'pydagnn: the CPU GEMM kernels did not compile ({e!r}); '
                                  'convolutions use numpy BLAS', RuntimeWarning, stacklevel=3)
                    _STATE['lib'] = False
    return _STATE['lib']


def _build():
    import llvmlite.binding as llvm
    try:   # needed by older llvmlite, refused (deprecated) by newer
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
    except Exception:  # pragma: no cover
        pass
    cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features()
    regs = 32 if features.get('avx512f', False) and os.environ.get('PYDAGNN_GEMM_BITS') != '256' else 16
    variants = []
    for dt, (ty, size, tag) in _TYPES.items():
        vw = (64 if regs == 32 else 32) // size
        for nv, mr in _MR[regs].items():
            for mode in MODES:
                variants.append((dt, ty, vw, mr, nv, mode, f'gemm_{tag}_{mr}x{nv}{mode}'))
    src = '\n'.join([_declarations(ty, vw) for ty, vw in
                     sorted({(v[1], v[2]) for v in variants})]
                    + [generate_ir(ty, vw, mr, nv, name, a_table=mode == 'atab',
                                   b_table=mode == 'btab')
                       for _, ty, vw, mr, nv, mode, name in variants])
    mod = llvm.parse_assembly(src)
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=cpu, features=features.flatten(), opt=3)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    P_, I_ = ctypes.c_void_p, ctypes.c_int64
    proto = ctypes.CFUNCTYPE(None, P_, I_, I_, I_, P_, P_, I_, I_, P_, P_, I_, I_, I_, I_,
                             I_, I_, I_, ctypes.c_int32)
    kernels = {}
    for dt, ty, vw, mr, nv, mode, name in variants:
        kernels[(dt, nv, mode)] = Kernel(proto(engine.get_function_address(name)), dt, mr, nv,
                                         vw, mode)
    return _Library(regs, kernels, (mod, engine, tm))


def _declarations(ty, vw):
    v = f'<{vw} x {ty}>'
    sfx = f'v{vw}{"f32" if ty == "float" else "f64"}'
    return (f'declare {v} @llvm.fma.{sfx}({v}, {v}, {v})\n'
            f'declare {v} @llvm.masked.load.{sfx}.p0(ptr, i32, <{vw} x i1>, {v})\n'
            f'declare void @llvm.masked.store.{sfx}.p0({v}, ptr, i32, <{vw} x i1>)\n')


def generate_ir(ty, vw, mr, nv, name, a_table=False, b_table=False):
    """LLVM IR of one variant (see the module docstring for the arguments' meaning):
    ``void name(A, ais, ars, aks, aoff, B, bjs, ldb, boff, C, ldc, M, N, K, G, gsb, gsc,
    accumulate)``: G groups of N columns, group g reading B at ``B + g * gsb`` and
    writing C at ``C + g * gsc`` (a batch of GEMMs sharing A).

    Loops: column tiles (j0, step NR) outside, row blocks (i0, step MR) inside, then
    the reduction over k with the MR * NV accumulators in registers (loop phis): per k,
    NV vector loads of B, MR scalar loads of A broadcast, MR * NV FMAs."""
    V = f'<{vw} x {ty}>'
    M1 = f'<{vw} x i1>'
    sfx = f'v{vw}{"f32" if ty == "float" else "f64"}'
    al = 4 if ty == 'float' else 8
    nr = vw * nv
    iota = ', '.join(f'i64 {t}' for t in range(vw))
    L = []
    e = L.append
    e(f'define void @{name}(ptr noalias %A, i64 %ais, i64 %ars, i64 %aks, ptr %aoff, '
      f'ptr noalias %B, i64 %bjs, i64 %ldb, ptr %boff, ptr noalias %C, i64 %ldc, i64 %M, '
      f'i64 %N, i64 %K, i64 %G, i64 %gsb, i64 %gsc, i32 %acc) {{')
    e('entry:')
    e('  %Mm1 = sub i64 %M, 1')
    e('  %hasacc = icmp ne i32 %acc, 0')
    e('  %kpos = icmp sgt i64 %K, 0')
    e(f'  %Nv.i = insertelement <{vw} x i64> poison, i64 %N, i32 0')
    e(f'  %Nv = shufflevector <{vw} x i64> %Nv.i, <{vw} x i64> poison, <{vw} x i32> zeroinitializer')
    e('  br label %gloop')
    # G groups of N columns: group g reads B from B + g * gsb and writes C + g * gsc
    e('gloop:')
    e('  %g = phi i64 [0, %entry], [%gn, %glatch]')
    e('  %gdone = icmp sge i64 %g, %G')
    e('  br i1 %gdone, label %exit, label %gbody')
    e('gbody:')
    e('  %gbo = mul i64 %g, %gsb')
    e(f'  %Bg = getelementptr {ty}, ptr %B, i64 %gbo')
    e('  %gco = mul i64 %g, %gsc')
    e(f'  %Cg = getelementptr {ty}, ptr %C, i64 %gco')
    e('  br label %jloop')
    e('jloop:')
    e('  %j0 = phi i64 [0, %gbody], [%j0n, %jlatch]')
    e('  %jt = phi i64 [0, %gbody], [%jtn, %jlatch]')
    e('  %jdone = icmp sge i64 %j0, %N')
    e('  br i1 %jdone, label %glatch, label %jbody')
    e('jbody:')
    for v in range(nv):   # column masks of this tile
        e(f'  %c{v} = add i64 %j0, {v * vw}')
        e(f'  %cv{v}.i = insertelement <{vw} x i64> poison, i64 %c{v}, i32 0')
        e(f'  %cv{v}.s = shufflevector <{vw} x i64> %cv{v}.i, <{vw} x i64> poison, <{vw} x i32> zeroinitializer')
        e(f'  %cv{v} = add <{vw} x i64> %cv{v}.s, <{iota}>')
        e(f'  %mk{v} = icmp slt <{vw} x i64> %cv{v}, %Nv')
    e('  %bjo = mul i64 %jt, %bjs')
    e(f'  %Bj = getelementptr {ty}, ptr %Bg, i64 %bjo')
    e('  br label %iloop')
    e('iloop:')
    e('  %i0 = phi i64 [0, %jbody], [%i0n, %ilatch]')
    e('  %it = phi i64 [0, %jbody], [%itn, %ilatch]')
    e('  %idone = icmp sge i64 %i0, %M')
    e('  br i1 %idone, label %jlatch, label %ibody')
    e('ibody:')
    e('  %aio = mul i64 %it, %ais')
    e(f'  %Ai = getelementptr {ty}, ptr %A, i64 %aio')
    for r in range(mr):   # row pointers; rows past M read row M - 1 (not stored)
        e(f'  %ri{r} = add i64 %i0, {r}')
        e(f'  %rl{r} = icmp slt i64 %ri{r}, %M')
        e(f'  %rc{r} = select i1 %rl{r}, i64 %ri{r}, i64 %Mm1')
        if a_table:   # row i of A starts at A + aoff[i]
            e(f'  %aq{r} = getelementptr i64, ptr %aoff, i64 %rc{r}')
            e(f'  %ao{r} = load i64, ptr %aq{r}, align 8')
            e(f'  %Ar{r} = getelementptr {ty}, ptr %A, i64 %ao{r}')
        else:
            e(f'  %rr{r} = sub i64 %rc{r}, %i0')
            e(f'  %ao{r} = mul i64 %rr{r}, %ars')
            e(f'  %Ar{r} = getelementptr {ty}, ptr %Ai, i64 %ao{r}')
    e('  br i1 %kpos, label %kloop, label %done')
    e('kloop:')
    e('  %k = phi i64 [0, %ibody], [%kn, %kloop]')
    for r in range(mr):
        for v in range(nv):
            e(f'  %s{r}_{v} = phi {V} [zeroinitializer, %ibody], [%t{r}_{v}, %kloop]')
    if b_table:   # row k of B starts at B + boff[k]
        e('  %bq = getelementptr i64, ptr %boff, i64 %k')
        e('  %bo = load i64, ptr %bq, align 8')
    else:
        e('  %bo = mul i64 %k, %ldb')
    e(f'  %Bk = getelementptr {ty}, ptr %Bj, i64 %bo')
    for v in range(nv):
        e(f'  %Bk{v} = getelementptr {ty}, ptr %Bk, i64 {v * vw}')
        e(f'  %b{v} = call {V} @llvm.masked.load.{sfx}.p0(ptr %Bk{v}, i32 {al}, {M1} %mk{v}, {V} zeroinitializer)')
    e('  %ako = mul i64 %k, %aks')
    for r in range(mr):
        e(f'  %ap{r} = getelementptr {ty}, ptr %Ar{r}, i64 %ako')
        e(f'  %as{r} = load {ty}, ptr %ap{r}, align {al}')
        e(f'  %av{r}.i = insertelement {V} poison, {ty} %as{r}, i32 0')
        e(f'  %av{r} = shufflevector {V} %av{r}.i, {V} poison, <{vw} x i32> zeroinitializer')
        for v in range(nv):
            e(f'  %t{r}_{v} = call {V} @llvm.fma.{sfx}({V} %av{r}, {V} %b{v}, {V} %s{r}_{v})')
    e('  %kn = add i64 %k, 1')
    e('  %kmore = icmp slt i64 %kn, %K')
    e('  br i1 %kmore, label %kloop, label %done')
    e('done:')
    for r in range(mr):
        for v in range(nv):
            e(f'  %f{r}_{v} = phi {V} [zeroinitializer, %ibody], [%t{r}_{v}, %kloop]')
    e('  br i1 %hasacc, label %acc0, label %set0')
    for mode in ('acc', 'set'):   # store the rows < M: C = sum, or C += sum
        for r in range(mr):
            nxt = f'{mode}{r + 1}' if r + 1 < mr else 'ilatch'
            e(f'{mode}{r}:')
            e(f'  br i1 %rl{r}, label %{mode}do{r}, label %ilatch')
            e(f'{mode}do{r}:')
            e(f'  %{mode}co{r} = mul i64 %ri{r}, %ldc')
            e(f'  %{mode}C{r} = getelementptr {ty}, ptr %Cg, i64 %{mode}co{r}')
            e(f'  %{mode}Cj{r} = getelementptr {ty}, ptr %{mode}C{r}, i64 %j0')
            for v in range(nv):
                p = f'%{mode}p{r}_{v}'
                e(f'  {p} = getelementptr {ty}, ptr %{mode}Cj{r}, i64 {v * vw}')
                val = f'%f{r}_{v}'
                if mode == 'acc':
                    e(f'  %old{r}_{v} = call {V} @llvm.masked.load.{sfx}.p0(ptr {p}, i32 {al}, {M1} %mk{v}, {V} zeroinitializer)')
                    e(f'  %sum{r}_{v} = fadd {V} %old{r}_{v}, %f{r}_{v}')
                    val = f'%sum{r}_{v}'
                e(f'  call void @llvm.masked.store.{sfx}.p0({V} {val}, ptr {p}, i32 {al}, {M1} %mk{v})')
            e(f'  br label %{nxt}')
    e('ilatch:')
    e(f'  %i0n = add i64 %i0, {mr}')
    e('  %itn = add i64 %it, 1')
    e('  br label %iloop')
    e('jlatch:')
    e(f'  %j0n = add i64 %j0, {nr}')
    e('  %jtn = add i64 %jt, 1')
    e('  br label %jloop')
    e('glatch:')
    e('  %gn = add i64 %g, 1')
    e('  br label %gloop')
    e('exit:')
    e('  ret void')
    e('}')
    return '\n'.join(L)
