"""Parity with the original ``vl_nnconv`` (fixtures/fx_conv.mat, float32): forward output,
dzdx, dzdf and dzdb of all six cases, by the functions and the ``dagnn.Conv`` block, with
the stored pad and stride passed as stored (a scalar, [top bottom left right] or [sy sx]).
The cases run in ``pydagnn.parity_layers.conv_cases``: ``rel_err <= 1e-5``, results float32,
no dzdb without a bias."""
import numpy as np
import pytest

from pydagnn import parity_layers as pl
from pydagnn.testing import load_fixture


@pytest.fixture(scope='module')
def fx():
    return load_fixture('fx_conv.mat')


@pytest.fixture(scope='module')
def cases(fx):
    return pl.conv_cases(fx, np.float32)


def test_fixture_lists_the_cases(fx):
    assert pl.conv_case_names(fx) == pl.CONV_CASES
    for case in pl.CONV_CASES:
        assert fx[f'{case}_x'].dtype == np.float32


@pytest.mark.parametrize('case', pl.CONV_CASES)
def test_fx_conv(cases, case, record_property):
    rows = cases[case]
    print(f'fx_conv {case}: ' + ', '.join(f'{n} {e:.2e}' for n, _, e, t in rows if t))
    record_property('rel_err', {n: e for n, _, e, _ in rows})
    bad = pl.over_tolerance(rows)
    assert not bad, pl.format_rows(bad)
