"""The gated mixture blocks: H_x, gating, CM_out, Balance_loss (layers/gating.py,
layers/cm_out.py, layers/balance_loss.py). Float64 central differences for every
derivative (by hand: the var values are tuples), and the selection rules."""
import warnings

import numpy as np
import pytest

from pydagnn.gradcheck import assert_close, numerical_derivative
from pydagnn.layer import REGISTRY, BlockContext
from pydagnn.layers.balance_loss import Balance_loss, balance_loss_backward, balance_loss_forward
from pydagnn.layers.cm_out import CM_out, cm_out_forward
from pydagnn.routing import route_order
from pydagnn.layers.gating import H_x, gating, gating_forward, softplus, topk_mask

K, N, D, DH, TOPK = 6, 5, 7, 4, 3


def _num(f, x):
    idx, num = numerical_derivative(f, x)
    return idx, num


def _check(name, f, x, der, rtol=1e-6, atol=1e-8):
    idx, num = _num(f, x)
    flat = np.asarray(der).reshape(-1, order='F' if x.flags.f_contiguous else 'C')
    assert_close(name, flat[idx], num, rtol, atol)


def _separated_scores(rng, k=K, n=N, gap=0.3):
    """K x N scores whose k-th and (k+1)-th largest differ by at least ``gap``."""
    H = np.empty((k, n))
    for j in range(n):
        H[:, j] = rng.permutation(np.arange(k) * gap + rng.uniform(0, gap / 10, k))
    return H


def _routed_outputs(rng, mask, dim=DH):
    return [np.asfortranarray(rng.standard_normal((1, 1, dim, int(c)))) if c else None
            for c in mask.sum(axis=1)]


# ---------------------------------------------------------------- registry and properties
def test_registry_and_properties():
    assert REGISTRY['dagnn.H_x'] is H_x and REGISTRY['dagnn.gating'] is gating
    assert REGISTRY['dagnn.CM_out'] is CM_out and REGISTRY['dagnn.Balance_loss'] is Balance_loss
    assert H_x().save() == {'size': [], 'hasBias': False, 'topk': 8, 'CM_num': 16,
                            'f_size': [1, 1], 'dim_in': 128}
    assert gating().save() == {'size': [], 'hasBias': False, 'topk': 8, 'CM_num': 16,
                               'f_size': [8, 8]}
    assert CM_out().save() == {'CM_num': 16, 'topk': 8, 'hdim': 256}
    assert Balance_loss().save() == {'loss_weight': 100, 'CM_num': 16}
    assert Balance_loss.always_backward is True
    assert 'noise' not in H_x().save()


def test_hx_init_params():
    wg, wn = H_x(size=[8256, 16]).init_params(np.random.default_rng(0), np.float32)
    for w in (wg, wn):
        assert w.shape == (8256, 16) and w.dtype == np.float32
        assert np.all(w == np.float32(1) / np.float32(8256))


# ---------------------------------------------------------------- H_x
def test_hx_modes_and_noise():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 1, D, N)).astype(np.float32)
    wg, wn = (rng.standard_normal((D, K)).astype(np.float32) for _ in range(2))
    b = H_x(size=[D, K])
    b.net = BlockContext(mode='normal', rng=np.random.default_rng(7))
    (H, g), = b.forward([x], [wg, wn])
    assert H.shape == (K, N) and H.dtype == np.float32
    assert g.shape == (1, N) and g.dtype == np.float64
    assert np.array_equal(g, np.random.default_rng(7).standard_normal((1, N)))
    x2 = x.reshape(D, N)
    sp = np.log1p(np.exp(wn.T.astype(np.float64) @ x2))
    assert np.allclose(H, wg.T @ x2 + g * sp, rtol=1e-5, atol=1e-5)
    b.noise = np.arange(N) / 10.0
    (H2, g2), = b.forward([x], [wg, wn])
    assert np.array_equal(g2, (np.arange(N) / 10.0).reshape(1, N))
    b.noise = np.zeros(N + 1)
    with pytest.raises(ValueError, match='noise'):
        b.forward([x], [wg, wn])
    b.net.mode = 'test'
    (H3, g3), = b.forward([x], [wg, wn])          # test mode: gamma = 0, noise ignored
    assert np.all(g3 == 0) and g3.dtype == np.float64
    assert np.allclose(H3, wg.T @ x2, rtol=1e-6, atol=1e-6)


