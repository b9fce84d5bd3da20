"""The residual tail BatchNorm -> Sum -> ReLU, fused (layers/bnorm_sum_relu.py,
models/fuse.py):

* the fused op against BN, Sum and ReLU (the existing functions) in float32 and
  float64: forward, backward (dx, ds, dg, db, moments), batch and given moments, leak,
  NaN and Inf passed through as the three layers pass them, other layouts and dtypes;
* the block against the three blocks, 'normal' and 'test' mode, a negative leak and
  synced statistics (run as the three blocks);
* nets: a built ResNet18-GAP fused vs not (objective, every param derivative, the input
  derivative, 'normal' and 'test' mode) with one group per pattern found in the net; a
  BN or Sum output read elsewhere, or precious, or a three-input Sum is not fused;
  names unique; saving writes the original layers and a loaded net is fused.
"""
import numpy as np
import pytest

from pydagnn.dagnn import DagNN
from pydagnn.layer import BlockContext
from pydagnn.layers.bnorm import (BatchNorm, bnorm_backward, bnorm_backward_fixed_moments,
                                  bnorm_forward)
from pydagnn.layers.bnorm_sum_relu import (BatchNormSumReLU, bnorm_sum_relu_backward,
                                           bnorm_sum_relu_backward_fixed_moments,
                                           bnorm_sum_relu_forward)
from pydagnn.layers.conv import Conv
from pydagnn.layers.relu import ReLU, relu_backward, relu_forward
from pydagnn.layers.sum import Sum, sum_forward
from pydagnn.models import build
from pydagnn.models.fuse import fuse_bn_relu, set_fused_bn_relu
from pydagnn.testing import rel_err
from test_bn_relu_fusion import _assert_close, _step, resnet  # noqa: F401  (resnet: a fixture)

PAIR, TAIL = 'pydagnn.BatchNormReLU', 'pydagnn.BatchNormSumReLU'
TOL = {np.float32: 1e-6, np.float64: 1e-14}


def _data(dtype, shape=(7, 5, 6, 4), seed=3):
    """x, the shortcut s, dz, g, b and given moments."""
    rng = np.random.default_rng(seed)
    C = shape[2]
    x = np.asfortranarray(rng.standard_normal(shape) * 2 + 0.5).astype(dtype, order='F')
    s = np.asfortranarray(rng.standard_normal(shape)).astype(dtype, order='F')
    dz = np.asfortranarray(rng.standard_normal(shape)).astype(dtype, order='F')
    g = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    m = np.stack([rng.standard_normal(C), rng.uniform(0.5, 2, C)], axis=1).astype(dtype)
    return x, s, dz, g, b, m


def _unfused(x, s, g, b, dz, moments, leak):
    """BN, Sum, ReLU with the existing functions: (z, dx, ds, dg, db, moments)."""
    h, _ = bnorm_forward(x, g, b, moments=moments)
    z = relu_forward(sum_forward([h, s]), leak)
    ds = relu_backward(z, dz, leak)
    dx, dg, db, m = bnorm_backward(x, g, b, ds, moments=moments)
    return z, dx, ds, dg, db, m


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('given', [False, True])
@pytest.mark.parametrize('leak', [0, 0.1])
def test_fused_op_equals_bn_sum_relu(dtype, given, leak):
    x, s, dz, g, b, m = _data(dtype)
    moments = m if given else None
    z, mf = bnorm_sum_relu_forward(x, s, g, b, moments=moments, leak=leak)
    assert z.flags.f_contiguous
    dx, ds, dg, db, mb = bnorm_sum_relu_backward(x, g, b, z, dz, moments=moments, leak=leak)
    assert dx.flags.f_contiguous and ds.flags.f_contiguous
    want = _unfused(x, s, g, b, dz, moments, leak)
    _assert_close((z, dx, ds, dg, db, mb), want, TOL[dtype])
    np.testing.assert_array_equal(mf, mb)
    assert (z >= 0).all() if leak == 0 else (z < 0).any()
    off = z <= 0                                     # the mask did something
    assert off.any() and (~off).any() and (ds[off] == 0).all() == (leak == 0)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_fused_op_given_the_forward_moments_equals_recomputing(dtype):
    """The block hands forward's batch moments to backward: the same numbers."""
    x, s, dz, g, b, _ = _data(dtype)
    z, m = bnorm_sum_relu_forward(x, s, g, b)
    kept = bnorm_sum_relu_backward(x, g, b, z, dz, moments=m)
    again = bnorm_sum_relu_backward(x, g, b, z, dz)
    for a, e in zip(kept, again):
        np.testing.assert_array_equal(a, e)


