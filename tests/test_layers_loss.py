"""dagnn.Loss / vl_nnloss: every loss type, labels, ignored labels, instance weights."""
import numpy as np
import pytest

from pydagnn.gradcheck import check_block
from pydagnn.layer import block_class
from pydagnn.layers.loss import Loss, loss_backward, loss_forward, opts_to_dict
from pydagnn.layers.softmax import softmax_forward


def _x(rng, shape=(1, 1, 5, 4)):
    rng.standard_normal(7)          # decorrelate from check_block's default_rng(0) projection
    return np.asfortranarray(rng.standard_normal(shape))


def _ref_terms(x, c, loss):
    """Straightforward per-image reference for 1 x 1 x C x N scores (float64)."""
    C, N = x.shape[2], x.shape[3]
    t = np.zeros(N)
    for n in range(N):
        s = x[0, 0, :, n]
        k = int(c[n]) - 1
        if loss == 'softmaxlog':
            t[n] = np.log(np.exp(s - s.max()).sum()) + s.max() - s[max(k, 0)]
        elif loss == 'classerror':
            t[n] = float(np.argmax(s) != k)
    return t


@pytest.mark.parametrize('loss', ['softmaxlog', 'log', 'classerror', 'topkerror', 'mhinge',
                                  'mshinge'])
def test_gradcheck_categorical(rng, loss):
    x = _x(rng, (2, 3, 5, 3))
    if loss == 'log':
        x = softmax_forward(x)                     # probabilities
    label = np.array([3, 1, 5], dtype=np.float64)  # one label per image
    blk = Loss(loss=loss)
    err = check_block(blk, [x, label], [])
    assert set(err) == {'in0'}


@pytest.mark.parametrize('loss', ['softmaxlog', 'log', 'mhinge', 'mshinge'])
def test_gradcheck_per_pixel_labels_ignore_and_weights(rng, loss):
    x = _x(rng, (2, 2, 4, 3))
    if loss == 'log':
        x = softmax_forward(x)
    label = rng.integers(1, 5, size=(2, 2, 1, 3)).astype(np.float64)
    label[0, 1, 0, 0] = 0
    label[1, 1, 0, 2] = 0                                     # ignored pixels
    w = 0.5 + rng.random((2, 2, 1, 3))
    blk = Loss(loss=loss)
    check_block(blk, [x, label], [])
    check_block(blk, [x, label, w], [])                       # instance weights as a 3rd input
    # ignored terms contribute nothing, to the value or the derivative
    d = loss_backward(x, label, 1.0, loss=loss)
    assert np.all(d[0, 1, :, 0] == 0) and np.all(d[1, 1, :, 2] == 0)


@pytest.mark.parametrize('loss', ['binarylog', 'logistic', 'hinge', 'binaryerror'])
def test_gradcheck_binary(rng, loss):
    x = _x(rng, (2, 1, 3, 2))
    if loss == 'binarylog':
        x = 0.05 + 0.9 * np.asfortranarray(rng.random(x.shape))   # probabilities
    c = np.where(rng.random(x.shape) < 0.5, -1.0, 1.0)
    c[0, 0, 1, 1] = 0                                            # ignored
    blk = Loss(loss=loss)
    check_block(blk, [x, c], [])
    w = 0.5 + rng.random(x.shape)
    check_block(blk, [x, c, w], [])
    assert np.all(loss_backward(x, c, 1.0, loss=loss)[0, 0, 1, 1] == 0)


def test_softmaxlog_values_and_stability(rng):
    x = _x(rng)
    c = np.array([1, 5, 2, 2])
    y = loss_forward(x, c)
    assert y.shape == (1, 1, 1, 1) and y.dtype == np.float64
    np.testing.assert_allclose(y.item(), _ref_terms(x, c, 'softmaxlog').sum(), rtol=1e-12)
    big = (x * 1e4).astype(np.float32)                 # exp would overflow without the shift
    yb = loss_forward(big, c)
    assert yb.dtype == np.float32 and np.isfinite(yb).all()
    assert np.isfinite(loss_backward(big, c, 1.0)).all()
    # dzdy scales the derivative; the derivative is softmax - onehot
    d1 = loss_backward(x, c, 1.0)
    np.testing.assert_allclose(loss_backward(x, c, np.array([[2.5]])), 2.5 * d1, rtol=1e-14)
    onehot = np.zeros_like(x)
    onehot[0, 0, c - 1, np.arange(4)] = 1
    np.testing.assert_allclose(d1, softmax_forward(x) - onehot, rtol=1e-12, atol=1e-15)


def test_ignored_labels_and_instance_weights(rng):
    x = _x(rng)
    c = np.array([1, 0, 2, 3])
    t = _ref_terms(x, c, 'softmaxlog')
    np.testing.assert_allclose(loss_forward(x, c).item(), t[[0, 2, 3]].sum(), rtol=1e-12)
    w = np.array([0.5, 2.0, 1.5, 0.0])
    expect = (w * t * (c != 0)).sum()
    for wshape in [(1, 1, 1, 4), (4,), (1, 4)]:
        y = loss_forward(x, c, instance_weights=w.reshape(wshape))
        np.testing.assert_allclose(y.item(), expect, rtol=1e-12)
    blk = Loss(opts=['instanceWeights', w.reshape(1, 1, 1, 4)])
    np.testing.assert_allclose(blk.forward([x, c], [])[0].item(), expect, rtol=1e-12)


