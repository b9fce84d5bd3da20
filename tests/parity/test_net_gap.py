"""Whole-network parity: the original ResNet18-GAP baseline (gap_resnet18_init.mat) in
normal mode with batch statistics, against gap_resnet18_eval_io.mat."""
import numpy as np
import pytest

from pydagnn import parity
from pydagnn.testing import load_fixture, shared_path


@pytest.fixture(scope='module', params=['float32', 'float64'])
def result(request):
    from pydagnn.io.matconvnet import load_matconvnet
    io = load_fixture('gap_resnet18_eval_io.mat')
    dtype = np.dtype(request.param)
    net = load_matconvnet(shared_path('fixtures', 'gap_resnet18_init.mat'))
    parity.cast_net(net, dtype)
    net.mode = 'normal'
    net.conserve_memory = False
    net.eval({'input': io['input'].astype(dtype), 'label': io['label'].astype(dtype).ravel()},
             {'objective': 1})
    return io, net


def test_forward(result):
    io, net = result
    assert parity.rel_err(net.get_var('prediction').value, io['normal_prediction']) <= 1e-4
    assert parity.rel_err(net.get_var('objective').value, io['normal_objective']) <= 1e-4


def test_derivatives(result):
    io, net = result
    for name in ('prediction_f', 'prediction_b'):
        assert parity.rel_err(net.get_param(name).der, io['der_' + name]) <= 1e-3, name
    assert parity.rel_err(net.get_param('conv1_f').der, io['der_conv1_f']) <= 3e-2
    # conv1_b is followed by BN: zero by construction, compared at the filter's scale.
    d = np.linalg.norm(net.get_param('conv1_b').der - io['der_conv1_b'].ravel())
    assert d / np.linalg.norm(io['der_conv1_f']) <= 1e-4
