"""BatchNorm followed by ReLU, fused (layers/bnorm_relu.py, models/fuse.py):

* the fused op against BN then ReLU (the existing functions) in float32 and float64:
  forward, backward (dx, dg, db, moments), batch and given moments, leak, NaN and Inf
  passed through as the two layers pass them, other layouts and dtypes of dy;
* the block against the two blocks, 'normal' and 'test' mode, and a negative leak
  (run as the two blocks);
* nets: a built ResNet18-GAP fused vs not (objective, every param derivative, the input
  derivative, 'normal' and 'test' mode); a BN output read elsewhere, or precious, is not
  fused; names unique; saving writes the original layers and a loaded net is fused.
"""
import numpy as np
import pytest

from pydagnn.dagnn import DagNN
from pydagnn.layer import BlockContext
from pydagnn.layers.bnorm import (BatchNorm, bnorm_backward, bnorm_backward_fixed_moments,
                                  bnorm_forward)
from pydagnn.layers.bnorm_relu import (BatchNormReLU, bnorm_relu_backward,
                                       bnorm_relu_backward_fixed_moments, bnorm_relu_forward)
from pydagnn.layers.conv import Conv
from pydagnn.layers.relu import ReLU, relu_backward, relu_forward
from pydagnn.models import build
from pydagnn.models.fuse import fuse_bn_relu, set_fused_bn_relu
from pydagnn.testing import rel_err

FUSED = 'pydagnn.BatchNormReLU'
TOL = {np.float32: 1e-6, np.float64: 1e-14}


def _data(dtype, shape=(7, 5, 6, 4), seed=3):
    rng = np.random.default_rng(seed)
    C = shape[2]
    x = np.asfortranarray(rng.standard_normal(shape) * 2 + 0.5).astype(dtype, order='F')
    dy = np.asfortranarray(rng.standard_normal(shape)).astype(dtype, order='F')
    g = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    m = np.stack([rng.standard_normal(C), rng.uniform(0.5, 2, C)], axis=1).astype(dtype)
    return x, dy, g, b, m


def _unfused(x, g, b, dy, moments, leak):
    """BN then ReLU with the existing functions: (y, dx, dg, db, moments)."""
    z, _ = bnorm_forward(x, g, b, moments=moments)
    y = relu_forward(z, leak)
    dx, dg, db, m = bnorm_backward(x, g, b, relu_backward(y, dy, leak), moments=moments)
    return y, dx, dg, db, m


def _assert_close(got, want, tol, what=''):
    for k, (a, e) in enumerate(zip(got, want)):
        assert a.dtype == e.dtype and a.shape == e.shape, f'{what} output {k}'
        assert rel_err(a, e) <= tol, f'{what} output {k}: rel err {rel_err(a, e):.3g}'


# ---------------------------------------------------------------------------- the op
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('given', [False, True])
@pytest.mark.parametrize('leak', [0, 0.1])
def test_fused_op_equals_bn_then_relu(dtype, given, leak):
    x, dy, g, b, m = _data(dtype)
    moments = m if given else None
    y, mf = bnorm_relu_forward(x, g, b, moments=moments, leak=leak)
    assert y.flags.f_contiguous
    dx, dg, db, mb = bnorm_relu_backward(x, g, b, y, dy, moments=moments, leak=leak)
    want = _unfused(x, g, b, dy, moments, leak)
    _assert_close((y, dx, dg, db, mb), want, TOL[dtype])
    np.testing.assert_array_equal(mf, mb)
    assert (y >= 0).all() if leak == 0 else (y < 0).any()


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_fused_op_given_the_forward_moments_equals_recomputing(dtype):
    """The block hands forward's batch moments to backward: the same numbers."""
    x, dy, g, b, _ = _data(dtype)
    y, m = bnorm_relu_forward(x, g, b)
    kept = bnorm_relu_backward(x, g, b, y, dy, moments=m)
    again = bnorm_relu_backward(x, g, b, y, dy)
    for a, e in zip(kept, again):
        np.testing.assert_array_equal(a, e)


def test_fused_op_threaded_strided_and_other_dy():
    """Many channels (split over the threads), a C-order x and a float64 dy for a float32
    map: the same as the two layers."""
    x, dy, g, b, _ = _data(np.float32, shape=(9, 8, 37, 3), seed=5)
    xc = np.ascontiguousarray(x)
    y, _ = bnorm_relu_forward(xc, g, b)
    got = bnorm_relu_backward(xc, g, b, y, dy.astype(np.float64))
    want = _unfused(x, g, b, dy, None, 0)
    _assert_close((y,) + got, want, TOL[np.float32])