def test_fused_op_threaded_strided_and_other_dz():
    """Many channels (split over the threads), C-order x and s and a float64 dz for a
    float32 map: the same as the three layers."""
    x, s, dz, g, b, _ = _data(np.float32, shape=(9, 8, 37, 3), seed=5)
    xc, sc = np.ascontiguousarray(x), np.ascontiguousarray(s)
    z, _ = bnorm_sum_relu_forward(xc, sc, g, b)
    got = bnorm_sum_relu_backward(xc, g, b, z, dz.astype(np.float64))
    want = _unfused(x, s, g, b, dz, None, 0)
    _assert_close((z,) + got, want, TOL[np.float32])


def test_a_shortcut_of_another_dtype_runs_the_three_functions():
    """A float64 s for a float32 map: what BN, Sum (numpy's promotion) and ReLU give."""
    x, s, dz, g, b, _ = _data(np.float32)
    s64 = s.astype(np.float64)
    z, _ = bnorm_sum_relu_forward(x, s64, g, b)
    h, _ = bnorm_forward(x, g, b)
    want = relu_forward(sum_forward([h, s64]))
    assert z.dtype == want.dtype == np.float64
    np.testing.assert_array_equal(z, want)


@pytest.mark.parametrize('given', [False, True])
def test_fused_op_nan_and_inf_pass_through(given):
    """A NaN / Inf in x, s or dz reaches the same outputs, as non-finite, as with the
    three layers (channel 1: a NaN in x; channel 2: +-Inf in x; channel 4: NaN and
    +Inf in s; dz: Inf and NaN in channel 3)."""
    x, s, dz, g, b, m = _data(np.float32)
    x[0, 0, 1, 0] = np.nan
    x[1, 0, 2, 0], x[2, 0, 2, 1] = np.inf, -np.inf
    s[0, 1, 4, 0], s[2, 2, 4, 1] = np.nan, np.inf
    dz[3, 1, 3, 0], dz[4, 1, 3, 2] = np.inf, np.nan
    moments = m if given else None
    with np.errstate(invalid='ignore', over='ignore'):
        z, _ = bnorm_sum_relu_forward(x, s, g, b, moments=moments)
        got = (z,) + bnorm_sum_relu_backward(x, g, b, z, dz, moments=moments)[:4]
        want = _unfused(x, s, g, b, dz, moments, 0)[:5]
    for a, e in zip(got, want):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e))
        np.testing.assert_array_equal(np.isinf(a), np.isinf(e))
        ok = np.isfinite(e)
        assert ok.any() and rel_err(a[ok], e[ok]) <= 1e-6
    assert np.isnan(z[:, :, 1]).all() == (not given)
    assert np.isnan(z[0, 1, 4, 0]) and z[2, 2, 4, 1] == np.inf


def test_fused_test_mode_backward_is_the_composed_one():
    x, s, dz, g, b, m = _data(np.float32)
    z, _ = bnorm_sum_relu_forward(x, s, g, b, moments=m, leak=0.2)
    dx, ds, dg, db = bnorm_sum_relu_backward_fixed_moments(x, g, b, z, dz, m, leak=0.2)
    want_ds = relu_backward(z, dz, 0.2)
    np.testing.assert_array_equal(ds, want_ds)
    for a, e in zip((dx, dg, db), bnorm_backward_fixed_moments(x, g, b, want_ds, m)):
        np.testing.assert_array_equal(a, e)


