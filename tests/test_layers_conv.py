"""Convolution: float64 derivative checks of dagnn.Conv for every option set, values
against a direct (loop over taps) reference, shapes, dtypes, errors and the block API."""
import zlib

import numpy as np
import pytest

from pydagnn.gradcheck import check_block
from pydagnn.layer import block_class
from pydagnn.layers import conv as conv_mod
from pydagnn.layers.conv import Conv, conv_backward, conv_forward, conv_output_size

from option_refs import pad4, pair   # tests/option_refs.py


def ref_conv(x, w, b=None, pad=(0, 0, 0, 0), stride=(1, 1), dilate=(1, 1)):
    """Direct float64 cross-correlation, MatConvNet semantics (groups included)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    H, W, C, N = x.shape
    FH, FW, Cin, Co = w.shape
    pt, pb, pl, pr = pad
    sy, sx = stride
    ry, rx = dilate
    G = C // Cin
    Cog = Co // G
    xp = np.zeros((H + pt + pb, W + pl + pr, C, N))
    xp[pt:pt + H, pl:pl + W] = x
    Ho = (H + pt + pb - ((FH - 1) * ry + 1)) // sy + 1
    Wo = (W + pl + pr - ((FW - 1) * rx + 1)) // sx + 1
    y = np.zeros((Ho, Wo, Co, N))
    for g in range(G):
        for i in range(FH):
            for j in range(FW):
                rows = slice(i * ry, i * ry + (Ho - 1) * sy + 1, sy)
                cols = slice(j * rx, j * rx + (Wo - 1) * sx + 1, sx)
                patch = xp[rows, cols, g * Cin:(g + 1) * Cin, :]
                y[:, :, g * Cog:(g + 1) * Cog, :] += np.einsum('hwcn,ck->hwkn', patch,
                                                                w[i, j, :, g * Cog:(g + 1) * Cog])
    if b is not None:
        y += np.asarray(b, dtype=np.float64).reshape(1, 1, -1, 1)
    return y


# (id, x shape, filter shape, pad, stride, dilate, hasBias)
CASES = [
    ('3x3_s2_p1', (7, 6, 3, 2), (3, 3, 3, 4), 1, 2, 1, True),
    ('pad4_asym_stride2', (8, 7, 3, 2), (3, 2, 3, 4), [0, 1, 2, 1], [2, 1], 1, True),
    ('pad2_vh', (6, 7, 2, 2), (3, 3, 2, 3), [1, 2], [1, 2], 1, True),
    ('dilate2', (9, 8, 2, 2), (3, 3, 2, 3), 2, 1, 2, True),
    ('dilate_rect', (9, 8, 2, 1), (2, 3, 2, 3), [1, 0, 2, 1], 1, [2, 1], True),
    ('nobias', (6, 6, 3, 2), (3, 3, 3, 2), 1, 1, 1, False),
    ('1x1', (5, 4, 6, 3), (1, 1, 6, 4), 0, 1, 1, True),
    ('1x1_s2', (6, 5, 4, 2), (1, 1, 4, 3), 0, 2, 1, False),
    ('full_filter', (4, 5, 3, 3), (4, 5, 3, 4), 0, 1, 1, True),
    ('full_filter_padded', (4, 4, 2, 2), (5, 5, 2, 3), [1, 0, 0, 1], 1, 1, True),
    ('map_1x1', (1, 1, 7, 4), (1, 1, 7, 5), 0, 1, 1, True),
    ('single_image', (7, 6, 3, 1), (3, 3, 3, 4), 1, 1, 1, True),
    ('groups', (6, 6, 4, 2), (3, 3, 2, 6), 1, 1, 1, True),
]


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_conv_gradcheck_and_values(case):
    _, xs, ws, pad, stride, dilate, has_bias = case
    rng = np.random.default_rng(zlib.crc32(case[0].encode()))
    x = rng.standard_normal(xs)
    w = rng.standard_normal(ws)
    block = Conv(size=list(ws), hasBias=has_bias, pad=pad, stride=stride, dilate=dilate)
    params = [w, rng.standard_normal(ws[3])] if has_bias else [w]
    y = block.forward([x], params)[0]
    yr = ref_conv(x, w, params[1] if has_bias else None, pad4(pad), pair(stride), pair(dilate))
    assert y.shape == yr.shape
    assert y.flags.f_contiguous and y.dtype == np.float64
    np.testing.assert_allclose(y, yr, rtol=1e-12, atol=1e-12)
    assert block.get_output_sizes([xs])[0] == yr.shape
    errs = check_block(block, [x], params)
    assert set(errs) == ({'in0', 'par0', 'par1'} if has_bias else {'in0', 'par0'})


def test_conv_float32_matches_reference_and_keeps_layout():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 8, 5, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 5, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    for xin in (x, np.ascontiguousarray(x)):   # any memory order in, Fortran out
        y = conv_forward(xin, w, b, pad=1, stride=[2, 1])
        assert y.dtype == np.float32 and y.flags.f_contiguous
        yr = ref_conv(x, w, b, (1, 1, 1, 1), (2, 1))
        assert np.linalg.norm(y - yr) / np.linalg.norm(yr) < 1e-6
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = conv_backward(x, w, b, dy, pad=1, stride=[2, 1])
    for a, ref in ((dx, x), (dw, w), (db, b)):
        assert a.dtype == np.float32 and a.shape == ref.shape and a.flags.f_contiguous
    np.testing.assert_allclose(db, dy.sum(axis=(0, 1, 3), dtype=np.float64), rtol=1e-5)


def _adjoint_check(x, w, b, pad, stride, dilate, seed=0):
    """<dy, conv(x)> is bilinear: compare conv_backward with the reference's adjoint."""
    rng = np.random.default_rng(seed)
    y = conv_forward(x, w, b, pad, stride, dilate)
    yr = ref_conv(x, w, b, pad4(pad), pair(stride), pair(dilate))
    np.testing.assert_allclose(y, yr, rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = conv_backward(x, w, b, dy, pad, stride, dilate)
    vx, vw = rng.standard_normal(x.shape), rng.standard_normal(w.shape)
    def f(xx, ww):
        return np.sum(ref_conv(xx, ww, None, pad4(pad), pair(stride), pair(dilate)) * dy)
    assert np.isclose(np.sum(dx * vx), f(vx, w), rtol=1e-10)
    assert np.isclose(np.sum(dw * vw), f(x, vw), rtol=1e-10)
    if b is not None:
        np.testing.assert_allclose(db, dy.sum(axis=(0, 1, 3)), rtol=1e-10)


@pytest.mark.parametrize('chunk_bytes', [1, 3000, 1 << 30])
def test_conv_chunking_paths(monkeypatch, chunk_bytes):
    """Chunks of one image (GEMM into the output), several images with a remainder
    chunk, and the whole batch at once all give the same result."""
    monkeypatch.setattr(conv_mod, 'COL_CHUNK_BYTES', chunk_bytes)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5, 3, 7))
    w = rng.standard_normal((3, 3, 3, 4))
    _adjoint_check(x, w, rng.standard_normal(4), [1, 0, 1, 2], [1, 2], 1)
    # grouped, with chunking
    _adjoint_check(rng.standard_normal((5, 5, 4, 5)), rng.standard_normal((3, 3, 2, 4)), None,
                   1, 1, 1)
    # pointwise dw packing (several images per chunk)
    _adjoint_check(rng.standard_normal((4, 3, 5, 7)), rng.standard_normal((1, 1, 5, 6)),
                   rng.standard_normal(6), 0, 1, 1)


