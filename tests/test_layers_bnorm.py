"""dagnn.BatchNorm / vl_nnbnorm: derivative checks and semantics."""
import numpy as np
import pytest

from pydagnn.gradcheck import check_block
from pydagnn.layer import BlockContext, block_class
from pydagnn.layers.bnorm import (BatchNorm, bnorm_backward, bnorm_backward_fixed_moments,
                                  bnorm_forward, bnorm_moments)


def _data(rng, shape=(4, 3, 3, 2)):
    # (x is not drawn first: check_block's projection comes from default_rng(0) too, and a
    # projection that is an affine function of x per channel has a zero derivative)
    C = shape[2]
    g = 0.5 + rng.random(C)
    b = rng.standard_normal(C)
    x = np.asfortranarray(2 * rng.standard_normal(shape) + 0.5)
    m = np.asfortranarray(np.stack([rng.standard_normal(C), 0.5 + rng.random(C)], axis=1))
    return x, g, b, m


def test_registered():
    assert block_class('dagnn.BatchNorm') is BatchNorm
    blk = BatchNorm(numChannels=3)
    assert blk.save() == {'numChannels': 3, 'epsilon': 1e-5, 'opts': ['NoCuDNN']}
    g, b, m = blk.init_params(np.random.default_rng(0))
    assert g.shape == (3,) and b.shape == (3,) and m.shape == (3, 2)
    assert (g == 1).all() and (b == 0).all() and (m == 0).all() and g.dtype == np.float32
    d = blk.param_defaults()
    assert d[2] == {'train_method': 'average', 'learning_rate': 0.1} and d[0] == {} and d[1] == {}


def test_forward_normalizes(rng):
    x, g, b, _ = _data(rng)
    x = x.astype(np.float32)
    y, m = bnorm_forward(x, g.astype(np.float32), b.astype(np.float32))
    assert y.dtype == np.float32 and y.flags.f_contiguous and m.shape == (3, 2)
    xd = x.astype(np.float64)
    mu = xd.mean(axis=(0, 1, 3))
    sig = np.sqrt(xd.var(axis=(0, 1, 3)) + 1e-5)
    np.testing.assert_allclose(m[:, 0], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m[:, 1], sig, rtol=1e-5)
    c4 = (slice(None), None)       # a C-vector as 1 x 1 x C x 1
    ref = g[c4] * (xd - mu[c4]) / sig[c4] + b[c4]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bnorm_moments(x), m, rtol=1e-6)


def test_given_moments_forward(rng):
    x, g, b, m = _data(rng)
    y, mo = bnorm_forward(x, g, b, moments=m, test_mode=True)
    assert mo is m
    def c4(v):
        return v.reshape(1, 1, -1, 1)
    ref = c4(g) * (x - c4(m[:, 0])) / c4(m[:, 1]) + c4(b)
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    with pytest.raises(ValueError, match='test_mode'):
        bnorm_forward(x, g, b, test_mode=True)


def test_gradcheck_normal_mode(rng):
    x, g, b, m = _data(rng)
    blk = BatchNorm(numChannels=3)
    err = check_block(blk, [x], [g, b, m], wrt=['in0', 'par0', 'par1'])
    assert set(err) == {'in0', 'par0', 'par1'}


def test_gradcheck_normal_mode_column_params(rng):
    # MATLAB-shaped C x 1 params: derivatives come back in the same shapes
    x, g, b, m = _data(rng, (2, 2, 4, 3))
    blk = BatchNorm(numChannels=4)
    check_block(blk, [x], [g.reshape(4, 1), b.reshape(4, 1), m], wrt=['in0', 'par0', 'par1'])


def test_moments_derivative_is_batch_moments_times_n(rng):
    x, g, b, m = _data(rng)
    blk = BatchNorm(numChannels=3)
    dy = np.asfortranarray(rng.standard_normal(x.shape))
    _, (dg, db, dm) = blk.backward([x], [g, b, m], [dy], blk.forward([x], [g, b, m]))
    assert dm.shape == (3, 2)
    np.testing.assert_allclose(dm, 2 * bnorm_moments(x), rtol=1e-12)


def test_gradcheck_test_mode(rng):
    x, g, b, m = _data(rng)
    blk = BatchNorm(numChannels=3)
    blk.net = BlockContext(mode='test')
    err = check_block(blk, [x], [g, b, m])
    assert set(err) == {'in0', 'par0', 'par1'}     # no moments derivative in test mode
    _, dpar = blk.backward([x], [g, b, m], [np.ones(x.shape)], None)
    assert dpar[2] is None


def test_backward_with_given_moments_follows_the_original(rng):
    # vl_nnbnorm(x,g,b,dy,'moments',m) applies the batch formula with the given moments;
    # with the batch moments it equals the plain backward.
    x, g, b, _ = _data(rng)
    dy = rng.standard_normal(x.shape)
    dx0, dg0, db0, m0 = bnorm_backward(x, g, b, dy)
    dx1, dg1, db1, m1 = bnorm_backward(x, g, b, dy, moments=m0)
    assert m1 is m0
    for a, c in ((dx0, dx1), (dg0, dg1), (db0, db1)):
        np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12)
    # given other moments: dg, db are those of the given-moments forward, dx is not g/sigma*dy
    _, _, _, m = _data(rng)
    dx2, dg2, db2, _ = bnorm_backward(x, g, b, dy, moments=m)
    dx3, dg3, db3 = bnorm_backward_fixed_moments(x, g, b, dy, m)
    np.testing.assert_allclose(dg2, dg3, rtol=1e-10)
    np.testing.assert_allclose(db2, db3, rtol=1e-10)
    assert not np.allclose(dx2, dx3)


def test_bad_shapes(rng):
    x, g, b, m = _data(rng)
    with pytest.raises(ValueError, match=r'g has shape \(2,\).*\(4, 3, 3, 2\)'):
        bnorm_forward(x, g[:2], b)
    with pytest.raises(ValueError, match='moments'):
        bnorm_forward(x, g, b, moments=m[:2])
    with pytest.raises(ValueError, match='dy has shape'):
        bnorm_backward(x, g, b, np.ones(5))


def test_f_order_independent(rng):
    x, g, b, _ = _data(rng)
    y1, _ = bnorm_forward(x, g, b)
    y2, _ = bnorm_forward(np.ascontiguousarray(x), g, b)
    np.testing.assert_allclose(y1, y2, rtol=1e-13)
    assert y2.flags.f_contiguous