def test_hx_gradcheck_fixed_noise():
    rng = np.random.default_rng(2)
    x = np.asfortranarray(rng.standard_normal((1, 1, D, N)))
    wg, wn = (np.asfortranarray(rng.standard_normal((D, K))) for _ in range(2))
    b = H_x(size=[D, K])
    b.noise = rng.standard_normal(N)
    p = rng.standard_normal((K, N))
    f = lambda: float(np.sum(p * b.forward([x], [wg, wn])[0][0]))   # noqa: E731
    out = b.forward([x], [wg, wn])
    (dx,), (dwg, dwn) = b.backward([x], [wg, wn], [p], out)
    assert dx.shape == x.shape
    for name, a, d in (('x', x, dx), ('wg', wg, dwg), ('wn', wn, dwn)):
        _check(name, f, a, d)
    assert b.backward([x], [wg, wn], [None], out) == ([None], [None, None])


def test_softplus_overflow_falls_back_to_linear():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        t32 = np.array([100.0, 88.0, 89.0, -100.0, 0.0], np.float32)
        sp = softplus(t32)
        assert sp.dtype == np.float32
        assert sp[0] == 100 and sp[2] == 89           # exp overflows in float32 above ~88.72
        assert sp[1] == np.float32(np.log(1 + np.exp(np.float32(88))))
        assert sp[3] == 0 and sp[4] == np.float32(np.log(2))
        t64 = np.array([1000.0, 700.0])
        assert softplus(t64)[0] == 1000 and np.isclose(softplus(t64)[1], 700)


def test_hx_overflow_forward_and_backward():
    """Wn'x beyond float32's exp range: H uses the linear value, the derivative sigmoid 1."""
    x = np.ones((1, 1, 2, 2), np.float32)
    wg = np.zeros((2, 3), np.float32)
    wn = np.full((2, 3), 60.0, np.float32)           # Wn'x = 120
    b = H_x(size=[2, 3])
    b.noise = np.array([1.0, -2.0])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        (H, g), = b.forward([x], [wg, wn])
        assert np.array_equal(H, np.array([[120, -240]] * 3, np.float32))
        (dx,), (dwg, dwn) = b.backward([x], [wg, wn], [np.ones((3, 2), np.float32)], [(H, g)])
    assert np.array_equal(dwn, np.array([[-1.0] * 3] * 2, np.float32))   # sum_n gamma_n * x
    assert np.all(np.isfinite(dx))


# ---------------------------------------------------------------- gating: selection rules
def test_topk_tie_rule_keeps_first_in_index_order():
    H = np.array([[3, 1, 1, 1, 2, 1],
                  [5, 4, 4, 4, 4, 1]], float).T     # K = 6, two images
    m = topk_mask(H, 3)
    assert m.sum(axis=0).tolist() == [3, 3]
    assert m[:, 0].tolist() == [True, True, False, False, True, False]
    assert m[:, 1].tolist() == [True, True, True, False, False, False]


def test_topk_partial_all_equal_column_is_deterministic():
    """Only some images tie completely: the original's tie rule (first k), no random draw."""
    H = np.array([[2.0] * K, np.arange(K, dtype=float)]).T
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    m = topk_mask(H, TOPK, rng)
    assert rng.bit_generator.state == state
    assert m[:, 0].tolist() == [True] * TOPK + [False] * (K - TOPK)
    assert m[:, 1].tolist() == [False] * (K - TOPK) + [True] * TOPK


def test_topk_all_tie_random_pick_is_seeded_and_reproducible():
    H = np.full((K, 40), 1.0 / 7, np.float32)       # the constant-init first batch
    m1 = topk_mask(H, TOPK, np.random.default_rng(11))
    m2 = topk_mask(H, TOPK, np.random.default_rng(11))
    m3 = topk_mask(H, TOPK, np.random.default_rng(12))
    assert np.array_equal(m1, m2) and not np.array_equal(m1, m3)
    assert np.all(m1.sum(axis=0) == TOPK)
    t = np.random.default_rng(11).standard_normal((K, 40))   # the draw: top k of randn(K, N)
    assert np.array_equal(m1, t >= np.sort(t, axis=0)[::-1][TOPK - 1])
    assert len({tuple(c) for c in m1.T}) > 1           # not the same pick for every image
    # every column tied from its k-th value down also counts as "all selected" (original rule)
    H2 = np.ones((K, 3))
    H2[0] = 5
    m4 = topk_mask(H2, TOPK, np.random.default_rng(11))
    t4 = np.random.default_rng(11).standard_normal((K, 3))
    assert np.array_equal(m4, t4 >= np.sort(t4, axis=0)[::-1][TOPK - 1])
    # topk == K: everything selected, no draw
    assert topk_mask(H, K).all()


