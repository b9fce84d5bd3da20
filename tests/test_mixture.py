"""The batched mixture (layers/mixture.py, pydagnn/plan.py, models/gm.fuse_mixture):
every GM net runs its K routed component chains and CM_out as one block over all
(image, component) pairs; the looped path (the layers one by one) is the reference.

* a small built GM-SOP net (float64) and the original loaded net (float32 fixture):
  batched == looped in forward values and in every param derivative, to float rounding;
* the block alone: float64 central differences for the routed input, every param and
  the gate weights, with a component that no image selects;
* an empty component keeps ``der is None``; a precious internal var sends the net back
  to the looped path; saving writes the original layers and loading fuses again.
"""
import os

import numpy as np
import pytest

from pydagnn import backend, load_matconvnet
from pydagnn.gradcheck import check_block, numerical_derivative, assert_close
from pydagnn.models import build
from pydagnn.models.gm import MIXTURE_NAME, fuse_mixture, set_batched_mixture
from pydagnn.routing import GateValue
from pydagnn.testing import rel_err

N, K, TOPK = 5, 4, 2
SMALL = dict(section_len=1, cm_num=K, topk=TOPK, num_classes=10, gating_widths=(8, 6),
             cm_widths=(8, 6), dtype=np.float64)
FIXTURE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'fixtures', 'gmsop_resnet18_eval.mat')


def _small(seed=7, dead_cm=None):   # seed 7: CM counts [2 4 1 3]
    """The small GM-SOP net with random gating weights (so the selection is generic),
    a fixed H_x noise and dropout mask (so two evals see the same randomness)."""
    net = build('ResNet18-GM-SOP', seed=seed, **SMALL)
    rng = np.random.default_rng(50 + seed)
    for name in ('gating_w', 'gating_noise_w'):
        p = net.get_param(name)
        p.value = np.asfortranarray(rng.standard_normal(p.value.shape))
    if dead_cm is not None:
        net.get_param('gating_w').value[:, dead_cm - 1] = -50.0
    x = np.asfortranarray(rng.standard_normal((16, 16, 3, N)) * 50)
    label = rng.integers(1, 11, size=N).astype(np.float64)
    net.get_layer('H_x').block.noise = rng.standard_normal(N)
    D = net.get_layer('Fusion_out').block.hdim
    net.get_layer('dropout').block.mask = np.asfortranarray(np.where(rng.random((1, 1, D, N)) < 0.2, 0, 1.25))
    return net, x, label


def _run(net, x, label, batched):
    """Fusion_out, objective, input and param derivatives of one normal-mode step."""
    assert set_batched_mixture(net, batched) == batched
    net.get_var('Fusion_out').precious = True
    net.eval({'input': x, 'label': label}, {'objective': 1})
    ran = [e.name for e in net.executor.plan]
    assert (MIXTURE_NAME in ran) == batched
    out = {'Fusion_out': _host(net.get_var('Fusion_out').value),
           'objective': _host(net.get_var('objective').value),
           'der_input': _host(net.get_var('input').der)}
    for p in net.params:
        out['der_' + p.name] = _host(p.der)
    return out


def _mixtures(net):
    """The net's batched-mixture groups (the BN -> ReLU pairs are fused groups too)."""
    return [g for g in net.fused_groups if g.type == 'pydagnn.Mixture']


def _host(v):
    return None if v is None else np.array(backend.to_host(v))