@pytest.mark.parametrize('given', [False, True])
def test_fused_op_nan_and_inf_pass_through(given):
    """A NaN / Inf in x or dy reaches the same outputs, as non-finite, as with the two
    layers (channel 1: a NaN; channel 2: +-Inf; dy: Inf and NaN in channel 3)."""
    x, dy, g, b, m = _data(np.float32)
    x[0, 0, 1, 0] = np.nan
    x[1, 0, 2, 0], x[2, 0, 2, 1] = np.inf, -np.inf
    dy[3, 1, 3, 0], dy[4, 1, 3, 2] = np.inf, np.nan
    moments = m if given else None
    with np.errstate(invalid='ignore', over='ignore'):
        y, _ = bnorm_relu_forward(x, g, b, moments=moments)
        got = (y,) + bnorm_relu_backward(x, g, b, y, dy, moments=moments)[:3]
        want = _unfused(x, g, b, dy, moments, 0)[:4]
    for a, e in zip(got, want):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
        np.testing.assert_array_equal(np.isinf(a), np.isinf(e))
        ok = np.isfinite(e)
        assert ok.any() and rel_err(a[ok], e[ok]) <= 1e-6
    assert np.isnan(y[:, :, 1]).all() == (not given)


def test_fused_test_mode_backward_is_the_composed_one():
    x, dy, g, b, m = _data(np.float32)
    y, _ = bnorm_relu_forward(x, g, b, moments=m, leak=0.2)
    got = bnorm_relu_backward_fixed_moments(x, g, b, y, dy, m, leak=0.2)
    want = bnorm_backward_fixed_moments(x, g, b, relu_backward(y, dy, 0.2), m)
    for a, e in zip(got, want):
        np.testing.assert_array_equal(a, e)


def test_fused_op_negative_leak_forward_and_checks():
    x, dy, g, b, _ = _data(np.float32)
    y, _ = bnorm_relu_forward(x, g, b, leak=-0.2)
    np.testing.assert_array_equal(y, relu_forward(bnorm_forward(x, g, b)[0], -0.2))
    with pytest.raises(ValueError, match='bnorm_relu_backward: .* needs leak >= 0'):
        bnorm_relu_backward(x, g, b, y, dy, leak=-0.2)
    with pytest.raises(ValueError, match='bnorm_relu_forward: g has shape'):
        bnorm_relu_forward(x, g[:3], b)


# ---------------------------------------------------------------------------- the block
def _blocks(mode, leak=0, opts_leak=None):
    ctx = BlockContext(mode=mode)
    bn = BatchNorm(numChannels=6)
    relu = ReLU(leak=leak, opts=['leak', opts_leak] if opts_leak is not None else [])
    fused = BatchNormReLU(bn, relu)
    for blk in (bn, relu, fused):
        blk.net = ctx
    return bn, relu, fused


@pytest.mark.parametrize('mode', ['normal', 'test'])
@pytest.mark.parametrize('leak,opts_leak', [(0, None), (0.1, None), (0, 0.3), (-0.2, None)])
def test_block_equals_the_two_blocks(mode, leak, opts_leak):
    bn, relu, fused = _blocks(mode, leak, opts_leak)
    x, dy, g, b, m = _data(np.float64)
    params = [g, b, m]
    z = bn.forward([x], params)[0]
    y = relu.forward([z], [])[0]
    (dz,), _ = relu.backward([z], [], [dy], [y])
    (dx,), dpar = bn.backward([x], params, [dz], [z])
    outs = fused.forward([x], params)
    assert len(outs) == 1 + fused.state_outputs
    (fdx,), fdpar = fused.backward([x], params, [dy], outs)
    _assert_close([outs[0], fdx], [y, dx], 1e-14, mode)
    assert (fdpar[2] is None) == (dpar[2] is None) == (mode == 'test')
    _assert_close([d for d in fdpar if d is not None], [d for d in dpar if d is not None],
                  1e-14, mode)
    assert fused.fusable() == (relu.backward_needs_inputs is False)


# ---------------------------------------------------------------------------- nets
@pytest.fixture(scope='module')
def resnet():
    net = build('ResNet18-GAP', num_classes=10)
    rng = np.random.default_rng(0)
    for layer in net.layers:          # test mode needs sensible stored moments
        if layer.type == 'dagnn.BatchNorm':
            p = net.get_param(layer.params[2])
            C = p.value.shape[0]
            m = np.stack([rng.standard_normal(C) * 0.1, rng.uniform(0.5, 2, C)], axis=1)
            p.value = np.asfortranarray(m.astype(np.float32))
    x = np.asfortranarray(rng.standard_normal((64, 64, 3, 4)).astype(np.float32) * 60)
    label = rng.integers(1, 11, size=4).astype(np.float32)
    return net, x, label


def _step(net, x, label, mode, fused):
    """objective, input derivative and param derivatives of one eval; the plan's types."""
    set_fused_bn_relu(net, fused)
    net.mode = mode
    net.get_var('objective').precious = True
    net.eval({'input': x, 'label': label}, {'objective': 1})
    out = {'objective': net.get_var('objective').value.copy(),
           'der_input': net.get_var('input').der.copy()}
    out.update({'der_' + p.name: p.der.copy() for p in net.params if p.der is not None})
    return out, [e.type for e in net.executor.plan]


