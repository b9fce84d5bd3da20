"""MatConvNet beta25 layer types, part b (issue 12): dagnn.PDist, dagnn.ROIPooling,
dagnn.BilinearSampler, dagnn.AffineGridGenerator, dagnn.UniformScalingGridGenerator and
GM-SOP's dagnn.MPN_COV_Pool_C.

Forward values against simple loop transcriptions of the vl_nn* documentation (and of
the .m files for the grid generators), float64 derivative checks (check_block) for every
option set, MatConvNet's special rules (epsilon in pdist derivatives, ROI rounding and
tie order, zero padding of the sampler), the block API, and GPU-vs-CPU comparisons
(marker gpu, skipped without CuPy)."""
import math
import zlib

import numpy as np
import pytest

from pydagnn import backend
from pydagnn.gradcheck import check_block
from pydagnn.layer import block_class
from pydagnn.layers.bilinear_sampler import (BilinearSampler, bilinear_sampler_backward,
                                             bilinear_sampler_forward)
from pydagnn.layers.grid_generators import AffineGridGenerator, UniformScalingGridGenerator
from pydagnn.layers.mpn_cov import MPN_COV_Pool
from pydagnn.layers.mpn_cov_c import MPN_COV_Pool_C, mpn_cov_c_forward
from pydagnn.layers.pdist import PDist, pdist_backward, pdist_forward
from pydagnn.layers.roipool import ROIPooling, roipool_backward, roipool_forward

RNG = np.random.default_rng


# ----------------------------------------------------------------------------- PDist

def ref_pdist(x, x0, p, no_root, weights, aggregate):
    H, W, C, N = x.shape
    y = np.zeros((H, W, 1, N))
    for i in range(H):
        for j in range(W):
            for n in range(N):
                t = x0[0, 0, :, n] if x0.shape[0] == 1 else x0[i, j, :, n]
                s = sum(abs(x[i, j, c, n] - t[c]) ** p for c in range(C))
                y[i, j, 0, n] = s if no_root else s ** (1.0 / p)
    if weights is not None:
        y = y * weights
    return y.sum().reshape(1, 1, 1, 1) if aggregate else y


# (aggregate, weights kind, x0 kind)
PD_VARIANTS = [(False, None, 'full'), (True, None, 'one'), (False, 'mask', 'one'),
               (True, 'scalar', 'full'), (True, 'mask', 'full')]
PD_CASES = [(p, nr) + v for p in (1, 2, 3, 0.5, 1.5) for nr in (False, True)
            for v in PD_VARIANTS]


@pytest.mark.parametrize('case', PD_CASES, ids=[
    f'p{c[0]}-{"noroot" if c[1] else "root"}-{"agg" if c[2] else "map"}-{c[3]}-{c[4]}'
    for c in PD_CASES])
def test_pdist_values_and_gradcheck(case):
    p, no_root, agg, wkind, x0kind = case
    rng = RNG(zlib.crc32(str(case).encode()))
    x = rng.standard_normal((3, 4, 5, 2))
    x0 = rng.standard_normal((3, 4, 5, 2) if x0kind == 'full' else (1, 1, 5, 2))
    w = {None: None, 'scalar': np.array(1.7), 'mask': rng.uniform(0.5, 2, (3, 4, 1, 2))}[wkind]
    blk = PDist(p=p, noRoot=no_root, aggregate=agg)
    inputs = [x, x0] + ([w] if w is not None else [])
    y = blk.forward(inputs, [])[0]
    np.testing.assert_allclose(y, ref_pdist(x, x0, p, no_root, w, agg), rtol=1e-12, atol=1e-12)
    assert y.shape == blk.get_output_sizes([x.shape, x0.shape])[0]
    errs = check_block(blk, inputs, [], rtol=1e-5, atol=1e-7)
    assert set(errs) == {'in0', 'in1'}
    dx, dx0 = blk.backward(inputs, [], [np.ones_like(y)], [y])[0][:2]
    assert dx0.shape == x0.shape