def test_fused_op_negative_leak_forward_and_checks():
    x, s, dz, g, b, _ = _data(np.float32)
    z, _ = bnorm_sum_relu_forward(x, s, g, b, leak=-0.2)
    h, _ = bnorm_forward(x, g, b)
    np.testing.assert_array_equal(z, relu_forward(sum_forward([h, s]), -0.2))
    with pytest.raises(ValueError, match='bnorm_sum_relu_backward: .* needs leak >= 0'):
        bnorm_sum_relu_backward(x, g, b, z, dz, leak=-0.2)
    with pytest.raises(ValueError, match='bnorm_sum_relu_forward: g has shape'):
        bnorm_sum_relu_forward(x, s, g[:3], b)
    with pytest.raises(ValueError,
                       match=r'bnorm_sum_relu_forward: the shortcut s has shape \(7, 5, 6, 3\)'):
        bnorm_sum_relu_forward(x, s[..., :3], g, b)


# ---------------------------------------------------------------------------- the block
def _blocks(mode, leak=0, opts_leak=None, synced=False):
    ctx = BlockContext(mode=mode)
    if synced:
        ctx.batch_reducer = lambda a: a          # one rank: the synced formulas, locally
    bn = BatchNorm(numChannels=6)
    add = Sum()
    relu = ReLU(leak=leak, opts=['leak', opts_leak] if opts_leak is not None else [])
    fused = BatchNormSumReLU(bn, add, relu)
    for blk in (bn, add, relu, fused):
        blk.net = ctx
    return bn, add, relu, fused


def _three_blocks(bn, add, relu, x, s, dz, params):
    """z, [dx, ds], param derivatives of the three blocks (the Sum reads [s, h], as in
    the builders)."""
    h = bn.forward([x], params)[0]
    u = add.forward([s, h], [])[0]
    z = relu.forward([u], [])[0]
    (du,), _ = relu.backward([u], [], [dz], [z])
    (ds, dh), _ = add.backward([s, h], [], [du], [u])
    (dx,), dpar = bn.backward([x], params, [dh], [h])
    return z, [dx, ds], dpar


@pytest.mark.parametrize('mode', ['normal', 'test'])
@pytest.mark.parametrize('leak,opts_leak,synced', [(0, None, False), (0.1, None, False),
                                                   (0, 0.3, False), (-0.2, None, False),
                                                   (0, None, True)])
def test_block_equals_the_three_blocks(mode, leak, opts_leak, synced):
    bn, add, relu, fused = _blocks(mode, leak, opts_leak, synced)
    x, s, dz, g, b, m = _data(np.float64)
    params = [g, b, m]
    z, ders, dpar = _three_blocks(bn, add, relu, x, s, dz, params)
    outs = fused.forward([x, s], params)
    assert len(outs) == 1 + fused.state_outputs
    fders, fdpar = fused.backward([x, s], params, [dz], outs)
    _assert_close([outs[0]] + fders, [z] + ders, 1e-14, mode)
    assert (fdpar[2] is None) == (dpar[2] is None) == (mode == 'test')
    _assert_close([d for d in fdpar if d is not None], [d for d in dpar if d is not None],
                  1e-14, mode)
    assert fused.fusable() == (leak >= 0 and (opts_leak or 0) >= 0)