def test_conv_empty_batch():
    x = np.zeros((5, 5, 3, 0))
    w = np.ones((3, 3, 3, 2))
    y = conv_forward(x, w, np.ones(2), pad=1)
    assert y.shape == (5, 5, 2, 0)
    dx, dw, db = conv_backward(x, w, np.ones(2), np.zeros((5, 5, 2, 0)), pad=1)
    assert dx.shape == x.shape and not dw.any() and not db.any()


def test_conv_accepts_matlab_shapes():
    """Trailing singleton dimensions dropped by MATLAB (N = 1, Cout = 1) are accepted."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 3))
    w = rng.standard_normal((3, 3, 3))
    b = np.array([[0.5]])
    y = conv_forward(x, w, b, pad=1)
    assert y.shape == (5, 4, 1, 1)
    yr = ref_conv(x[..., None], w[..., None], [0.5], (1, 1, 1, 1))
    np.testing.assert_allclose(y, yr, atol=1e-12)
    dx, dw, db = conv_backward(x, w, b, np.ones((5, 4)), pad=1)
    assert dx.shape == (5, 4, 3, 1) and dw.shape == (3, 3, 3, 1) and db.shape == (1,)


def test_conv_output_size():
    assert conv_output_size(10, 9, 3, 2, [0, 1, 2, 1], [2, 1]) == (5, 11)
    assert conv_output_size(64, 64, 3, 3, 1, 2) == (32, 32)
    assert conv_output_size(9, 9, 3, 3, 2, 1, 2) == (9, 9)


@pytest.mark.parametrize('args, match', [
    (((5, 5, 5, 2), (3, 3, 4, 2)), r'x has 5 channels.*filters expect 4'),
    (((5, 5, 4, 2), (3, 3, 2, 3)), r'groups'),
    (((2, 5, 4, 2), (3, 3, 4, 2)), r'larger than the padded input'),
    (((5, 5, 4, 2, 1, 1), (3, 3, 4, 2)), r'at most 4 dimensions'),
])
def test_conv_bad_shapes(args, match):
    xs, ws = args
    with pytest.raises(ValueError, match=match):
        conv_forward(np.zeros(xs), np.zeros(ws))


def test_conv_bad_options_and_derivative_shapes():
    x, w = np.zeros((5, 5, 4, 2)), np.zeros((3, 3, 4, 2))
    with pytest.raises(ValueError, match=r'bias has 3 elements.*expected 2'):
        conv_forward(x, w, np.zeros(3))
    with pytest.raises(ValueError, match=r'pad must have 1, 2 or 4'):
        conv_forward(x, w, pad=[1, 1, 1])
    with pytest.raises(ValueError, match=r'pad must be non-negative'):
        conv_forward(x, w, pad=-1)
    with pytest.raises(ValueError, match=r'stride must be >= 1'):
        conv_forward(x, w, stride=0)
    with pytest.raises(ValueError, match=r'dilate must have 1 or 2'):
        conv_forward(x, w, dilate=[1, 1, 1])
    with pytest.raises(ValueError, match=r'dy has shape \(5, 5, 2, 2\), expected \(3, 3, 2, 2\)'):
        conv_backward(x, w, None, np.zeros((5, 5, 2, 2)))
    with pytest.raises(ValueError, match=r'float32 or float64'):
        conv_forward(x.astype(np.int32), w)


def test_conv_block_api():
    assert block_class('dagnn.Conv') is Conv
    blk = Conv(size=[3, 3, 8, 16], pad=1, stride=2)
    f, b = blk.init_params(np.random.default_rng(0), np.float32)
    assert f.shape == (3, 3, 8, 16) and f.dtype == np.float32 and f.flags.f_contiguous
    assert b.shape == (16,) and b.dtype == np.float32 and not b.any()
    assert abs(f.std() - np.sqrt(2 / 72)) < 0.02
    assert blk.get_output_sizes([(32, 30, 8, 5)]) == [(16, 15, 16, 5)]
    assert blk.get_output_sizes([None]) == [None]
    nb = Conv(size=[1, 1, 4, 2], hasBias=False)
    (f1,) = nb.init_params(np.random.default_rng(0), np.float64)
    assert f1.dtype == np.float64
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 2))
    dxs, dps = nb.backward([x], [f1], [np.ones((3, 3, 2, 2))], None)
    assert len(dps) == 1 and dps[0].shape == f1.shape
    # hasBias false with a bias param present (as a loaded net may have): ignored
    dxs, dps = nb.backward([x], [f1, np.ones(2)], [np.ones((3, 3, 2, 2))], None)
    assert len(dps) == 2 and dps[1] is None
    assert np.array_equal(nb.forward([x], [f1, np.ones(2)])[0], nb.forward([x], [f1])[0])
    with pytest.raises(ValueError, match='no property'):
        Conv(sizes=[1, 1, 1, 1])


def test_conv_block_loaded_properties():
    """Properties as scipy.io.loadmat gives them (double row vectors, uint8 logicals)."""
    blk = Conv(size=np.array([[3., 2., 3., 4.]]), hasBias=np.array([[1]], dtype=np.uint8),
               pad=np.array([[0., 1., 2., 1.]]), stride=np.array([[2., 1.]]),
               dilate=np.array([[1., 1.]]), opts=np.zeros((0, 0), dtype=object))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 9, 3, 2)).astype(np.float32)
    f = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)
    b = rng.standard_normal((1, 4)).astype(np.float32)
    y = blk.forward([x], [f, b])[0]
    assert y.shape == (5, 11, 4, 2) == blk.get_output_sizes([x.shape])[0]
    dxs, dps = blk.backward([x], [f, b], [np.ones_like(y)], [y])
    assert dps[1].shape == (1, 4) and dps[0].shape == f.shape


@pytest.mark.parametrize('threads', ['1', '3'])
def test_conv_worker_split_agrees(monkeypatch, threads):
    """The batch split over worker threads (or none) gives the same results."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 5, 3, 5))
    w = rng.standard_normal((3, 3, 3, 4))
    b = rng.standard_normal(4)
    w1 = rng.standard_normal((1, 1, 3, 4))
    dy = rng.standard_normal((6, 5, 4, 5))
    ref = [conv_forward(x, w, b, 1), conv_backward(x, w, b, dy, 1),
           conv_forward(x, w1, b), conv_backward(x, w1, b, dy)]
    monkeypatch.setenv('PYDAGNN_NUM_THREADS', threads)
    got = [conv_forward(x, w, b, 1), conv_backward(x, w, b, dy, 1),
           conv_forward(x, w1, b), conv_backward(x, w1, b, dy)]
    for r, g_ in zip(ref, got):
        r, g_ = (r, g_) if isinstance(r, tuple) else ((r,), (g_,))
        for a, c in zip(r, g_):
            np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-12)


