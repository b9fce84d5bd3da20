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
