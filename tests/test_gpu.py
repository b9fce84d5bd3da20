"""GPU (CuPy) against CPU (NumPy): every layer's forward and backward, a whole
ResNet18-GM-SOP training step, and the host synchronisations inside a step.

Marker ``gpu``; skipped cleanly when ``pydagnn.backend.gpu_available()`` is False.
The worst relative error per layer is printed at the end of the session and, when
``PYDAGNN_GPU_REPORT`` names a file, written there as JSON.

``PYDAGNN_GPU_SELFCHECK=1`` runs the same comparisons with NumPy on both sides (no GPU
needed): it checks this file's harness, not the GPU code.
"""
import json
import os
import traceback

import numpy as np
import pytest

from pydagnn import backend
from pydagnn.layer import BlockContext, block_class
from pydagnn.testing import rel_err

SELFCHECK = os.environ.get('PYDAGNN_GPU_SELFCHECK') == '1'
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (SELFCHECK or backend.gpu_available()),
                                 reason='needs cupy and a CUDA device')]

TOL = 1e-4          # float32, per layer
STEP_TOL = 1e-3     # float32, a whole training step through ~100 layers
WORST = {}          # layer case -> worst rel err over its outputs and derivatives


def _dev(a):
    """A value on the device (recursing into tuples; None and scalars kept)."""
    if isinstance(a, (tuple, list)):
        return type(a)(_dev(v) for v in a)
    if isinstance(a, np.ndarray):
        if SELFCHECK:
            return a.copy(order='K')
        import cupy
        return cupy.asarray(a)
    return a


def _host(a):
    if isinstance(a, (tuple, list)):
        return type(a)(_host(v) for v in a)
    return backend.to_host(a)


def _is_dev(a):
    return SELFCHECK or backend.is_gpu_array(a)