def test_gating_block_tuple_and_all_tie_uses_net_rng():
    H = np.full((K, N), 0.25)
    b = gating(topk=TOPK, CM_num=K)
    b.net = BlockContext(rng=np.random.default_rng(5))
    (out,) = b.forward([(H, np.zeros((1, N)))], [])
    sfm, mask, masked, none4, none5, sums = out
    assert none4 is None and none5 is None
    assert mask.dtype == bool and mask.shape == (K, N) and np.all(mask.sum(axis=0) == TOPK)
    assert np.allclose(sfm[mask], 1.0 / TOPK) and np.all(sfm[~mask] == 0)
    assert np.array_equal(masked, np.where(mask, H, 0))
    assert sums.shape == (1, K) and np.allclose(sums, sfm.sum(axis=1))
    assert np.array_equal(mask, topk_mask(H, TOPK, np.random.default_rng(5)))


def test_selected_zero_score_gets_zero_weight_but_stays_selected():
    H = np.array([[0.0, 1.0, -1.0, 2.0, -3.0, -4.0],
                  [0.5, 0.0, 0.2, -1.0, -2.0, -3.0]]).T
    sfm, mask, masked, sums = gating_forward(H, TOPK)
    assert mask[:, 0].tolist() == [True, True, False, True, False, False]
    assert mask[1, 1] and sfm[1, 1] == 0
    assert sfm[0, 0] == 0 and np.isclose(sfm[:, 0].sum(), 1)
    assert np.isclose(sfm[[1, 3], 0], np.exp([1, 2]) / np.exp([1, 2]).sum()).all()
    # backward: nothing flows into the zero-weight entry
    b = gating(topk=TOPK)
    out = b.forward([H], [])
    (dH,), _ = b.backward([H], [], [np.ones((K, 2)) + np.arange(K)[:, None]], out)
    assert dH[0, 0] == 0 and dH[1, 1] == 0 and np.all(dH[~mask] == 0)


def test_gating_gradcheck():
    rng = np.random.default_rng(4)
    H = _separated_scores(rng)
    b = gating(topk=TOPK, CM_num=K)
    p = rng.standard_normal((K, N))
    out = b.forward([(H, None)], [])
    (dH,), _ = b.backward([(H, None)], [], [p], out)
    f = lambda: float(np.sum(p * b.forward([(H, None)], [])[0][0]))   # noqa: E731
    _check('gating H', f, H, dH)
    H4 = np.asfortranarray(H.reshape(1, 1, K, N))               # 1 x 1 x K x N input
    out4 = b.forward([H4], [])
    (dH4,), _ = b.backward([H4], [], [p], out4)
    assert dH4.shape == H4.shape and np.allclose(dH4.reshape(K, N), dH)


# ---------------------------------------------------------------- CM_out
def test_cm_out_forward_matches_dense_reference():
    rng = np.random.default_rng(6)
    H = _separated_scores(rng)
    H[1] = -10          # CM 2 gets no image
    sfm, mask, _, _ = gating_forward(H, TOPK)
    ys = _routed_outputs(rng, mask)
    assert ys[1] is None
    z = cm_out_forward(sfm, mask, ys)
    ref = np.zeros((DH, N))
    for i in range(K):
        for pos, n in enumerate(np.flatnonzero(mask[i])):
            ref[:, n] += sfm[i, n] * ys[i][0, 0, :, pos]
    assert z.shape == (1, 1, DH, N) and np.allclose(z[0, 0], ref)
    ys[1] = np.zeros((1, 1, DH, 0))           # an empty array works like None
    assert np.allclose(cm_out_forward(sfm, mask, ys), z)
    order = route_order(mask)
    for i in range(K):
        assert order[i, :mask[i].sum()].tolist() == np.flatnonzero(mask[i]).tolist()
    ys[0] = ys[0][:, :, :, :-1]
    with pytest.raises(ValueError, match='CM 1'):
        cm_out_forward(sfm, mask, ys)


def test_cm_out_gradcheck():
    rng = np.random.default_rng(8)
    H = _separated_scores(rng)
    H[4] = -10
    sfm, mask, _, _ = gating_forward(H, TOPK)
    sfm = np.asfortranarray(sfm)
    ys = _routed_outputs(rng, mask)
    g = (sfm, mask, None, None, None, None)
    b = CM_out(CM_num=K, topk=TOPK, hdim=DH)
    p = rng.standard_normal((1, 1, DH, N))
    out = b.forward([g] + ys, [])
    ders, dpar = b.backward([g] + ys, [], [p], out)
    assert dpar == [] and len(ders) == K + 1 and ders[5] is None
    f = lambda: float(np.sum(p * b.forward([g] + ys, [])[0]))   # noqa: E731
    idx, num = _num(f, sfm)
    sel = mask.reshape(-1, order='F')[idx]
    assert_close('CM_out sfm', ders[0].reshape(-1, order='F')[idx][sel], num[sel], 1e-6, 1e-8)
    assert np.all(ders[0][~mask] == 0)
    for i, y in enumerate(ys):
        if y is not None:
            assert ders[i + 1].shape == y.shape
            _check(f'CM_out y{i + 1}', f, y, ders[i + 1])


