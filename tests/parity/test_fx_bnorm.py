"""Parity with vl_nnbnorm / dagnn.BatchNorm (fixtures/fx_bnorm.mat; float32, 1e-5 tier).
The fixture's cases (training forward, backward without and with 'moments', test mode with
the given moments) run in ``pydagnn.parity_layers.bnorm_cases``: ``rel_err <= 1e-5``,
results float32, dzdg and dzdmoments shaped as stored."""
import numpy as np
import pytest

from pydagnn import parity_layers as pl
from pydagnn.layer import BlockContext
from pydagnn.layers.bnorm import BatchNorm, bnorm_forward
from pydagnn.testing import load_fixture, rel_err

TOL = 1e-5


@pytest.fixture(scope='module')
def fx():
    return load_fixture('fx_bnorm.mat')


@pytest.fixture(scope='module')
def cases(fx):
    return pl.bnorm_cases(fx, np.float32)


def _eps(fx):
    return float(fx['epsilon'].item())


def test_inputs_are_float32(fx):
    for k in ('x', 'g', 'b', 'dzdy', 'test_moments'):
        assert fx[k].dtype == np.float32


@pytest.mark.parametrize('case', pl.BNORM_CASES)
def test_fx_bnorm(cases, case):
    bad = pl.over_tolerance(cases[case])
    assert not bad, pl.format_rows(bad)


def test_dag_block(fx):
    x, g, b = fx['x'], fx['g'], fx['b']
    blk = BatchNorm(numChannels=4, epsilon=_eps(fx))
    m0 = np.zeros((4, 2), np.float32)
    out = blk.forward([x], [g, b, m0])
    assert rel_err(out[0], fx['train_y']) <= TOL
    (dx,), (dg, db, dm) = blk.backward([x], [g, b, m0], [fx['dzdy']], out)
    N = x.shape[3]
    assert rel_err(dx, fx['dag_dzdx']) <= TOL
    assert rel_err(dg, fx['dag_dzdg']) <= TOL
    assert rel_err(db, fx['dag_dzdb']) <= TOL
    assert rel_err(dm, N * fx['dag_dzdmoments']) <= TOL      # the block's x N scaling


def test_test_mode_block(fx):
    """dagnn.BatchNorm in test mode normalizes with the stored moments (the function-level
    test mode is the 'test' case above)."""
    x, g, b, m = fx['x'], fx['g'], fx['b'], fx['test_moments']
    blk = BatchNorm(numChannels=4, epsilon=_eps(fx))
    blk.net = BlockContext(mode='test')
    assert rel_err(blk.forward([x], [g, b, m])[0], fx['test_y']) <= TOL


def test_fusion_bn_of_the_gmsop_network():
    """fusion_bn of gmsop_resnet18_eval (1 x 1 x 8256 x 4): test mode with the stored
    params, normal mode with batch statistics over 4 values, and the moments
    'derivative' (batch moments x 4) the network run recorded."""
    io = load_fixture('gmsop_resnet18_eval_io.mat')
    model = load_fixture('gmsop_resnet18_eval.mat')
    params = {str(p['name'].item()): p['value'] for p in model['params'].ravel()}
    g, b, m = (params['fusion_bn_bn_' + s] for s in 'wbm')
    y, _ = bnorm_forward(io['test_Fusion_out'], g, b, moments=m, test_mode=True)
    assert rel_err(y, io['test_fusion_bn']) <= TOL
    blk = BatchNorm(numChannels=8256)
    out = blk.forward([io['normal_Fusion_out']], [g, b, m])
    assert rel_err(out[0], io['normal_fusion_bn']) <= TOL
    _, (_, _, dm) = blk.backward([io['normal_Fusion_out']], [g, b, m],
                                 [np.ones_like(io['normal_Fusion_out'])], out)
    assert rel_err(dm, io['der_fusion_bn_bn_m']) <= TOL
