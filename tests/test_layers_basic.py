"""ReLU, SoftMax, Sigmoid, Sum, Concat, Scale, DropOut: derivative checks and semantics."""
import numpy as np
import pytest

from pydagnn.gradcheck import check_block
from pydagnn.layer import REGISTRY, BlockContext
from pydagnn.layers.concat import Concat, concat_backward, concat_forward
from pydagnn.layers.dropout import DropOut, dropout_mask
from pydagnn.layers.relu import ReLU, relu_backward, relu_forward
from pydagnn.layers.scale import Scale
from pydagnn.layers.sigmoid import Sigmoid, sigmoid_forward
from pydagnn.layers.softmax import SoftMax, softmax_forward
from pydagnn.layers.sum import Sum, sum_forward


def _x(rng, shape=(3, 2, 4, 2), away_from_zero=False):
    rng.standard_normal(5)      # decorrelate from check_block's default_rng(0) projection
    x = rng.standard_normal(shape)
    if away_from_zero:
        x = np.where(np.abs(x) < 0.05, 0.1, x)
    return np.asfortranarray(x)


def test_registry_names():
    for t, cls in [('dagnn.ReLU', ReLU), ('dagnn.SoftMax', SoftMax), ('dagnn.Sigmoid', Sigmoid),
                   ('dagnn.Sum', Sum), ('dagnn.Concat', Concat), ('dagnn.Scale', Scale),
                   ('dagnn.DropOut', DropOut)]:
        assert REGISTRY[t] is cls and cls.type_name == t
    assert ReLU().save() == {'useShortCircuit': True, 'leak': 0, 'opts': []}
    assert Concat().save() == {'dim': 3}
    assert Scale().save() == {'size': None, 'hasBias': True}
    assert DropOut().save() == {'rate': 0.5, 'frozen': False}
    assert Sum().save() == {} and SoftMax().save() == {} and Sigmoid().save() == {}
    # old files: numInputs is accepted and dropped
    Sum(numInputs=2)
    Concat(numInputs=2, dim=4)
    with pytest.raises(ValueError, match='no property'):
        ReLU(slope=1)


@pytest.mark.parametrize('leak', [0, 0.1])
def test_relu_gradcheck(rng, leak):
    x = _x(rng, away_from_zero=True)
    check_block(ReLU(leak=leak), [x], [])


def test_relu_semantics():
    x = np.array([-2.0, -0.0, 0.0, 3.0]).reshape(1, 1, 4, 1)
    dy = np.full(x.shape, 2.0)
    assert relu_forward(x).ravel().tolist() == [0, 0, 0, 3]
    assert relu_backward(x, dy).ravel().tolist() == [0, 0, 0, 2]      # derivative 0 at x = 0
    assert relu_forward(x, 0.1).ravel().tolist() == [-0.2, 0, 0, 3]
    assert relu_backward(x, dy, 0.1).ravel().tolist() == [0.2, 0.2, 0.2, 2]
    blk = ReLU(opts=['leak', 0.1])                                     # opts override the property
    assert blk.forward([x], [])[0].ravel().tolist() == [-0.2, 0, 0, 3]
    # short circuit: backward from the output when the input was freed
    blk = ReLU()
    y = blk.forward([x], [])
    assert blk.backward([None], [], [dy], y)[0][0].ravel().tolist() == [0, 0, 0, 2]
    x32 = x.astype(np.float32)
    assert relu_forward(x32).dtype == np.float32
    assert relu_backward(x32, dy.astype(np.float32)).dtype == np.float32


def test_softmax_gradcheck(rng):
    x = _x(rng)
    check_block(SoftMax(), [x], [])
    y = softmax_forward(x)
    np.testing.assert_allclose(y.sum(axis=2), 1, rtol=1e-14)
    big = np.asfortranarray(x * 1e4)
    assert np.isfinite(softmax_forward(big)).all()


def test_sigmoid_gradcheck(rng):
    x = _x(rng)
    check_block(Sigmoid(), [x], [])
    np.testing.assert_allclose(sigmoid_forward(x), 1 / (1 + np.exp(-x)), rtol=1e-14)
    with np.errstate(over='raise', invalid='raise', divide='raise'):
        s = sigmoid_forward(np.array([-1e4, 0, 1e4], dtype=np.float32))
    assert s.tolist() == [0, 0.5, 1]


def test_sum_gradcheck(rng):
    xs = [_x(rng) for _ in range(3)]
    blk = Sum()
    assert set(check_block(blk, xs, [])) == {'in0', 'in1', 'in2'}
    assert blk.numInputs == 3
    np.testing.assert_allclose(sum_forward(xs), xs[0] + xs[1] + xs[2], rtol=1e-15)
    with pytest.raises(ValueError, match=r'input 1 has shape \(3, 2, 4, 1\)'):
        sum_forward([xs[0], xs[1][..., :1]])


@pytest.mark.parametrize('dim', [1, 3, 4])
def test_concat_gradcheck(rng, dim):
    shapes = [[3, 2, 4, 2], [3, 2, 4, 2], [3, 2, 4, 2]]
    for s, k in zip(shapes, (1, 2, 3)):
        s[dim - 1] = k
    xs = [_x(rng, tuple(s)) for s in shapes]
    blk = Concat(dim=dim)
    check_block(blk, xs, [])
    y = concat_forward(xs, dim)
    assert y.flags.f_contiguous
    np.testing.assert_array_equal(y, np.concatenate(xs, axis=dim - 1))
    assert blk.get_output_sizes([x.shape for x in xs]) == [y.shape]
    parts = concat_backward(y, [x.shape for x in xs], dim)
    for p, x in zip(parts, xs):
        np.testing.assert_array_equal(p, x)
        assert p.flags.f_contiguous


