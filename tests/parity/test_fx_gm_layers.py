"""Parity of H_x, gating, CM_out and Balance_loss with the original's arithmetic
(fx_gm_layers.mat), float32, ``rel_err <= 1e-5``, masks exactly equal. The cases run in
``pydagnn.parity_layers.gm_layers_cases``: every result float32 (the H_x noise float64,
the mask bool), no derivative for a CM without images."""
import numpy as np
import pytest

from pydagnn import parity_layers as pl
from pydagnn.testing import load_fixture


@pytest.fixture(scope='module')
def fx():
    return load_fixture('fx_gm_layers.mat')


@pytest.fixture(scope='module')
def cases(fx):
    return pl.gm_layers_cases(fx, np.float32)


def test_fixture(fx):
    assert fx['cm15_out'].shape == (1, 1, 10, 0) and fx['cm15_der'].size == 0


@pytest.mark.parametrize('case', pl.GM_LAYERS_CASES)
def test_fx_gm_layers(cases, case):
    bad = pl.over_tolerance(cases[case])
    assert not bad, pl.format_rows(bad)
