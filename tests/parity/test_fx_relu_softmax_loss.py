"""Parity with vl_nnrelu, vl_nnsoftmax, vl_nnloss and vl_nndropout
(fixtures/fx_pool_relu_softmax_loss.mat and the GM-SOP network run; float32, 1e-5 tier).
The fixture's cases run in ``pydagnn.parity_layers.relu_softmax_loss_cases``: functions and
blocks, ``rel_err <= 1e-5``, results float32 (top-k error float64), the ReLU derivative
exactly 0 at the exact zeros of x, error counts exactly equal."""
import numpy as np
import pytest

from pydagnn import parity_layers as pl
from pydagnn.layer import BlockContext
from pydagnn.layers.dropout import DropOut
from pydagnn.layers.loss import loss_forward
from pydagnn.testing import load_fixture, rel_err

TOL = 1e-5


@pytest.fixture(scope='module')
def fx():
    return load_fixture('fx_pool_relu_softmax_loss.mat')


@pytest.fixture(scope='module')
def cases(fx):
    return pl.relu_softmax_loss_cases(fx, np.float32)


def test_fixture(fx):
    x = fx['relu_x']
    assert x.dtype == np.float32 and (x == 0).any()          # exact zeros: derivative 0 there
    assert fx['loss_classerror'].dtype == np.float32
    for k in (5, 2):
        assert fx[f'loss_top{k}error'].dtype == np.float64   # vl_nnloss topkerror: double


@pytest.mark.parametrize('case', pl.RELU_SOFTMAX_LOSS_CASES)
def test_fx_relu_softmax_loss(cases, case):
    bad = pl.over_tolerance(cases[case])
    assert not bad, pl.format_rows(bad)


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
