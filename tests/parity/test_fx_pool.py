"""Parity with the original ``vl_nnpool`` (fixtures/fx_pool_relu_softmax_loss.mat,
float32): avg 8x8 on 8x8 (global), avg 8x8 stride 1 on 10x9, max 3x3 stride 2 pad 1."""
import pytest

from pydagnn.layers.pool import Pooling, pool_backward, pool_forward
from pydagnn.testing import load_fixture, rel_err

# case: (poolSize, method, pad, stride), as fixtures/README.md describes them
CASES = {
    'avg8': (8, 'avg', 0, 1),
    'avg8s1': (8, 'avg', 0, 1),
    'max3': (3, 'max', 1, 2),
}
TOL = 1e-5


@pytest.mark.parametrize('case', list(CASES))
def test_fx_pool(case, record_property):
    d = load_fixture('fx_pool_relu_softmax_loss.mat')
    pool, method, pad, stride = CASES[case]
    x, dzdy = d[f'{case}_x'], d[f'{case}_dzdy']
    y = pool_forward(x, pool, method, pad=pad, stride=stride)
    dx = pool_backward(x, dzdy, pool, method, pad=pad, stride=stride)
    assert y.dtype == dx.dtype == x.dtype
    blk = Pooling(method=method, poolSize=[pool, pool], pad=pad, stride=stride)
    yb = blk.forward([x], [])[0]
    dxb = blk.backward([x], [], [dzdy], [yb])[0][0]
    errs = {'y': rel_err(y, d[f'{case}_y']), 'dzdx': rel_err(dx, d[f'{case}_dzdx']),
            'block_y': rel_err(yb, d[f'{case}_y']), 'block_dzdx': rel_err(dxb, d[f'{case}_dzdx'])}
    print(f'fx_pool {case}: ' + ', '.join(f'{k} {v:.2e}' for k, v in errs.items()))
    record_property('rel_err', errs)
    for k, v in errs.items():
        assert v <= TOL, f'{case} {k}: rel_err {v:.3g} > {TOL}'