# ---------------------------------------------------------------- Balance_loss
def test_balance_loss_formula_is_the_exact_derivative():
    rng = np.random.default_rng(9)
    s = rng.random((K, N))
    s /= s.sum(axis=0)
    loss, rsd, w_sum = balance_loss_forward(s, 100)
    ws = s.sum(axis=1)
    assert np.isclose(rsd[0, 0], ws.std(ddof=1) / ws.mean())
    assert np.isclose(loss[0, 0], 100 * rsd[0, 0] ** 2)
    assert w_sum.shape == (K, 1) and loss.shape == rsd.shape == (1, 1)
    d = balance_loss_backward(s, 100, rsd, w_sum)
    _check('Balance_loss', lambda: float(balance_loss_forward(s, 100)[0][0, 0]), s, d)
    assert np.allclose(d, d[:, :1])                 # the same column for every image


def test_balance_loss_block_ignores_der_outputs():
    rng = np.random.default_rng(10)
    s = rng.random((K, N)).astype(np.float32)
    b = Balance_loss(loss_weight=100, CM_num=K)
    out = b.forward([(s, None)], [])
    (loss, rsd, w_sum), = out
    assert loss.dtype == rsd.dtype == w_sum.dtype == np.float32
    d1, p1 = b.backward([(s, None)], [], [None], out)
    d2, _ = b.backward([(s, None)], [], [np.ones((1, 1))], out)
    assert p1 == [] and np.array_equal(d1[0], d2[0]) and d1[0].shape == (K, N)


