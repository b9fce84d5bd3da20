"""Parity with vl_nnrelu, vl_nnsoftmax, vl_nnloss and vl_nndropout
(fixtures/fx_pool_relu_softmax_loss.mat and the GM-SOP network run; float32, 1e-5 tier)."""
import numpy as np
import pytest

from pydagnn.layer import BlockContext
from pydagnn.layers.dropout import DropOut
from pydagnn.layers.loss import Loss, loss_backward, loss_forward
from pydagnn.layers.relu import ReLU, relu_backward, relu_forward
from pydagnn.layers.softmax import SoftMax, softmax_backward, softmax_forward
from pydagnn.testing import load_fixture, rel_err

TOL = 1e-5


@pytest.fixture(scope='module')
def fx():
    return load_fixture('fx_pool_relu_softmax_loss.mat')


def test_relu(fx):
    x = fx['relu_x']
    assert x.dtype == np.float32 and (x == 0).any()          # exact zeros: derivative 0 there
    y = relu_forward(x)
    dx = relu_backward(x, fx['relu_dzdy'])
    assert y.dtype == np.float32 and dx.dtype == np.float32
    assert rel_err(y, fx['relu_y']) <= TOL
    assert rel_err(dx, fx['relu_dzdx']) <= TOL
    assert np.array_equal(dx[x == 0], np.zeros(int((x == 0).sum()), np.float32))
    blk = ReLU()
    out = blk.forward([x], [])
    assert rel_err(blk.backward([x], [], [fx['relu_dzdy']], out)[0][0], fx['relu_dzdx']) <= TOL


def test_softmax(fx):
    x = fx['softmax_x']
    y = softmax_forward(x)
    assert y.dtype == np.float32
    assert rel_err(y, fx['softmax_y']) <= TOL
    assert rel_err(softmax_backward(x, fx['softmax_dzdy']), fx['softmax_dzdx']) <= TOL
    blk = SoftMax()
    out = blk.forward([x], [])
    dx = blk.backward([x], [], [fx['softmax_dzdy']], out)[0][0]
    assert rel_err(dx, fx['softmax_dzdx']) <= TOL


def test_softmaxlog(fx):
    x, c = fx['loss_x'], fx['loss_label']
    y = loss_forward(x, c, 'softmaxlog')
    assert y.dtype == np.float32
    assert rel_err(y, fx['loss_softmaxlog']) <= TOL
    d1 = loss_backward(x, c, 1, 'softmaxlog')
    d25 = loss_backward(x, c, np.float32(2.5), 'softmaxlog')
    assert d1.dtype == np.float32
    assert rel_err(d1, fx['loss_softmaxlog_dzdx']) <= TOL
    assert rel_err(d25, fx['loss_softmaxlog_dzdx_dzdy2p5']) <= TOL
    blk = Loss()
    out = blk.forward([x, c], [])
    assert rel_err(out[0], fx['loss_softmaxlog']) <= TOL
    dx = blk.backward([x, c], [], [np.float32(2.5)], out)[0][0]
    assert rel_err(dx, fx['loss_softmaxlog_dzdx_dzdy2p5']) <= TOL


def test_error_counts_exact(fx):
    x, c = fx['loss_x'], fx['loss_label']
    y = loss_forward(x, c, 'classerror')
    assert y.dtype == fx['loss_classerror'].dtype == np.float32
    assert y.item() == fx['loss_classerror'].item()
    for k in (5, 2):
        ref = fx[f'loss_top{k}error']
        y = loss_forward(x, c, 'topkerror', top_k=k)
        assert y.dtype == ref.dtype == np.float64
        assert y.item() == ref.item()
        assert Loss(loss='topkerror', opts=['topK', k]).forward([x, c], [])[0].item() == ref.item()


@pytest.mark.parametrize('mode', ['test', 'normal'])
def test_network_head(mode):
    """The GM-SOP network's loss layers on its recorded predictions, and its dropout."""
    io = load_fixture('gmsop_resnet18_eval_io.mat')
    pred, label = io[f'{mode}_prediction'], io['label']
    assert rel_err(loss_forward(pred, label), io[f'{mode}_objective']) <= TOL
    assert loss_forward(pred, label, 'classerror').item() == io[f'{mode}_top1error'].item()
    top5 = loss_forward(pred, label, 'topkerror', top_k=5)
    ref5 = io[f'{mode}_top5error']
    assert top5.dtype == ref5.dtype and top5.item() == ref5.item()
    blk = DropOut(rate=0.2)
    blk.net = BlockContext(mode=mode)
    if mode == 'normal':
        blk.mask = io['normal_dropout_mask']
        blk.frozen = True
    (y,) = blk.forward([io[f'{mode}_fusion_bn']], [])
    assert rel_err(y, io[f'{mode}_dropout']) <= TOL