def test_pdist_epsilon_and_x0_derivative_shape():
    x = np.zeros((1, 1, 3, 1))
    x0 = np.full((1, 1, 3, 1), 1e-5)
    d = x - x0
    # root, p = 2: 1 / sqrt(max(sum d^2, epsilon)) with sum d^2 = 3e-10 < epsilon
    dx, dx0 = pdist_backward(x, x0, np.ones((1, 1, 1, 1)), p=2, epsilon=1e-6)
    np.testing.assert_allclose(dx, d / math.sqrt(1e-6))
    np.testing.assert_allclose(dx0, -dx)
    # p < 1, no root: p max(|d|, epsilon)^(p-1) sign(d)
    dx, _ = pdist_backward(x, x0, np.ones((1, 1, 1, 1)), p=0.5, no_root=True, epsilon=1e-3)
    np.testing.assert_allclose(dx, 0.5 * 1e-3 ** -0.5 * np.sign(d))
    # the function returns dzdx0 of x's size when x0 is 1 x 1 x C x N; the block sums it
    x = RNG(1).standard_normal((2, 3, 4, 2))
    x0 = RNG(2).standard_normal((1, 1, 4, 2))
    dx, dx0 = pdist_backward(x, x0, np.ones((2, 3, 1, 2)), p=2)
    assert dx0.shape == x.shape
    der = PDist(aggregate=False).backward([x, x0], [], [np.ones((2, 3, 1, 2))], None)[0]
    np.testing.assert_allclose(der[1], dx0.sum(axis=(0, 1), keepdims=True))


def test_pdist_block_api_opts_and_average():
    assert block_class('dagnn.PDist') is PDist
    assert PDist().save() == {'loss': 'pdist', 'ignoreAverage': False, 'opts': [], 'p': 2,
                              'aggregate': True, 'noRoot': False, 'epsilon': 1e-6}
    rng = RNG(3)
    x, x0 = rng.standard_normal((2, 2, 3, 2)), rng.standard_normal((2, 2, 3, 2))
    blk = PDist(opts=['noRoot', True])             # opts come after the properties
    y = blk.forward([x, x0], [])[0]
    np.testing.assert_allclose(y, ref_pdist(x, x0, 2, True, None, True))
    assert blk.numAveraged == 8 and blk.average == pytest.approx(float(y.ravel()[0]) / 8)
    blk.reset()
    assert blk.numAveraged == 0
    with pytest.raises(ValueError, match='x0 has shape'):
        pdist_forward(x, x0[:1])
    with pytest.raises(ValueError, match='instanceWeights'):
        pdist_forward(x, x0, instance_weights=np.ones(3))
    with pytest.raises(ValueError, match='unknown option'):
        PDist(opts=['bogus', 1]).forward([x, x0], [])
    y32 = pdist_forward(x.astype(np.float32), x0.astype(np.float32), 3)
    assert y32.dtype == np.float32 and y32.shape == (2, 2, 1, 2)


# ------------------------------------------------------------------------ ROIPooling

def c_round(v):
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def ref_roipool(x, rois, method, sub, T):
    """Loops over the documented definition (nnroipooling.cu's bins)."""
    H, W, C, N = x.shape
    rois = np.asarray(rois, dtype=float).reshape(5, -1, order='F')
    sh, sw = sub
    R = rois.shape[1]
    y = np.zeros((sh, sw, C, R))
    for r in range(R):
        t, u1, v1, u2, v2 = rois[:, r]
        U1, V1 = T[0] * u1 + T[2] * v1 + T[4], T[1] * u1 + T[3] * v1 + T[5]
        U2, V2 = T[0] * u2 + T[2] * v2 + T[4], T[1] * u2 + T[3] * v2 + T[5]
        img = min(max(int(t) - 1, 0), N - 1)
        h0, w0 = c_round(V1) - 1, c_round(U1) - 1
        hh = max(c_round(V2) - 1 - h0 + 1, 1)
        ww = max(c_round(U2) - 1 - w0 + 1, 1)
        for i in range(sh):
            a = min(max(math.floor(i * hh / sh) + h0, 0), H)
            b = min(max(math.ceil((i + 1) * hh / sh) + h0, 0), H)
            for j in range(sw):
                c = min(max(math.floor(j * ww / sw) + w0, 0), W)
                d = min(max(math.ceil((j + 1) * ww / sw) + w0, 0), W)
                if b <= a or d <= c:
                    continue
                tile = x[a:b, c:d, :, img]
                y[i, j, :, r] = tile.max(axis=(0, 1)) if method == 'max' else \
                    tile.mean(axis=(0, 1))
    return y


