"""Parity with the original ``vl_nnpool`` (fixtures/fx_pool_relu_softmax_loss.mat,
float32): avg 8x8 on 8x8 (global), avg 8x8 stride 1 on 10x9, max 3x3 stride 2 pad 1, by
the functions and the ``dagnn.Pooling`` block (``pydagnn.parity_layers.pool_cases``:
``rel_err <= 1e-5``, results in x's dtype)."""
import numpy as np
import pytest

from pydagnn import parity_layers as pl
from pydagnn.testing import load_fixture


@pytest.fixture(scope='module')
def cases():
    return pl.pool_cases(load_fixture('fx_pool_relu_softmax_loss.mat'), np.float32)


@pytest.mark.parametrize('case', list(pl.POOL_CASES))
def test_fx_pool(cases, case, record_property):
    rows = cases[case]
    print(f'fx_pool {case}: ' + ', '.join(f'{n} {e:.2e}' for n, _, e, t in rows if t))
    record_property('rel_err', {n: e for n, _, e, _ in rows})
    bad = pl.over_tolerance(rows)
    assert not bad, pl.format_rows(bad)
