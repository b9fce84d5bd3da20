"""Layer-fixture parity with the original MatConvNet / GM-SOP code.

Runs every case of the layer fixtures in ``shared/fixtures`` (``fx_conv.mat``,
``fx_bnorm.mat``, ``fx_pool_relu_softmax_loss.mat``, ``fx_isqrtcov.mat``,
``fx_gm_layers.mat``; see ``shared/fixtures/README.md``) through pydagnn's layer functions
and blocks, with the stored inputs cast to a given dtype, and compares each result with the
stored one. The parity tests (``tests/parity/test_fx_*.py``) and the table of
``python -m pydagnn.parity`` both use these functions.

A row is ``(fixture variable, group, error, tolerance)``:

* a value: ``error`` is ``rel_err(pydagnn's, stored)``, ``tolerance`` ``TOL`` (1e-5, the
  float32 layer tier); ``inf`` when pydagnn gives no value or one of the wrong size;
* an exact check (masks, error counts, a result's dtype or shape, "no derivative"):
  ``error`` is the mismatch count (or ``|difference|`` of two error counts), ``tolerance`` 0.
  These rows are named ``'<variable>: dtype'``, ``'<variable>: shape'`` and so on.

The name starts with the fixture variable compared (a qualifier follows after a space or a
colon, e.g. ``'c3x3_p1_s1_bias_y (Conv block)'``). Groups: 'conv', 'bnorm', 'pool',
'relu', 'softmax', 'loss', 'cov_chain', 'H_x', 'gating', 'CM_out', 'Balance_loss'.

Each ``*_cases(d, dtype)`` takes a loaded fixture (``scipy.io.loadmat``; not modified) and
returns ``{case name: rows}``, the cases in the order of the constants below; the expected
dtype of a result is the run's dtype except where the original's is fixed (``topkerror``
and the H_x noise are float64, masks are bool).
"""
import os

import numpy as np

from .layer import BlockContext
from .layers.balance_loss import Balance_loss
from .layers.bnorm import bnorm_backward, bnorm_forward
from .layers.cm_out import CM_out
from .layers.conv import Conv, conv_backward, conv_forward
from .layers.cov import (OBJ_ConvNet_COV_Pool, OBJ_ConvNet_COV_ScaleTr, OBJ_ConvNet_Cov_Sqrtm,
                         OBJ_ConvNet_Cov_TraceNorm)
from .layers.gating import H_x, gating
from .layers.loss import Loss, loss_backward, loss_forward
from .layers.pool import Pooling, pool_backward, pool_forward
from .layers.relu import ReLU, relu_backward, relu_forward
from .layers.softmax import SoftMax, softmax_backward, softmax_forward
from .testing import rel_err

#: tolerance (relative error) of the float32 layer fixtures
TOL = 1e-5

#: fx_conv.mat: its ``case_names``
CONV_CASES = ('c3x3_p1_s1_bias', 'c3x3_p1_s2_nobias', 'c1x1_p0_s2_nobias', 'c1x1_p0_s1_bias',
              'c3x3_pasym_sasym', 'c_fc_8x8')
#: fx_pool_relu_softmax_loss.mat pooling cases: (poolSize, method, pad, stride), as
#: fixtures/README.md describes them
POOL_CASES = {
    'avg8': (8, 'avg', 0, 1),
    'avg8s1': (8, 'avg', 0, 1),
    'max3': (3, 'max', 1, 2),
}
RELU_SOFTMAX_LOSS_CASES = ('relu', 'softmax', 'softmaxlog', 'error_counts')
BNORM_CASES = ('train_forward', 'train_backward', 'dag_backward', 'test')
ISQRTCOV_CASES = ('forward', 'sqrtm3', 'sqrtm5', 'backward_blocks', 'chain_from_x')
GM_LAYERS_CASES = ('H_x', 'H_x_test', 'gating', 'Balance_loss', 'CM_out', 'backward', 'tie',
                   'big')


# ---------------------------------------------------------------------------------- rows

