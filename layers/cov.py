"""iSQRT-COV second-order pooling: ``vl_nncov_pool``, ``vl_nncov_traceNorm`` and
``vl_nncov_sqrtm`` (GM-SOP's ``bits/impl/cov_*_cpu.cpp``), and their DagNN blocks
``dagnn.OBJ_ConvNet_COV_Pool``, ``dagnn.OBJ_ConvNet_Cov_TraceNorm``,
``dagnn.OBJ_ConvNet_Cov_Sqrtm`` and ``dagnn.OBJ_ConvNet_COV_ScaleTr``.

For one image let X be the ``M x d`` matrix of the input (M = H*W positions, row
``m = h + H*w``, d channels). The chain is

* cov pool:    ``P = X' Ibar X``, ``Ibar = (I - 11'/M) / M``, symmetrised; ``d x d x 1 x N``.
* trace norm:  ``A = P / tr(P)``; second output ``tr`` (``1 x 1 x 1 x N``).
* sqrtm:       Newton-Schulz, ``Y0 = A, Z0 = I``; for k = 1..K-1 (K = iterNum):
  ``T_k = (3I - Z_{k-1} Y_{k-1}) / 2``, ``Y_k = Y_{k-1} T_k``, ``Z_k = T_k Z_{k-1}``;
  last step ``Y = coef * Y_{K-1} (3I - Z_{K-1} Y_{K-1}) / 2``. Output: the upper triangle
  of Y (row <= column) taken column by column, ``1 x 1 x d(d+1)/2 x N``. The auxiliary
  outputs ``_Y`` and ``_Z`` (``d x d x K x N``) hold what the original stores: slot k
  (k = 1..K-1, 0-based) holds ``Y_k`` / ``Z_k``; slot 0 of ``_Z`` holds
  ``Z_{K-1} Y_{K-1} - 3I`` (the original's last scratch product) and slot 0 of ``_Y``
  is zero. (The original's mex is only defined for K >= 3; here K = 1 and 2 follow the
  same formulas.)
* scale tr:    ``y = sqrt(tr) * v``.

Derivatives. ``sqrtm_backward`` is the exact derivative of the iteration above for any
square A (transposes included, so it is also exact for non-symmetric perturbations);
the original CPU code's scratch-matrix defect (SPEC 3) is not reproduced. The derivative
of the vectorised output goes to the upper triangle of dY (lower triangle 0).
``scale_tr_backward`` returns ``dtr = v . dy`` *without* the ``1/(2 sqrt(tr))`` factor;
``trace_norm_backward`` applies it (``+ dtr / (2 sqrt(tr)) * I``), as the original pair
does, so only the pair is the true derivative.

All functions are batched over images (``xp.matmul`` on ``N x d x d`` stacks), accept
any memory order, keep the dtype and return Fortran-contiguous arrays. On the CPU the
Newton-Schulz forward and backward run the same products and steps in the same order
with work buffers: the products straight into the aux outputs and buffers, the
elementwise steps fused (``layers/kernels/cov_cpu.py``); measured on the 2-core AVX-512
machine, 8 matrices of 128 x 128 (one mixture chunk), one core: forward 0.34 -> 0.23 ms,
backward 0.62 -> 0.55 ms per matrix, of which the 6 and 13 products take ~0.18 and ~0.45.
"""
import functools

import numpy as np

from pydagnn.backend import get_array_module, is_gpu_array
from pydagnn.layer import Layer, register

from pydagnn.layers._common import as4d, int_option
from pydagnn.layers.kernels import cov_cpu as _kc
from pydagnn.layers.kernels.threads_cpu import num_workers, parallel_for, split

__all__ = ['cov_pool_forward', 'cov_pool_backward', 'trace_norm_forward', 'trace_norm_backward',
           'sqrtm_forward', 'sqrtm_backward', 'scale_tr_forward', 'scale_tr_backward',
           'triu_indices_colmajor',
           'OBJ_ConvNet_COV_Pool', 'OBJ_ConvNet_Cov_TraceNorm', 'OBJ_ConvNet_Cov_Sqrtm',
           'OBJ_ConvNet_COV_ScaleTr']