ROIS = np.array([[1, 1, 1, 11, 9], [2, 3, 2, 8, 7], [1, 5, 4, 5, 4], [2, -2, -1, 20, 15],
                 [1, 2.5, 3.5, 7.5, 8.49], [2, 1.4, 2.6, 10.5, 6.5], [1, 9, 8, 3, 2]]).T
TRANSFORMS = [(1, [1, 0, 0, 1, 0, 0]), (0.5, [0.5, 0, 0, 0.5, 0.5, 0.5]),
              ([0.5, 0.75], [0.5, 0, 0, 0.75, 0.5, 0.25]),
              (np.array([[0., 1., 0.5], [1., 0., -0.5]]), [0, 1, 1, 0, 0.5, -0.5])]
ROI_CASES = [(m, s, k) for m in ('max', 'avg') for s in ([2, 3], [6, 6], 1, [4, 1])
             for k in range(len(TRANSFORMS))]


@pytest.mark.parametrize('case', ROI_CASES,
                         ids=[f'{c[0]}-{c[1]}-T{c[2]}' for c in ROI_CASES])
def test_roipool_values_and_gradcheck(case):
    method, sub, k = case
    rng = RNG(10 + k)
    x = rng.standard_normal((9, 11, 3, 2))
    t, T6 = TRANSFORMS[k]
    blk = ROIPooling(method=method, subdivisions=sub, transform=t)
    y = blk.forward([x, ROIS], [])[0]
    s2 = (sub, sub) if np.isscalar(sub) else tuple(sub)
    np.testing.assert_allclose(y, ref_roipool(x, ROIS, method, s2, T6), rtol=1e-13, atol=1e-13)
    assert y.shape == blk.get_output_sizes([x.shape, ROIS.shape])[0] == s2 + (3, ROIS.shape[1])
    errs = check_block(blk, [x, ROIS], [])
    assert set(errs) == {'in0'}


def test_roipool_rounding_ties_and_flatten():
    # corner 2.5 rounds away from zero (to 3), not to even (2)
    x = np.arange(1.0, 26.0).reshape(5, 5, 1, 1, order='F')
    y = roipool_forward(x, [1, 2.5, 2.5, 2.5, 2.5], 'max', 1)
    assert y.ravel()[0] == x[2, 2, 0, 0]
    # ties: the derivative goes to the first maximum in column-major scan order
    x = np.zeros((3, 3, 1, 1))
    x[2, 0] = x[0, 1] = 5.0           # (row 2, col 0) comes first column-major
    dx = roipool_backward(x, [1, 1, 1, 3, 3], np.full((1, 1, 1, 1), 2.0), 'max', 1)
    assert dx[2, 0, 0, 0] == 2.0 and dx.sum() == 2.0
    # avg derivative: dy / tile size over the tile; overlapping ROIs accumulate
    dx = roipool_backward(np.ones((4, 4, 1, 2)), np.array([[2, 1, 1, 2, 2], [2, 1, 1, 4, 4]]).T,
                          np.ones((1, 1, 1, 2)), 'avg', 1)
    assert dx[0, 0, 0, 1] == pytest.approx(1 / 4 + 1 / 16) and dx[..., 0].sum() == 0
    # an image index out of range is clamped; a ROI outside the map gives empty tiles (0)
    x = RNG(4).standard_normal((4, 4, 2, 2))
    y = roipool_forward(x, np.array([[5, 1, 1, 4, 4], [1, 20, 20, 30, 30]]).T, 'max', 2)
    np.testing.assert_allclose(y[:, :, :, 0], ref_roipool(x, [5, 1, 1, 4, 4], 'max', (2, 2),
                                                          [1, 0, 0, 1, 0, 0])[:, :, :, 0])
    assert np.all(y[:, :, :, 1] == 0)
    blk = ROIPooling(subdivisions=[2, 3], flatten=True)
    y = blk.forward([x, ROIS[:, :2]], [])[0]
    assert y.shape == (1, 1, 12, 2) == blk.get_output_sizes([x.shape, (5, 2)])[0]
    errs = check_block(blk, [RNG(5).standard_normal((9, 11, 2, 2)), ROIS[:, :3]], [])
    assert set(errs) == {'in0'}


