"""Pooling: float64 derivative checks of dagnn.Pooling (max and avg, padding, strides,
overlapping windows), values against a direct reference, MatConvNet's tie rule and
average divisor, errors and the block API."""
import zlib

import numpy as np
import pytest

from pydagnn.gradcheck import check_block
from pydagnn.layer import block_class
from pydagnn.layers.pool import Pooling, pool_backward, pool_forward, pool_output_size

from option_refs import pad4, pair   # tests/option_refs.py


def ref_pool(x, pool, method, pad, stride):
    """Direct reference: windows clipped to the image; avg divides by the clipped size."""
    H, W, C, N = x.shape
    ph, pw = pool
    pt, pb, pl, pr = pad
    sy, sx = stride
    Ho = (H + pt + pb - ph) // sy + 1
    Wo = (W + pl + pr - pw) // sx + 1
    y = np.zeros((Ho, Wo, C, N))
    for i in range(Ho):
        for j in range(Wo):
            r1, c1 = i * sy - pt, j * sx - pl
            win = x[max(r1, 0):min(r1 + ph, H), max(c1, 0):min(c1 + pw, W)]
            y[i, j] = win.max(axis=(0, 1)) if method == 'max' else win.mean(axis=(0, 1))
    return y


# (id, x shape, poolSize, pad, stride)
GEOMS = [
    ('3x3_s2_p1', (9, 9, 3, 2), 3, 1, 2),
    ('2x2_s2', (8, 6, 2, 2), 2, 0, 2),
    ('overlap_3x3_s1', (6, 7, 2, 2), 3, 0, 1),
    ('rect_asym_pad', (7, 6, 2, 2), [3, 2], [1, 0, 0, 1], [2, 1]),
    ('pad2_vh', (5, 6, 2, 1), [3, 3], [2, 1], 1),
    ('global', (8, 8, 3, 2), 8, 0, 1),
]
CASES = [(m,) + g for m in ('max', 'avg') for g in GEOMS]


@pytest.mark.parametrize('case', CASES, ids=[f'{c[0]}-{c[1]}' for c in CASES])
def test_pool_gradcheck_and_values(case):
    method, name, xs, pool, pad, stride = case
    rng = np.random.default_rng(zlib.crc32(f'{method}{name}'.encode()))
    x = rng.standard_normal(xs)
    block = Pooling(method=method, poolSize=pool, pad=pad, stride=stride)
    y = block.forward([x], [])[0]
    yr = ref_pool(x, pair(pool), method, pad4(pad), pair(stride))
    assert y.shape == yr.shape == block.get_output_sizes([xs])[0]
    assert y.flags.f_contiguous and y.dtype == np.float64
    np.testing.assert_allclose(y, yr, rtol=1e-13, atol=1e-13)
    errs = check_block(block, [x], [])
    assert set(errs) == {'in0'}


def test_avg_divisor_is_clipped_window():
    """MatConvNet divides by the number of window elements inside the image."""
    x = np.ones((4, 4, 1, 1))
    y = pool_forward(x, 3, 'avg', pad=1, stride=1)
    np.testing.assert_array_equal(y, np.ones((4, 4, 1, 1)))
    dx = pool_backward(x, np.ones_like(y), 3, 'avg', pad=1, stride=1)
    def expected(r, c):   # sum over the windows holding (r, c) of 1 / (their size inside the image)
        cnt = lambda i: min(i + 2, 4) - max(i - 1, 0)  # noqa: E731
        return sum(1.0 / (cnt(i) * cnt(j)) for i in range(4) for j in range(4)
                   if abs(i - r) <= 1 and abs(j - c) <= 1)
    assert dx[0, 0, 0, 0] == pytest.approx(1 / 4 + 1 / 6 + 1 / 6 + 1 / 9)
    for r in range(4):
        for c in range(4):
            assert dx[r, c, 0, 0] == pytest.approx(expected(r, c))
    # the full-window divisor (the SPEC's wording) would give 4/9 at the corner instead of 1
    assert y[0, 0, 0, 0] == 1.0


def test_max_padding_never_wins_and_ties_go_to_first_in_scan_order():
    x = -np.ones((3, 3, 1, 1))     # all negative: zero padding must not be the max
    y = pool_forward(x, 3, 'max', pad=1, stride=1)
    np.testing.assert_array_equal(y, -np.ones((3, 3, 1, 1)))
    # all equal in one window: the derivative goes to its first element in column-major order
    x = np.zeros((2, 2, 1, 1))
    dx = pool_backward(x, np.ones((1, 1, 1, 1)), 2, 'max')
    np.testing.assert_array_equal(dx[:, :, 0, 0], [[1, 0], [0, 0]])
    # ties at (1,0) and (0,1): column 0 is scanned first, so (row 1, col 0) wins
    x = np.array([[0., 5.], [5., 1.]]).reshape(2, 2, 1, 1, order='F')
    dx = pool_backward(x, np.full((1, 1, 1, 1), 2.0), 2, 'max')
    np.testing.assert_array_equal(dx[:, :, 0, 0], [[0, 0], [2, 0]])
    # overlapping windows accumulate
    x = np.array([1., 9., 2.]).reshape(3, 1, 1, 1)
    dx = pool_backward(x, np.array([1., 10.]).reshape(2, 1, 1, 1), [2, 1], 'max', stride=1)
    np.testing.assert_array_equal(dx.ravel(), [0, 11, 0])