class _Rows:
    """The rows of one case."""

    def __init__(self, group, dtype):
        self.group, self.dtype, self.rows = group, np.dtype(dtype), []

    def close(self, var, mine, ref, *, dtype=True, shape=None, group=None):
        """A ``rel_err`` row; then, unless ``dtype`` is False, a ``'<var>: dtype'`` row
        (True: the run's dtype, else the dtype given), and with ``shape`` (True: ``ref``'s
        shape, else the tuple given) a ``'<var>: shape'`` row."""
        group = group or self.group
        try:
            err = float('inf') if mine is None else float(rel_err(mine, ref))
        except ValueError:                       # the size differs
            err = float('inf')
        self.rows.append((var, group, err, TOL))
        if dtype is not False:
            want = self.dtype if dtype is True else np.dtype(dtype)
            self.exact(f'{var}: dtype', int(getattr(mine, 'dtype', None) != want), group)
        if shape is not None:
            want = tuple(np.shape(ref)) if shape is True else tuple(shape)
            self.exact(f'{var}: shape', int(getattr(mine, 'shape', None) != want), group)

    def exact(self, var, count, group=None):
        self.rows.append((var, group or self.group, count, 0))


def _mismatches(mine, ref):
    """Entries where the mask ``mine`` differs from the stored (0/1) ``ref``; all of
    them when the shapes differ."""
    ref = np.asarray(ref).astype(bool)
    if mine is None or np.shape(mine) != ref.shape:
        return max(1, ref.size)
    return int(np.count_nonzero(np.asarray(mine).astype(bool) != ref))


def _count_diff(mine, ref):
    """``|mine - ref|`` of two one-element error counts."""
    return float(abs(float(np.asarray(mine).item()) - float(np.asarray(ref).item())))


def _cast(a, dtype):
    """A stored floating-point input as ``dtype`` (no copy when it already is)."""
    a = np.asarray(a)
    return a.astype(dtype, copy=False) if np.issubdtype(a.dtype, np.floating) else a


def _int(d, k):
    return int(np.asarray(d[k]).ravel()[0])


def over_tolerance(rows):
    """The rows whose error is not within their tolerance (NaN included)."""
    return [r for r in rows if not r[2] <= r[3]]


def format_rows(rows):
    return '; '.join(f'{n} [{g}] {e:.3g} (tol {t:g})' for n, g, e, t in rows)


def uncompared(d, rows, inputs):
    """Variables of the fixture ``d`` that are neither in ``inputs`` nor compared by a
    row (the part of a row's name before the first space or colon)."""
    seen = {n.split(' ')[0].split(':')[0] for n, _, _, _ in rows}
    return sorted(k for k in d if not k.startswith('__') and k not in inputs and k not in seen)


# ---------------------------------------------------------------------------- fx_conv.mat

#: fx_conv.mat variables that are inputs or settings
CONV_INPUTS = tuple(f'{c}_{k}' for c in CONV_CASES
                    for k in ('x', 'f', 'b', 'pad', 'stride', 'dzdy')) + ('case_names',)


def conv_case_names(d):
    return tuple(str(np.ravel(c)[0]) for c in d['case_names'].ravel())


def conv_cases(d, dtype=np.float32):
    """vl_nnconv: y, dzdx, dzdf, dzdb of each case, by ``conv_forward``/``conv_backward``
    and by the ``dagnn.Conv`` block, with pad and stride passed as stored."""
    return {case: _conv_case(d, case, dtype) for case in conv_case_names(d)}


