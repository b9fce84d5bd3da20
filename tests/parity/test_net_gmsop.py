"""Whole-network parity: the original ResNet18-GM-SOP model (gmsop_resnet18_eval.mat),
loaded by pydagnn and evaluated on the stored input, against the original's outputs
(gmsop_resnet18_eval_io.mat). Tolerance tiers: pydagnn.parity.TIERS."""
import numpy as np
import pytest

from pydagnn import parity
from pydagnn.testing import load_fixture, shared_path


@pytest.fixture(scope='module')
def io():
    return load_fixture('gmsop_resnet18_eval_io.mat')


@pytest.fixture(scope='module')
def run32(io):
    return parity.run_gmsop(shared_path('fixtures', 'gmsop_resnet18_eval.mat'), io, np.float32)


@pytest.fixture(scope='module')
def rows32(io, run32):
    return parity.compare_gmsop(io, run32[0], run32[1])


def _check(rows, groups):
    bad = [r for r in rows if r[1] in groups and r[2] > r[3]]
    worst = parity.worst_by_group([r for r in rows if r[1] in groups])
    print({g: f'{e:.3g} ({n})' for g, (n, e, t) in worst.items()})
    assert not bad, 'over tolerance: ' + '; '.join(f'{n} [{g}] {e:.3g} > {t:g}' for n, g, e, t in bad)


def test_forward_values_float32(rows32):
    _check(rows32, {'forward'})


def test_masks_and_error_counts_exact(rows32):
    _check(rows32, {'exact'})


def test_head_derivatives_float32(rows32):
    _check(rows32, {'head_der'})


def test_moment_derivatives_float32(rows32):
    _check(rows32, {'moments_der'})


def test_derivatives_below_isqrt_float32(rows32):
    _check(rows32, {'below_isqrt_der'})


def test_cms_without_images_get_no_derivative(run32):
    _, normal, net = run32
    counts = np.asarray(normal['gating'][1]).sum(axis=1)
    assert list(counts) == [4, 4, 0, 3, 1, 0, 0, 0, 4, 0, 4, 4, 3, 4, 0, 1]
    for i in (3, 6, 7, 8, 10, 15):
        assert normal[f'der_CM_{i}_a_f'] is None and normal[f'der_CM_{i}_b_f'] is None


def test_execution_order_is_the_originals():
    from pydagnn.io.matconvnet import load_matconvnet
    import scipy.io
    path = shared_path('fixtures', 'gmsop_resnet18_eval.mat')
    net = load_matconvnet(path)
    order = scipy.io.loadmat(path, variable_names=['executionOrder'])['executionOrder'].ravel()
    assert list(np.array(net.execution_order) + 1) == list(order.astype(int))
    pos = {net.layers[i].name: k for k, i in enumerate(net.execution_order)}
    assert pos['gating'] < pos['Balance_loss'] < min(pos[f'CM_{i}_a_conv'] for i in range(1, 17))
    assert max(pos[f'CM_{i}_Cov_ScaleTr'] for i in range(1, 17)) < pos['Fusion_out']
    assert net.get_layer('CM_7_a_conv').route == ('gating', 7)


def test_derivatives_do_not_depend_on_conserve_memory(io, run32):
    """The original drops Balance_loss's derivative when conserveMemory is false (the
    nocm_* fixture variables show it); pydagnn gives the conserveMemory=true numbers."""
    _, cm_false, _ = parity.run_gmsop(shared_path('fixtures', 'gmsop_resnet18_eval.mat'), io,
                                      np.float32, conserve_memory=False)
    _, cm_true, _ = run32
    for name in ('gating_w', 'gating_noise_w', 'conv1_f', 'gating1_f', 'prediction_f'):
        np.testing.assert_allclose(cm_false['der_' + name], cm_true['der_' + name], rtol=1e-6, atol=1e-9)
    for name in ('gating_w', 'gating_noise_w'):
        assert parity.rel_err(cm_false['der_' + name], io['der_' + name]) <= 1e-3
        # ... and differ from the original's conserveMemory=false numbers, which lack the
        # balance term entirely.
        assert parity.rel_err(cm_false['der_' + name], io['nocm_der_' + name]) > 1e-2
    cols = io['der_prediction_f_colidx'].ravel().astype(int) - 1
    assert parity.rel_err(cm_false['der_prediction_f'][:, :, :, cols], io['nocm_der_prediction_f_cols']) <= 1e-3
    assert parity.rel_err(cm_false['objective'], io['nocm_objective']) <= 1e-4


@pytest.mark.slow
def test_float64_run_within_tiers(io):
    """pydagnn in float64 against the float32 original: the forward agrees to ~1e-5; below
    the iSQRT layers ReLU units within rounding of zero flip (fixture README, Precision)."""
    t, n, _ = parity.run_gmsop(shared_path('fixtures', 'gmsop_resnet18_eval.mat'), io, np.float64)
    _check(parity.compare_gmsop(io, t, n), set(parity.TIERS))