def test_pool_float32_and_layout():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10, 9, 4, 3)).astype(np.float32)
    for method in ('max', 'avg'):
        for xin in (x, np.ascontiguousarray(x)):
            y = pool_forward(xin, [3, 2], method, pad=[1, 1, 0, 1], stride=2)
            assert y.dtype == np.float32 and y.flags.f_contiguous
            yr = ref_pool(x.astype(np.float64), (3, 2), method, (1, 1, 0, 1), (2, 2))
            np.testing.assert_allclose(y, yr, rtol=1e-6, atol=1e-6)
            dx = pool_backward(xin, np.ones_like(y), [3, 2], method, pad=[1, 1, 0, 1], stride=2)
            assert dx.dtype == np.float32 and dx.flags.f_contiguous and dx.shape == x.shape
    # global average: plain mean
    y = pool_forward(x[:8, :8], 8, 'avg')
    np.testing.assert_allclose(y[0, 0], x[:8, :8].mean(axis=(0, 1)), rtol=1e-6, atol=1e-7)
    assert pool_output_size(9, 9, 3, 1, 2) == (5, 5)


def test_pool_empty_batch():
    y = pool_forward(np.zeros((8, 8, 3, 0)), 8, 'avg')
    assert y.shape == (1, 1, 3, 0)
    assert pool_backward(np.zeros((8, 8, 3, 0)), y, 8, 'avg').shape == (8, 8, 3, 0)


def test_pool_errors():
    x = np.zeros((6, 6, 2, 2))
    with pytest.raises(ValueError, match=r'padding value .* larger than or equal to the pooling'):
        pool_forward(x, 2, 'max', pad=2)
    with pytest.raises(ValueError, match=r'pooling window \[7, 7\] is larger than the input'):
        pool_forward(x, 7, 'avg')
    with pytest.raises(ValueError, match=r"method must be 'max' or 'avg'"):
        pool_forward(x, 2, 'sum')
    with pytest.raises(ValueError, match=r'dy has shape \(6, 6, 2, 2\), expected \(3, 3, 2, 2\)'):
        pool_backward(x, x, 2, 'max', stride=2)
    with pytest.raises(ValueError, match=r'stride must be >= 1'):
        pool_forward(x, 2, 'max', stride=0)
    with pytest.raises(ValueError, match=r'dilate must be 1'):
        Pooling(poolSize=2, dilate=2).forward([x], [])


def test_pool_block_api():
    assert block_class('dagnn.Pooling') is Pooling
    # properties as loadmat gives them
    blk = Pooling(method=np.array(['avg']), poolSize=np.array([[8., 8.]]),
                  pad=np.array([[0., 0., 0., 0.]]), stride=np.array([[1., 1.]]),
                  dilate=np.array([[1., 1.]]),
                  opts=np.array([[np.array(['cuDNN'])]], dtype=object))
    assert blk.get_output_sizes([(8, 8, 128, 4)]) == [(1, 1, 128, 4)]
    x = np.random.default_rng(6).standard_normal((8, 8, 5, 3)).astype(np.float32)
    y = blk.forward([x], [])[0]
    assert y.shape == (1, 1, 5, 3)
    dxs, dps = blk.backward([x], [], [np.ones_like(y)], [y])
    assert dps == [] and np.allclose(dxs[0], 1 / 64)
    d = Pooling().save()
    assert d == {'method': 'max', 'poolSize': [1, 1], 'opts': [], 'pad': 0, 'stride': 1,
                 'dilate': 1}


def test_pool_worker_split_agrees(monkeypatch):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((7, 6, 3, 5))
    dy = rng.standard_normal((4, 3, 3, 5))
    ref = [f(x, dy) for f in (lambda x, dy: pool_backward(x, dy, 3, 'max', 1, 2),
                              lambda x, dy: pool_backward(x, dy, 3, 'avg', 1, 2))]
    monkeypatch.setenv('PYDAGNN_NUM_THREADS', '1')
    got = [pool_backward(x, dy, 3, 'max', 1, 2), pool_backward(x, dy, 3, 'avg', 1, 2)]
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