@pytest.mark.parametrize('mode', ['normal', 'test'])
def test_built_resnet_fused_equals_unfused(resnet, mode):
    net, x, label = resnet
    try:
        fused, types = _step(net, x, label, mode, True)
        plain, plain_types = _step(net, x, label, mode, False)
    finally:
        set_fused_bn_relu(net, True)
    assert types.count(FUSED) == 9 and FUSED not in plain_types     # conv1 and every 'a' BN
    # the 8 residual tails (BN -> Sum -> ReLU) are groups too: tests/test_bn_sum_relu_fusion.py
    assert len(types) == len(plain_types) - 9 - 2 * 8
    assert fused.keys() == plain.keys()
    for k in plain:
        if np.linalg.norm(plain[k]) == 0:
            np.testing.assert_array_equal(fused[k], plain[k])
        else:
            assert rel_err(fused[k], plain[k]) <= 1e-6, f'{k}: {rel_err(fused[k], plain[k]):.3g}'


def test_builders_fuse_every_bn_relu_pair_with_unique_names(resnet):
    net, _, _ = resnet
    groups = [g for g in net.fused_groups if g.type == FUSED]
    assert len(groups) == 9 and len({g.name for g in groups}) == 9
    first = groups[0]
    assert first.name == 'conv1_bn+conv1_relu' and first.members == ['conv1_bn', 'conv1_relu']
    assert first.params == net.get_layer('conv1_bn').params and first.outputs == ['conv1_relu']
    assert not {g.name for g in groups} & {l.name for l in net.layers}
    # replaced, not added (and the 8 residual tails)
    assert set_fused_bn_relu(net, True) == 9 + 8 and len(net.fused_groups) == 9 + 8


def _tiny(extra_reader=False, relu_leak=0):
    """conv -> BN -> ReLU -> conv; with ``extra_reader`` a second ReLU also reads the BN output."""
    net = DagNN()
    net.add_layer('conv', Conv(size=[3, 3, 3, 4], pad=1), ['input'], ['c'], ['cf', 'cb'])
    net.add_layer('bn', BatchNorm(numChannels=4), ['c'], ['z'], ['g', 'b', 'm'])
    net.add_layer('relu', ReLU(leak=relu_leak), ['z'], ['y'])
    net.add_layer('head', Conv(size=[1, 1, 4, 2]), ['y'], ['out'], ['hf', 'hb'])
    if extra_reader:
        net.add_layer('relu2', ReLU(), ['z'], ['y2'])
    net.init_params(np.random.default_rng(1), dtype=np.float64)
    return net


def _ran(net, x):
    net.eval({'input': x}, {'out': np.ones((5, 5, 2, 2))})
    return [e.name for e in net.executor.plan]


def test_a_bn_output_read_elsewhere_or_precious_is_not_fused():
    x = np.asfortranarray(np.random.default_rng(2).standard_normal((5, 5, 3, 2)))
    net = _tiny()
    assert set_fused_bn_relu(net) == 1 and _ran(net, x) == ['conv', 'bn+relu', 'head']
    net.get_var('z').precious = True                      # its value is wanted: the layers run
    assert _ran(net, x) == ['conv', 'bn', 'relu', 'head'] and net.get_var('z').value is not None
    assert set_fused_bn_relu(_tiny(extra_reader=True)) == 0
    assert set_fused_bn_relu(_tiny(relu_leak=-0.1)) == 0
    taken = _tiny()
    taken.add_layer('bn+relu', ReLU(), ['out'], ['out2'])
    (group,) = fuse_bn_relu(taken)
    assert group.name == 'bn+relu#2'


def test_a_rewired_net_runs_the_layers():
    x = np.asfortranarray(np.random.default_rng(2).standard_normal((5, 5, 3, 2)))
    net = _tiny()
    set_fused_bn_relu(net)
    net.remove_layer('relu')
    net.add_layer('relu', ReLU(leak=0.5), ['z'], ['y'])   # a new block: not the group's
    assert 'bn+relu' not in _ran(net, x)


def test_save_writes_the_original_layers_and_the_loader_fuses(tmp_path):
    from pydagnn.io.matconvnet import load_matconvnet, save_matconvnet
    net = _tiny()
    set_fused_bn_relu(net)
    before = [(l.name, l.type, l.inputs, l.outputs, l.params) for l in net.layers]
    path = str(tmp_path / 'tiny.mat')
    save_matconvnet(net, path)
    back = load_matconvnet(path)
    assert [(l.name, l.type, l.inputs, l.outputs, l.params) for l in back.layers] == before
    assert [g.name for g in back.fused_groups] == ['bn+relu']
    x = np.asfortranarray(np.random.default_rng(2).standard_normal((5, 5, 3, 2)))
    _ran(net, x)
    assert 'bn+relu' in _ran(back, x)
    for p in net.params:
        np.testing.assert_array_equal(back.get_param(p.name).der, p.der)