def _assert_same(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, f'{k}: a derivative in one path only'
            continue
        assert rel_err(a[k], b[k]) <= tol, f'{k}: batched vs looped rel err {rel_err(a[k], b[k]):.3g}'


def test_builders_and_loader_fuse_the_mixture():
    net, _, _ = _small()
    (group,) = _mixtures(net)
    assert group.name == MIXTURE_NAME and group.inputs == ['conv5_1', 'gating']
    assert group.outputs == ['Fusion_out'] + [f'CM_{i}_Cov_ScaleTr' for i in range(1, K + 1)]
    # every CM param, by its own name, component-major; the net's layers are untouched
    assert group.params == [f'CM_{i}_{c}_f' for i in range(1, K + 1) for c in 'ab']
    assert {l.name for l in net.layers} >= set(group.members)
    assert len(group.members) == K * 8 + 1


@pytest.mark.parametrize('dead_cm', [None, 2])
# per_chunk: the CPU's chain-major chunks (1: every component over several chunks), or
# None: the stage-major stacks (the GPU's path)
@pytest.mark.parametrize('per_chunk', [8, 1, None])
def test_batched_equals_looped_on_a_built_net(dead_cm, per_chunk, monkeypatch):
    from pydagnn.layers.mixture import MixtureBlock
    monkeypatch.setattr(MixtureBlock, 'pairs_per_chunk', per_chunk)
    net, x, label = _small(dead_cm=dead_cm)
    looped = _run(net, x, label, False)
    batched = _run(net, x, label, True)
    _assert_same(batched, looped, 1e-12)
    assert all(batched['der_' + p.name] is not None for p in net.params
               if p.name.startswith('CM_') and not p.name.startswith(f'CM_{dead_cm}_'))
    if dead_cm is not None:   # no image selects it: no derivative, no value (as looped)
        for c in 'ab':
            assert batched[f'der_CM_{dead_cm}_{c}_f'] is None
        assert net.get_var(f'CM_{dead_cm}_Cov_ScaleTr').value is None
        assert net.executor.routes[f'CM_{dead_cm}_a_conv'].size == 0


def test_routes_are_recorded_for_the_fused_members():
    net, x, label = _small()
    net.get_var('gating').precious = True
    net.eval({'input': x, 'label': label})
    mask = net.get_var('gating').value[1].astype(bool)
    for i in range(1, K + 1):
        np.testing.assert_array_equal(net.executor.routes[f'CM_{i}_a_conv'], np.flatnonzero(mask[i - 1]))


def test_precious_internal_var_runs_the_layers():
    net, x, label = _small()
    net.get_var('CM_1_cov_pool').precious = True
    net.eval({'input': x, 'label': label})
    assert MIXTURE_NAME not in [e.name for e in net.executor.plan]
    assert net.get_var('CM_1_cov_pool').value is not None
    net.get_var('CM_1_cov_pool').precious = False
    net.eval({'input': x, 'label': label})
    assert MIXTURE_NAME in [e.name for e in net.executor.plan]


def test_changed_structure_runs_the_layers():
    """A group made before a change of the net is not used (the layers run); fusing
    again finds the chains by their routing, whatever their names."""
    net, x, label = _small()
    ref = _run(net, x, label, True)
    net.rename_layer('CM_2_b_relu', 'CM_2_b_relu_renamed')
    net.eval({'input': x, 'label': label})
    assert MIXTURE_NAME not in [e.name for e in net.executor.plan]
    _assert_same(_run(net, x, label, True), ref, 1e-12)       # fused again, same numbers


@pytest.mark.parametrize('per_chunk', [2, None])
def test_block_float64_derivatives(per_chunk, monkeypatch):
    """The block alone: central differences for x, every param and the gate weights;
    component 3 gets no image (its params: no derivative). Chain-major chunks of 2 pairs
    (components split over chunks) and the stage-major stacks."""
    from pydagnn.layers.mixture import MixtureBlock
    monkeypatch.setattr(MixtureBlock, 'pairs_per_chunk', per_chunk)
    net, _, _ = _small()
    group = fuse_mixture(net)
    block = group.block
    rng = np.random.default_rng(7)
    x = np.asfortranarray(rng.standard_normal((4, 4, 128, N)))
    mask = np.zeros((K, N), bool)
    for n in range(N):
        mask[rng.choice([0, 1, 3], TOPK, replace=False), n] = True
    sfm = np.where(mask, rng.random((K, N)) + 0.5, 0.0)
    params = [np.asfortranarray(rng.standard_normal(net.get_param(p).value.shape) * 0.2) for p in group.params]
    gate = (sfm, mask)
    D = block.hdim
    dz = rng.standard_normal((1, 1, D, N))
    der_outputs = [dz] + [None] * (K + 1)
    errs = check_block(block, [x, gate], params, der_outputs=der_outputs, rtol=1e-5, atol=1e-9)
    assert 'in0' in errs and all(f'par{k}' in errs for k in (0, 1, 2, 3, 6, 7))
    outs = block.forward([x, gate], params)
    der_in, der_par = block.backward([x, gate], params, der_outputs, outs)
    assert der_par[4] is None and der_par[5] is None              # component 3: no image
    assert outs[3] is None                                       # ... and no output

    def f():
        return float(np.sum(block.forward([x, (sfm, mask)], params)[0] * dz))
    idx, num = numerical_derivative(f, sfm)
    sel = mask.reshape(-1)[idx]
    assert_close('mixture d sfm', der_in[1].reshape(-1)[idx][sel], num[sel], 1e-6, 1e-9)
    assert not np.any(der_in[1][~mask])


def test_gate_value_pairs_are_cached():
    mask = np.array([[1, 0, 1], [0, 1, 1]], bool)
    g = GateValue((np.ones((2, 3)), mask), counts=np.array([2, 2]))
    from pydagnn.routing import route_index
    p = route_index(g).pairs()
    assert route_index(g).pairs() is p
    np.testing.assert_array_equal(p.image, [0, 2, 1, 2])
    np.testing.assert_array_equal(p.component, [0, 0, 1, 1])
    assert p.bounds == [(0, 2), (2, 4)] and len(p) == 4


def test_save_writes_the_original_layers(tmp_path):
    from pydagnn.io.matconvnet import save_matconvnet
    net, x, label = _small()
    before = [(l.name, l.type, l.inputs, l.outputs, l.params) for l in net.layers]
    path = str(tmp_path / 'gm.mat')
    save_matconvnet(net, path)
    back = load_matconvnet(path)
    assert [(l.name, l.type, l.inputs, l.outputs, l.params) for l in back.layers] == before
    assert [g.name for g in _mixtures(back)] == [MIXTURE_NAME]


@pytest.fixture(scope='module')
def original():
    if not os.path.exists(FIXTURE):
        pytest.skip('../shared/fixtures is absent')
    from pydagnn.testing import load_fixture
    return load_matconvnet(FIXTURE), load_fixture('gmsop_resnet18_eval_io.mat')


def test_loaded_original_net_batched_equals_looped(original):
    net, io = original
    x = io['input'].astype(np.float32)
    label = io['label'].astype(np.float32).ravel()
    assert [g.name for g in _mixtures(net)] == [MIXTURE_NAME]     # the loader fused it
    net.get_layer('H_x').block.noise = io['gamma_normal'].ravel()
    net.get_layer('dropout').block.mask = io['normal_dropout_mask'].astype(np.float32)
    batched = _run(net, x, label, True)
    looped = _run(net, x, label, False)
    set_batched_mixture(net, True)
    # conv1's bias feeds a batch norm: its derivative is 0 in exact arithmetic, and
    # float32 rounding noise (norm ~2e-5 against ~25 for conv1_bn's) in both paths
    for d in (batched, looped):
        assert np.linalg.norm(d.pop('der_conv1_b')) < 1e-4
    _assert_same(batched, looped, 2e-6)   # measured: 1e-6 at most (BN params), most below


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason='no GPU')
@pytest.mark.parametrize('dead_cm', [None, 2])
def test_gpu_batched_equals_looped(dead_cm):
    """On the GPU (one scatter-add kernel, device pair indices): batched == looped, and
    both == the CPU's batched result."""
    net, x, label = _small(dead_cm=dead_cm)
    cpu = _run(net, x, label, True)
    net.move('gpu')
    net.get_layer('dropout').block.mask = backend.to_device(net.get_layer('dropout').block.mask, 'gpu')
    looped = _run(net, x, label, False)
    batched = _run(net, x, label, True)
    _assert_same(batched, looped, 1e-12)
    _assert_same(batched, cpu, 1e-10)