# ---------------------------------------------------------------------------- nets
def _patterns(net):
    """(BN -> ReLU pairs, BN -> Sum -> ReLU tails) counted on the net's wiring, directly:
    a BN whose output has one reader, a ReLU; a two-input Sum whose output has one
    reader, a ReLU, and one of whose inputs is a BN output with one reader, the Sum."""
    readers = {}
    for l in net.layers:
        for v in l.inputs:
            readers.setdefault(v, []).append(l)
    made_by = {v: l for l in net.layers for v in l.outputs}

    def only(v, type_name):
        r = readers.get(v, [])
        return len(r) == 1 and r[0].type == type_name

    def bn_for_sum(v):
        return v in made_by and made_by[v].type == 'dagnn.BatchNorm' and only(v, 'dagnn.Sum')

    pairs = sum(l.type == 'dagnn.BatchNorm' and only(l.outputs[0], 'dagnn.ReLU')
                for l in net.layers)
    tails = sum(l.type == 'dagnn.Sum' and len(l.inputs) == 2 and only(l.outputs[0], 'dagnn.ReLU')
                and any(bn_for_sum(v) for v in l.inputs) for l in net.layers)
    return pairs, tails


@pytest.mark.parametrize('mode', ['normal', 'test'])
def test_built_resnet_fused_equals_unfused(resnet, mode):
    net, x, label = resnet
    pairs, tails = _patterns(net)
    assert (pairs, tails) == (9, 8)    # conv1 and every 'a' BN; every residual block's tail
    try:
        fused, types = _step(net, x, label, mode, True)
        plain, plain_types = _step(net, x, label, mode, False)
    finally:
        set_fused_bn_relu(net, True)
    assert types.count(PAIR) == pairs and types.count(TAIL) == tails
    assert PAIR not in plain_types and TAIL not in plain_types
    assert len(types) == len(plain_types) - pairs - 2 * tails
    assert fused.keys() == plain.keys()
    for k in plain:
        if np.linalg.norm(plain[k]) == 0:
            np.testing.assert_array_equal(fused[k], plain[k])
        else:
            assert rel_err(fused[k], plain[k]) <= 1e-6, f'{k}: {rel_err(fused[k], plain[k]):.3g}'


def test_builders_fuse_every_tail_with_unique_names(resnet):
    net, _, _ = resnet
    tails = [g for g in net.fused_groups if g.type == TAIL]
    names = {g.name for g in net.fused_groups}
    assert len(tails) == 8 and len(names) == len(net.fused_groups) == 17
    first = tails[0]
    assert first.name == 'conv2_1b_bn+conv2_1_sum+conv2_1_relu'
    assert first.members == ['conv2_1b_bn', 'conv2_1_sum', 'conv2_1_relu']
    assert first.inputs == ['conv2_1b_conv', 'conv1_relu'] and first.outputs == ['conv2_1']
    assert first.params == net.get_layer('conv2_1b_bn').params
    adapted = next(g for g in tails if g.name.startswith('conv3_1b_bn'))
    assert adapted.inputs == ['conv3_1b_conv', 'conv3_1_adapt_conv_bn']   # the adapt BN runs alone
    members = [m for g in net.fused_groups for m in g.members]
    assert len(members) == len(set(members))                              # no layer in two groups
    assert not {g.name for g in net.fused_groups} & {l.name for l in net.layers}
    assert set_fused_bn_relu(net, True) == 17 and len(net.fused_groups) == 17   # replaced


def _tiny(bn_reader=False, sum_reader=False, third_input=False, relu_leak=0):
    """conv -> BN -> Sum(input shortcut, BN) -> ReLU -> conv head; options add a ReLU
    reading the BN output, a ReLU reading the Sum output, or a third Sum input."""
    net = DagNN()
    net.add_layer('conv', Conv(size=[3, 3, 3, 3], pad=1), ['input'], ['c'], ['cf', 'cb'])
    net.add_layer('bn', BatchNorm(numChannels=3), ['c'], ['h'], ['g', 'b', 'm'])
    net.add_layer('sum', Sum(), ['input', 'h'] + (['c'] if third_input else []), ['u'])
    net.add_layer('relu', ReLU(leak=relu_leak), ['u'], ['z'])
    net.add_layer('head', Conv(size=[1, 1, 3, 2]), ['z'], ['out'], ['hf', 'hb'])
    if bn_reader:
        net.add_layer('relu2', ReLU(), ['h'], ['y2'])
    if sum_reader:
        net.add_layer('relu3', ReLU(), ['u'], ['y3'])
    net.init_params(np.random.default_rng(1), dtype=np.float64)
    return net