def _conv_case(d, case, dtype):
    r = _Rows('conv', dtype)
    v = lambda k: d[f'{case}_{k}']  # noqa: E731
    x, f, b, dzdy = (_cast(v(k), dtype) for k in ('x', 'f', 'b', 'dzdy'))
    pad, stride = v('pad'), v('stride')
    b = None if b.size == 0 else b
    y = conv_forward(x, f, b, pad=pad, stride=stride)
    dx, df, db = conv_backward(x, f, b, dzdy, pad=pad, stride=stride)
    r.close(f'{case}_y', y, v('y'))
    r.close(f'{case}_dzdx', dx, v('dzdx'))
    r.close(f'{case}_dzdf', df, v('dzdf'))
    if b is None:       # no bias: no derivative, and none stored
        r.exact(f'{case}_dzdb (none)', int(db is not None) + int(v('dzdb').size != 0))
    else:
        r.close(f'{case}_dzdb', db, v('dzdb'))
    # the same through the dagnn.Conv block, as a loaded net would call it
    blk = Conv(size=list(f.shape) + [1] * (4 - f.ndim), hasBias=b is not None,
               pad=pad, stride=stride)
    params = [f, b] if b is not None else [f]
    yb = blk.forward([x], params)[0]
    (dxb,), dps = blk.backward([x], params, [dzdy], [yb])
    r.close(f'{case}_y (Conv block)', yb, v('y'))
    r.close(f'{case}_dzdx (Conv block)', dxb, v('dzdx'))
    r.close(f'{case}_dzdf (Conv block)', dps[0], v('dzdf'))
    if b is not None:
        r.close(f'{case}_dzdb (Conv block)', dps[1], v('dzdb'))
    return r.rows


# -------------------------------------------------------------------------- fx_bnorm.mat

BNORM_INPUTS = ('x', 'g', 'b', 'dzdy', 'epsilon', 'test_moments')


def bnorm_cases(d, dtype=np.float32):
    """vl_nnbnorm (epsilon as stored): training forward, backward without and with
    'moments' (the call dagnn.BatchNorm makes), test mode with the given moments."""
    x, g, b, dzdy = (_cast(d[k], dtype) for k in ('x', 'g', 'b', 'dzdy'))
    eps = float(d['epsilon'].item())
    out = {}

    r = _Rows('bnorm', dtype)
    y, m = bnorm_forward(x, g, b, epsilon=eps)
    r.close('train_y', y, d['train_y'])
    r.close('train_moments', m, d['train_moments'])
    out['train_forward'] = r.rows

    r = _Rows('bnorm', dtype)
    dx, dg, db, dm = bnorm_backward(x, g, b, dzdy, epsilon=eps)
    r.close('train_dzdx', dx, d['train_dzdx'])
    r.close('train_dzdg', dg, d['train_dzdg'], shape=True)
    r.close('train_dzdb', db, d['train_dzdb'])
    r.close('train_dzdmoments', dm, d['train_dzdmoments'], shape=True)
    out['train_backward'] = r.rows

    r = _Rows('bnorm', dtype)     # 'moments' = the batch moments of the forward
    res = bnorm_backward(x, g, b, dzdy, moments=_cast(d['train_moments'], dtype), epsilon=eps)
    for a, k in zip(res, ('dzdx', 'dzdg', 'dzdb', 'dzdmoments')):
        r.close('dag_' + k, a, d['dag_' + k])
    out['dag_backward'] = r.rows

    r = _Rows('bnorm', dtype)     # test mode: the given moments (sigma includes epsilon)
    m = _cast(d['test_moments'], dtype)
    y, _ = bnorm_forward(x, g, b, moments=m, epsilon=eps, test_mode=True)
    r.close('test_y', y, d['test_y'])
    res = bnorm_backward(x, g, b, dzdy, moments=m, epsilon=eps)   # the original's formula
    for a, k in zip(res, ('dzdx', 'dzdg', 'dzdb', 'dzdmoments')):
        r.close('test_' + k, a, d['test_' + k])
    out['test'] = r.rows
    return out


# -------------------------------------------------------- fx_pool_relu_softmax_loss.mat

POOL_RELU_SOFTMAX_LOSS_INPUTS = tuple(f'{c}_{k}' for c in list(POOL_CASES) + ['relu', 'softmax']
                                      for k in ('x', 'dzdy')) + ('loss_x', 'loss_label')


