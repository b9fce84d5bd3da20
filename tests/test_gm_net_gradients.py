"""Whole-network checks of a small GM-SOP net built by ``pydagnn.models.build``
(section_len 1, 4 component modules, top-2, 16x16 inputs, 10 classes, narrow 1x1 convs),
in float64:

* every parameter's derivative (BN moments aside) and the input's derivative from
  ``eval(..., {'objective': 1})`` match central finite differences of
  ``objective + Balance_loss`` (the balance loss's derivative enters through its own
  backward), along random directions, in 'normal' mode with the H_x noise and the
  dropout mask fixed and with a CM selection that no perturbation changes;
* routing: the routed net's fusion, prediction and CM parameter derivatives equal a
  dense reference that runs every CM on every image and masks afterwards; a CM that no
  image selects is skipped and its params get no derivative (``der is None``).
"""
import numpy as np
import pytest

from pydagnn.models import build

N = 4           # images
K = 4           # component modules
TOPK = 2
SMALL = dict(section_len=1, cm_num=K, topk=TOPK, num_classes=10, gating_widths=(8, 6),
             cm_widths=(8, 6), dtype=np.float64)
D = 6 * 7 // 2  # 21: iSQRT-COV of 6 channels


def _small_net(seed=1, dead_cm=None):
    """The small net with generic params: random BN gains/biases and gating weights
    (the constant ones/D init of H_x would tie every score); ``dead_cm`` gets a gating
    column so negative that no image selects it."""
    net = build('ResNet18-GM-SOP', seed=seed, **SMALL)
    rng = np.random.default_rng(100 + seed)
    for p in net.params:
        if p.name.endswith('_bn_w'):
            p.value = 0.8 + 0.4 * rng.random(p.value.shape)
        elif p.name.endswith('_bn_b') or p.name == 'conv1_b':
            p.value = 0.1 * rng.standard_normal(p.value.shape)
    for name in ('gating_w', 'gating_noise_w'):
        p = net.get_param(name)
        p.value = np.asfortranarray(rng.standard_normal(p.value.shape))
    if dead_cm is not None:
        net.get_param('gating_w').value[:, dead_cm - 1] = -50.0
    x = np.asfortranarray(rng.standard_normal((16, 16, 3, N)) * 50)
    label = np.array([1, 4, 7, 10], dtype=np.float64)
    gamma = rng.standard_normal(N)
    mask = np.where(rng.random((1, 1, D, N)) < 0.2, 0.0, 1.25)
    net.get_layer('H_x').block.noise = gamma
    net.get_layer('dropout').block.mask = np.asfortranarray(mask)
    for v in ('gating', 'H_x'):
        net.get_var(v).precious = True
    return net, x, label


def _f(net, x, label):
    """objective + Balance_loss, and the selection mask, from one forward pass."""
    net.eval({'input': x, 'label': label})
    obj = float(np.asarray(net.get_var('objective').value).sum())
    bal = float(np.asarray(net.get_var('Balance_loss').value[0]).sum())
    return obj + bal, net.get_var('gating').value[1].copy()


def _margins(net):
    H = net.get_var('H_x').value[0]
    s = np.sort(H, axis=0)[::-1]
    return s[TOPK - 1] - s[TOPK]


@pytest.fixture(scope='module')
def gm_net():
    net, x, label = _small_net(seed=23)  # CM counts [1 1 3 3], smallest top-k margin 0.27
    _, sel = _f(net, x, label)
    return net, x, label, sel


def test_small_net_selection_is_generic(gm_net):
    net, x, label, sel = gm_net
    assert sel.shape == (K, N) and (sel.sum(axis=0) == TOPK).all()
    assert (sel.sum(axis=1) > 0).all(), 'every CM should receive an image in this set-up'
    assert _margins(net).min() > 0.05  # wide top-k margins: no perturbation below flips them


def test_whole_net_derivatives_match_finite_differences(gm_net):
    net, x, label, sel = gm_net
    net.eval({'input': x, 'label': label}, {'objective': 1})
    ders = {p.name: None if p.der is None else p.der.copy() for p in net.params}
    dx = net.get_var('input').der.copy()
    assert np.array_equal(net.get_var('gating').value[1], sel)
    assert float(np.sum(net.get_var('Balance_loss').value[0])) > 1  # the balance term matters

    rng = np.random.default_rng(7)
    checked = []
    # two random directions for the GM parts and the ends of the net, one elsewhere
    twice = {'gating_w', 'gating_noise_w', 'gating1_f', 'gating2_bn_w', 'CM_1_a_f', 'CM_3_b_f',
             'fusion_bn_bn_w', 'prediction_f', 'conv1_f', 'input'}

    def check(name, value, der, setter):
        assert der is not None, f'{name}: no derivative'
        assert der.shape == value.shape, name
        for _ in range(2 if name in twice else 1):
            v = rng.standard_normal(value.shape)
            v *= max(np.linalg.norm(value), 1e-3 * value.size ** 0.5) / np.linalg.norm(v)
            h = 1e-6
            setter(value + h * v)
            fp, sp = _f(net, x, label)
            setter(value - h * v)
            fm, sm = _f(net, x, label)
            setter(value)
            assert np.array_equal(sp, sel) and np.array_equal(sm, sel), f'{name}: selection changed'
            fd = (fp - fm) / (2 * h)
            an = float(np.sum(der * v))
            scale = np.linalg.norm(der) * np.linalg.norm(v)
            if name == 'conv1_b':  # BN follows conv1: the true derivative is 0
                assert abs(an) < 1e-8 * np.linalg.norm(v) and abs(fd) < 1e-5 * np.linalg.norm(v)
                continue
            # observed: about 1e-9 of the scale, 4e-7 at worst (prediction_b, a tiny vector)
            assert abs(an - fd) <= 2e-6 * scale + 1e-9, \
                f'{name}: directional derivative {an:.10g} vs finite difference {fd:.10g} (scale {scale:.3g})'
        checked.append(name)

    for p in net.params:
        if p.train_method == 'average':
            continue
        def setter(val, p=p):
            p.value = np.asfortranarray(val)
        check(p.name, p.value.copy(), ders[p.name], setter)

    def set_x(val):
        x[...] = val
    check('input', x.copy(), dx, set_x)
    n_params = sum(1 for p in net.params if p.train_method != 'average')
    assert len(checked) == n_params + 1
    assert {'gating_w', 'gating_noise_w', 'CM_1_a_f', 'CM_4_b_f', 'fusion_bn_bn_w', 'prediction_f',
            'conv1_f', 'input'} <= set(checked)