def _ran(net, x):
    net.eval({'input': x}, {'out': np.ones((5, 5, 2, 2))})
    return [e.name for e in net.executor.plan]


X = np.asfortranarray(np.random.default_rng(2).standard_normal((5, 5, 3, 2)))


def test_the_tiny_tail_is_fused_and_gives_the_layers_numbers():
    net = _tiny()
    assert set_fused_bn_relu(net) == 1 and _ran(net, X) == ['conv', 'bn+sum+relu', 'head']
    fused = {p.name: p.der.copy() for p in net.params} | {'input': net.get_var('input').der.copy()}
    set_fused_bn_relu(net, False)
    assert _ran(net, X) == ['conv', 'bn', 'sum', 'relu', 'head']
    for name, d in fused.items():
        want = net.get_var('input').der if name == 'input' else net.get_param(name).der
        assert rel_err(d, want) <= 1e-14, name


@pytest.mark.parametrize('var', ['h', 'u'])
def test_a_precious_bn_or_sum_output_runs_the_layers(var):
    net = _tiny()
    set_fused_bn_relu(net)
    net.get_var(var).precious = True                   # its value is wanted: the layers run
    assert _ran(net, X) == ['conv', 'bn', 'sum', 'relu', 'head']
    assert net.get_var(var).value is not None


def test_what_is_not_a_tail():
    assert set_fused_bn_relu(_tiny(bn_reader=True)) == 0
    assert set_fused_bn_relu(_tiny(sum_reader=True)) == 0
    assert set_fused_bn_relu(_tiny(third_input=True)) == 0
    assert set_fused_bn_relu(_tiny(relu_leak=-0.1)) == 0
    twice = DagNN()                                     # Sum(h, h): no shortcut
    twice.add_layer('bn', BatchNorm(numChannels=3), ['input'], ['h'], ['g', 'b', 'm'])
    twice.add_layer('sum', Sum(), ['h', 'h'], ['u'])
    twice.add_layer('relu', ReLU(), ['u'], ['z'])
    assert fuse_bn_relu(twice) == []


def test_names_are_unique_and_a_bn_is_in_one_group():
    taken = _tiny()
    taken.add_layer('bn+sum+relu', ReLU(), ['out'], ['out2'])
    (group,) = fuse_bn_relu(taken)
    assert group.name == 'bn+sum+relu#2'
    both = DagNN()                     # Sum(BN1 out, BN2 out): one group, the later input's BN
    both.add_layer('bn1', BatchNorm(numChannels=3), ['input'], ['h1'], ['g1', 'b1', 'm1'])
    both.add_layer('bn2', BatchNorm(numChannels=3), ['input'], ['h2'], ['g2', 'b2', 'm2'])
    both.add_layer('sum', Sum(), ['h1', 'h2'], ['u'])
    both.add_layer('relu', ReLU(), ['u'], ['z'])
    (group,) = fuse_bn_relu(both)
    assert group.members == ['bn2', 'sum', 'relu'] and group.inputs == ['input', 'h1']


def test_save_writes_the_original_layers_and_the_loader_fuses(tmp_path):
    from pydagnn.io.matconvnet import load_matconvnet, save_matconvnet
    net = _tiny()
    set_fused_bn_relu(net)
    before = [(l.name, l.type, l.inputs, l.outputs, l.params) for l in net.layers]
    path = str(tmp_path / 'tiny.mat')
    save_matconvnet(net, path)
    back = load_matconvnet(path)
    assert [(l.name, l.type, l.inputs, l.outputs, l.params) for l in back.layers] == before
    assert [g.name for g in back.fused_groups] == ['bn+sum+relu']
    _ran(net, X)
    assert 'bn+sum+relu' in _ran(back, X)
    for p in net.params:
        np.testing.assert_array_equal(back.get_param(p.name).der, p.der)
