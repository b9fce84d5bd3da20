"""Derivative checks (float64, central differences) and behaviour of the iSQRT-COV ops
and blocks (layers/cov.py) and of the MPN-COV block (layers/mpn_cov.py)."""
import numpy as np
import pytest

from pydagnn.gradcheck import assert_close, check_block, numerical_derivative
from pydagnn.layer import REGISTRY
from pydagnn.layers.cov import (OBJ_ConvNet_COV_Pool, OBJ_ConvNet_COV_ScaleTr,
                                OBJ_ConvNet_Cov_Sqrtm, OBJ_ConvNet_Cov_TraceNorm, cov_pool_forward,
                                scale_tr_backward, scale_tr_forward, sqrtm_backward, sqrtm_forward,
                                trace_norm_backward, trace_norm_forward, triu_indices_colmajor)
from pydagnn.layers.mpn_cov import MPN_COV_Pool, mpn_cov_forward


def _spd(rng, d, N, shift=0.5):
    """A ``d x d x 1 x N`` stack of well-conditioned SPD matrices (float64, F order)."""
    B = rng.standard_normal((N, d, 2 * d))
    P = B @ B.transpose(0, 2, 1) / (2 * d) + shift * np.eye(d)
    return np.asfortranarray(P.transpose(1, 2, 0)).reshape(d, d, 1, N, order='F')


def _normalised(rng, d, N, nonsym=0.0):
    A, _ = trace_norm_forward(_spd(rng, d, N))
    if nonsym:
        A = A + nonsym * rng.standard_normal(A.shape) / d
    return np.asfortranarray(A)


# ---------------------------------------------------------------- registry and properties
def test_registered_names_and_defaults():
    for name, cls in [('dagnn.OBJ_ConvNet_COV_Pool', OBJ_ConvNet_COV_Pool),
                      ('dagnn.OBJ_ConvNet_Cov_TraceNorm', OBJ_ConvNet_Cov_TraceNorm),
                      ('dagnn.OBJ_ConvNet_Cov_Sqrtm', OBJ_ConvNet_Cov_Sqrtm),
                      ('dagnn.OBJ_ConvNet_COV_ScaleTr', OBJ_ConvNet_COV_ScaleTr),
                      ('dagnn.MPN_COV_Pool', MPN_COV_Pool)]:
        assert REGISTRY[name] is cls
    assert OBJ_ConvNet_Cov_Sqrtm().save() == {'opts': ['cuDNN'], 'cudnn': ['CuDNN'], 'coef': 1,
                                              'iterNum': 5}
    for cls in (OBJ_ConvNet_COV_Pool, OBJ_ConvNet_Cov_TraceNorm, OBJ_ConvNet_COV_ScaleTr):
        assert cls().save() == {'opts': ['cuDNN'], 'cudnn': ['CuDNN']}
    assert MPN_COV_Pool().save() == {'method': 'covariance_small', 'regu_method': 'power',
                                     'alpha': 0.5, 'epsilon': 1e-12, 'opts': ['cuDNN']}


def test_output_sizes():
    assert OBJ_ConvNet_COV_Pool().get_output_sizes([(16, 16, 128, 4)]) == [(128, 128, 1, 4)]
    assert OBJ_ConvNet_Cov_TraceNorm().get_output_sizes([(128, 128, 1, 4)]) == \
        [(128, 128, 1, 4), (1, 1, 1, 4)]
    assert OBJ_ConvNet_Cov_Sqrtm(iterNum=3).get_output_sizes([(128, 128, 1, 4)]) == \
        [(1, 1, 8256, 4), (128, 128, 3, 4), (128, 128, 3, 4)]
    assert OBJ_ConvNet_COV_ScaleTr().get_output_sizes([(1, 1, 8256, 4), (1, 1, 1, 4)]) == \
        [(1, 1, 8256, 4)]


def test_triangle_order_is_matlab_column_major():
    r, c = triu_indices_colmajor(4)
    assert list(zip(r.tolist(), c.tolist())) == [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2),
                                                 (0, 3), (1, 3), (2, 3), (3, 3)]
    Y = np.arange(16.0).reshape(4, 4, order='F')          # Y(i, j) = i + 4 j
    mask = np.triu(np.ones((4, 4), bool))
    assert np.array_equal(Y[r, c], Y.T[mask.T])           # MATLAB's Y(triu(true(4)))