def test_error_losses_counts(rng):
    x = _x(rng, (1, 1, 6, 8))
    c = rng.integers(1, 7, size=8)
    y = loss_forward(x, c, 'classerror')
    assert y.item() == _ref_terms(x, c, 'classerror').sum()
    order = np.argsort(-x[0, 0], axis=0, kind='stable')        # C x N
    for k in (1, 2, 5, 6):
        inside = [(c[n] - 1) in order[:k, n] for n in range(8)]
        yk = loss_forward(x, c, 'topkerror', top_k=k)
        assert yk.dtype == np.float64 and yk.item() == 8 - sum(inside)
    assert loss_forward(x, c, 'topkerror', top_k=1).item() == y.item()
    assert not loss_backward(x, c, 1.0, loss='classerror').any()
    assert not loss_backward(x, c, 1.0, loss='topkerror').any()


def test_ties_rank_like_a_stable_descending_sort():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, :, 0] = [1, 1, 1, 0]       # label 3 ranks third among three equal maxima
    x[0, 0, :, 1] = [1, 1, 1, 0]       # label 1 ranks first
    x[0, 0, :, 2] = [0, 2, 2, 2]       # label 4 ranks third
    x[0, 0, :, 3] = [5, 5, 0, 0]       # label 2 ranks second (argmax picks 1)
    c = np.array([3, 1, 4, 2])
    assert loss_forward(x, c, 'topkerror', top_k=2).item() == 2      # images 1 and 3 out
    assert loss_forward(x, c, 'topkerror', top_k=3).item() == 0
    assert loss_forward(x, c, 'classerror').item() == 3              # only image 2 right


def test_block_average_and_reset(rng):
    blk = Loss()
    x1, x2 = _x(rng, (1, 1, 5, 4)), _x(rng, (1, 1, 5, 2))
    y1 = blk.forward([x1, [1, 2, 3, 4]], [])[0].item()
    y2 = blk.forward([x2, [5, 5]], [])[0].item()
    assert blk.numAveraged == 6
    np.testing.assert_allclose(float(blk.average), (y1 + y2) / 6, rtol=1e-12)
    x3 = _x(rng, (2, 3, 5, 2))                                    # H*W*N terms count
    blk.reset()
    assert blk.average == 0 and blk.numAveraged == 0
    y3 = blk.forward([x3, [1, 2]], [])[0].item()
    assert blk.numAveraged == 12
    np.testing.assert_allclose(float(blk.average), y3 / 12, rtol=1e-12)
    blk2 = Loss(ignoreAverage=True)
    blk2.forward([x1, [1, 2, 3, 4]], [])
    assert blk2.numAveraged == 0


def test_block_opts_topk_and_save():
    assert block_class('dagnn.Loss') is Loss
    blk = Loss(loss='topkerror', opts=['topK', 2])
    assert blk.save() == {'loss': 'topkerror', 'ignoreAverage': False, 'opts': ['topK', 2]}
    x = np.zeros((1, 1, 4, 1))
    x[0, 0, :, 0] = [3, 2, 1, 0]
    assert blk.forward([x, [2]], [])[0].item() == 0
    assert blk.forward([x, [3]], [])[0].item() == 1
    blk.opts = {'topk': 3}
    assert blk.forward([x, [3]], [])[0].item() == 0
    # MATLAB-loaded cell: object array of 1-element arrays
    cell = np.empty((1, 2), dtype=object)
    cell[0, 0] = np.array(['topK'])
    cell[0, 1] = np.array([[3.0]])
    assert opts_to_dict(cell) == {'topk': cell[0, 1]}
    blk.opts = cell
    assert blk.forward([x, [3]], [])[0].item() == 0
    assert opts_to_dict(['NoCuDNN']) == {'nocudnn': True}
    assert opts_to_dict(np.empty((0, 0), dtype=object)) == {}


def test_bad_inputs(rng):
    x = _x(rng, (2, 2, 5, 3))
    msg = r'label has shape \(4,\).*x has shape \(2, 2, 5, 3\).*N = 3.*H\*W\*N = 12'
    with pytest.raises(ValueError, match=msg):
        loss_forward(x, np.ones(4))
    with pytest.raises(ValueError, match=r'label has shape \(1, 3\).*H\*W\*C\*N = 60'):
        loss_forward(x, np.ones((1, 3)), 'hinge')
    with pytest.raises(ValueError, match="unknown loss 'softmax'"):
        loss_forward(x, np.ones(3), 'softmax')
    with pytest.raises(ValueError, match='labels must be integers in 0..5'):
        loss_forward(x, np.array([1, 6, 2]))
    with pytest.raises(ValueError, match='topK = 6'):
        loss_forward(x, np.ones(3), 'topkerror', top_k=6)
    with pytest.raises(ValueError, match='instance weights of shape'):
        loss_forward(x, np.ones(3), instance_weights=np.ones(5))
    with pytest.raises(ValueError, match='dy must be a scalar'):
        loss_backward(x, np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match='unknown option'):
        Loss(opts=['topk', 5, 'bogus', 1]).forward([x, np.ones(3)], [])