# ----------------------------------------------------------------------------- routing
def _run_chain(net, layers, values):
    """Forward the given layers (names, in order) on ``values`` (var name -> array, all
    images): a dense reference for one CM. Returns the per-layer inputs/outputs."""
    record = []
    for name in layers:
        l = net.get_layer(name)
        ins = [values[v] for v in l.inputs]
        pars = [net.get_param(p).value for p in l.params]
        outs = l.block.forward(ins, pars)
        for v, o in zip(l.outputs, outs):
            values[v] = o
        record.append((l, ins, pars, outs))
    return record


def _back_chain(record, ders):
    """Backward through a recorded chain; returns param name -> derivative."""
    pders = {}
    for l, ins, pars, outs in reversed(record):
        dout = [ders.get(v) for v in l.outputs]
        if all(d is None for d in dout):
            continue
        dins, dpars = l.block.backward(ins, pars, dout, outs)
        for v, d in zip(l.inputs, dins or ()):
            if d is not None:
                ders[v] = d if ders.get(v) is None else ders[v] + d
        for p, d in zip(l.params, dpars or ()):
            if d is not None:
                pders[p] = d
    return pders


def _cm_layers(net, i):
    order = [net.layers[j].name for j in net.execution_order]
    return [n for n in order if n.startswith(f'CM_{i}_')]


@pytest.mark.parametrize('dead_cm', [None, 3])
def test_routing_equals_dense_reference(dead_cm):
    net, x, label = _small_net(seed=16, dead_cm=dead_cm)  # CM counts [2 1 4 1] when none is dead
    for v in ('conv5_1', 'Fusion_out', 'fusion_bn', 'prediction'):
        net.get_var(v).precious = True
    net.eval({'input': x, 'label': label}, {'objective': 1})
    sfm, sel = net.get_var('gating').value[0], net.get_var('gating').value[1].astype(bool)
    trunk = net.get_var('conv5_1').value
    dz = net.get_var('Fusion_out').der
    assert dz is not None and dz.shape == (1, 1, D, N)
    if dead_cm is not None:
        assert not sel[dead_cm - 1].any() and (sel.sum(axis=1) > 0).sum() == K - 1

    fused = np.zeros((D, N))
    for i in range(1, K + 1):
        values = {'conv5_1': trunk}
        record = _run_chain(net, _cm_layers(net, i), values)
        y = values[f'CM_{i}_Cov_ScaleTr'].reshape(D, N, order='F')   # every image
        w = sfm[i - 1] * sel[i - 1]                                    # masked afterwards
        fused += y * w[None, :]
        # the dense reference's backward: the derivative reaches only the selected images
        dy = (dz.reshape(D, N, order='F') * w[None, :]).reshape(1, 1, D, N, order='F')
        ref = _back_chain(record, {f'CM_{i}_Cov_ScaleTr': dy})
        for p in (f'CM_{i}_a_f', f'CM_{i}_b_f'):
            got = net.get_param(p).der
            if not sel[i - 1].any():
                assert got is None, f'{p}: a CM with no image must get no derivative'
                assert net.get_var(f'CM_{i}_Cov_ScaleTr').value is None
                assert not np.any(ref[p])
            else:
                np.testing.assert_allclose(got, ref[p], rtol=1e-10, atol=1e-12 * np.abs(ref[p]).max())
    np.testing.assert_allclose(net.get_var('Fusion_out').value.reshape(D, N, order='F'), fused,
                               rtol=1e-12, atol=1e-12 * np.abs(fused).max())

    # the head on the dense fusion gives the same prediction
    bn = net.get_layer('fusion_bn')
    ybn = bn.block.forward([fused.reshape(1, 1, D, N, order='F')], [net.get_param(p).value for p in bn.params])[0]
    np.testing.assert_allclose(net.get_var('fusion_bn').value, ybn, rtol=1e-10, atol=1e-10)
    mask = net.get_layer('dropout').block.mask
    pred = net.get_layer('prediction')
    ref_pred = pred.block.forward([ybn * mask], [net.get_param(p).value for p in pred.params])[0]
    np.testing.assert_allclose(net.get_var('prediction').value, ref_pred, rtol=1e-10, atol=1e-10)