def _compare(case, what, got, ref, tol=TOL, skip=()):
    """rel err of every array in got (device) vs ref (host), recursively; records the
    worst for ``case`` and fails above ``tol``."""
    if isinstance(ref, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(ref), (case, what)
        for i, (g, r) in enumerate(zip(got, ref)):
            if i in skip:
                continue
            _compare(case, f'{what}[{i}]', g, r, tol)
        return
    if ref is None:
        assert got is None, f'{case} {what}: expected None, got {type(got)}'
        return
    if not hasattr(ref, 'shape') or np.ndim(ref) == 0 and not hasattr(got, 'shape'):
        ref = np.asarray(ref)
    assert _is_dev(got) or np.ndim(got) == 0, f'{case} {what}: result is not on the device ({type(got)})'
    g = np.asarray(_host(got))
    assert g.shape == np.shape(ref), f'{case} {what}: shape {g.shape} vs {np.shape(ref)}'
    if g.dtype == bool or ref.dtype == bool:
        assert np.array_equal(g, ref), f'{case} {what}: boolean arrays differ'
        e = 0.0
    else:
        assert np.isfinite(g).all() == np.isfinite(ref).all(), f'{case} {what}: non-finite values differ'
        e = float(rel_err(g, ref))
    WORST[case] = max(WORST.get(case, 0.0), e)
    assert e < tol, f'{case} {what}: rel err {e:.3g} >= {tol:g}'


def _run_block(case, type_name, props, inputs, params, der_outputs, mode='normal', skip_out=(),
               skip_din=(), skip_dpar=(), prepare=None):
    """Forward and backward of one block on the host and on the device; compare."""
    results = []
    for on_dev in (False, True):
        block = block_class(type_name)(**props)
        block.net = BlockContext(mode=mode, rng=np.random.default_rng(7))
        if prepare is not None:
            prepare(block, on_dev)
        conv = _dev if on_dev else (lambda v: v)
        ins, pars = conv(list(inputs)), conv(list(params))
        outs = block.forward(ins, pars)
        ders = conv(list(der_outputs)) if der_outputs is not None else None
        back = block.backward(ins, pars, ders, outs) if ders is not None else None
        results.append((outs, back))
    (o_ref, b_ref), (o_dev, b_dev) = results
    _compare(case, 'forward', o_dev, o_ref, skip=skip_out)
    if b_ref is not None:
        _compare(case, 'dinputs', b_dev[0], b_ref[0], skip=skip_din)
        _compare(case, 'dparams', b_dev[1], b_ref[1], skip=skip_dpar)


def _r(rng, *shape, scale=1.0):
    return np.asfortranarray((rng.standard_normal(shape) * scale).astype(np.float32))


# --------------------------------------------------------------------------- layers
CONV = [
    # name, x shape, filter shape, pad, stride, dilate, bias
    ('3x3 pad1', (9, 8, 4, 3), (3, 3, 4, 5), 1, 1, 1, True),
    ('3x3 stride2', (9, 8, 4, 3), (3, 3, 4, 6), 1, 2, 1, False),
    ('asym pad stride dilate', (11, 10, 3, 2), (3, 2, 3, 4), [0, 2, 1, 0], [2, 1], [2, 1], True),
    ('1x1', (6, 5, 8, 4), (1, 1, 8, 7), 0, 1, 1, True),
    ('1x1 stride2', (6, 6, 8, 2), (1, 1, 8, 3), 0, 2, 1, False),
    ('fc', (4, 4, 5, 3), (4, 4, 5, 9), 0, 1, 1, True),
    ('grouped', (7, 7, 6, 2), (3, 3, 3, 4), 1, 1, 1, True),
    ('resnet conv2 size', (64, 64, 16, 2), (3, 3, 16, 16), 1, 1, 1, False),
]


@pytest.mark.parametrize('case', CONV, ids=[c[0] for c in CONV])
def test_conv(case, rng):
    name, xs, ws, pad, stride, dilate, bias = case
    from pydagnn.layers.conv import conv_output_size
    x, w = _r(rng, *xs), _r(rng, *ws, scale=0.3)
    params = [w] + ([_r(rng, ws[3])] if bias else [])
    Ho, Wo = conv_output_size(xs[0], xs[1], ws[0], ws[1], pad, stride, dilate)
    dy = _r(rng, Ho, Wo, ws[3], xs[3])
    _run_block(f'Conv {name}', 'dagnn.Conv',
               dict(size=list(ws), hasBias=bias, pad=pad, stride=stride, dilate=dilate),
               [x], params, [dy])


POOL = [('max 3x3 s2 pad1', 'max', [3, 3], 1, 2), ('max 2x2', 'max', [2, 2], 0, 2),
        ('avg 3x3 pad', 'avg', [3, 3], [1, 0, 0, 1], 1), ('avg global 8x8', 'avg', [8, 8], 0, 1)]


@pytest.mark.parametrize('case', POOL, ids=[c[0] for c in POOL])
def test_pooling(case, rng):
    name, method, ps, pad, stride = case
    from pydagnn.layers.pool import pool_output_size
    x = _r(rng, 8, 8, 5, 3)
    Ho, Wo = pool_output_size(8, 8, ps, pad, stride)
    _run_block(f'Pooling {name}', 'dagnn.Pooling', dict(method=method, poolSize=ps, pad=pad, stride=stride),
               [x], [], [_r(rng, Ho, Wo, 5, 3)])


@pytest.mark.parametrize('mode', ['normal', 'test'])
@pytest.mark.parametrize('shape', [(16, 16, 8, 4), (1, 1, 40, 6)], ids=['map', 'vector'])
def test_batchnorm(mode, shape, rng):
    C = shape[2]
    x = _r(rng, *shape, scale=2.0) + 0.5
    g, b = _r(rng, C) + 1, _r(rng, C)
    m = np.asfortranarray(np.stack([rng.standard_normal(C), rng.uniform(0.5, 2, C)], 1).astype(np.float32))
    _run_block(f'BatchNorm {mode} {shape}', 'dagnn.BatchNorm', dict(numChannels=C), [x], [g, b, m],
               [_r(rng, *shape)], mode=mode)


def test_bnorm_functions_big_batch(rng):
    """The fused reductions at a training size (many planes, long planes)."""
    from pydagnn.layers.bnorm import bnorm_backward, bnorm_forward
    x = _r(rng, 32, 32, 32, 16, scale=3.0) + 1.0
    g, b, dy = _r(rng, 32) + 1, _r(rng, 32), _r(rng, 32, 32, 32, 16)
    ref = bnorm_forward(x, g, b), bnorm_backward(x, g, b, dy)
    got = bnorm_forward(*_dev([x, g, b])), bnorm_backward(*_dev([x, g, b, dy]))
    _compare('bnorm functions 32x32x32x16', 'all', got, ref)


@pytest.mark.parametrize('leak', [0, 0.1])
def test_relu(leak, rng):
    _run_block(f'ReLU leak {leak}', 'dagnn.ReLU', dict(leak=leak), [_r(rng, 5, 4, 3, 2)], [], [_r(rng, 5, 4, 3, 2)])


def test_softmax_sigmoid(rng):
    _run_block('SoftMax', 'dagnn.SoftMax', {}, [_r(rng, 2, 3, 7, 4)], [], [_r(rng, 2, 3, 7, 4)])
    _run_block('Sigmoid', 'dagnn.Sigmoid', {}, [_r(rng, 2, 3, 7, 4, scale=3)], [], [_r(rng, 2, 3, 7, 4)])


LOSSES = ['softmaxlog', 'log', 'classerror', 'topkerror', 'mhinge', 'mshinge', 'binaryerror', 'binarylog',
          'logistic', 'hinge']


@pytest.mark.parametrize('loss', LOSSES)
def test_loss(loss, rng):
    C, N = 10, 6
    if loss in ('binaryerror', 'binarylog', 'logistic', 'hinge'):
        x = _r(rng, 1, 1, C, N)
        if loss == 'binarylog':
            x = np.asfortranarray(rng.uniform(0.05, 0.95, (1, 1, C, N)).astype(np.float32))
        label = np.asfortranarray(np.sign(rng.standard_normal((1, 1, C, N))).astype(np.float32))
    else:
        x = _r(rng, 1, 1, C, N)
        if loss == 'log':
            e = np.exp(x)
            x = np.asfortranarray((e / e.sum(axis=2, keepdims=True)).astype(np.float32))
        label = rng.integers(1, C + 1, N).astype(np.float32)
        label[0] = 0     # ignored
    opts = ['topK', 3] if loss == 'topkerror' else []
    _run_block(f'Loss {loss}', 'dagnn.Loss', dict(loss=loss, opts=opts), [x, label], [],
               [np.ones((1, 1, 1, 1), np.float32)], skip_din=(1,))


def test_loss_average_stays_on_device(rng):
    b = block_class('dagnn.Loss')(loss='softmaxlog')
    x = _dev(_r(rng, 1, 1, 5, 4))
    lab = _dev(np.array([1, 2, 3, 4], np.float32))
    b.forward([x, lab], [])
    b.forward([x, lab], [])
    assert _is_dev(b.average)


def test_dropout_fixed_mask_and_drawn(rng):
    x = _r(rng, 3, 3, 4, 5)
    mask = np.asfortranarray(((rng.random(x.shape) >= 0.3) / 0.7).astype(np.float32))

    def prep(block, on_dev):
        block.mask = _dev(mask) if on_dev else mask
    _run_block('DropOut fixed mask', 'dagnn.DropOut', dict(rate=0.3), [x], [], [_r(rng, *x.shape)], prepare=prep)
    # a drawn mask on the device: zeros and 1/(1-rate) only, about the right share
    b = block_class('dagnn.DropOut')(rate=0.3)
    b.net = BlockContext(rng=np.random.default_rng(1))
    y = _host(b.forward([_dev(np.ones((50, 50, 4, 2), np.float32))], [])[0])
    assert np.all((y == 0) | np.isclose(y, 1 / 0.7, rtol=1e-6))
    assert 0.25 < (y == 0).mean() < 0.35


def test_sum_concat_scale(rng):
    a, b, c = _r(rng, 4, 3, 2, 5), _r(rng, 4, 3, 2, 5), _r(rng, 4, 3, 2, 5)
    _run_block('Sum', 'dagnn.Sum', {}, [a, b, c], [], [_r(rng, 4, 3, 2, 5)])
    _run_block('Concat', 'dagnn.Concat', dict(dim=3), [a, _r(rng, 4, 3, 3, 5)], [], [_r(rng, 4, 3, 5, 5)])
    _run_block('Scale', 'dagnn.Scale', dict(size=[1, 1, 2], hasBias=True), [a],
               [_r(rng, 1, 1, 2), _r(rng, 1, 1, 2)], [_r(rng, 4, 3, 2, 5)])


def test_isqrt_cov_chain(rng):
    x = _r(rng, 6, 5, 16, 4) + 0.3
    from pydagnn.layers.cov import cov_pool_forward, sqrtm_forward, trace_norm_forward
    P = cov_pool_forward(x)
    A, tr = trace_norm_forward(P)
    yv = sqrtm_forward(A, 1, 3)[0]
    _run_block('COV_Pool', 'dagnn.OBJ_ConvNet_COV_Pool', {}, [x], [], [_r(rng, 16, 16, 1, 4)])
    _run_block('Cov_TraceNorm', 'dagnn.OBJ_ConvNet_Cov_TraceNorm', {}, [P], [],
               [_r(rng, 16, 16, 1, 4), _r(rng, 1, 1, 1, 4)])
    _run_block('Cov_Sqrtm', 'dagnn.OBJ_ConvNet_Cov_Sqrtm', dict(coef=1, iterNum=3), [A], [],
               [_r(rng, 1, 1, 136, 4), None, None])
    _run_block('Cov_Sqrtm iter5', 'dagnn.OBJ_ConvNet_Cov_Sqrtm', dict(coef=1, iterNum=5), [A], [],
               [_r(rng, 1, 1, 136, 4), None, None])
    _run_block('COV_ScaleTr', 'dagnn.OBJ_ConvNet_COV_ScaleTr', {}, [yv, tr], [], [_r(rng, 1, 1, 136, 4)])


def test_mpn_cov(rng):
    x = _r(rng, 4, 4, 5, 3)
    # V's columns have a sign ambiguity (compare y, S and the derivative)
    _run_block('MPN_COV_Pool', 'dagnn.MPN_COV_Pool', {}, [x], [], [_r(rng, 1, 1, 15, 3), None, None],
               skip_out=(1,))


def _gate_inputs(rng, K=6, N=8, D=12, k=3):
    x = _r(rng, 1, 1, D, N)
    wg, wn = _r(rng, D, K), _r(rng, D, K)
    return x, wg, wn


def test_hx_gating_cmout_balance(rng):
    K, N, D, k, DH = 6, 8, 12, 3, 5
    x, wg, wn = _gate_inputs(rng, K, N, D, k)
    noise = rng.standard_normal(N)

    def prep(block, on_dev):
        block.noise = noise
    _run_block('H_x', 'dagnn.H_x', dict(size=[D, K]), [x], [wg, wn], [_r(rng, K, N)], prepare=prep)
    H = _r(rng, K, N)
    _run_block('gating', 'dagnn.gating', dict(topk=k, CM_num=K), [(H, noise[None])], [], [_r(rng, K, N)])
    from pydagnn.layers.gating import gating_forward
    sfm, mask, masked, sums = gating_forward(H, k)
    gate = (sfm, mask, masked, None, None, sums)
    ys = [_r(rng, 1, 1, DH, int(c)) if c else None for c in mask.sum(axis=1)]
    _run_block('CM_out', 'dagnn.CM_out', dict(CM_num=K, topk=k, hdim=DH), [gate] + ys, [],
               [_r(rng, 1, 1, DH, N)])
    _run_block('Balance_loss', 'dagnn.Balance_loss', dict(loss_weight=100, CM_num=K), [gate], [], [None])


def test_gating_all_tie_uses_the_same_draw():
    """The all-tie re-draw comes from the net's rng on the host: GPU == CPU."""
    from pydagnn.layers.gating import topk_mask_counts
    H = np.ones((6, 5), np.float32)
    m1, c1 = topk_mask_counts(H, 2, np.random.default_rng(3))
    m2, c2 = topk_mask_counts(_dev(H), 2, np.random.default_rng(3))
    assert np.array_equal(_host(m2), m1) and np.array_equal(c2, c1)


# --------------------------------------------------------------------------- whole step
def _small_batch(net, rng, N=8):
    x = _r(rng, 64, 64, 3, N, scale=50.0)
    lab = rng.integers(1, 1001, N).astype(np.float32)
    return x, lab


def _gm_net(seed=0, dtype=np.float32):
    from pydagnn.models import build
    net = build('ResNet18-GM-SOP', seed=seed, dtype=dtype)
    rng = np.random.default_rng(5)
    for name in ('gating_w', 'gating_noise_w'):   # break the all-equal init (ties)
        p = net.get_param(name)
        p.value = np.asfortranarray((p.value * (1 + 0.5 * rng.standard_normal(p.value.shape))).astype(dtype))
    return net


def _fix_randomness(net, N, on_dev):
    rng = np.random.default_rng(11)
    net.get_layer('H_x').block.noise = rng.standard_normal(N)
    drop = net.get_layer('dropout').block
    mask = np.asfortranarray(((rng.random((1, 1, 8256, N)) >= 0.2) / 0.8).astype(np.float32))
    drop.mask = _dev(mask) if on_dev else mask


def test_resnet18_gm_sop_train_step_gpu_equals_cpu():
    """One SGD step (eval with derivatives + accumulate_gradients) at batch 8 on the GPU
    and on the CPU in float32, and on the CPU in float64 as the reference: the GPU's
    derivatives and updates must be as close to the float64 ones as the CPU's float32
    ones are (within 4x, or under STEP_TOL), and close to the CPU's float32 ones."""
    from pydagnn.train import accumulate_gradients
    N = 8
    res = {}
    for kind in ('cpu32', 'gpu32', 'cpu64'):
        on_dev = kind == 'gpu32'
        dt = np.float64 if kind == 'cpu64' else np.float32
        net = _gm_net(dtype=dt)
        if on_dev and not SELFCHECK:
            net.move('gpu')
        _fix_randomness(net, N, on_dev)
        x, lab = _small_batch(net, np.random.default_rng(4), N)
        x = x.astype(dt)
        net.eval({'input': _dev(x) if on_dev else x, 'label': _dev(lab) if on_dev else lab},
                 {'objective': 1})
        ders = {p.name: np.asarray(_host(p.der), np.float64) for p in net.params if p.der is not None}
        before = {p.name: np.asarray(_host(p.value), np.float64) for p in net.params}
        accumulate_gradients(net, {}, learning_rate=0.1, batch_size=N)
        delta = {p.name: np.asarray(_host(p.value), np.float64) - before[p.name] for p in net.params}
        routes = {k: np.asarray(_host(v)) for k, v in net.executor.routes.items()}
        res[kind] = (ders, delta, routes)
    (d1, u1, r1), (d2, u2, r2), (d3, u3, r3) = res['cpu32'], res['gpu32'], res['cpu64']
    assert r1.keys() == r2.keys()
    for k in r1:
        assert np.array_equal(r1[k], r2[k]), f'routing of {k} differs'
    same64 = all(np.array_equal(r1[k], r3[k]) for k in r1)
    assert d1.keys() == d2.keys()
    worst, worst_ratio, bad = ('', 0.0), ('', 0.0), []
    for name in d1:
        for what, a, b, c in (('derivative', d2, d1, d3), ('update', u2, u1, u3)):
            e = float(rel_err(a[name], b[name]))            # GPU vs CPU, both float32
            if e > worst[1]:
                worst = (f'{what} {name}', e)
            if same64:
                e_gpu = float(rel_err(a[name], c[name]))     # vs float64
                e_cpu = float(rel_err(b[name], c[name]))
                ratio = e_gpu / max(e_cpu, 1e-7)
                if ratio > worst_ratio[1]:
                    worst_ratio = (f'{what} {name} (gpu {e_gpu:.2g}, cpu {e_cpu:.2g} vs float64)', ratio)
                if e_gpu > max(STEP_TOL, 4 * e_cpu):
                    bad.append(f'{what} of {name}: GPU {e_gpu:.3g} vs CPU {e_cpu:.3g} from float64')
            elif e > STEP_TOL:
                bad.append(f'{what} of {name}: GPU vs CPU rel err {e:.3g}')
    WORST[f'GM-SOP step, GPU vs CPU float32 (worst: {worst[0]})'] = worst[1]
    if same64:
        WORST[f'GM-SOP step, GPU/CPU error ratio vs float64 (worst: {worst_ratio[0]})'] = worst_ratio[1]
    assert not bad, '\n'.join(bad[:20])


def test_train_step_reads_the_device_once():
    """One eval with derivatives + the SGD update: exactly one device-to-host read
    (the gating layer's per-CM counts); every ``cupy.ndarray.get`` (which ``item``,
    ``float``, ``int``, ``bool``, ``tolist`` all go through) is counted."""
    if SELFCHECK:
        pytest.skip('counts device reads')
    import cupy
    from pydagnn.train import accumulate_gradients
    N = 16
    net = _gm_net()
    net.move('gpu')
    _fix_randomness(net, N, True)
    rng = np.random.default_rng(4)
    x, lab = _small_batch(net, rng, N)
    feed = {'input': cupy.asarray(x), 'label': cupy.asarray(lab)}
    state = {}
    net.eval(feed, {'objective': 1})      # warm-up: kernels compiled, pools filled
    accumulate_gradients(net, state, learning_rate=0.1, batch_size=N)
    calls = []
    orig = cupy.ndarray.get

    def counting_get(self, *a, **k):
        calls.append(''.join(traceback.format_stack(limit=8)[:-1]))
        return orig(self, *a, **k)
    cupy.ndarray.get = counting_get
    try:
        net.eval(feed, {'objective': 1})
        accumulate_gradients(net, state, learning_rate=0.1, batch_size=N)
    finally:
        cupy.ndarray.get = orig
    WORST['device reads per step'] = float(len(calls))
    assert len(calls) == 1, f'{len(calls)} device reads in a step:\n' + '\n---\n'.join(calls)


def test_move_roundtrip_and_momentum(rng):
    if SELFCHECK:
        pytest.skip('moves to the device')
    from pydagnn.models import build
    from pydagnn.train import accumulate_gradients
    net = build('ResNet18-GAP', num_classes=10, section_len=1)
    vals = {p.name: p.value.copy() for p in net.params}
    net.move('gpu')
    assert net.device == 'gpu' and all(backend.is_gpu_array(p.value) for p in net.params)
    x = _r(rng, 64, 64, 3, 4)
    net.conserve_memory = False
    net.eval({'input': x, 'label': np.array([1, 2, 3, 4], np.float32)}, {'objective': 1})
    assert backend.is_gpu_array(net.get_var('objective').value)
    state = {'momentum': {p.name: np.zeros_like(vals[p.name]) for p in net.params}}   # host momentum
    accumulate_gradients(net, state, learning_rate=0.1, batch_size=4)
    grads = [p.name for p in net.params if p.train_method == 'gradient' and p.der is not None]
    assert grads and all(backend.is_gpu_array(state['momentum'][n]) for n in grads)
    net.move('cpu')
    assert all(isinstance(p.value, np.ndarray) for p in net.params)
    loss = net.get_layer('loss').block
    assert not backend.is_gpu_array(loss.average)


def test_tf32_switch():
    if SELFCHECK:
        pytest.skip('cuBLAS setting')
    import cupy
    a = cupy.asarray(np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32))
    ref = a.get().astype(np.float64) @ a.get().astype(np.float64)
    prev = backend.set_tf32(True)
    try:
        assert backend.tf32_enabled()
        e_tf32 = rel_err((a @ a).get(), ref)
    finally:
        backend.set_tf32(False)
    e_fp32 = rel_err((a @ a).get(), ref)
    assert not backend.tf32_enabled()
    WORST['matmul rel err fp32'] = float(e_fp32)
    WORST['matmul rel err tf32'] = float(e_tf32)
    assert e_fp32 < 1e-5
    assert prev in (None, False)


def test_peak_memory_hook():
    if SELFCHECK:
        pytest.skip('memory pool')
    import cupy
    with backend.PeakMemory() as pm:
        a = cupy.zeros(1 << 20, np.float32)
        del a
    assert pm.peak >= 4 << 20
    st = backend.memory_stats()
    assert st['pool_total'] >= st['pool_used'] >= 0 and st['device_total'] > 0


@pytest.fixture(scope='module', autouse=True)
def _report():
    yield
    if not WORST:
        return
    lines = ['', 'GPU vs CPU, worst relative error per case:']
    for k, v in sorted(WORST.items(), key=lambda kv: -kv[1]):
        lines.append(f'  {v:10.3g}  {k}')
    print('\n'.join(lines))
    path = os.environ.get('PYDAGNN_GPU_REPORT')
    if path:
        with open(path, 'w') as f:
            json.dump(WORST, f, indent=1, sort_keys=True)
