"""The CUDA sources of the GPU kernels (layers/kernels/*_gpu.py), compiled as plain C++
for the CPU (``-DPD_CPU``: the grid-stride loop becomes a plain loop) and checked
against the CPU implementation through ctypes. This checks the kernels' index
arithmetic on machines without a GPU; tests/test_gpu.py checks the real thing.
Skipped when no C++ compiler is found."""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from pydagnn.layers.kernels import gpu_common, im2col_gpu, pool_gpu
from pydagnn.layers.kernels import im2col_cpu
from pydagnn.layers.pool import pool_backward, pool_forward

CXX = shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
pytestmark = pytest.mark.skipif(CXX is None, reason='no C++ compiler to build the kernels for the CPU')

_libs = {}


def _lib(src, dtype):
    key = (id(src), np.dtype(dtype).str)
    if key not in _libs:
        code = gpu_common.source(src, dtype)
        h = hashlib.sha1(code.encode()).hexdigest()[:12]
        d = tempfile.mkdtemp(prefix='pd_kern_')
        cpp = os.path.join(d, f'k{h}.cpp')
        so = os.path.join(d, f'k{h}.so')
        with open(cpp, 'w') as f:
            f.write(code)
        subprocess.run([CXX, '-DPD_CPU', '-O1', '-std=c++14', '-shared', '-fPIC', cpp, '-o', so],
                       check=True, capture_output=True)
        _libs[key] = ctypes.CDLL(so)
    return _libs[key]


def _arg(a):
    if isinstance(a, np.ndarray):
        assert a.flags.c_contiguous
        return a.ctypes.data_as(ctypes.c_void_p)
    if isinstance(a, np.int64):
        return ctypes.c_longlong(int(a))
    if isinstance(a, np.int32):
        return ctypes.c_int(int(a))
    raise TypeError(type(a))


class _FakeKernel:
    def __init__(self, lib, name):
        self.fn = getattr(lib, name)
        self.fn.restype = None

    def __call__(self, grid, block, args):
        self.fn(*[_arg(a) for a in args])


@pytest.fixture
def cpu_kernels(monkeypatch):
    """Route gpu_common.get_kernel / launch to the CPU build of the same source."""
    monkeypatch.setattr(gpu_common, 'get_kernel', lambda src, name, dt: _FakeKernel(_lib(src, dt), name))
    monkeypatch.setattr(gpu_common, 'launch', lambda k, n, args: k(None, None, args) if n > 0 else None)


class _G:
    def __init__(self, **kw):
        self.__dict__.update(kw)


CONV_CASES = [
    # H, W, C, N, FH, FW, pad (t, b, l, r), stride, dilate
    (7, 6, 3, 2, 3, 3, (1, 1, 1, 1), (1, 1), (1, 1)),
    (9, 8, 2, 3, 3, 2, (0, 2, 1, 0), (2, 3), (1, 1)),
    (10, 9, 2, 2, 3, 3, (2, 1, 0, 2), (1, 2), (2, 1)),
    (5, 5, 4, 1, 5, 5, (0, 0, 0, 0), (1, 1), (1, 1)),
    (8, 8, 3, 2, 1, 1, (0, 0, 0, 0), (2, 2), (1, 1)),
]


@pytest.mark.parametrize('case', CONV_CASES)
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_im2col_col2im_match_numba(cpu_kernels, case, dtype, rng):
    H, W, C, N, FH, FW, (pt, pb, pl, pr), (sy, sx), (ry, rx) = case
    x = np.asfortranarray(rng.standard_normal((H, W, C, N)).astype(dtype))
    fhe, fwe = (FH - 1) * ry + 1, (FW - 1) * rx + 1
    Ho, Wo = (H + pt + pb - fhe) // sy + 1, (W + pl + pr - fwe) // sx + 1
    g = _G(C=C, H=H, W=W, Ho=Ho, Wo=Wo, FH=FH, FW=FW, pt=pt, pl=pl, sy=sy, sx=sx, ry=ry, rx=rx,
           K=C * FW * FH, P=Ho * Wo)
    for n0, m in ((0, N), (N - 1, 1)):
        ref = np.empty((g.K, m * g.P), dtype)
        im2col_cpu.im2col(x.T, ref, n0, FH, FW, Ho, Wo, pt, pl, sy, sx, ry, rx)
        got = np.full_like(ref, np.nan)
        im2col_gpu.im2col(x.T, got, n0, m, g)
        np.testing.assert_array_equal(got, ref)
        col = rng.standard_normal(ref.shape).astype(dtype)
        dref = np.zeros((H, W, C, N), dtype, order='F')
        im2col_cpu.col2im(col, dref.T, n0, FH, FW, Ho, Wo, pt, pl, sy, sx, ry, rx)
        dgot = np.zeros((H, W, C, N), dtype, order='F')
        im2col_gpu.col2im(col, dgot.T, n0, m, g)
        np.testing.assert_allclose(dgot, dref, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-6)


POOL_CASES = [
    # H, W, C, N, pool, pad, stride
    (7, 6, 3, 2, (3, 3), (1, 1, 1, 1), (2, 2)),
    (8, 9, 2, 3, (2, 3), (0, 1, 2, 0), (1, 2)),
    (6, 6, 2, 2, (3, 2), (2, 0, 0, 1), (3, 1)),
    (5, 4, 1, 1, (5, 4), (0, 0, 0, 0), (1, 1)),
]


@pytest.mark.parametrize('case', POOL_CASES)
@pytest.mark.parametrize('method', ['max', 'avg'])
def test_pool_kernels_match_cpu(cpu_kernels, case, method, rng, monkeypatch):
    H, W, C, N, ps, pad, stride = case
    x = np.asfortranarray(rng.standard_normal((H, W, C, N)))
    x[0, 0, 0, 0] = x[1, 0, 0, 0]     # a tie: the first maximum must win
    y_ref = pool_forward(x, ps, method, pad, stride)
    Ho, Wo = y_ref.shape[:2]
    g = _G(Ho=Ho, Wo=Wo, ph=ps[0], pw=ps[1], pt=pad[0], pl=pad[2], sy=stride[0], sx=stride[1])
    y = np.full(y_ref.shape, np.nan, order='F')
    (pool_gpu.max_forward if method == 'max' else pool_gpu.avg_forward)(x.T, y.T, g)
    np.testing.assert_allclose(y, y_ref, rtol=1e-13)
    dy = np.asfortranarray(rng.standard_normal(y_ref.shape))
    dx_ref = pool_backward(x, dy, ps, method, pad, stride)
    dx = np.full(x.shape, np.nan, order='F')
    if method == 'max':
        pool_gpu.max_backward(x.T, dy.T, dx.T, g)
    else:
        pool_gpu.avg_backward(dy.T, dx.T, g)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-14)
