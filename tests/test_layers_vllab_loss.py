"""LapSRN's dagnn.vllab_dag_loss: values against the formulas of vllab_nn_L1_loss.m /
vllab_nn_L2_loss.m, float64 derivative checks, what deploy does with it."""
import numpy as np
import pytest

from pydagnn.gradcheck import check_block
from pydagnn.layers.vllab_loss import vllab_dag_loss, vllab_loss_backward, vllab_loss_forward

CASES = [('L1', 1, False), ('L1', 0.5, True), ('L2', 1, False), ('L2', 2.0, True)]


@pytest.mark.parametrize('kind, lam, by_size', CASES)
def test_values_and_gradcheck(kind, lam, by_size):
    rng = np.random.default_rng(len(kind) + int(by_size))
    x, z = rng.standard_normal((5, 4, 1, 3)), rng.standard_normal((5, 4, 1, 3))
    d = x - z
    ref = np.sqrt(d * d + 1e-6).sum() if kind == 'L1' else 0.5 * (d * d).sum()
    ref *= lam / (20 if by_size else 1)
    blk = vllab_dag_loss(loss_type=kind, average_by_size=by_size, **{'lambda': lam})
    y = blk.forward([x, z], [])[0]
    assert y.shape == (1, 1)
    np.testing.assert_allclose(y[0, 0], ref, rtol=1e-12)
    errs = check_block(blk, [x, z], [], wrt=['in0'], rtol=1e-6, atol=1e-8)
    assert set(errs) == {'in0'}
    assert blk.is_loss


def test_float32_and_errors():
    x = np.ones((2, 2, 1, 1), np.float32)
    assert vllab_loss_forward(x, x * 0, 'L2').dtype == np.float32
    assert vllab_loss_backward(x, x * 0, np.float32(1), 'L1').dtype == np.float32
    with pytest.raises(ValueError, match="loss_type must be 'L1' or 'L2', got 'L3'"):
        vllab_loss_forward(x, x, 'L3')
    with pytest.raises(ValueError, match='target has shape'):
        vllab_loss_forward(x, np.ones(3), 'L1')
    with pytest.raises(ValueError, match='float32 or float64'):
        vllab_loss_forward(np.ones((2, 2), int), np.ones((2, 2)), 'L1')