# ---------------------------------------------------------------------------- helpers
#: at most this many images per call on the CPU: a chunk's d x d stacks and the
#: Newton-Schulz temporaries then stay in cache. Measured on the 2-core machine: 256
#: matrices of 128 x 128 (the batched mixture's N*k pairs), sqrtm forward + backward,
#: in chunks of 16 take about 30-35% less CPU time than as one stack of 256 or 128
#: (chunks of 32: a little more than 16).
CPU_CHUNK = 16


def _by_images(n_arrays):
    """On the CPU, run the decorated function on contiguous chunks of at most
    :data:`CPU_CHUNK` images (the last axis of its first ``n_arrays`` arguments), the
    chunks shared out to worker threads with single-threaded BLAS, and assemble the
    outputs once. The per-image products are small (d x d, d = 128 at most in these
    models): OpenBLAS's own threads cost more than they give there, and on a loaded
    2-core machine their barriers stall (see kernels/threads_cpu.py)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            arrays, rest = args[:n_arrays], args[n_arrays:]
            first = arrays[0]
            if is_gpu_array(first) or getattr(first, 'ndim', 0) != 4 or first.shape[-1] < 2:
                return fn(*args, **kwargs)
            n = first.shape[-1]
            chunks = split(n, max(-(-n // CPU_CHUNK), min(num_workers(), n)))   # >= 1 per worker

            def part(a, b, _):
                # consecutive chunks that fit in one are one call (a region already
                # running elsewhere, e.g. the mixture's chunks, runs all parts here)
                runs = _merge(chunks[a:b], CPU_CHUNK)
                return [(r, fn(*[None if x is None else x[..., r[0]:r[1]] for x in arrays],
                               *rest, **kwargs)) for r in runs]
            done = [r for rs in parallel_for(part, len(chunks)) for r in rs]
            if len(done) == 1:
                return done[0][1]
            return _assemble([p for _, p in done], [r for r, _ in done])
        return wrapper
    return deco


def _merge(chunks, most):
    """Consecutive (start, stop) ranges joined while the join spans at most ``most``."""
    out = []
    for a, b in chunks:
        if out and b - out[-1][0] <= most:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _assemble(parts, bounds):
    """Join per-chunk results (arrays or tuples of arrays) along the image axis."""
    if isinstance(parts[0], tuple):
        return tuple(_assemble([p[k] for p in parts], bounds) for k in range(len(parts[0])))
    first = parts[0]
    out = np.empty(first.shape[:-1] + (bounds[-1][1],), dtype=first.dtype, order='F')
    for (a, b), p in zip(bounds, parts):
        out[..., a:b] = p
    return out


def _square(a, name, op):
    """A ``d x d x 1 x N`` array -> (a, d, N)."""
    a = as4d(a, name, op)
    d, d2, one, N = a.shape
    if d != d2 or one != 1:
        raise ValueError(f'{op}: {name} must be d x d x 1 x N, got shape {a.shape}')
    return a, d, N


def _mats(a4):
    """``d x d x 1 x N`` -> ``(N, d, d)`` view with ``[n, i, j] = a[i, j, 0, n]``."""
    return a4[:, :, 0, :].transpose(2, 0, 1)


def _from_mats(m):
    """``(N, d, d)`` -> ``d x d x 1 x N`` Fortran-contiguous."""
    xp = get_array_module(m)
    N, d, _ = m.shape
    return xp.asfortranarray(m.transpose(1, 2, 0)).reshape(d, d, 1, N, order='F')


def _tr(m):
    """Batched transpose of an ``(..., d, d)`` stack (a view)."""
    return m.swapaxes(-1, -2)


def triu_indices_colmajor(d, xp=np):
    """(rows, cols) of the upper triangle (row <= col) of a ``d x d`` matrix in MATLAB's
    column-major order (``Y(triu(true(d)))``): column 0 row 0, column 1 rows 0..1, ..."""
    cols, rows = np.tril_indices(d)   # tril in row-major order = triu in column-major order
    return xp.asarray(rows), xp.asarray(cols)


# ---------------------------------------------------------------------------- cov pool
def _positions(x):
    """``H x W x d x N`` -> ``(N, d, M)`` (X' per image; a view when x is F-contiguous)."""
    H, W, d, N = x.shape
    return x.T.reshape(N, d, W * H)


@_by_images(1)
def cov_pool_forward(x):
    """``P = X' Ibar X`` per image, symmetrised. x: ``H x W x d x N`` -> ``d x d x 1 x N``."""
    x = as4d(x, 'x', 'cov_pool_forward')
    H, W, d, N = x.shape
    M = H * W
    if M == 0:
        raise ValueError(f'cov_pool_forward: empty spatial extent, x has shape {x.shape}')
    xt = _positions(x)
    xc = xt - xt.mean(axis=2, keepdims=True)
    P = (xc @ _tr(xc)) * (1.0 / M)
    P = (P + _tr(P)) * 0.5          # exactly symmetric: P.T holds the same matrices
    return get_array_module(P).asfortranarray(P.T).reshape(d, d, 1, N, order='F')


@_by_images(2)
def cov_pool_backward(x, dP):
    """``dX = 2 Ibar X sym(dP)`` per image. Returns dx shaped like x (``H x W x d x N``)."""
    x = as4d(x, 'x', 'cov_pool_backward')
    H, W, d, N = x.shape
    dP, dd, dN = _square(dP, 'dP', 'cov_pool_backward')
    if dd != d or dN != N:
        raise ValueError(f'cov_pool_backward: dP has shape {dP.shape}, x has shape {x.shape}')
    M = H * W
    xt = _positions(x)
    xc = xt - xt.mean(axis=2, keepdims=True)
    G = _mats(dP)
    S = (G + _tr(G)) * (1.0 / M)    # 2 * sym(dP) / M
    dxt = S @ xc                    # (N, d, M): (Xc S)' per image
    return get_array_module(dxt).asfortranarray(dxt.reshape(N, d, W, H).T)


# ---------------------------------------------------------------------------- trace norm
def trace_norm_forward(P):
    """``A = P / tr(P)`` and ``tr`` (``1 x 1 x 1 x N``)."""
    xp = get_array_module(P)
    P, d, N = _square(P, 'P', 'trace_norm_forward')
    tr = xp.trace(P, axis1=0, axis2=1).reshape(1, 1, 1, N)   # (1, N) -> 1 x 1 x 1 x N
    A = xp.asfortranarray(P / tr)
    return A, xp.asfortranarray(tr)


def trace_norm_backward(P, tr, dA, dtr=None):
    """``dP = dA / tr + (-(P . dA) / tr^2 + dtr / (2 sqrt(tr))) I``.

    ``dtr`` is what arrives at the ``_tr`` output (from ``scale_tr_backward``: ``v . dy``);
    ``None`` (no derivative) counts as zero, and so does ``dA = None``.
    """
    xp = get_array_module(P)
    P, d, N = _square(P, 'P', 'trace_norm_backward')
    if tr is None:
        tr = trace_norm_forward(P)[1]
    trv = tr.reshape(N)
    if dA is None:
        dP = xp.zeros(P.shape, dtype=P.dtype, order='F')
        coef = xp.zeros(N, dtype=P.dtype)
    else:
        dA = as4d(dA, 'dA', 'trace_norm_backward')
        if dA.shape != P.shape:
            raise ValueError(f'trace_norm_backward: dA has shape {dA.shape}, P has shape {P.shape}')
        dot = (P * dA).sum(axis=(0, 1, 2))
        dP = xp.asfortranarray(dA / trv)
        coef = -dot / (trv * trv)
    if dtr is not None:
        coef = coef + dtr.reshape(N) / (2 * xp.sqrt(trv))
    i = xp.arange(d)
    dP[i, i, 0, :] += coef[None, :]
    return dP


# ---------------------------------------------------------------------------- sqrtm
@_by_images(1)
def sqrtm_forward(A, coef=1, iter_num=3):
    """Newton-Schulz square root. A: ``d x d x 1 x N`` ->
    ``(y_vec 1 x 1 x d(d+1)/2 x N, Y d x d x iter_num x N, Z d x d x iter_num x N)``
    (see the module docstring for what Y and Z hold)."""
    xp = get_array_module(A)
    A, d, N = _square(A, 'A', 'sqrtm_forward')
    c = int_option(coef, 'coef', 'sqrtm_forward')
    K = int_option(iter_num, 'iter_num', 'sqrtm_forward')
    if not is_gpu_array(A):
        return _sqrtm_forward_cpu(A, d, N, c, K)
    dt = A.dtype
    I3 = 3 * xp.eye(d, dtype=dt)
    Yaux = xp.zeros((d, d, K, N), dtype=dt, order='F')
    Zaux = xp.zeros((d, d, K, N), dtype=dt, order='F')
    Yv = Yaux.transpose(3, 2, 0, 1)          # (N, K, d, d) views for writing
    Zv = Zaux.transpose(3, 2, 0, 1)
    Y = _mats(A)
    Z = None                                 # Z0 = I
    for k in range(1, K):
        T = (I3 - (Y if Z is None else Z @ Y)) * 0.5
        Y = Y @ T
        Z = T if Z is None else T @ Z
        Yv[:, k] = Y
        Zv[:, k] = Z
    Mk = Y if Z is None else Z @ Y
    Zv[:, 0] = Mk - I3
    Yout = Y @ ((I3 - Mk) * (0.5 * c))
    r, cc = triu_indices_colmajor(d, xp)
    vec = Yout[:, r, cc]                     # (N, L)
    L = d * (d + 1) // 2
    y = xp.asfortranarray(vec.T).reshape(1, 1, L, N, order='F')
    return y, Yaux, Zaux


@_by_images(4)
def sqrtm_backward(A, Y, Z, dy, coef=1, iter_num=3):
    """Exact derivative of :func:`sqrtm_forward` with respect to A.

    Y, Z: the auxiliary outputs of the forward (recomputed when ``None``).
    dy: ``1 x 1 x d(d+1)/2 x N``. Returns dA, ``d x d x 1 x N``.
    """
    xp = get_array_module(A)
    A, d, N = _square(A, 'A', 'sqrtm_backward')
    c = int_option(coef, 'coef', 'sqrtm_backward')
    K = int_option(iter_num, 'iter_num', 'sqrtm_backward')
    L = d * (d + 1) // 2
    if dy.size != L * N:
        raise ValueError(f'sqrtm_backward: dy has shape {dy.shape}, expected (1, 1, {L}, {N}) '
                         f'for A of shape {A.shape}')
    if Y is None or Z is None:
        _, Y, Z = sqrtm_forward(A, c, K)
    for name, a in (('Y', Y), ('Z', Z)):
        if a.shape != (d, d, K, N):
            raise ValueError(f'sqrtm_backward: {name} has shape {a.shape}, expected {(d, d, K, N)} '
                             f'(iter_num {K})')
    if not is_gpu_array(A):
        return _sqrtm_backward_cpu(A, Y, Z, dy, d, N, c, K)
    dt = A.dtype
    I3 = 3 * xp.eye(d, dtype=dt)
    Am = _mats(A)
    Yv = Y.transpose(3, 2, 0, 1)
    Zv = Z.transpose(3, 2, 0, 1)
    G = xp.zeros((N, d, d), dtype=dt)
    r, cc = triu_indices_colmajor(d, xp)
    G[:, r, cc] = dy.reshape(L, N, order='F').T
    if c != 1:
        G *= c
    # last step: Yout = c/2 (3 Yp - Yp Zp Yp), Mk = Zp Yp (stored as Z slot 0 + 3I)
    Mk = Zv[:, 0] + I3
    if K == 1:
        Yp, Zp = Am, None
    else:
        Yp, Zp = Yv[:, K - 1], Zv[:, K - 1]
    W = _tr(Yp) @ G
    gY = 1.5 * G - 0.5 * (G @ _tr(Mk) + (W if Zp is None else _tr(Zp) @ W))
    gZ = None if Zp is None else -0.5 * (W @ _tr(Yp))
    # steps k = K-1 .. 1: Y_k = Y_{k-1} T, Z_k = T Z_{k-1}, T = (3I - Z_{k-1} Y_{k-1}) / 2
    for k in range(K - 1, 0, -1):
        if k > 1:
            Yp, Zp = Yv[:, k - 1], Zv[:, k - 1]
            T = (I3 - Zp @ Yp) * 0.5
            gT = _tr(Yp) @ gY + gZ @ _tr(Zp)
            gY, gZ = gY @ _tr(T) - 0.5 * (_tr(Zp) @ gT), _tr(T) @ gZ - 0.5 * (gT @ _tr(Yp))
        else:                                # Y0 = A, Z0 = I (constant)
            T = (I3 - Am) * 0.5
            gT = _tr(Am) @ gY + gZ
            gY = gY @ _tr(T) - 0.5 * gT
            gZ = None
    return _from_mats(gY)


def _stack(d, n, dt):
    """An ``(n, d, d)`` stack of column-major matrices (the layout of the layer's own
    ``d x d x 1 x N`` arrays, so that the fused kernels run along contiguous columns)."""
    return np.empty((d, d, n), dtype=dt, order='F').transpose(2, 0, 1)


def _mm(a, b, out):
    """``out = a @ b`` for stacks, ``out`` column-major per matrix (numpy's matmul calls
    BLAS only for a row-major output, so it writes ``out.T = b.T @ a.T``)."""
    np.matmul(_tr(b), _tr(a), out=_tr(out))
    return out


def _consts(dt):
    return np.array([0, 0.5, 1.5, 3], dtype=dt)


def _sqrtm_forward_cpu(A, d, N, c, K):
    """:func:`sqrtm_forward` on the CPU (one chunk of images): the same products and
    elementwise steps in the same order, the products written straight into the aux
    outputs and the steps fused (:mod:`.kernels.cov_cpu`)."""
    dt = A.dtype
    k3 = _consts(dt)
    Yaux = np.zeros((d, d, K, N), dtype=dt, order='F')
    Zaux = np.zeros((d, d, K, N), dtype=dt, order='F')
    Yv = Yaux.transpose(3, 2, 0, 1)          # (N, K, d, d) views
    Zv = Zaux.transpose(3, 2, 0, 1)
    T = _stack(d, N, dt)
    Y, Z = _mats(A), None                    # Z0 = I
    for k in range(1, K):
        if Z is None:
            _kc.half_3i_minus(_tr(Y), _tr(T), k3)
            _mm(Y, T, out=Yv[:, k])
            Zv[:, k] = T
        else:
            _mm(Z, Y, out=T)
            _kc.half_3i_minus(_tr(T), _tr(T), k3)
            _mm(Y, T, out=Yv[:, k])
            _mm(T, Z, out=Zv[:, k])
        Y, Z = Yv[:, k], Zv[:, k]
    Mk = Zv[:, 0]                            # Z_{K-1} Y_{K-1} - 3I
    if Z is None:
        Mk[...] = Y
    else:
        _mm(Z, Y, out=Mk)
    _kc.add_diag(Mk, -k3[3])
    np.multiply(Mk, dt.type(-0.5 * c), out=T)   # (3I - Mk) c / 2
    Yout = _mm(Y, T, out=_stack(d, N, dt))
    L = d * (d + 1) // 2
    y = np.empty((1, 1, L, N), dtype=dt, order='F')
    _kc.triu_gather(Yout, y.reshape(L, N, order='F'))
    return y, Yaux, Zaux


def _sqrtm_backward_cpu(A, Y, Z, dy, d, N, c, K):
    """:func:`sqrtm_backward` on the CPU (one chunk of images), its expressions term for
    term with work buffers instead of temporaries."""
    dt = A.dtype
    k3 = _consts(dt)
    L = d * (d + 1) // 2
    Am = _mats(A)
    Yv = Y.transpose(3, 2, 0, 1)
    Zv = Z.transpose(3, 2, 0, 1)
    G, B1, B2, B3, B4, B5, B6 = (_stack(d, N, dt) for _ in range(7))
    _kc.triu_scatter(np.asarray(dy).reshape(L, N, order='F'), G)
    if c != 1:
        G *= c
    if K == 1:
        Yp, Zp = Am, None
    else:
        Yp, Zp = Yv[:, K - 1], Zv[:, K - 1]
    B1[...] = Zv[:, 0]                                              # Mk
    _kc.add_diag(B1, k3[3])
    W = _mm(_tr(Yp), G, out=B2)
    _mm(G, _tr(B1), out=B3)
    if Zp is None:
        _kc.grad_last(_tr(G), _tr(B3), _tr(W), _tr(B1), k3)
    else:
        _kc.grad_last(_tr(G), _tr(B3), _tr(_mm(_tr(Zp), W, out=B4)), _tr(B1), k3)
    gY, gZ = B1, None
    if Zp is not None:
        gZ = _mm(W, _tr(Yp), out=B3)
        np.multiply(gZ, dt.type(-0.5), out=gZ)
    free = [B2, B4, B5, B6, G]
    for k in range(K - 1, 0, -1):
        if k > 1:
            Yp, Zp = Yv[:, k - 1], Zv[:, k - 1]
            T, gT, P1, P2 = free[:4]
            _mm(Zp, Yp, out=T)
            _kc.half_3i_minus(_tr(T), _tr(T), k3)
            _mm(_tr(Yp), gY, out=gT)
            _kc.add_into(_tr(gT), _tr(_mm(gZ, _tr(Zp), out=P1)))
            _mm(gY, _tr(T), out=P1)
            _kc.sub_half(_tr(P1), _tr(_mm(_tr(Zp), gT, out=P2)), _tr(P1), k3)   # new gY
            _mm(_tr(T), gZ, out=P2)
            _kc.sub_half(_tr(P2), _tr(_mm(gT, _tr(Yp), out=gY)), _tr(P2), k3)   # new gZ
            free = [gY, gZ, T, gT, free[4]]
            gY, gZ = P1, P2
        else:                                # Y0 = A, Z0 = I (constant)
            T, gT = free[:2]
            _kc.half_3i_minus(_tr(Am), _tr(T), k3)
            _mm(_tr(Am), gY, out=gT)
            _kc.add_into(_tr(gT), _tr(gZ))
            dA = np.empty((d, d, 1, N), dtype=dt, order='F')
            out = _mm(gY, _tr(T), out=_mats(dA))
            _kc.sub_half(_tr(out), _tr(gT), _tr(out), k3)
            return dA
    return _from_mats(gY)


# ---------------------------------------------------------------------------- scale tr
def scale_tr_forward(v, tr):
    """``y = sqrt(tr) * v``; v ``1 x 1 x L x N``, tr ``1 x 1 x 1 x N``."""
    xp = get_array_module(v)
    v = as4d(v, 'v', 'scale_tr_forward')
    tr = as4d(tr, 'tr', 'scale_tr_forward')
    if tr.size != v.shape[3]:
        raise ValueError(f'scale_tr_forward: tr has shape {tr.shape}, v has shape {v.shape}')
    return xp.asfortranarray(v * xp.sqrt(tr.reshape(1, 1, 1, -1)))


def scale_tr_backward(v, tr, dy):
    """``(dv, dtr) = (sqrt(tr) * dy, v . dy)`` -- dtr without ``1/(2 sqrt(tr))``, which
    :func:`trace_norm_backward` applies."""
    xp = get_array_module(v)
    v = as4d(v, 'v', 'scale_tr_backward')
    dy = as4d(dy, 'dy', 'scale_tr_backward')
    if dy.shape != v.shape:
        raise ValueError(f'scale_tr_backward: dy has shape {dy.shape}, v has shape {v.shape}')
    tr4 = tr.reshape(1, 1, 1, -1)
    dv = xp.asfortranarray(dy * xp.sqrt(tr4))
    dtr = (v * dy).sum(axis=(0, 1, 2)).reshape(tr4.shape)
    return dv, xp.asfortranarray(dtr)


# ---------------------------------------------------------------------------- blocks
_COV_PROPS = {'opts': ['cuDNN'], 'cudnn': ['CuDNN']}


@register('dagnn.OBJ_ConvNet_COV_Pool')
class OBJ_ConvNet_COV_Pool(Layer):
    """Covariance pooling: input ``H x W x d x N`` -> ``d x d x 1 x N``.
    ``opts``/``cudnn`` are stored for file compatibility only."""
    batch_independent = True   # per-image matrices
    properties = dict(_COV_PROPS)

    def forward(self, inputs, params):
        return [cov_pool_forward(inputs[0])]

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None], []
        return [cov_pool_backward(inputs[0], der_outputs[0])], []

    def get_output_sizes(self, input_sizes):
        s = input_sizes[0]
        return [None if s is None else (s[2], s[2], 1, s[3])]


