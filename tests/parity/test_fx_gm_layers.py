"""Parity of H_x, gating, CM_out and Balance_loss with the original's arithmetic
(fx_gm_layers.mat), float32, ``rel_err <= 1e-5``, masks exactly equal."""
import numpy as np
import pytest

from pydagnn.layer import BlockContext
from pydagnn.layers.balance_loss import Balance_loss
from pydagnn.layers.cm_out import CM_out
from pydagnn.layers.gating import H_x, gating
from pydagnn.testing import load_fixture, rel_err

TOL = 1e-5


@pytest.fixture(scope='module')
def fx():
    return load_fixture('fx_gm_layers.mat')


def _ok(name, a, b, tol=TOL):
    assert a is not None and a.dtype == np.float32, f'{name}: {None if a is None else a.dtype}'
    e = rel_err(a, b)
    assert e <= tol, f'{name}: rel_err {e:.3g} > {tol:g}'
    return e


def _int(fx, k):
    return int(np.asarray(fx[k]).ravel()[0])


@pytest.fixture(scope='module')
def blocks(fx):
    D, K, k, hdim = _int(fx, 'D'), _int(fx, 'CM_num'), _int(fx, 'topk'), _int(fx, 'hdim')
    hx = H_x(size=[D, K], CM_num=K, topk=k, dim_in=D)
    hx.noise = fx['gamma']
    return (hx, gating(size=[D, K], CM_num=K, topk=k), CM_out(CM_num=K, topk=k, hdim=hdim),
            Balance_loss(loss_weight=fx['loss_weight'].item(), CM_num=K))


@pytest.fixture(scope='module')
def run(fx, blocks):
    hx, gt, cm, bl = blocks
    hv = hx.forward([fx['x']], [fx['wg'], fx['wn']])
    gv = gt.forward(hv, [])
    ys = [fx[f'cm{i:02d}_out'] for i in range(1, 17)]
    ys = [None if y.size == 0 else y for y in ys]
    z = cm.forward(gv + ys, [])
    lo = bl.forward(gv, [])
    return hv, gv, ys, z, lo


def test_hx(fx, run):
    H, gamma = run[0][0]
    _ok('hx', H, fx['hx'])
    assert gamma.dtype == np.float64 and gamma.shape == (1, 5)


def test_hx_test_mode(fx):
    b = H_x(size=[36, 16])
    b.noise = fx['gamma']                      # ignored in test mode
    b.net = BlockContext(mode='test')
    (H, gamma), = b.forward([fx['x']], [fx['wg'], fx['wn']])
    _ok('hx_test', H, fx['hx_test'])
    assert not gamma.any()


def test_gating(fx, run):
    sfm, mask, masked, v4, v5, sums = run[1][0]
    _ok('sfm', sfm, fx['sfm'])
    assert mask.dtype == bool and np.array_equal(mask, fx['cm_index'].astype(bool))
    _ok('topk_v', masked, fx['topk_v'])
    _ok('sfm_rowsum', sums, fx['sfm_rowsum'])
    assert sums.shape == (1, 16) and v4 is None and v5 is None


def test_balance_loss(fx, run, blocks):
    loss, rsd, w_sum = run[4][0]
    _ok('bl_loss', loss, fx['bl_loss'])
    _ok('bl_rsd', rsd, fx['bl_rsd'])
    _ok('bl_wsum', w_sum, fx['bl_wsum'])
    (d,), _ = blocks[3].backward(run[1], [], [None], run[4])
    _ok('bl_dzdsfm', d, fx['bl_dzdsfm'])


def test_cm_out(fx, run, blocks):
    _, gv, ys, z, _ = run
    _ok('fusion', z[0], fx['fusion'])
    ders, _ = blocks[2].backward(gv + ys, [], [fx['dzdfusion']], z)
    _ok('cmout_dzdsfm', ders[0], fx['cmout_dzdsfm'])
    assert fx['cm15_out'].shape == (1, 1, 10, 0) and fx['cm15_der'].size == 0
    for i in range(1, 17):
        ref = fx[f'cm{i:02d}_der']
        if ref.size == 0:
            assert ders[i] is None, f'CM {i} got no image but has a derivative'
        else:
            assert ders[i].shape == ref.shape
            _ok(f'cm{i:02d}_der', ders[i], ref)


def test_gating_and_hx_backward(fx, run, blocks):
    hx, gt, cm, bl = blocks
    hv, gv, ys, z, lo = run
    ders, _ = cm.backward(gv + ys, [], [fx['dzdfusion']], z)
    (dbl,), _ = bl.backward(gv, [], [None], lo)
    total = ders[0] + dbl                      # as the DagNN accumulates into the gating var
    _ok('dzdsfm_total', total, fx['dzdsfm_total'])
    (dH,), _ = gt.backward(hv, [], [total], gv)
    _ok('dzdhx', dH, fx['dzdhx'])
    (dx,), (dwg, dwn) = hx.backward([fx['x']], [fx['wg'], fx['wn']], [dH], hv)
    _ok('dzdx', dx, fx['dzdx'])
    _ok('dzdwg', dwg, fx['dzdwg'])
    _ok('dzdwn', dwn, fx['dzdwn'])
    # and from the stored inputs of each step
    (dH2,), _ = gt.backward([fx['hx']], [], [fx['dzdsfm_total']], [(fx['sfm'],)])
    _ok('dzdhx (stored sfm)', dH2, fx['dzdhx'])


def test_tie_branch(fx):
    (out,) = gating(topk=8, CM_num=16).forward([fx['tie_hx']], [])
    assert np.array_equal(out[1], fx['tie_cm_index'].astype(bool))
    _ok('tie_sfm', out[0], fx['tie_sfm'])


def test_big_inputs(fx):
    b = H_x(size=[36, 16])
    b.noise = fx['gamma'][:, :2]
    (H, _), = b.forward([fx['big_x']], [fx['wg'], fx['wn']])
    _ok('big_hx', H, fx['big_hx'])