def test_roipool_block_api_and_errors():
    assert block_class('dagnn.ROIPooling') is ROIPooling
    assert ROIPooling().save() == {'method': 'max', 'subdivisions': [6, 6], 'transform': 1,
                                   'flatten': False}
    x = np.zeros((4, 4, 1, 1))
    with pytest.raises(ValueError, match='5 x R'):
        roipool_forward(x, np.zeros(4))
    with pytest.raises(ValueError, match='transform must have 1, 2 or 6'):
        roipool_forward(x, [1, 1, 1, 2, 2], transform=[1, 2, 3])
    with pytest.raises(ValueError, match='smaller than 1'):
        roipool_forward(x, [1, 1, 1, 2, 2], subdivisions=[0, 2])
    with pytest.raises(ValueError, match="'max' or 'avg'"):
        roipool_forward(x, [1, 1, 1, 2, 2], method='sum')
    y = roipool_forward(x.astype(np.float32), np.array([1, 1, 1, 3, 3], np.float32), 'avg', 2)
    assert y.dtype == np.float32 and y.flags.f_contiguous


# ------------------------------------------------------------ BilinearSampler, grids

def ref_sampler(x, grid):
    H, W, C, N = x.shape
    _, Ho, Wo, No = grid.shape

    def pix(r, c, ch, n):
        return x[r, c, ch, n] if 0 <= r < H and 0 <= c < W else 0.0
    y = np.zeros((Ho, Wo, C, No))
    for n in range(No):
        src = n // (No // N)
        for i in range(Ho):
            for j in range(Wo):
                py = (grid[0, i, j, n] + 1) / 2 * (H - 1)
                px = (grid[1, i, j, n] + 1) / 2 * (W - 1)
                r, c = math.floor(py), math.floor(px)
                a, b = py - r, px - c
                for ch in range(C):
                    y[i, j, ch, n] = ((1 - a) * (1 - b) * pix(r, c, ch, src)
                                      + a * (1 - b) * pix(r + 1, c, ch, src)
                                      + (1 - a) * b * pix(r, c + 1, ch, src)
                                      + a * b * pix(r + 1, c + 1, ch, src))
    return y


SAMPLER_CASES = [('same_n', (5, 6, 3, 2), (2, 4, 3, 2), 1.0),
                 ('groups_of_3', (4, 5, 2, 2), (2, 3, 4, 6), 1.0),
                 ('outside', (5, 4, 2, 1), (2, 5, 5, 1), 1.6),
                 ('one_row', (1, 6, 2, 1), (2, 2, 3, 1), 1.0)]


