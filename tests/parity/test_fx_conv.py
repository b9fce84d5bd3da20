"""Parity with the original ``vl_nnconv`` (fixtures/fx_conv.mat, float32): forward output,
dzdx, dzdf and dzdb of all six cases, with the stored pad and stride passed as stored
(a scalar, [top bottom left right] or [sy sx])."""
import numpy as np
import pytest

from pydagnn.layers.conv import Conv, conv_backward, conv_forward
from pydagnn.testing import load_fixture, rel_err

CASES = ['c3x3_p1_s1_bias', 'c3x3_p1_s2_nobias', 'c1x1_p0_s2_nobias', 'c1x1_p0_s1_bias',
         'c3x3_pasym_sasym', 'c_fc_8x8']
TOL = 1e-5


def test_fixture_lists_the_cases():
    d = load_fixture('fx_conv.mat')
    assert [str(np.ravel(c)[0]) for c in d['case_names'].ravel()] == CASES


@pytest.mark.parametrize('case', CASES)
def test_fx_conv(case, record_property):
    d = load_fixture('fx_conv.mat')
    g = lambda k: d[f'{case}_{k}']  # noqa: E731
    x, f, b, pad, stride = g('x'), g('f'), g('b'), g('pad'), g('stride')
    assert x.dtype == np.float32
    b = None if b.size == 0 else b
    y = conv_forward(x, f, b, pad=pad, stride=stride)
    dx, df, db = conv_backward(x, f, b, g('dzdy'), pad=pad, stride=stride)
    assert y.dtype == dx.dtype == df.dtype == np.float32
    errs = {'y': rel_err(y, g('y')), 'dzdx': rel_err(dx, g('dzdx')), 'dzdf': rel_err(df, g('dzdf'))}
    if b is None:
        assert db is None and g('dzdb').size == 0
    else:
        errs['dzdb'] = rel_err(db, g('dzdb'))
    # the same through the dagnn.Conv block, as a loaded net would call it
    blk = Conv(size=list(f.shape) + [1] * (4 - f.ndim), hasBias=b is not None,
               pad=pad, stride=stride)
    params = [f, b] if b is not None else [f]
    yb = blk.forward([x], params)[0]
    dxs, dps = blk.backward([x], params, [g('dzdy')], [yb])
    errs['block_y'] = rel_err(yb, g('y'))
    errs['block_dzdf'] = rel_err(dps[0], g('dzdf'))
    print(f'fx_conv {case}: ' + ', '.join(f'{k} {v:.2e}' for k, v in errs.items()))
    record_property('rel_err', errs)
    for k, v in errs.items():
        assert v <= TOL, f'{case} {k}: rel_err {v:.3g} > {TOL}'
