"""The CPU speed kernels against plain numpy formulas (issue 14):

* BatchNorm's numba kernels (layers/kernels/bnorm_cpu.py) against the float64 formulas,
  in float32 and float64, with batch and with given moments, and a large mean (the
  centred form must cancel it);
* the ReLU kernels (layers/kernels/eltwise_cpu.py): equal to numpy's formula on small and
  threaded maps, NaN and Inf propagated as numpy does, other layouts on numpy;
* threads_cpu: OpenBLAS at one thread outside the regions, ``PYDAGNN_BLAS_THREADS``
  checked, ``matmul`` split by rows and by columns equal to ``np.matmul``;
* the batched mixture's chunking of pairs.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from pydagnn.layers.bnorm import bnorm_backward, bnorm_forward
from pydagnn.layers.kernels import threads_cpu
from pydagnn.layers.relu import PARALLEL_MIN, relu_backward, relu_forward
from pydagnn.testing import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _to_map(a3, shape):
    H, W, C, N = shape
    return a3.reshape(N, C, W, H).T


@pytest.mark.parametrize('dtype,tol', [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize('offset', [0.0, 1e3])
@pytest.mark.parametrize('given', [False, True])
def test_bnorm_kernels_match_the_formulas(dtype, tol, offset, given):
    rng = np.random.default_rng(3)
    shape = (7, 5, 6, 4)
    x = np.asfortranarray(rng.standard_normal(shape) * 2 + offset).astype(dtype, order='F')
    dy = np.asfortranarray(rng.standard_normal(shape)).astype(dtype, order='F')
    g = rng.standard_normal(6).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    moments = None
    if given:
        moments = np.stack([rng.standard_normal(6) + offset, rng.random(6) + 0.5], axis=1).astype(dtype)
    x64 = x.astype(np.float64)
    H, W, C, N = shape
    x3 = x64.T.reshape(N, C, -1)
    d3 = dy.astype(np.float64).T.reshape(N, C, -1)
    if moments is None:
        mu = x3.mean(axis=(0, 2))
        sigma = np.sqrt(((x3 - mu[:, None]) ** 2).mean(axis=(0, 2)) + 1e-5)
    else:
        mu, sigma = moments[:, 0].astype(np.float64), moments[:, 1].astype(np.float64)
    g64, b64 = g.astype(np.float64), b.astype(np.float64)
    xm = x3 - mu[:, None]
    y_ref = _to_map(xm * (g64 / sigma)[:, None] + b64[:, None], shape)
    M = N * H * W
    db_ref = d3.sum(axis=(0, 2))
    dg_ref = (d3 * xm).sum(axis=(0, 2)) / sigma
    G1 = g64 / sigma
    G2 = G1 * dg_ref / (M * sigma)
    dx_ref = _to_map(G1[:, None] * (d3 - (db_ref / M)[:, None]) - G2[:, None] * xm, shape)

    y, m = bnorm_forward(x, g, b, moments=moments)
    dx, dg, db, m2 = bnorm_backward(x, g, b, dy, moments=moments)
    assert y.dtype == dtype and dx.dtype == dtype and y.flags.f_contiguous and dx.flags.f_contiguous
    assert rel_err(y, y_ref) <= tol
    assert rel_err(dx, dx_ref) <= tol * (50 if offset and dtype == np.float32 else 1)
    assert rel_err(dg, dg_ref) <= tol * (50 if offset and dtype == np.float32 else 1)
    assert rel_err(db, db_ref) <= tol
    assert rel_err(m[:, 0], mu) <= tol and rel_err(m[:, 1], sigma) <= tol
    np.testing.assert_array_equal(m, m2)


def test_bnorm_kernels_threaded_and_strided_input(monkeypatch):
    """The planes split over the workers give the same bits as one thread (per-plane
    sums, totalled image by image), for the fused kernels too; a non-Fortran input gives
    the same result."""
    from pydagnn.layers import bnorm as bnorm_mod
    from pydagnn.layers.bnorm_relu import bnorm_relu_backward, bnorm_relu_forward
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 8, 33, 5)).astype(np.float32) + 3            # C order
    dy = np.asfortranarray(rng.standard_normal(x.shape).astype(np.float32))
    g, b = rng.standard_normal(33).astype(np.float32), rng.standard_normal(33).astype(np.float32)

    def run():
        y, m = bnorm_forward(x, g, b)
        z, _ = bnorm_relu_forward(x, g, b)
        return (y, m, z) + bnorm_backward(x, g, b, dy) + bnorm_relu_backward(x, g, b, z, dy, m)
    monkeypatch.setattr(bnorm_mod, 'PARALLEL_MIN_ELEMENTS', x.size + 1)   # one thread
    serial = run()
    monkeypatch.setattr(bnorm_mod, 'PARALLEL_MIN_ELEMENTS', 0)             # the workers
    calls = []
    real = bnorm_mod.parallel_for
    monkeypatch.setattr(bnorm_mod, 'parallel_for',
                        lambda fn, n, **kw: calls.append(kw) or real(fn, n, **kw))
    threaded = run()
    assert calls and all(kw.get('workers') is None for kw in calls)
    for a, b_ in zip(serial, threaded):
        np.testing.assert_array_equal(a, b_)
    yf, mf = bnorm_forward(np.asfortranarray(x), g, b)
    np.testing.assert_array_equal(serial[0], yf)
    np.testing.assert_array_equal(serial[1], mf)


def test_bnorm_nan_propagates():
    x = np.asfortranarray(np.ones((3, 3, 2, 2), np.float32))
    x[0, 0, 1, 0] = np.nan
    y, m = bnorm_forward(x, np.ones(2, np.float32), np.zeros(2, np.float32))
    assert np.isnan(m[1]).all() and np.isnan(y[:, :, 1]).all() and np.isfinite(y[:, :, 0]).all()


@pytest.mark.parametrize('n', [10, PARALLEL_MIN * 2 + 3])
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_relu_kernels_match_numpy(n, dtype):
    rng = np.random.default_rng(5)
    x = np.asfortranarray(rng.standard_normal((n, 1, 1, 1)).astype(dtype))
    x[:3, 0, 0, 0] = [np.nan, -np.inf, np.inf]
    dy = np.asfortranarray(rng.standard_normal(x.shape).astype(dtype))
    dy[3:6, 0, 0, 0] = [np.inf, np.nan, -np.inf]
    with np.errstate(invalid='ignore'):
        y_ref = np.maximum(x, 0)
        dx_ref = dy * (x > 0)
    y = relu_forward(x)
    dx = relu_backward(x, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)          # NaN where numpy gives NaN
    np.testing.assert_array_equal(dx, dx_ref)


def test_relu_other_layouts_and_leak():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 5, 3, 2))                       # C order: numpy path
    dy = rng.standard_normal((4, 5, 3, 2))
    np.testing.assert_array_equal(relu_forward(x), np.maximum(x, 0))
    np.testing.assert_array_equal(relu_backward(x, dy), dy * (x > 0))
    np.testing.assert_allclose(relu_forward(x, leak=0.1), np.where(x > 0, x, 0.1 * x), rtol=1e-15)
    assert relu_forward(x).flags.f_contiguous


def test_openblas_is_single_threaded_outside_regions():
    blas = threads_cpu.blas_control()
    if not blas:
        pytest.skip('numpy has no OpenBLAS thread control here')
    code = ('import pydagnn.layers.kernels.threads_cpu as t; print(t.blas_control()[0]())')
    env = {k: v for k, v in os.environ.items() if k != 'PYDAGNN_BLAS_THREADS'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.stdout.strip() == '1', out.stderr
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                         env={**env, 'PYDAGNN_BLAS_THREADS': '2'})
    assert out.stdout.strip() == '2', out.stderr
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                         env={**env, 'PYDAGNN_BLAS_THREADS': 'many'})
    assert out.returncode != 0 and "PYDAGNN_BLAS_THREADS must be a whole number of threads, got 'many'" in out.stderr


@pytest.mark.parametrize('m,k,n', [(300, 200, 150), (3, 500, 4000), (1, 1, 1)])
def test_threaded_matmul_equals_numpy(m, k, n, monkeypatch):
    monkeypatch.setattr(threads_cpu, 'MATMUL_SPLIT_MIN', 1)
    rng = np.random.default_rng(7)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = np.asfortranarray(rng.standard_normal((k, n)).astype(np.float32))   # a transposed view's layout
    out = np.empty((m, n), np.float32)
    threads_cpu.matmul(a, b, out)
    assert rel_err(out, a.astype(np.float64) @ b.astype(np.float64)) < 1e-5


def test_mixture_chunks_cover_each_component():
    from pydagnn.layers.mixture import _chunks
    bounds = [(0, 17), (17, 17), (17, 20), (20, 36)]
    ch = _chunks(bounds, 8)
    assert ch == [(0, 0, 6), (0, 6, 12), (0, 12, 17), (2, 17, 20), (3, 20, 28), (3, 28, 36)]
    assert _chunks([(0, 0)], 8) == []


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('K,R,nparts', [(1152, 128, 4), (37, 5, 1), (27, 16, 3)])
def test_filter_derivative_parts_are_summed_in_part_order(dtype, K, R, nparts):
    # conv's backward sums the per-part (Kg, Cout) dW transposed on the workers:
    # the same numbers as adding the parts one by one, in part order
    from pydagnn.layers.conv import _sum_parts
    from pydagnn.layers.kernels.im2col_cpu import sum_transposed
    rng = np.random.default_rng(K + nparts)
    parts = [(rng.standard_normal((K, R)) * 10.0 ** rng.integers(-4, 4, (K, R))).astype(dtype)
             for _ in range(nparts)]
    ref = np.zeros((R, K), dtype)
    for p in parts:
        ref += p.T
    out = np.zeros((R, K), dtype)
    _sum_parts([p.T for p in parts], out)
    np.testing.assert_array_equal(out, ref)
    split = np.full((R, K), np.nan, dtype)   # two ranges, as two workers take them
    sum_transposed(tuple(parts), split, 0, K // 3)
    sum_transposed(tuple(parts), split, K // 3, K)
    np.testing.assert_array_equal(split, ref)