# ---------------------------------------------------------------- forward semantics
def test_cov_pool_is_population_covariance_float32(rng):
    x = rng.standard_normal((5, 4, 6, 3)).astype(np.float32)
    P = cov_pool_forward(x)
    assert P.shape == (6, 6, 1, 3) and P.dtype == np.float32 and P.flags.f_contiguous
    for n in range(3):
        X = x[:, :, :, n].reshape(20, 6, order='F').astype(np.float64)
        assert np.allclose(P[:, :, 0, n], np.cov(X.T, bias=True), atol=1e-5)
        assert np.array_equal(P[:, :, 0, n], P[:, :, 0, n].T)


def test_sqrtm_forward_and_aux_layout(rng):
    d, N = 6, 2
    A = _normalised(rng, d, N, nonsym=0.2)
    for K in (1, 2, 3, 5):
        y, Y, Z = sqrtm_forward(A, coef=2, iter_num=K)
        assert y.shape == (1, 1, 21, N) and Y.shape == Z.shape == (d, d, K, N)
        for n in range(N):
            a, I = A[:, :, 0, n], np.eye(d)
            Yk, Zk = a, I
            for k in range(1, K):
                T = (3 * I - Zk @ Yk) / 2
                Yk, Zk = Yk @ T, T @ Zk
                assert np.allclose(Y[:, :, k, n], Yk) and np.allclose(Z[:, :, k, n], Zk)
            assert np.all(Y[:, :, 0, n] == 0)
            assert np.allclose(Z[:, :, 0, n], Zk @ Yk - 3 * I)
            Yout = 2 * Yk @ (3 * I - Zk @ Yk) / 2
            r, c = triu_indices_colmajor(d)
            assert np.allclose(y[0, 0, :, n], Yout[r, c])


def test_sqrtm_converges_to_square_root(rng):
    A = _normalised(rng, 5, 2)
    y, _, _ = sqrtm_forward(A, 1, 12)
    r, c = triu_indices_colmajor(5)
    for n in range(2):
        w, V = np.linalg.eigh(A[:, :, 0, n])
        S = V @ np.diag(np.sqrt(w)) @ V.T
        assert np.allclose(y[0, 0, :, n], S[r, c], atol=1e-6)


def test_sqrtm_rejects_bad_options(rng):
    A = _normalised(rng, 3, 1)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match='coef'):
            sqrtm_forward(A, coef=bad)
        with pytest.raises(ValueError, match='iter_num'):
            sqrtm_forward(A, iter_num=bad)
    with pytest.raises(ValueError, match='d x d x 1 x N'):
        sqrtm_forward(np.zeros((3, 4, 1, 2)))


def test_dtype_and_layout_preserved(rng):
    x = np.ascontiguousarray(rng.random((4, 4, 5, 2)).astype(np.float32))   # C order in
    P = cov_pool_forward(x)
    A, tr = trace_norm_forward(P)
    y, Y, Z = sqrtm_forward(A, 1, 3)
    s = scale_tr_forward(y, tr)
    for a in (P, A, tr, y, Y, Z, s):
        assert a.dtype == np.float32 and a.flags.f_contiguous


# ---------------------------------------------------------------- derivatives
def test_cov_pool_gradcheck(rng):
    x = rng.standard_normal((4, 3, 5, 2))
    check_block(OBJ_ConvNet_COV_Pool(), [x], [])


def test_trace_norm_gradcheck_main_output(rng):
    P = _spd(rng, 5, 3)
    check_block(OBJ_ConvNet_Cov_TraceNorm(), [P], [],
                der_outputs=[rng.standard_normal(P.shape), None])


def test_trace_norm_and_scale_tr_through_tr_path(rng):
    """L = <p, sqrt(tr(P)) v> + <q, P / tr(P)>: the _tr path (ScaleTr gives v.dy, the
    trace norm applies 1/(2 sqrt(tr))) together with the main path, end to end."""
    P = _spd(rng, 5, 3)
    v = np.asfortranarray(rng.standard_normal((1, 1, 15, 3)))
    p = rng.standard_normal(v.shape)
    q = rng.standard_normal(P.shape)
    tn, st = OBJ_ConvNet_Cov_TraceNorm(), OBJ_ConvNet_COV_ScaleTr()

    def f():
        A, tr = tn.forward([P], [])
        return np.sum(p * st.forward([v, tr], [])[0]) + np.sum(q * A)

    A, tr = tn.forward([P], [])
    out = st.forward([v, tr], [])
    (dv, dtr), _ = st.backward([v, tr], [], [p], out)
    (dP,), _ = tn.backward([P], [], [q, dtr], [A, tr])
    for name, arr, der in (('P', P, dP), ('v', v, dv)):
        idx, num = numerical_derivative(f, arr)
        assert_close(name, der.reshape(-1, order='F')[idx], num, 1e-6, 1e-8)
    # the _tr path alone (no derivative on the main output)
    (dP_tr,), _ = tn.backward([P], [], [None, dtr], [A, tr])

    def g():
        return np.sum(p * st.forward([v, tn.forward([P], [])[1]], [])[0])
    idx, num = numerical_derivative(g, P)
    assert_close('P via _tr', dP_tr.reshape(-1, order='F')[idx], num, 1e-6, 1e-8)


