"""The layer-fixture rows of ``pydagnn.parity_layers`` as a whole: every stored output of
every layer fixture is compared, the cases are the listed ones (the parametrized tests of
``test_fx_*.py`` cover all of them), float64 inputs give float64 results within the same
tolerances, and ``python -m pydagnn.parity --layers-only`` prints the table."""
import os

import numpy as np
import pytest

from pydagnn import parity, parity_layers as pl
from pydagnn.testing import load_fixture, shared_path

_FILES = sorted({name for name, _, _ in pl.LAYER_FIXTURES})
_LISTED = {pl.conv_cases: pl.CONV_CASES, pl.bnorm_cases: pl.BNORM_CASES,
           pl.pool_cases: tuple(pl.POOL_CASES),
           pl.relu_softmax_loss_cases: pl.RELU_SOFTMAX_LOSS_CASES,
           pl.isqrtcov_cases: pl.ISQRTCOV_CASES, pl.gm_layers_cases: pl.GM_LAYERS_CASES}


@pytest.mark.parametrize('name', _FILES)
def test_every_output_is_compared_in_the_listed_cases(name):
    d = load_fixture(name)
    rows, inputs = [], set()
    for fname, cases, ins in pl.LAYER_FIXTURES:
        if fname == name:
            got = cases(d, np.float32)
            assert tuple(got) == _LISTED[cases], cases.__name__
            assert all(got.values()), f'{cases.__name__}: a case without rows'
            rows += [r for case_rows in got.values() for r in case_rows]
            inputs |= set(ins)
    assert not pl.uncompared(d, rows, inputs)


def test_float64():
    rows = pl.layer_rows(shared_path('fixtures'), np.float64,
                         load=lambda path: load_fixture(os.path.basename(path)))
    bad = pl.over_tolerance(rows)
    assert not bad, pl.format_rows(bad)


def test_layers_only_table(capsys):
    assert parity.main(['--layers-only', '--dtype', 'float32',
                        '--fixtures', shared_path('fixtures')]) == 0
    out = capsys.readouterr().out
    for group in ('conv', 'bnorm', 'pool', 'relu', 'softmax', 'loss', 'cov_chain', 'H_x',
                  'gating', 'CM_out', 'Balance_loss'):
        assert f'\n  {group} ' in out, group
    assert 'OVER' not in out and 'GM-SOP' not in out
