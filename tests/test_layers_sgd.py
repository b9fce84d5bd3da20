"""The SGD-with-momentum op (pydagnn.layers.sgd), the step accumulate_gradients takes."""
import numpy as np
import pytest

from pydagnn.layers.sgd import sgd_momentum_update


@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('with_mom', [False, True])
def test_sgd_momentum_update_formula(rng, nesterov, with_mom):
    value = rng.standard_normal((3, 4)).astype(np.float32)
    der = rng.standard_normal((3, 4)).astype(np.float32)
    mom = rng.standard_normal(12).astype(np.float32) if with_mom else None   # any shape, 12 elements
    m, v = sgd_momentum_update(der, value, mom, 0.25, 1e-3, 0.9, 0.1, nesterov)
    g = 0.25 * der.astype(np.float64) + 1e-3 * value
    m_ref = -g if mom is None else 0.9 * mom.reshape(3, 4) - g
    delta = 0.9 * m_ref - g if nesterov else m_ref
    assert m.dtype == v.dtype == np.float32 and m.shape == v.shape == (3, 4)
    np.testing.assert_allclose(m, m_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, value + 0.1 * delta, rtol=1e-5, atol=1e-6)


def test_sgd_momentum_update_bad_momentum():
    with pytest.raises(ValueError, match=r"momentum of 'w'.*\(5,\)"):
        sgd_momentum_update(np.ones((2, 2)), np.ones((2, 2)), np.ones(5), 1.0, 0.0, 0.9, 0.1,
                            name='w')


@pytest.mark.parametrize('dt', [np.float32, np.float64])
@pytest.mark.parametrize('with_mom', [True, False])
@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('shape,orders', [((3, 3, 64, 80), 'FFF'), ((3, 3, 64, 80), 'CFC'),
                                          ((7, 5), 'FFF'), ((1, 1, 300, 400), 'CCC')])
def test_fused_cpu_step_equals_the_numpy_form(dt, with_mom, nesterov, shape, orders):
    """The CPU's fused kernel (split over the workers for big params) gives the numpy
    form's result to the bit, in value's memory order, for any operand orders."""
    from pydagnn.layers import sgd as S
    rng = np.random.default_rng(len(shape) + int(with_mom) + 2 * int(nesterov))
    der, value, mom = (np.asarray(rng.standard_normal(shape), dtype=dt, order=o) for o in orders)
    mom = mom if with_mom else None
    args = (1 / 32, 1e-4 * 1.5, 0.9, 0.075, nesterov)
    m1, v1 = S.sgd_momentum_update(der, value, mom, *args)
    m0, v0 = S._sgd_numpy_cpu(der, value, mom, *args)
    for new, ref in ((m1, m0), (v1, v0)):
        assert new.dtype == value.dtype and new.shape == value.shape
        assert new.flags.f_contiguous if orders[1] == 'F' else new.flags.c_contiguous
        np.testing.assert_array_equal(new, ref)