@pytest.mark.parametrize('iter_num', [1, 3, 5])
@pytest.mark.parametrize('nonsym', [0.0, 0.3])
def test_sqrtm_gradcheck(rng, iter_num, nonsym):
    """Exact derivative of the iteration, also for non-symmetric A (and perturbations)."""
    A = _normalised(rng, 5, 2, nonsym=nonsym)
    check_block(OBJ_ConvNet_Cov_Sqrtm(coef=1, iterNum=iter_num), [A], [])


def test_sqrtm_gradcheck_coef2(rng):
    A = _normalised(rng, 4, 2, nonsym=0.2)
    check_block(OBJ_ConvNet_Cov_Sqrtm(coef=2, iterNum=3), [A], [])


def test_sqrtm_backward_recomputes_missing_aux(rng):
    A = _normalised(rng, 4, 2)
    y, Y, Z = sqrtm_forward(A, 1, 3)
    dy = rng.standard_normal(y.shape)
    assert np.allclose(sqrtm_backward(A, None, None, dy, 1, 3), sqrtm_backward(A, Y, Z, dy, 1, 3))


def test_whole_chain_gradcheck(rng):
    """cov_pool -> trace_norm -> sqrtm (iterNum 3) -> scale_tr, as the models wire it."""
    x = np.asfortranarray(np.maximum(rng.standard_normal((4, 4, 5, 2)), 0))
    cp, tn, sq, st = (OBJ_ConvNet_COV_Pool(), OBJ_ConvNet_Cov_TraceNorm(),
                      OBJ_ConvNet_Cov_Sqrtm(coef=1, iterNum=3), OBJ_ConvNet_COV_ScaleTr())
    p = rng.standard_normal((1, 1, 15, 2))

    def fwd():
        P, = cp.forward([x], [])
        A, tr = tn.forward([P], [])
        y, Y, Z = sq.forward([A], [])
        s, = st.forward([y, tr], [])
        return P, A, tr, y, Y, Z, s

    P, A, tr, y, Y, Z, s = fwd()
    (dy, dtr), _ = st.backward([y, tr], [], [p], [s])
    (dA,), _ = sq.backward([A], [], [dy, None, None], [y, Y, Z])
    (dP,), _ = tn.backward([P], [], [dA, dtr], [A, tr])
    (dx,), _ = cp.backward([x], [], [dP], [P])
    idx, num = numerical_derivative(lambda: float(np.sum(p * fwd()[-1])), x)
    assert_close('chain dx', dx.reshape(-1, order='F')[idx], num, 1e-6, 1e-8)


def test_blocks_without_derivative_return_none(rng):
    A = _normalised(rng, 3, 2)
    sq = OBJ_ConvNet_Cov_Sqrtm(iterNum=3)
    out = sq.forward([A], [])
    assert sq.backward([A], [], [None, None, None], out) == ([None], [])
    tn = OBJ_ConvNet_Cov_TraceNorm()
    out = tn.forward([A], [])
    assert tn.backward([A], [], [None, None], out) == ([None], [])
    dP = trace_norm_backward(A, out[1], None, np.ones((1, 1, 1, 2)))
    assert np.allclose(dP[:, :, 0, 0], np.eye(3) / (2 * np.sqrt(out[1][0, 0, 0, 0])))
    v = rng.standard_normal((1, 1, 6, 2))
    dv, dtr = scale_tr_backward(v, out[1], np.ones_like(v))
    assert dtr.shape == (1, 1, 1, 2) and np.allclose(dtr.ravel(), v.sum(axis=(0, 1, 2)))


# ---------------------------------------------------------------- MPN-COV (eigen-decomposition)
@pytest.mark.parametrize('method,regu', [('covariance_small', 'power'),
                                         ('covariance_small', 'mat-l2'),
                                         ('covariance_small', 'log'), ('full', 'power')])