# ---------------------------------------------------------------- the whole gated mixture
def test_gated_mixture_chain_gradcheck():
    """x -> H_x (fixed noise) -> gating -> CM_out (fixed CM outputs) + Balance_loss:
    L = <p, z> + loss, checked against central differences for x, Wg, Wn and every y_i.
    The selection has wide margins, so no perturbation changes it."""
    rng = np.random.default_rng(12)
    x = np.asfortranarray(rng.standard_normal((1, 1, D, N)))
    wg = np.asfortranarray(rng.standard_normal((D, K)))
    wn = np.asfortranarray(0.3 * rng.standard_normal((D, K)))
    hx, gt = H_x(size=[D, K]), gating(topk=TOPK, CM_num=K)
    cm, bl = CM_out(CM_num=K, topk=TOPK, hdim=DH), Balance_loss(loss_weight=100, CM_num=K)
    hx.noise = rng.standard_normal(N)
    h0 = hx.forward([x], [wg, wn])[0][0]
    srt = np.sort(h0, axis=0)[::-1]
    assert np.min(srt[TOPK - 1] - srt[TOPK]) > 1e-3
    mask0 = gt.forward([h0], [])[0][1]
    ys = _routed_outputs(rng, mask0)
    p = rng.standard_normal((1, 1, DH, N))

    def fwd():
        hv = hx.forward([x], [wg, wn])
        gv = gt.forward(hv, [])
        assert np.array_equal(gv[0][1], mask0)
        z = cm.forward(gv + ys, [])
        lo = bl.forward(gv, [])
        return hv, gv, z, lo

    def f():
        _, _, z, lo = fwd()
        return float(np.sum(p * z[0]) + lo[0][0][0, 0])

    hv, gv, z, lo = fwd()
    ders, _ = cm.backward(gv + ys, [], [p], z)
    (dsb,), _ = bl.backward(gv, [], [None], lo)
    (dH,), _ = gt.backward(hv, [], [ders[0] + dsb], gv)
    (dx,), (dwg, dwn) = hx.backward([x], [wg, wn], [dH], hv)
    for name, a, d in (('x', x, dx), ('wg', wg, dwg), ('wn', wn, dwn)):
        _check(f'chain {name}', f, a, d, rtol=1e-5, atol=1e-7)
    for i, y in enumerate(ys):
        if y is not None:
            _check(f'chain y{i + 1}', f, y, ders[i + 1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- in a DagNN
def test_gm_sop_blocks_in_a_net():
    """iSQRT-COV gating branch -> H_x -> gating -> Balance_loss, K routed iSQRT-COV CMs
    (one gets no image) -> CM_out, in a DagNN: the Balance_loss derivative arrives through
    always_backward, the empty CM gets no derivative, results do not depend on
    conserve_memory, and a directional finite difference agrees."""
    from pydagnn import DagNN
    from pydagnn.gradcheck import directional_derivative
    from pydagnn.layers.conv import Conv
    from pydagnn.layers.cov import (OBJ_ConvNet_COV_Pool, OBJ_ConvNet_COV_ScaleTr,
                                    OBJ_ConvNet_Cov_Sqrtm, OBJ_ConvNet_Cov_TraceNorm)
    k, K_, d, n = 2, 4, 4, 5
    L = d * (d + 1) // 2
    net = DagNN(seed=0)

    def isqrt(prefix, inp):
        net.add_layer(prefix + 'cov_pool', OBJ_ConvNet_COV_Pool(), [inp], [prefix + 'cov_pool'])
        net.add_layer(prefix + 'tn', OBJ_ConvNet_Cov_TraceNorm(), [prefix + 'cov_pool'],
                      [prefix + 'tn', prefix + 'tn_tr'])
        net.add_layer(prefix + 'sq', OBJ_ConvNet_Cov_Sqrtm(coef=1, iterNum=3), [prefix + 'tn'],
                      [prefix + 'sq', prefix + 'sq_Y', prefix + 'sq_Z'])
        net.add_layer(prefix + 'st', OBJ_ConvNet_COV_ScaleTr(), [prefix + 'sq', prefix + 'tn_tr'],
                      [prefix + 'st'])
        return prefix + 'st'

    g = isqrt('gating_', 'input')
    net.add_layer('H_x', H_x(size=[L, K_], CM_num=K_, topk=k, dim_in=L), [g], ['H_x'],
                  ['gating_w', 'gating_noise_w'])
    net.add_layer('gating', gating(size=[L, K_], CM_num=K_, topk=k), ['H_x'], ['gating'])
    net.add_layer('Balance_loss', Balance_loss(loss_weight=100, CM_num=K_), ['gating'],
                  ['Balance_loss'])
    outs = []
    for i in range(1, K_ + 1):
        net.add_layer(f'CM_{i}_a_conv', Conv(size=[1, 1, d, d], hasBias=False), ['input'],
                      [f'CM_{i}_a'], [f'CM_{i}_a_f'])
        net.set_route(f'CM_{i}_a_conv', 'gating', i)
        outs.append(isqrt(f'CM_{i}_', f'CM_{i}_a'))
    net.add_layer('Fusion_out', CM_out(CM_num=K_, topk=k, hdim=L), ['gating'] + outs,
                  ['Fusion_out'])
    net.get_var('Balance_loss').precious = True
    net.init_params(np.random.default_rng(1), np.float64)
    rng = np.random.default_rng(5)
    for name in ('gating_w', 'gating_noise_w'):
        p_ = net.get_param(name)
        p_.value = np.asfortranarray(rng.standard_normal(p_.value.shape))
    net.get_layer('H_x').block.noise = np.linspace(-1, 1, n)
    x = np.asfortranarray(np.maximum(rng.standard_normal((3, 3, d, n)), 0))
    p = rng.standard_normal((1, 1, L, n))
    ders = []
    for conserve in (True, False):
        net.conserve_memory = conserve
        net.eval({'input': x}, {'Fusion_out': p})
        ders.append({q.name: None if q.der is None else q.der.copy() for q in net.params})
    mask = net.get_var('gating').value[1]
    empty = [i + 1 for i, c in enumerate(mask.sum(axis=1)) if c == 0]
    assert empty                                               # (CM 1 with these seeds)
    for i in empty:
        assert ders[0][f'CM_{i}_a_f'] is None and ders[1][f'CM_{i}_a_f'] is None
    h = np.sort(net.get_var('H_x').value[0], axis=0)[::-1]
    assert np.min(h[k - 1] - h[k]) > 1e-3                      # FD keeps the selection
    for name, d0 in ders[0].items():
        assert (d0 is None) == (ders[1][name] is None)
        assert d0 is None or np.allclose(d0, ders[1][name], rtol=1e-12, atol=1e-14)

    def f():
        net.eval({'input': x})
        return float(np.sum(p * net.get_var('Fusion_out').value)
                     + net.get_var('Balance_loss').value[0].item())

    for name in ('gating_w', 'CM_2_a_f'):
        w = net.get_param(name).value
        v = rng.standard_normal(w.shape)
        num = directional_derivative(f, w, v)
        assert np.isclose(num, np.sum(ders[1][name] * v), rtol=1e-6, atol=1e-8), name