@pytest.mark.parametrize('case', SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
def test_bilinear_sampler_values_and_gradcheck(case):
    _, xs, gs, span = case
    rng = RNG(sum(xs) + sum(gs))
    x = rng.standard_normal(xs)
    grid = rng.uniform(-span, span, gs)
    blk = BilinearSampler()
    y = blk.forward([x, grid], [])[0]
    np.testing.assert_allclose(y, ref_sampler(x, grid), rtol=1e-13, atol=1e-13)
    assert y.shape == blk.get_output_sizes([xs, gs])[0] and y.flags.f_contiguous
    errs = check_block(blk, [x, grid], [])
    assert set(errs) == {'in0', 'in1'}


def ref_affine_grid(A, Ho, Wo):
    """AffineGridGenerator.m, transcribed."""
    nb = A.shape[3]
    A = A.reshape(2, 3, nb, order='F')
    L = A[:, :2, :].reshape(2, 2 * nb, order='F')
    ml = lambda n: np.linspace(-1, 1, n) if n > 1 else np.ones(1)  # noqa: E731
    yy, xx = np.meshgrid(ml(Ho), ml(Wo))
    xxyy = np.stack([yy.ravel(order='F'), xx.ravel(order='F')], axis=1)
    t = A[:, 2, :].reshape(1, 2 * nb, order='F')
    g = (xxyy @ L + t).reshape(Wo, Ho, 2, nb, order='F')
    return g.transpose(2, 1, 0, 3)


def ref_scaling_grid(T, Ho, Wo):
    """UniformScalingGridGenerator.m, transcribed."""
    nb = T.shape[3]
    S = T[0, 0, 0, :].reshape(1, 1, nb)
    t = T[0, 0, 1:3, :].reshape(2, 1, nb, order='F')
    ml = lambda n: np.linspace(-1, 1, n) if n > 1 else np.ones(1)  # noqa: E731
    yy, xx = np.meshgrid(ml(Wo), ml(Ho))
    xxyy = np.stack([xx.ravel(order='F'), yy.ravel(order='F')])
    g = xxyy[:, :, None] * S + t
    return g.reshape(2, Ho, Wo, nb, order='F')


@pytest.mark.parametrize('hw', [(4, 5), (3, 3), (1, 4), (6, 1)])
def test_grid_generators(hw):
    Ho, Wo = hw
    rng = RNG(Ho * 10 + Wo)
    A = rng.standard_normal((1, 1, 6, 3))
    T = rng.standard_normal((1, 1, 3, 2))
    ga, gs = AffineGridGenerator(Ho=Ho, Wo=Wo), UniformScalingGridGenerator(Ho=Ho, Wo=Wo)
    np.testing.assert_allclose(ga.forward([A], [])[0], ref_affine_grid(A, Ho, Wo), atol=1e-14)
    np.testing.assert_allclose(gs.forward([T], [])[0], ref_scaling_grid(T, Ho, Wo), atol=1e-14)
    assert ga.get_output_sizes([A.shape]) == [(2, Ho, Wo, 3)]
    assert set(check_block(ga, [A], [])) == {'in0'}
    assert set(check_block(gs, [T], [])) == {'in0'}


def test_identity_grid_resamples_exactly_and_grid_pipeline():
    x = RNG(7).standard_normal((5, 7, 2, 2))
    A = np.tile(np.array([1., 0, 0, 1, 0, 0]).reshape(1, 1, 6, 1), (1, 1, 1, 2))
    g = AffineGridGenerator(Ho=5, Wo=7).forward([A], [])[0]
    np.testing.assert_allclose(bilinear_sampler_forward(x, g), x, atol=1e-12)
    T = np.tile(np.array([1., 0, 0]).reshape(1, 1, 3, 1), (1, 1, 1, 2))
    g2 = UniformScalingGridGenerator(Ho=5, Wo=7).forward([T], [])[0]
    np.testing.assert_allclose(g2, g, atol=1e-15)
    dx, dg = bilinear_sampler_backward(x, g, np.ones((5, 7, 2, 2)), der_grid=False)
    assert dg is None and dx.shape == x.shape
    for name, cls in [('dagnn.BilinearSampler', BilinearSampler),
                      ('dagnn.AffineGridGenerator', AffineGridGenerator),
                      ('dagnn.UniformScalingGridGenerator', UniformScalingGridGenerator)]:
        assert block_class(name) is cls
    assert AffineGridGenerator().save() == {'Ho': 0, 'Wo': 0}
    assert BilinearSampler().save() == {}
    with pytest.raises(ValueError, match='not a multiple'):
        bilinear_sampler_forward(x, np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match=r'1 x 1 x 6 x N'):
        AffineGridGenerator(Ho=2, Wo=2).forward([np.zeros((1, 1, 3, 2))], [])
    with pytest.raises(ValueError, match='positive integer'):
        AffineGridGenerator().forward([A], [])
    y32 = bilinear_sampler_forward(x.astype(np.float32), g.astype(np.float32))
    assert y32.dtype == np.float32


# ---------------------------------------------------------------- MPN_COV_Pool_C

def ref_mpn_cov_c(x, alpha, eps):
    H, W, D, N = x.shape
    out = []
    for n in range(N):
        X = x[:, :, :, n].reshape(H * W, D, order='F')
        Xc = X - X.mean(axis=0)
        P = Xc.T @ Xc / (H * W)
        s, V = np.linalg.eigh(P)
        C = V @ np.diag((s + eps) ** alpha) @ V.T
        out.append([C[i, j] for j in range(D) for i in range(j + 1)])
    return np.array(out).T.reshape(1, 1, -1, N)


@pytest.mark.parametrize('opts', [dict(alpha=0.5), dict(alpha=0.3, epsilon=1e-3),
                                  dict(alpha=1.0), dict(alpha=0.5, regu_method='mat-l2'),
                                  dict(alpha=0.7, method='covariance')])
def test_mpn_cov_c_values_and_gradcheck(opts):
    x = RNG(8).standard_normal((4, 3, 5, 2))
    blk = MPN_COV_Pool_C(**opts)
    y, aS, aV, aD = blk.forward([x], [])
    np.testing.assert_allclose(y, ref_mpn_cov_c(x, opts['alpha'], opts.get('epsilon', 1e-12)),
                               rtol=1e-10, atol=1e-12)
    assert [y.shape, aS.shape, aV.shape, aD.shape] == blk.get_output_sizes([x.shape]) == \
        [(1, 1, 15, 2), (1, 5, 6, 1), (5, 5, 2, 1), (2, 1, 1, 1)]
    np.testing.assert_array_equal(aD.ravel(), [5, 5])
    s = aS[0, :, :2]                                     # eigenvalues, descending
    assert np.all(np.diff(s, axis=0) <= 0)
    np.testing.assert_allclose(aS[0, :, 2:4], (s + blk.epsilon) ** blk.alpha)
    np.testing.assert_allclose(aS[0, :, 4:6], blk.alpha * (s + blk.epsilon) ** (blk.alpha - 1))
    errs = check_block(blk, [x], [], rtol=1e-5, atol=1e-7)
    assert set(errs) == {'in0'}


def test_mpn_cov_c_matches_mpn_cov_pool_at_square_root_and_api():
    x = RNG(9).standard_normal((5, 4, 6, 3))
    y = MPN_COV_Pool_C().forward([x], [])[0]
    np.testing.assert_allclose(y, MPN_COV_Pool().forward([x], [])[0], rtol=1e-10, atol=1e-12)
    # alpha counts here (MPN_COV_Pool always takes the square root for 'power')
    y3 = MPN_COV_Pool_C(alpha=0.25).forward([x], [])[0]
    assert not np.allclose(y3, y)
    assert block_class('dagnn.MPN_COV_Pool_C') is MPN_COV_Pool_C
    assert MPN_COV_Pool_C().save() == {'method': 'covariance_small', 'regu_method': 'power',
                                       'alpha': 0.5, 'epsilon': 1e-12, 'opts': ['cuDNN']}
    with pytest.raises(ValueError, match="'power' or 'mat-l2'"):
        mpn_cov_c_forward(x, regu_method='log')
    with pytest.raises(ValueError, match='alpha must be positive'):
        mpn_cov_c_forward(x, alpha=0)
    # backward recomputes the aux outputs when the engine did not keep them
    blk = MPN_COV_Pool_C()
    outs = blk.forward([x], [])
    dy = RNG(10).standard_normal(outs[0].shape)
    a = blk.backward([x], [], [dy, None, None, None], outs)[0][0]
    b = blk.backward([x], [], [dy, None, None, None], None)[0][0]
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    y32 = mpn_cov_c_forward(x.astype(np.float32))[0]
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ GPU

def _gpu_cases():
    rng = RNG(11)
    x = rng.standard_normal((9, 11, 4, 2)).astype(np.float32)
    x0 = rng.standard_normal((1, 1, 4, 2)).astype(np.float32)
    w = rng.uniform(0.5, 2, (9, 11, 1, 2)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, (2, 5, 6, 4)).astype(np.float32)
    A = rng.standard_normal((1, 1, 6, 2)).astype(np.float32)
    T = rng.standard_normal((1, 1, 3, 2)).astype(np.float32)
    return [
        ('pdist', PDist(p=2, aggregate=False), [x, x0]),
        ('pdist_w', PDist(p=1.5, noRoot=True), [x, x0, w]),
        ('roipool_max', ROIPooling(subdivisions=[3, 2]), [x, ROIS.astype(np.float32)]),
        ('roipool_avg', ROIPooling(method='avg', subdivisions=[2, 4], transform=0.5),
         [x, ROIS.astype(np.float32)]),
        ('sampler', BilinearSampler(), [x, grid]),
        ('affine_grid', AffineGridGenerator(Ho=5, Wo=6), [A]),
        ('scaling_grid', UniformScalingGridGenerator(Ho=5, Wo=6), [T]),
        ('mpn_cov_c', MPN_COV_Pool_C(alpha=0.4), [x[:, :, :4]]),
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason='needs cupy and a CUDA device')
@pytest.mark.parametrize('k', range(8))
def test_gpu_matches_cpu(k):
    import cupy
    from pydagnn.testing import rel_err
    name, blk, inputs = _gpu_cases()[k]
    ycpu = blk.forward(inputs, [])
    dy = [RNG(k).standard_normal(ycpu[0].shape).astype(np.float32)] + [None] * (len(ycpu) - 1)
    dcpu = blk.backward(inputs, [], dy, ycpu)[0]
    ginputs = [cupy.asarray(a) for a in inputs]
    ygpu = blk.forward(ginputs, [])
    assert rel_err(backend.to_host(ygpu[0]), ycpu[0]) < 1e-4, name
    dgpu = blk.backward(ginputs, [], [cupy.asarray(dy[0])] + dy[1:], ygpu)[0]
    for a, b in zip(dgpu, dcpu):
        if b is not None:
            assert backend.is_gpu_array(a), name
            assert rel_err(backend.to_host(a), b) < 1e-4, name


# --------------------------------------------------------------- SimpleNN conversion

def _simplenn_file(tmp_path, *layers):
    import scipy.io
    c = np.empty((1, len(layers)), dtype=object)
    for i, layer in enumerate(layers):
        c[0, i] = layer
    scipy.io.savemat(tmp_path / 'simple.mat', {'layers': c})
    return tmp_path / 'simple.mat'


def test_simplenn_pdist_becomes_pdist_with_a_class_input(tmp_path):
    from pydagnn.io import load_matconvnet
    w = RNG(12).uniform(0.5, 2, (3, 4, 1, 2))
    path = _simplenn_file(tmp_path, {'type': 'relu', 'name': 'r'},
                          {'type': 'pdist', 'name': 'dist', 'p': np.array([[1.5]]),
                           'noRoot': np.array([[True]])},
                          {'type': 'pdist', 'name': 'dist2', 'instanceWeights': w,
                           'aggregate': np.array([[True]])})
    net = load_matconvnet(path)
    assert [l.block.type_name for l in net.layers] == ['dagnn.ReLU', 'dagnn.PDist', 'dagnn.PDist']
    d1, d2 = net.layers[1], net.layers[2]
    assert d1.inputs == ['x1', 'class'] and d2.inputs == ['x2', 'class1']
    b1, b2 = d1.block, d2.block
    assert (float(b1.p), bool(b1.noRoot), float(b1.epsilon), bool(b1.aggregate)) == \
        (1.5, True, 1e-3, False)
    assert (float(b2.p), bool(b2.noRoot), bool(b2.aggregate)) == (2.0, False, True)
    # the layer's constant instance weights travel in opts, as vl_nnpdist options
    x = RNG(13).standard_normal((3, 4, 1, 2))
    x0 = RNG(14).standard_normal((3, 4, 1, 2))
    y = b2.forward([x, x0], [])[0]
    np.testing.assert_allclose(y, ref_pdist(x, x0, 2, False, w, True), rtol=1e-12)


def test_simplenn_custom_layer_is_a_clear_error(tmp_path):
    from pydagnn.io import load_matconvnet
    from pydagnn.io.errors import MatFileError
    path = _simplenn_file(tmp_path, {'type': 'relu', 'name': 'r'},
                          {'type': 'custom', 'name': 'mine'})
    with pytest.raises(MatFileError, match=r"'mine' \(SimpleNN layer 2\).*custom layers hold "
                                           r"MATLAB function handles, which cannot be loaded"):
        load_matconvnet(path)


def test_new_blocks_in_a_net_save_load_and_backprop(tmp_path):
    """ROIPooling, the grid generator, the sampler, MPN_COV_Pool_C and PDist in one DagNN:
    the properties survive a .mat round trip and derivatives flow through the engine."""
    from pydagnn import DagNN
    from pydagnn.io import load_matconvnet, save_matconvnet
    net = DagNN()
    net.add_layer('aff', AffineGridGenerator(Ho=4, Wo=5), ['A'], ['g'])
    net.add_layer('bs', BilinearSampler(), ['x', 'g'], ['s'])
    net.add_layer('roi', ROIPooling(method='avg', subdivisions=[3, 2], flatten=False,
                                    transform=np.array([[0.5, 0, 0.5], [0, 0.5, 0.5]])),
                  ['x', 'rois'], ['r'])
    net.add_layer('cov', MPN_COV_Pool_C(alpha=0.3), ['s'], ['c', 'aS', 'aV', 'aD'])
    net.add_layer('pd', PDist(p=1.5, opts=['noRoot', True]), ['c', 't'], ['obj'])
    save_matconvnet(net, tmp_path / 'n.mat')
    n2 = load_matconvnet(tmp_path / 'n.mat')
    for a, b in zip(net.layers, n2.layers):
        assert type(a.block) is type(b.block) and (a.inputs, a.outputs) == (b.inputs, b.outputs)
        for k in a.block.properties:
            np.testing.assert_array_equal(np.asarray(getattr(b.block, k), dtype=object),
                                          np.asarray(getattr(a.block, k), dtype=object))
    rng = RNG(15)
    x = rng.standard_normal((9, 11, 3, 2))
    A = np.tile(np.array([0.8, 0.1, -0.1, 0.9, 0.05, -0.05]).reshape(1, 1, 6, 1), (1, 1, 1, 2))
    t = rng.standard_normal((1, 1, 6, 2))
    inputs = {'x': x, 'A': A, 'rois': ROIS, 't': t}
    n2.conserve_memory = False
    n2.eval(inputs, {'obj': 1.0})
    assert n2.get_var('x').der.shape == x.shape and n2.get_var('A').der.shape == A.shape
    assert n2.get_var('obj').value.shape == (1, 1, 1, 1)
    assert n2.get_var('r').value.shape == (3, 2, 3, ROIS.shape[1])