def test_mpn_cov_gradcheck(rng, method, regu):
    x = rng.standard_normal((4, 5, 6, 2))
    b = MPN_COV_Pool(method=method, regu_method=regu)
    y = b.forward([x], [])[0]
    check_block(b, [x], [], der_outputs=[rng.standard_normal(y.shape), None, None], rtol=1e-5,
                atol=1e-7)


def test_mpn_cov_power_is_matrix_square_root(rng):
    x = rng.standard_normal((5, 5, 4, 2)).astype(np.float32)
    y, V, S = mpn_cov_forward(x)
    assert y.shape == (1, 1, 10, 2) and V.shape == S.shape == (4, 4, 1, 2)
    assert y.dtype == np.float32
    r, c = triu_indices_colmajor(4)
    for n in range(2):
        X = x[:, :, :, n].reshape(25, 4, order='F').astype(np.float64)
        w, U = np.linalg.eigh(np.cov(X.T, bias=True))
        R = U @ np.diag(np.sqrt(w)) @ U.T
        assert np.allclose(y[0, 0, :, n], R[r, c], atol=1e-5)
        assert np.all(np.diff(np.diag(S[:, :, 0, n])) <= 0)      # descending eigenvalues


def test_mpn_cov_rank_deficient_drops_null_space(rng):
    """n = 4 positions < D = 6 channels: only the non-zero eigenpairs are kept (Dmin)."""
    x = rng.standard_normal((2, 2, 6, 1))
    y, V, S = mpn_cov_forward(x)
    s = np.diag(S[:, :, 0, 0])
    assert np.count_nonzero(s) == 3 and np.all(V[:, 3:, 0, 0] == 0)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize('dt', [np.float32, np.float64])
@pytest.mark.parametrize('d,n,K,c', [(128, 3, 3, 1), (5, 3, 1, 1), (6, 4, 2, 2), (7, 5, 5, 1), (16, 20, 3, 1)])
def test_sqrtm_cpu_path_equals_the_array_path(monkeypatch, dt, d, n, K, c):
    """The CPU Newton-Schulz (work buffers, fused elementwise kernels) computes what the
    device-agnostic xp code (the GPU's) computes, to float rounding."""
    from pydagnn.layers import cov as cv
    rng = np.random.default_rng(d * 100 + n + K)
    X = np.asfortranarray(np.maximum(rng.standard_normal((6, 5, d, n)), 0).astype(dt))
    A, _ = cv.trace_norm_forward(cv.cov_pool_forward(X))
    new = cv.sqrtm_forward(A, c, K)
    dy = np.asfortranarray(rng.standard_normal(new[0].shape).astype(dt))
    dnew = cv.sqrtm_backward(A, new[1], new[2], dy, c, K)
    monkeypatch.setattr(cv, 'is_gpu_array', lambda a: True)   # the xp path, on numpy
    old = cv.sqrtm_forward(A, c, K)
    dold = cv.sqrtm_backward(A, old[1], old[2], dy, c, K)
    tol = 1e-6 if dt == np.float32 else 1e-14
    for a, b in zip(new + (dnew,), old + (dold,)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.flags.f_contiguous
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, float(np.abs(b).max())))


def test_sqrtm_chunks_assemble_in_image_order():
    """Many images run in chunks on the workers (joined where they fit one chunk):
    the result is each image's own."""
    from pydagnn.layers import cov as cv
    rng = np.random.default_rng(3)
    N = 3 * cv.CPU_CHUNK + 5
    X = np.asfortranarray(np.maximum(rng.standard_normal((4, 4, 6, N)), 0).astype(np.float32))
    A, _ = cv.trace_norm_forward(cv.cov_pool_forward(X))
    y, Y, Z = cv.sqrtm_forward(A, 1, 3)
    dy = np.asfortranarray(rng.standard_normal(y.shape).astype(np.float32))
    dA = cv.sqrtm_backward(A, Y, Z, dy, 1, 3)
    for i in (0, cv.CPU_CHUNK, N - 1):
        yi, Yi, Zi = cv.sqrtm_forward(A[..., i:i + 1], 1, 3)
        np.testing.assert_array_equal(y[..., i], yi[..., 0])
        np.testing.assert_array_equal(Y[..., i], Yi[..., 0])
        np.testing.assert_array_equal(dA[..., i], cv.sqrtm_backward(A[..., i:i + 1], Yi, Zi,
                                                                    dy[..., i:i + 1], 1, 3)[..., 0])
