"""Sync-mode batch statistics (--sync-bn) without MPI: two threads stand in for two ranks,
their ``batch_sum`` adding their arrays through a barrier; each half's synced BN and
Balance_loss equal the plain functions on the whole batch."""
import threading

import numpy as np

from pydagnn.layers.balance_loss import balance_loss_backward, balance_loss_forward, balance_loss_forward_synced
from pydagnn.layers.bnorm import bnorm_backward, bnorm_backward_synced, bnorm_forward, bnorm_forward_synced


def two_ranks(fn, parts):
    """Run ``fn(part, batch_sum)`` on one thread per part; returns the results in order."""
    barrier = threading.Barrier(len(parts))
    slots = [None] * len(parts)
    out = [None] * len(parts)
    lock = threading.Lock()
    box = {}

    def batch_sum(a):
        with lock:
            box['sum'] = a.copy() if 'sum' not in box else box['sum'] + a
        barrier.wait()
        total = box['sum'].copy()
        barrier.wait()
        with lock:
            box.pop('sum', None)
        barrier.wait()
        return total

    def run(i):
        out[i] = fn(parts[i], batch_sum)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    del slots
    return out


def test_synced_bnorm_halves_equal_the_whole_batch():
    rng = np.random.default_rng(0)
    x = np.asfortranarray(rng.standard_normal((3, 4, 5, 7)) * 3 + 1)
    dy = np.asfortranarray(rng.standard_normal(x.shape))
    g, b = rng.standard_normal(5), rng.standard_normal(5)
    y, mom = bnorm_forward(x, g, b)
    dx, dg, db, _ = bnorm_backward(x, g, b, dy)
    cut = 3  # uneven: 3 and 4 images
    parts = [(x[..., :cut], dy[..., :cut]), (x[..., cut:], dy[..., cut:])]

    def fn(part, batch_sum):
        xs, dys = part
        ys, ms = bnorm_forward_synced(xs, g, b, 1e-5, batch_sum)
        dxs, dgs, dbs, _ = bnorm_backward_synced(xs, g, b, dys, 1e-5, batch_sum)
        return ys, ms, dxs, dgs, dbs

    (y0, m0, dx0, dg0, db0), (y1, m1, dx1, dg1, db1) = two_ranks(fn, parts)
    np.testing.assert_allclose(np.concatenate([y0, y1], axis=3), y, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(m0, mom, rtol=1e-12)
    np.testing.assert_array_equal(m0, m1)
    np.testing.assert_allclose(np.concatenate([dx0, dx1], axis=3), dx, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(dg0 + dg1, dg, rtol=1e-12)
    np.testing.assert_allclose(db0 + db1, db, rtol=1e-12)
    # alone, each half's statistics differ from the whole batch's
    assert np.abs(bnorm_forward(x[..., :cut], g, b)[1] - mom).max() > 1e-3


def test_synced_balance_loss_halves_equal_the_whole_batch():
    rng = np.random.default_rng(1)
    s = rng.random((4, 9))
    loss, rsd, w_sum = balance_loss_forward(s, 100)
    ds = balance_loss_backward(s, 100, rsd, w_sum)
    parts = [s[:, :4], s[:, 4:]]

    def fn(part, batch_sum):
        out = balance_loss_forward_synced(part, 100, batch_sum)
        return out, balance_loss_backward(part, 100, out[1], out[2])

    (o0, d0), (o1, d1) = two_ranks(fn, parts)
    np.testing.assert_allclose(o0[0], loss, rtol=1e-12)
    np.testing.assert_allclose(o1[2], w_sum, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([d0, d1], axis=1), ds, rtol=1e-12)