def test_concat_errors(rng):
    with pytest.raises(ValueError, match='must agree except along dim 3'):
        concat_forward([_x(rng, (2, 2, 1, 1)), _x(rng, (3, 2, 1, 1))])
    with pytest.raises(ValueError, match='dim must be 1..4'):
        concat_forward([_x(rng)], dim=0)


@pytest.mark.parametrize('has_bias', [True, False])
def test_scale_gradcheck(rng, has_bias):
    x = _x(rng, (3, 2, 4, 2))
    C = 4
    w = rng.standard_normal((1, 1, C))
    params = [w] + ([rng.standard_normal((1, 1, C))] if has_bias else [])
    blk = Scale(size=[1, 1, C], hasBias=has_bias)
    errs = check_block(blk, [x], params)
    assert set(errs) == {'in0', 'par0'} | ({'par1'} if has_bias else set())
    # a 1-D (C,) param stands for the 1 x 1 x C of `size`
    p1 = [w.reshape(C)] + ([params[1].reshape(C)] if has_bias else [])
    y0 = blk.forward([x], params)[0]
    y1 = blk.forward([x], p1)[0]
    np.testing.assert_allclose(y0, y1, rtol=1e-15)
    expect = x * w.reshape(1, 1, C, 1) + (params[1].reshape(1, 1, C, 1) if has_bias else 0)
    np.testing.assert_allclose(y0, expect, rtol=1e-15)
    check_block(blk, [x], p1)


def test_scale_as_inputs_and_full_size(rng):
    x = _x(rng, (2, 3, 2, 2))
    w = _x(rng, (2, 3, 2))                       # per position and channel, shared by images
    b = _x(rng, (2, 3, 2))
    blk = Scale(size=[2, 3, 2], hasBias=True)
    check_block(blk, [x, w, b], [])              # operands given as inputs, as Scale.m allows
    p = blk.init_params(np.random.default_rng(0))
    assert p[0].shape == (2, 3, 2) and (p[0] == 1).all() and (p[1] == 0).all()


def test_dropout_fixed_mask_gradcheck(rng):
    x = _x(rng)
    blk = DropOut(rate=0.5)
    blk.mask = dropout_mask(x.shape, 0.5, np.random.default_rng(3), np.float64)
    check_block(blk, [x], [])
    (y,) = blk.forward([x], [])
    assert blk.last_mask is blk.mask
    np.testing.assert_array_equal(y, x * blk.mask)


def test_dropout_masks_and_modes(rng):
    x = np.asfortranarray(np.ones((4, 4, 8, 8), dtype=np.float32))
    blk = DropOut(rate=0.2)
    blk.net = BlockContext(rng=np.random.default_rng(1))
    (y1,) = blk.forward([x], [])
    m1 = blk.last_mask
    assert m1.dtype == np.float32 and m1.flags.f_contiguous
    np.testing.assert_array_equal(y1, m1)
    assert set(np.unique(m1).tolist()) == {0.0, np.float32(1.25)}
    assert 0.7 < (m1 > 0).mean() < 0.9
    blk.forward([x], [])
    m2 = blk.last_mask
    assert not np.array_equal(m1, m2)                       # a fresh mask per forward
    dy = np.full(x.shape, 3.0, dtype=np.float32)
    np.testing.assert_array_equal(blk.backward([x], [], [dy], [None])[0][0], 3 * m2)
    # frozen: the last mask is reused (MatConvNet's `frozen & ~isempty(mask)`)
    blk.frozen = True
    blk.forward([x], [])
    assert blk.last_mask is m2
    # the same generator state gives the same mask
    blk.reset()
    assert blk.frozen is False and blk.mask is None and blk.last_mask is None
    blk.net = BlockContext(rng=np.random.default_rng(1))
    blk.forward([x], [])
    np.testing.assert_array_equal(blk.last_mask, m1)
    # test mode: identity, derivative passes through
    blk.net = BlockContext(mode='test')
    (y,) = blk.forward([x], [])
    assert y is x
    assert blk.backward([x], [], [dy], [y])[0][0] is dy


@pytest.mark.parametrize('dt', [np.float32, np.float64])
@pytest.mark.parametrize('shape', [(3, 4, 2, 2), (64, 64, 16, 8)])   # serial / threaded
def test_sum_of_two_maps_kernel(dt, shape):
    """The numba Sum of two Fortran maps (on the worker threads from PARALLEL_MIN
    elements) equals numpy's, NaN and Inf included; other layouts take numpy's path."""
    from pydagnn.layers.sum import sum_forward
    rng = np.random.default_rng(7)
    a = np.asfortranarray(rng.standard_normal(shape).astype(dt))
    b = np.asfortranarray(rng.standard_normal(shape).astype(dt))
    a.flat[[0, 5]] = [np.nan, np.inf]
    b.flat[[5, 6]] = [-np.inf, np.inf]
    with np.errstate(invalid='ignore'):   # inf + -inf
        y = sum_forward([a, b])
        assert y.dtype == dt and y.flags.f_contiguous
        np.testing.assert_array_equal(y, a + b)
        c = np.ascontiguousarray(b)   # C order: numpy's path, same values
        np.testing.assert_array_equal(sum_forward([a, c]), a + b)
        np.testing.assert_array_equal(sum_forward([a, b, a]), a + b + a)