def test_parallel_for_split_and_errors():
    from pydagnn.layers.kernels import threads_cpu
    assert threads_cpu.split(5, 2) == [(0, 3), (3, 5)]
    assert threads_cpu.split(2, 3) == [(0, 1), (1, 2), (2, 2)]
    # PARTS_PER_WORKER parts per thread, taken in turn, results in part order
    per = threads_cpu.PARTS_PER_WORKER
    expected = [(a, b, i) for i, (a, b) in enumerate(threads_cpu.split(7, min(7, 3 * per)))]
    assert threads_cpu.parallel_for(lambda a, b, i: (a, b, i), 7, workers=3) in (
        expected, [(0, 7, 0)])   # the latter without BLAS control

    def boom(a, b, i):
        if i == 1:
            raise RuntimeError('worker failed')
        return i
    if threads_cpu.blas_control():
        with pytest.raises(RuntimeError, match='worker failed'):
            threads_cpu.parallel_for(boom, 4, workers=2)
    # the region lock is released after an error
    assert sum(threads_cpu.parallel_for(lambda a, b, i: b - a, 4, workers=2, uses_blas=False)) == 4
    # BLAS runs one thread per call inside a region, and its setting is restored after it
    ctl = threads_cpu.blas_control()
    if ctl:
        before = ctl[0]()
        inside = threads_cpu.parallel_for(lambda a, b, i: ctl[0](), 4, workers=2)
        assert set(inside) == {1} and ctl[0]() == before


def test_conv_block_derivatives_keep_value_shapes():
    """A filter bank with Cout = 1 loaded from MATLAB is 3-D; its derivative is too."""
    rng = np.random.default_rng(9)
    blk = Conv(size=[3, 3, 2, 1], pad=1)
    x = rng.standard_normal((5, 5, 2, 2))
    f = rng.standard_normal((3, 3, 2))
    b = rng.standard_normal((1, 1))
    y = blk.forward([x], [f, b])[0]
    assert y.shape == (5, 5, 1, 2)
    dxs, dps = blk.backward([x], [f, b], [np.ones_like(y)], [y])
    assert dxs[0].shape == x.shape and dps[0].shape == f.shape and dps[1].shape == b.shape
    assert dps[0].flags.f_contiguous
