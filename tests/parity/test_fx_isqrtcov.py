"""Parity of the iSQRT-COV blocks with the original (fx_isqrtcov.mat: vl_nncov_pool,
vl_nncov_traceNorm, vl_nncov_sqrtm with the corrected CPU backward), float32,
``rel_err <= 1e-5``."""
import numpy as np
import pytest

from pydagnn.layers.cov import (OBJ_ConvNet_COV_Pool, OBJ_ConvNet_COV_ScaleTr,
                                OBJ_ConvNet_Cov_Sqrtm, OBJ_ConvNet_Cov_TraceNorm)
from pydagnn.testing import load_fixture, rel_err

TOL = 1e-5


@pytest.fixture(scope='module')
def fx():
    return load_fixture('fx_isqrtcov.mat')


def _ok(name, a, b, tol=TOL):
    assert a.dtype == np.float32, f'{name}: dtype {a.dtype}'
    e = rel_err(a, b)
    assert e <= tol, f'{name}: rel_err {e:.3g} > {tol:g}'
    return e


def test_settings(fx):
    assert fx['x'].shape == (8, 8, 32, 3) and fx['x'].dtype == np.float32
    assert fx['coef'].item() == 1 and fx['iterNum'].item() == 3


def test_forward_chain(fx):
    cov, = OBJ_ConvNet_COV_Pool().forward([fx['x']], [])
    _ok('cov', cov, fx['cov'])
    tn, tr = OBJ_ConvNet_Cov_TraceNorm().forward([fx['cov']], [])
    _ok('tn', tn, fx['tn'])
    _ok('tn_tr', tr, fx['tn_tr'])
    assert tr.shape == (1, 1, 1, 3)
    st, = OBJ_ConvNet_COV_ScaleTr().forward([fx['sq'], fx['tn_tr']], [])
    _ok('st', st, fx['st'])


@pytest.mark.parametrize('iter_num,prefix', [(3, 'sq'), (5, 'sq5')])
def test_sqrtm_forward_with_aux(fx, iter_num, prefix):
    y, Y, Z = OBJ_ConvNet_Cov_Sqrtm(coef=1, iterNum=iter_num).forward([fx['tn']], [])
    assert y.shape == (1, 1, 528, 3) and Y.shape == Z.shape == (32, 32, iter_num, 3)
    _ok(prefix, y, fx[prefix])
    _ok(prefix + '_Y', Y, fx[prefix + '_Y'])
    _ok(prefix + '_Z', Z, fx[prefix + '_Z'])
    if iter_num == 3:   # and the pure-Octave double re-derivation (formula and triangle order)
        assert rel_err(y, fx['ref_sq_double']) <= TOL


def test_backward_each_block(fx):
    (dsq, dtr), _ = OBJ_ConvNet_COV_ScaleTr().backward([fx['sq'], fx['tn_tr']], [], [fx['dzdst']],
                                                        [fx['st']])
    _ok('dzdsq', dsq, fx['dzdsq'])
    _ok('dzdtr_from_st', dtr, fx['dzdtr_from_st'])
    for iter_num, Yk, Zk, ref in ((3, 'sq_Y', 'sq_Z', 'dzdtn'), (5, 'sq5_Y', 'sq5_Z', 'dzdtn5')):
        sq = OBJ_ConvNet_Cov_Sqrtm(coef=1, iterNum=iter_num)
        (dtn,), _ = sq.backward([fx['tn']], [], [fx['dzdsq'], None, None],
                                [None, fx[Yk], fx[Zk]])
        _ok(ref, dtn, fx[ref])
    # both paths into the trace: dzdtn from sqrtm and dzdtr_from_st from ScaleTr
    (dcov,), _ = OBJ_ConvNet_Cov_TraceNorm().backward([fx['cov']], [],
                                                      [fx['dzdtn'], fx['dzdtr_from_st']],
                                                      [fx['tn'], fx['tn_tr']])
    _ok('dzdcov', dcov, fx['dzdcov'])
    (dx,), _ = OBJ_ConvNet_COV_Pool().backward([fx['x']], [], [fx['dzdcov']], [fx['cov']])
    _ok('dzdx', dx, fx['dzdx'])


def test_backward_whole_chain_from_x(fx):
    """Forward from x and backward from dzdst with pydagnn's own intermediate values."""
    cp, tn, sq, st = (OBJ_ConvNet_COV_Pool(), OBJ_ConvNet_Cov_TraceNorm(),
                      OBJ_ConvNet_Cov_Sqrtm(coef=1, iterNum=3), OBJ_ConvNet_COV_ScaleTr())
    P, = cp.forward([fx['x']], [])
    A, tr = tn.forward([P], [])
    y, Y, Z = sq.forward([A], [])
    s, = st.forward([y, tr], [])
    _ok('st (chain)', s, fx['st'])
    (dy, dtr), _ = st.backward([y, tr], [], [fx['dzdst']], [s])
    (dA,), _ = sq.backward([A], [], [dy, None, None], [y, Y, Z])
    _ok('dzdtn (chain)', dA, fx['dzdtn'])
    (dP,), _ = tn.backward([P], [], [dA, dtr], [A, tr])
    _ok('dzdcov (chain)', dP, fx['dzdcov'])
    (dx,), _ = cp.backward([fx['x']], [], [dP], [P])
    _ok('dzdx (chain)', dx, fx['dzdx'])