@register('dagnn.OBJ_ConvNet_Cov_TraceNorm')
class OBJ_ConvNet_Cov_TraceNorm(Layer):
    """Trace normalisation; two outputs ``[A, tr]`` (the second is the ``<name>_tr``
    var that ``OBJ_ConvNet_COV_ScaleTr`` consumes). Backward takes the derivatives of
    both outputs (``None`` counts as zero)."""
    batch_independent = True   # per-image matrices
    properties = dict(_COV_PROPS)

    def forward(self, inputs, params):
        A, tr = trace_norm_forward(inputs[0])
        return [A, tr]

    def backward(self, inputs, params, der_outputs, outputs=None):
        dA = der_outputs[0]
        dtr = der_outputs[1] if len(der_outputs) > 1 else None
        if dA is None and dtr is None:
            return [None], []
        tr = outputs[1] if outputs is not None and len(outputs) > 1 else None
        return [trace_norm_backward(inputs[0], tr, dA, dtr)], []

    def get_output_sizes(self, input_sizes):
        s = input_sizes[0]
        return [s, None if s is None else (1, 1, 1, s[3])]


@register('dagnn.OBJ_ConvNet_Cov_Sqrtm')
class OBJ_ConvNet_Cov_Sqrtm(Layer):
    """Newton-Schulz matrix square root; three outputs ``[y, _Y, _Z]``.
    ``coef`` and ``iterNum`` must be positive integers (the mex casts them to int); the
    class default ``iterNum`` is 5 as in the original (the GM-SOP models pass 3)."""
    batch_independent = True   # per-image matrices
    properties = dict(_COV_PROPS, coef=1, iterNum=5)

    def forward(self, inputs, params):
        return list(sqrtm_forward(inputs[0], self.coef, self.iterNum))

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None], []
        Y = Z = None
        if outputs is not None and len(outputs) == 3:
            Y, Z = outputs[1], outputs[2]
        return [sqrtm_backward(inputs[0], Y, Z, der_outputs[0], self.coef, self.iterNum)], []

    def get_output_sizes(self, input_sizes):
        s = input_sizes[0]
        if s is None:
            return [None, None, None]
        d, N = s[0], s[3]
        K = int_option(self.iterNum, 'iterNum', 'OBJ_ConvNet_Cov_Sqrtm')
        return [(1, 1, d * (d + 1) // 2, N), (d, d, K, N), (d, d, K, N)]


@register('dagnn.OBJ_ConvNet_COV_ScaleTr')
class OBJ_ConvNet_COV_ScaleTr(Layer):
    """``y = sqrt(tr) * v``; inputs ``[v, tr]``. The derivative returned for ``tr`` is
    ``v . dy`` (the trace-norm block applies ``1/(2 sqrt(tr))``)."""
    batch_independent = True   # per-image matrices
    properties = dict(_COV_PROPS)

    def forward(self, inputs, params):
        return [scale_tr_forward(inputs[0], inputs[1])]

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None, None], []
        dv, dtr = scale_tr_backward(inputs[0], inputs[1], der_outputs[0])
        return [dv, dtr], []

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]
