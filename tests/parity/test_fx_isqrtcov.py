"""Parity of the iSQRT-COV blocks with the original (fx_isqrtcov.mat: vl_nncov_pool,
vl_nncov_traceNorm, vl_nncov_sqrtm with the corrected CPU backward), float32,
``rel_err <= 1e-5``. The cases (forward from the stored inputs, sqrtm with iterNum 3 and 5
and its auxiliary outputs, the backward of each block, the whole chain from x) run in
``pydagnn.parity_layers.isqrtcov_cases``: results float32 and shaped as the original's."""
import numpy as np
import pytest

from pydagnn import parity_layers as pl
from pydagnn.testing import load_fixture


@pytest.fixture(scope='module')
def fx():
    return load_fixture('fx_isqrtcov.mat')


@pytest.fixture(scope='module')
def cases(fx):
    return pl.isqrtcov_cases(fx, np.float32)


def test_settings(fx):
    assert fx['x'].shape == (8, 8, 32, 3) and fx['x'].dtype == np.float32
    assert fx['coef'].item() == 1 and fx['iterNum'].item() == 3


@pytest.mark.parametrize('case', pl.ISQRTCOV_CASES)
def test_fx_isqrtcov(cases, case):
    bad = pl.over_tolerance(cases[case])
    assert not bad, pl.format_rows(bad)