def pool_cases(d, dtype=np.float32):
    """vl_nnpool: y and dzdx of each case, by ``pool_forward``/``pool_backward`` and by
    the ``dagnn.Pooling`` block."""
    out = {}
    for case, (pool, method, pad, stride) in POOL_CASES.items():
        r = _Rows('pool', dtype)
        x, dzdy = _cast(d[f'{case}_x'], dtype), _cast(d[f'{case}_dzdy'], dtype)
        y = pool_forward(x, pool, method, pad=pad, stride=stride)
        dx = pool_backward(x, dzdy, pool, method, pad=pad, stride=stride)
        r.close(f'{case}_y', y, d[f'{case}_y'])
        r.close(f'{case}_dzdx', dx, d[f'{case}_dzdx'])
        blk = Pooling(method=method, poolSize=[pool, pool], pad=pad, stride=stride)
        yb = blk.forward([x], [])[0]
        dxb = blk.backward([x], [], [dzdy], [yb])[0][0]
        r.close(f'{case}_y (Pooling block)', yb, d[f'{case}_y'])
        r.close(f'{case}_dzdx (Pooling block)', dxb, d[f'{case}_dzdx'])
        out[case] = r.rows
    return out


def relu_softmax_loss_cases(d, dtype=np.float32):
    """vl_nnrelu, vl_nnsoftmax and vl_nnloss (softmaxlog with dzdy 1 and 2.5; classerror,
    top-5 and top-2 error counts exactly), by the functions and by the blocks."""
    out = {}
    r = _Rows('relu', dtype)
    x, dzdy = _cast(d['relu_x'], dtype), _cast(d['relu_dzdy'], dtype)
    y = relu_forward(x)
    dx = relu_backward(x, dzdy)
    r.close('relu_y', y, d['relu_y'])
    r.close('relu_dzdx', dx, d['relu_dzdx'])
    r.exact('relu_dzdx where x == 0 (not 0)', int(np.count_nonzero(np.asarray(dx)[x == 0])))
    blk = ReLU()
    yb = blk.forward([x], [])
    r.close('relu_dzdx (ReLU block)', blk.backward([x], [], [dzdy], yb)[0][0], d['relu_dzdx'])
    out['relu'] = r.rows

    r = _Rows('softmax', dtype)
    x, dzdy = _cast(d['softmax_x'], dtype), _cast(d['softmax_dzdy'], dtype)
    r.close('softmax_y', softmax_forward(x), d['softmax_y'])
    r.close('softmax_dzdx', softmax_backward(x, dzdy), d['softmax_dzdx'])
    blk = SoftMax()
    yb = blk.forward([x], [])
    r.close('softmax_dzdx (SoftMax block)', blk.backward([x], [], [dzdy], yb)[0][0],
            d['softmax_dzdx'])
    out['softmax'] = r.rows

    r = _Rows('loss', dtype)
    x, c = _cast(d['loss_x'], dtype), d['loss_label']
    dy25 = np.dtype(dtype).type(2.5)
    r.close('loss_softmaxlog', loss_forward(x, c, 'softmaxlog'), d['loss_softmaxlog'])
    r.close('loss_softmaxlog_dzdx', loss_backward(x, c, 1, 'softmaxlog'),
            d['loss_softmaxlog_dzdx'])
    r.close('loss_softmaxlog_dzdx_dzdy2p5', loss_backward(x, c, dy25, 'softmaxlog'),
            d['loss_softmaxlog_dzdx_dzdy2p5'])
    blk = Loss()
    yb = blk.forward([x, c], [])
    r.close('loss_softmaxlog (Loss block)', yb[0], d['loss_softmaxlog'])
    r.close('loss_softmaxlog_dzdx_dzdy2p5 (Loss block)', blk.backward([x, c], [], [dy25], yb)[0][0],
            d['loss_softmaxlog_dzdx_dzdy2p5'])
    out['softmaxlog'] = r.rows

    r = _Rows('loss', dtype)      # counts summed over the batch: exact
    y = loss_forward(x, c, 'classerror')
    r.exact('loss_classerror', _count_diff(y, d['loss_classerror']))
    r.exact('loss_classerror: dtype', int(y.dtype != np.dtype(dtype)))
    for k in (5, 2):
        ref = d[f'loss_top{k}error']
        y = loss_forward(x, c, 'topkerror', top_k=k)
        r.exact(f'loss_top{k}error', _count_diff(y, ref))
        r.exact(f'loss_top{k}error: dtype (float64)', int(y.dtype != np.float64))
        yb = Loss(loss='topkerror', opts=['topK', k]).forward([x, c], [])[0]
        r.exact(f'loss_top{k}error (Loss block)', _count_diff(yb, ref))
    out['error_counts'] = r.rows
    return out


# ------------------------------------------------------------------------ fx_isqrtcov.mat

ISQRTCOV_INPUTS = ('x', 'coef', 'iterNum', 'dzdst', 'ref_sq_index_note')


def isqrtcov_cases(d, dtype=np.float32):
    """COV_Pool, Cov_TraceNorm, Cov_Sqrtm (iterNum 3 and 5, with the auxiliary Y and Z)
    and COV_ScaleTr: each block from the stored inputs, forward and backward, then the
    whole chain forward from x and backward from dzdst with pydagnn's own values."""
    v = lambda k: _cast(d[k], dtype)  # noqa: E731
    _, _, C, N = d['x'].shape
    coef, iter_num = float(d['coef'].item()), _int(d, 'iterNum')
    out = {}

    r = _Rows('cov_chain', dtype)
    cov, = OBJ_ConvNet_COV_Pool().forward([v('x')], [])
    r.close('cov', cov, d['cov'])
    r.close('ref_cov_double (cov)', cov, d['ref_cov_double'], dtype=False)
    tn, tr = OBJ_ConvNet_Cov_TraceNorm().forward([v('cov')], [])
    r.close('tn', tn, d['tn'])
    r.close('tn_tr', tr, d['tn_tr'], shape=(1, 1, 1, N))
    st, = OBJ_ConvNet_COV_ScaleTr().forward([v('sq'), v('tn_tr')], [])
    r.close('st', st, d['st'])
    out['forward'] = r.rows

    for case, it, prefix in (('sqrtm3', iter_num, 'sq'), ('sqrtm5', 5, 'sq5')):
        r = _Rows('cov_chain', dtype)
        y, Y, Z = OBJ_ConvNet_Cov_Sqrtm(coef=coef, iterNum=it).forward([v('tn')], [])
        r.close(prefix, y, d[prefix], shape=(1, 1, C * (C + 1) // 2, N))
        r.close(prefix + '_Y', Y, d[prefix + '_Y'], shape=(C, C, it, N))
        r.close(prefix + '_Z', Z, d[prefix + '_Z'], shape=(C, C, it, N))
        if prefix == 'sq':    # the pure-Octave double re-derivation (formula, triangle order)
            r.close('ref_sq_double (sq)', y, d['ref_sq_double'], dtype=False)
        out[case] = r.rows

    r = _Rows('cov_chain', dtype)
    (dsq, dtr), _ = OBJ_ConvNet_COV_ScaleTr().backward([v('sq'), v('tn_tr')], [], [v('dzdst')],
                                                        [v('st')])
    r.close('dzdsq', dsq, d['dzdsq'])
    r.close('dzdtr_from_st', dtr, d['dzdtr_from_st'])
    for it, Yk, Zk, ref in ((iter_num, 'sq_Y', 'sq_Z', 'dzdtn'), (5, 'sq5_Y', 'sq5_Z', 'dzdtn5')):
        sq = OBJ_ConvNet_Cov_Sqrtm(coef=coef, iterNum=it)
        (dtn,), _ = sq.backward([v('tn')], [], [v('dzdsq'), None, None], [None, v(Yk), v(Zk)])
        r.close(ref, dtn, d[ref])
    # both paths into the trace: dzdtn from sqrtm and dzdtr_from_st from ScaleTr
    (dcov,), _ = OBJ_ConvNet_Cov_TraceNorm().backward([v('cov')], [],
                                                      [v('dzdtn'), v('dzdtr_from_st')],
                                                      [v('tn'), v('tn_tr')])
    r.close('dzdcov', dcov, d['dzdcov'])
    (dx,), _ = OBJ_ConvNet_COV_Pool().backward([v('x')], [], [v('dzdcov')], [v('cov')])
    r.close('dzdx', dx, d['dzdx'])
    out['backward_blocks'] = r.rows

    r = _Rows('cov_chain', dtype)
    cp, tnb, sqb, stb = (OBJ_ConvNet_COV_Pool(), OBJ_ConvNet_Cov_TraceNorm(),
                         OBJ_ConvNet_Cov_Sqrtm(coef=coef, iterNum=iter_num),
                         OBJ_ConvNet_COV_ScaleTr())
    x = v('x')
    P, = cp.forward([x], [])
    A, tr = tnb.forward([P], [])
    y, Y, Z = sqb.forward([A], [])
    s, = stb.forward([y, tr], [])
    r.close('st (chain from x)', s, d['st'])
    (dy, dtr), _ = stb.backward([y, tr], [], [v('dzdst')], [s])
    (dA,), _ = sqb.backward([A], [], [dy, None, None], [y, Y, Z])
    r.close('dzdtn (chain from x)', dA, d['dzdtn'])
    (dP,), _ = tnb.backward([P], [], [dA, dtr], [A, tr])
    r.close('dzdcov (chain from x)', dP, d['dzdcov'])
    (dx,), _ = cp.backward([x], [], [dP], [P])
    r.close('dzdx (chain from x)', dx, d['dzdx'])
    out['chain_from_x'] = r.rows
    return out


# ----------------------------------------------------------------------- fx_gm_layers.mat

GM_LAYERS_INPUTS = (('x', 'wg', 'wn', 'gamma', 'D', 'N', 'topk', 'CM_num', 'hdim',
                     'loss_weight', 'dzdfusion', 'tie_hx', 'big_x')
                    + tuple(f'cm{i:02d}_out' for i in range(1, 17)))


def gm_layers_cases(d, dtype=np.float32):
    """H_x (normal mode with the stored noise, test mode, the softplus overflow branch),
    gating (with an exact tie), Balance_loss and CM_out forward and backward, and the
    gating and H_x backward from the derivative the DagNN accumulates."""
    v = lambda k: _cast(d[k], dtype)  # noqa: E731
    D, K, k, hdim = _int(d, 'D'), _int(d, 'CM_num'), _int(d, 'topk'), _int(d, 'hdim')
    N = d['x'].shape[3]
    hx = H_x(size=[D, K], CM_num=K, topk=k, dim_in=D)
    hx.noise = d['gamma']
    gt = gating(size=[D, K], CM_num=K, topk=k)
    cm = CM_out(CM_num=K, topk=k, hdim=hdim)
    bl = Balance_loss(loss_weight=d['loss_weight'].item(), CM_num=K)
    x, wg, wn = v('x'), v('wg'), v('wn')
    hv = hx.forward([x], [wg, wn])
    gv = gt.forward(hv, [])
    ys = [None if d[f'cm{i:02d}_out'].size == 0 else v(f'cm{i:02d}_out') for i in range(1, K + 1)]
    z = cm.forward(gv + ys, [])
    lo = bl.forward(gv, [])
    out = {}

    r = _Rows('H_x', dtype)
    H, gamma = hv[0]
    r.close('hx', H, d['hx'])
    r.close('gamma (H_x output 2)', gamma, d['gamma'], dtype=np.float64, shape=(1, N))
    out['H_x'] = r.rows

    r = _Rows('H_x', dtype)
    b = H_x(size=[D, K])
    b.noise = d['gamma']                       # ignored in test mode
    b.net = BlockContext(mode='test')
    (Ht, gt0), = b.forward([x], [wg, wn])
    r.close('hx_test', Ht, d['hx_test'])
    r.exact('hx_test: noise not 0 in test mode', int(np.count_nonzero(gt0)))
    out['H_x_test'] = r.rows

    r = _Rows('gating', dtype)
    sfm, mask, masked, v4, v5, sums = gv[0]
    r.close('sfm', sfm, d['sfm'])
    r.exact('cm_index', _mismatches(mask, d['cm_index']))
    r.exact('cm_index: dtype (bool)', int(getattr(mask, 'dtype', None) != bool))
    r.close('topk_v', masked, d['topk_v'])
    r.close('sfm_rowsum', sums, d['sfm_rowsum'], shape=(1, K))
    r.exact('gating outputs 4 and 5: not None', int(v4 is not None) + int(v5 is not None))
    out['gating'] = r.rows

    r = _Rows('Balance_loss', dtype)
    loss, rsd, w_sum = lo[0]
    r.close('bl_loss', loss, d['bl_loss'])
    r.close('bl_rsd', rsd, d['bl_rsd'])
    r.close('bl_wsum', w_sum, d['bl_wsum'])
    (dbl,), _ = bl.backward(gv, [], [None], lo)
    r.close('bl_dzdsfm', dbl, d['bl_dzdsfm'])
    out['Balance_loss'] = r.rows

    r = _Rows('CM_out', dtype)
    r.close('fusion', z[0], d['fusion'])
    ders, _ = cm.backward(gv + ys, [], [v('dzdfusion')], z)
    r.close('cmout_dzdsfm', ders[0], d['cmout_dzdsfm'])
    for i in range(1, K + 1):
        ref = d[f'cm{i:02d}_der']
        if ref.size == 0:   # the CM got no image: no derivative
            r.exact(f'cm{i:02d}_der (none)', int(ders[i] is not None))
        else:
            r.close(f'cm{i:02d}_der', ders[i], ref, shape=True)
    out['CM_out'] = r.rows

    r = _Rows('gating', dtype)
    total = ders[0] + dbl                      # as the DagNN accumulates into the gating var
    r.close('dzdsfm_total', total, d['dzdsfm_total'])
    (dH,), _ = gt.backward(hv, [], [total], gv)
    r.close('dzdhx', dH, d['dzdhx'])
    (dx,), (dwg, dwn) = hx.backward([x], [wg, wn], [dH], hv)
    r.close('dzdx', dx, d['dzdx'], group='H_x')
    r.close('dzdwg', dwg, d['dzdwg'], group='H_x')
    r.close('dzdwn', dwn, d['dzdwn'], group='H_x')
    # and from the stored inputs of the step
    (dH2,), _ = gt.backward([v('hx')], [], [v('dzdsfm_total')], [(v('sfm'),)])
    r.close('dzdhx (from the stored sfm)', dH2, d['dzdhx'])
    out['backward'] = r.rows

    r = _Rows('gating', dtype)
    (tie,) = gating(topk=k, CM_num=K).forward([v('tie_hx')], [])
    r.exact('tie_cm_index', _mismatches(tie[1], d['tie_cm_index']))
    r.close('tie_sfm', tie[0], d['tie_sfm'])
    out['tie'] = r.rows

    r = _Rows('H_x', dtype)
    b = H_x(size=[D, K])
    big_x = v('big_x')
    b.noise = d['gamma'][:, :big_x.shape[3]]
    (Hb, _), = b.forward([big_x], [wg, wn])
    r.close('big_hx', Hb, d['big_hx'])
    out['big'] = r.rows
    return out


# ------------------------------------------------------------------------------ all of it

#: (fixture file, cases function, its variables that are inputs or settings)
LAYER_FIXTURES = (
    ('fx_conv.mat', conv_cases, CONV_INPUTS),
    ('fx_bnorm.mat', bnorm_cases, BNORM_INPUTS),
    ('fx_pool_relu_softmax_loss.mat', pool_cases, POOL_RELU_SOFTMAX_LOSS_INPUTS),
    ('fx_pool_relu_softmax_loss.mat', relu_softmax_loss_cases, POOL_RELU_SOFTMAX_LOSS_INPUTS),
    ('fx_isqrtcov.mat', isqrtcov_cases, ISQRTCOV_INPUTS),
    ('fx_gm_layers.mat', gm_layers_cases, GM_LAYERS_INPUTS),
)


def layer_rows(fixtures_dir, dtype=np.float32, load=None):
    """Every row of every layer fixture in ``fixtures_dir``, ``dtype`` inputs.
    ``load(path)`` reads a .mat file (default ``scipy.io.loadmat``)."""
    if load is None:
        import scipy.io
        load = scipy.io.loadmat
    cache, rows = {}, []
    for name, cases, _ in LAYER_FIXTURES:
        if name not in cache:
            cache[name] = load(os.path.join(fixtures_dir, name))
        for case_rows in cases(cache[name], dtype).values():
            rows += case_rows
    return rows
