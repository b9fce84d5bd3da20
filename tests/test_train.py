"""The training loop (pydagnn.train), batches and prefetching (pydagnn.data), plots."""
import math
import os
import re
import sys
import threading
import time

import numpy as np
import pytest

from pydagnn import DagNN
from pydagnn import data as pdata
from pydagnn import train as ptrain
from pydagnn.layers.bnorm import BatchNorm
from pydagnn.layers.conv import Conv
from pydagnn.layers.dropout import DropOut
from pydagnn.layers.loss import Loss
from pydagnn.layers.relu import ReLU
from pydagnn.train import accumulate_gradients, cnn_train_dag

SIZE = 6
CLASSES = 3

try:  # plots are an optional extra ('.[plot]'); without it only the notice is tested
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


# ---------------------------------------------------------------------------- helpers
def tiny_net(dtype=np.float32, bn=True, dropout=False, seed=0):
    """conv 3x3 (+BN) + ReLU (+dropout), a conv over the whole map to CLASSES scores,
    softmaxlog and classerror losses."""
    net = DagNN(seed=seed)
    net.add_layer('conv1', Conv(size=[3, 3, 3, 4], pad=1), 'input', 'x1', ['conv1_f', 'conv1_b'])
    x = 'x1'
    if bn:
        net.add_layer('bn1', BatchNorm(numChannels=4), x, 'x1n', ['bn1_g', 'bn1_b', 'bn1_m'])
        x = 'x1n'
    net.add_layer('relu1', ReLU(), x, 'x2')
    x = 'x2'
    if dropout:
        net.add_layer('drop1', DropOut(rate=0.3), x, 'x2d')
        x = 'x2d'
    net.add_layer('pred', Conv(size=[SIZE, SIZE, 4, CLASSES]), x, 'prediction', ['pred_f', 'pred_b'])
    net.add_layer('loss', Loss(loss='softmaxlog'), ['prediction', 'label'], 'objective')
    net.add_layer('top1err', Loss(loss='classerror'), ['prediction', 'label'], 'top1error')
    net.init_params(np.random.default_rng(seed), dtype=dtype)
    return net


def tiny_imdb(n=40, n_val=12, seed=0, size=SIZE):
    """Learnable: class c brightens channel c (plus noise)."""
    rng = np.random.default_rng(seed)
    total = n + n_val
    labels = rng.integers(1, CLASSES + 1, size=total)
    data = rng.integers(0, 120, size=(size, size, 3, total)).astype(np.uint8)
    for i, c in enumerate(labels):
        data[:, :, c - 1, i] += 100
    sets = np.r_[np.ones(n), 2 * np.ones(n_val)]
    mean = data.reshape(-1, 3, total).mean(axis=(0, 2))
    return {'images': {'data': np.asfortranarray(data), 'labels': labels.astype(np.float32), 'set': sets},
            'meta': {'rgbMean': mean, 'sets': ['train', 'val', 'test']}}


def params_of(net):
    return {p.name: np.array(p.value) for p in net.params}


def assert_params_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def run(net, imdb, exp_dir, log=None, **kw):
    lines = []
    opts = dict(batch_size=16, num_epochs=2, learning_rate=0.05, plot_statistics=False,
                log=lines.append if log is None else log)
    opts.update(kw)
    net, stats = cnn_train_dag(net, imdb, exp_dir=str(exp_dir), **opts)
    return net, stats, lines


# ---------------------------------------------------------------------------- update rule
def _net_with_ders():
    net = tiny_net(dtype=np.float64)
    net.execution_order  # fanouts
    rng = np.random.default_rng(1)
    for p in net.params:
        p.value = rng.standard_normal(p.value.shape)
        p.der = rng.standard_normal(p.value.shape)
    f = net.get_param('conv1_f')
    f.learning_rate, f.weight_decay = 2.0, 0.5
    m = net.get_param('bn1_m')
    m.learning_rate = 0.3
    return net


def test_update_gradient_and_average_by_hand():
    net = _net_with_ders()
    f, m = net.get_param('conv1_f'), net.get_param('bn1_m')
    v0, d0 = f.value.copy(), f.der.copy()
    mv0, md0 = m.value.copy(), m.der.copy()
    lr, bs, mom, wd = 0.1, 8, 0.9, 1e-3
    state = {}
    accumulate_gradients(net, state, learning_rate=lr, batch_size=bs, momentum=mom, weight_decay=wd)
    g1 = d0 / bs + wd * 0.5 * v0
    np.testing.assert_allclose(state['momentum']['conv1_f'], -g1, rtol=1e-14)
    v1 = v0 + lr * 2.0 * (-g1)
    np.testing.assert_allclose(f.value, v1, rtol=1e-14)
    # 'average': no global lr, divided by batch size and fanout (1); no momentum
    assert m.fanout == 1
    np.testing.assert_allclose(m.value, 0.7 * mv0 + (0.3 / bs / 1) * md0, rtol=1e-14)
    assert 'bn1_m' not in state['momentum']
    # second step: momentum accumulates
    d1 = np.random.default_rng(5).standard_normal(v0.shape)
    f.der = d1
    for p in net.params:
        if p.name != 'conv1_f':
            p.der = None
    accumulate_gradients(net, state, learning_rate=lr, batch_size=bs, momentum=mom, weight_decay=wd)
    g2 = d1 / bs + wd * 0.5 * v1
    m2 = mom * (-g1) - g2
    np.testing.assert_allclose(state['momentum']['conv1_f'], m2, rtol=1e-13)
    np.testing.assert_allclose(f.value, v1 + lr * 2.0 * m2, rtol=1e-13)


def test_update_nesterov():
    net = _net_with_ders()
    f = net.get_param('conv1_f')
    v0, d0 = f.value.copy(), f.der.copy()
    state = {'momentum': {'conv1_f': np.full(v0.shape, 0.25)}}
    accumulate_gradients(net, state, learning_rate=0.2, batch_size=4, momentum=0.8, weight_decay=1e-2,
                         nesterov=True)
    g = d0 / 4 + 1e-2 * 0.5 * v0
    mnew = 0.8 * 0.25 - g
    np.testing.assert_allclose(state['momentum']['conv1_f'], mnew, rtol=1e-14)
    np.testing.assert_allclose(f.value, v0 + 0.2 * 2.0 * (0.8 * mnew - g), rtol=1e-14)


def test_update_skips_params_without_derivative():
    net = _net_with_ders()
    f, b = net.get_param('conv1_f'), net.get_param('pred_b')
    state = {'momentum': {'pred_b': np.ones(b.value.shape)}}
    b.der = None
    vb = b.value.copy()
    accumulate_gradients(net, state, learning_rate=0.1, batch_size=2)
    np.testing.assert_array_equal(b.value, vb)
    np.testing.assert_array_equal(state['momentum']['pred_b'], 1.0)  # kept, not decayed
    assert 'conv1_f' in state['momentum']


def test_update_keeps_float32_and_rejects_unknown_method():
    net = tiny_net()
    net.execution_order
    for p in net.params:
        p.der = np.ones_like(p.value)
    accumulate_gradients(net, {}, learning_rate=0.1, batch_size=3)
    assert all(p.value.dtype == np.float32 for p in net.params)
    net.params[0].train_method = 'adam'
    with pytest.raises(ValueError, match="unknown training method 'adam'"):
        accumulate_gradients(net, {}, learning_rate=0.1, batch_size=3)


# ---------------------------------------------------------------------------- data
def test_get_batch_mean_flip_labels():
    imdb = tiny_imdb()
    idx = np.array([5, 2, 7, 2])
    b = pdata.get_batch(imdb, idx, mode='val')
    x = b['input']
    assert x.dtype == np.float32 and x.shape == (SIZE, SIZE, 3, 4) and x.flags.f_contiguous
    raw = imdb['images']['data'][:, :, :, idx].astype(np.float32)
    np.testing.assert_allclose(x, raw - imdb['meta']['rgbMean'].astype(np.float32).reshape(1, 1, 3, 1))
    assert b['label'].dtype == np.float32 and b['label'].shape == (4,)
    np.testing.assert_array_equal(b['label'], imdb['images']['labels'][idx])
    # train: flips decided by rng.random() > 0.5, per image
    flips = np.random.default_rng(3).random(4) > 0.5
    t = pdata.get_batch(imdb, idx, mode='train', rng=np.random.default_rng(3))['input']
    for i in range(4):
        np.testing.assert_array_equal(t[:, :, :, i], x[:, ::-1, :, i] if flips[i] else x[:, :, :, i])
    t2 = pdata.get_batch(imdb, idx, mode='train', rng=np.random.default_rng(3))['input']
    np.testing.assert_array_equal(t, t2)
    many = pdata.get_batch(imdb, np.arange(40), mode='train', rng=np.random.default_rng(0))['input']
    flipped = sum(not np.array_equal(many[:, :, :, i], pdata.get_batch(imdb, [i], 'val')['input'][..., 0])
                  for i in range(40))
    assert 8 <= flipped <= 32


def test_prefetcher_order_errors_and_close():
    def slow(i):
        time.sleep(0.002)
        return i * i
    with pdata.Prefetcher([(i,) for i in range(20)], slow, depth=2) as pf:
        assert list(pf) == [i * i for i in range(20)]
    assert pf.wait_time >= 0

    def boom(i):
        if i == 3:
            raise KeyError('image 3 is missing')
        return i
    pf = pdata.Prefetcher([(i,) for i in range(10)], boom)
    got = []
    with pytest.raises(KeyError, match='image 3 is missing'):
        for v in pf:
            got.append(v)
    assert got == [0, 1, 2]
    assert not pf._thread.is_alive()

    started = threading.active_count()
    pf = pdata.Prefetcher([(i,) for i in range(1000)], slow, depth=2)
    assert next(pf) == 0
    pf.close()
    assert not pf._thread.is_alive()
    assert threading.active_count() <= started
    sl = pdata.SyncLoader([(i,) for i in range(3)], slow)
    assert list(sl) == [0, 1, 4] and sl.wait_time > 0


# ---------------------------------------------------------------------------- progress line
def test_format_progress():
    line = ptrain.format_progress('train', 1, 3, 40, 412.34, 430.06,
                                  {'num': 768, 'time': 1.2, 'objective': 6.90512, 'top1error': 0.9984,
                                   'top5error': 0.99, 'BalanceLoss': 12.3})
    assert line == ('train: epoch 01:   3/ 40: 412.3 (430.1) Hz BalanceLoss: 12.300 objective: 6.905 '
                    'top1error: 0.998 top5error: 0.990')


LINE = re.compile(r'^(train|val): epoch (\d\d): +(\d+)/ *(\d+): \d+\.\d \(\d+\.\d\) Hz '
                  r'objective: \d+\.\d{3} top1error: \d\.\d{3}$')


# ---------------------------------------------------------------------------- the loop
def test_train_learns_prints_and_saves(tmp_path):
    imdb = tiny_imdb()
    net = tiny_net()
    net, stats, lines = run(net, imdb, tmp_path, num_epochs=3, learning_rate=[0.05, 0.05, 0.02],
                            plot_statistics=True)
    prog = [l for l in lines if LINE.match(l)]
    # 40 train images in batches of 16 -> 3 batches; 12 val -> 1 batch; 3 epochs
    assert len(prog) == 3 * (3 + 1)
    assert prog[0].startswith('train: epoch 01:   1/  3:')
    assert any(re.match(r'train: epoch 01: data wait \d+\.\d\d s of \d+\.\d\d s \(\d+\.\d% of step time, '
                        r'prefetch on\)$', l) for l in lines), lines
    assert [len(stats['train']), len(stats['val'])] == [3, 3]
    for rec in stats['train']:
        assert rec['num'] == 40 and rec['time'] > 0
        assert set(rec) == {'num', 'time', 'objective', 'top1error'}
    assert stats['val'][0]['num'] == 12
    # the objective is per image: about log(3) at the start
    assert 0.3 < stats['train'][0]['objective'] < 3.0
    assert stats['train'][-1]['objective'] < stats['train'][0]['objective']
    for e in (1, 2, 3):
        assert (tmp_path / f'net-epoch-{e}.mat').exists()
    if HAVE_MPL:
        assert (tmp_path / 'net-train.pdf').stat().st_size > 0
        assert (tmp_path / 'net-train.png').stat().st_size > 0
    assert not [f for f in os.listdir(tmp_path) if 'tmp' in f]
    # the checkpoint holds net, state (momentum cell in param order) and stats, MATLAB-readable
    import scipy.io
    mat = scipy.io.loadmat(str(tmp_path / 'net-epoch-3.mat'))
    assert {'net', 'state', 'stats'} <= set(mat)
    mom = mat['state']['momentum'][0, 0]
    assert mom.dtype == object and mom.shape == (1, len(net.params))
    names = [p.name for p in net.params]
    k = names.index('conv1_f')
    assert mom[0, k].shape == net.params[k].value.shape and mom[0, k].dtype == np.float32
    assert float(mom[0, names.index('bn1_m')].reshape(-1)[0]) == 0.0  # 'average': no momentum
    tr = mat['stats']['train'][0, 0]
    assert tr.shape == (1, 3) and 'objective' in tr.dtype.names
    np.testing.assert_allclose(float(tr[0, 2]['objective'].reshape(-1)[0]), stats['train'][2]['objective'])
    loaded, state, st = ptrain.load_checkpoint(str(tmp_path / 'net-epoch-3.mat'))
    assert_params_equal(params_of(loaded), params_of(net))
    assert st['train'][2]['objective'] == pytest.approx(stats['train'][2]['objective'])


def test_sub_batches_give_the_same_update(tmp_path):
    """Without BN and random draws (dropout, flips: the draws of a sub-batch differ from
    those of the whole batch), the derivative of a batch is the sum over its interleaved
    sub-batches, so 1, 2 or 3 sub-batches give the same parameters."""
    imdb = tiny_imdb(n=37, n_val=5)

    def gb64(imdb_, idx, mode, rng):
        b = pdata.get_batch(imdb_, idx, 'noflip', rng=rng)
        return {'input': b['input'].astype(np.float64), 'label': b['label']}

    res = []
    for nsb in (1, 2, 3):
        net = tiny_net(dtype=np.float64, bn=False)
        net, stats, _ = run(net, imdb, tmp_path / f'sb{nsb}', get_batch=gb64, num_sub_batches=nsb,
                            num_epochs=2, weight_decay=1e-3, learning_rate=2e-5, continue_=False)
        res.append((params_of(net), stats))
    for p, st in res[1:]:
        for k in p:
            np.testing.assert_allclose(p[k], res[0][0][k], rtol=1e-10, atol=1e-13, err_msg=k)
        assert st['train'][1]['objective'] == pytest.approx(res[0][1]['train'][1]['objective'], rel=1e-10)


def test_resume_is_exact(tmp_path):
    """3 epochs straight == 2 epochs, stop, resume (from a fresh net) for the 3rd; with BN
    ('average' moments), dropout (net.rng) and momentum; prefetch on or off."""
    imdb = tiny_imdb()
    kw = dict(learning_rate=[0.05, 0.03, 0.01], num_sub_batches=2)
    straight, st_a, _ = run(tiny_net(dropout=True), imdb, tmp_path / 'a', num_epochs=3, prefetch=True, **kw)
    run(tiny_net(dropout=True), imdb, tmp_path / 'b', num_epochs=2, prefetch=False, **kw)
    resumed, st_b, lines = run(tiny_net(dropout=True, seed=7), imdb, tmp_path / 'b', num_epochs=3, **kw)
    assert any('resuming by loading epoch 2' in l for l in lines)
    assert not any(l.startswith('train: epoch 01') for l in lines)
    assert_params_equal(params_of(straight), params_of(resumed))
    assert len(st_b['train']) == 3
    assert st_b['train'][2]['objective'] == st_a['train'][2]['objective']
    assert st_b['train'][0]['objective'] == pytest.approx(st_a['train'][0]['objective'])
    # continue_=False starts over
    _, st_c, lines = run(tiny_net(dropout=True), imdb, tmp_path / 'b', num_epochs=1, continue_=False, **kw)
    assert len(st_c['train']) == 1 and not any('resuming' in l for l in lines)


def tiny_gm(seed=0):
    from pydagnn.models import build
    return build('ResNet18-GM-SOP', section_len=1, cm_num=4, topk=2, num_classes=5,  # top-5 needs 5
                 gating_widths=(16, 8), cm_widths=(16, 8), image_size=16, seed=seed)


def test_gm_net_resume_is_exact(tmp_path):
    """A reduced GM-SOP (routing, H_x noise, gating, dropout, Balance_loss): resumed ==
    straight, and the loaded net runs in the order the built one did (for section_len 1
    the loader's default order differs from the GM order; the checkpoint records it)."""
    imdb = tiny_imdb(n=24, n_val=8, size=16)
    kw = dict(learning_rate=0.05, batch_size=8)
    built = tiny_gm()
    straight, st_a, lines = run(built, imdb, tmp_path / 'a', num_epochs=2, **kw)
    assert any(LINE_BL.match(l) for l in lines), lines[:3]
    assert st_a['train'][0]['BalanceLoss'] >= 0
    assert all(np.isfinite(v).all() for v in params_of(straight).values())
    run(tiny_gm(), imdb, tmp_path / 'b', num_epochs=1, **kw)
    resumed, st_b, lines = run(tiny_gm(seed=5), imdb, tmp_path / 'b', num_epochs=2, **kw)
    assert any('resuming by loading epoch 1' in l for l in lines)
    assert [resumed.layers[i].name for i in resumed.execution_order] == \
        [built.layers[i].name for i in built.execution_order]
    assert_params_equal(params_of(straight), params_of(resumed))
    assert st_b['train'][1] == {k: v for k, v in st_a['train'][1].items() if k != 'time'} | \
        {'time': st_b['train'][1]['time']}


LINE_BL = re.compile(r'^train: epoch 01: +1/ +3: \d+\.\d \(\d+\.\d\) Hz BalanceLoss: \d+\.\d{3} '
                     r'objective: \d+\.\d{3} top1error: \d\.\d{3} top5error: \d\.\d{3}$')


def test_truncated_checkpoint_falls_back(tmp_path):
    imdb = tiny_imdb()
    straight, _, _ = run(tiny_net(), imdb, tmp_path / 'a', num_epochs=3)
    run(tiny_net(), imdb, tmp_path / 'b', num_epochs=2)
    ck = tmp_path / 'b' / 'net-epoch-2.mat'
    blob = ck.read_bytes()
    ck.write_bytes(blob[:len(blob) // 2])
    with pytest.warns(RuntimeWarning, match='net-epoch-2.mat'):
        resumed, stats, lines = run(tiny_net(), imdb, tmp_path / 'b', num_epochs=3)
    assert any('net-epoch-2.mat' in l and 'previous checkpoint' in l for l in lines)
    assert any('resuming by loading epoch 1' in l for l in lines)
    assert len(stats['train']) == 3
    assert_params_equal(params_of(straight), params_of(resumed))
    ptrain.load_checkpoint(str(ck))  # rewritten whole


def test_crash_during_save_loses_nothing(tmp_path, monkeypatch):
    # The crash is simulated inside the file writer (half the bytes written, then the
    # process "dies"), below the atomic temp-file-and-rename of save_matconvnet.
    import pydagnn.io.matfile as mcn
    imdb = tiny_imdb()
    straight, _, _ = run(tiny_net(), imdb, tmp_path / 'a', num_epochs=3)
    real = mcn._write_v5
    calls = []

    def crashing(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # epoch 2: write half a file, then die
            real(path, *a, **k)
            blob = open(path, 'rb').read()
            with open(path, 'wb') as f:
                f.write(blob[:len(blob) // 3])
            raise KeyboardInterrupt('killed while saving')
        return real(path, *a, **k)

    monkeypatch.setattr(mcn, '_write_v5', crashing)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_net(), imdb, tmp_path / 'b', num_epochs=3)
    monkeypatch.setattr(mcn, '_write_v5', real)
    files = sorted(os.listdir(tmp_path / 'b'))
    assert files == ['net-epoch-1.mat'], files  # no half checkpoint, no temporary left
    resumed, stats, lines = run(tiny_net(), imdb, tmp_path / 'b', num_epochs=3)
    assert any('resuming by loading epoch 1' in l for l in lines)
    assert_params_equal(params_of(straight), params_of(resumed))


def test_checkpoint_without_stats_is_partial(tmp_path):
    from pydagnn.io.matconvnet import save_matconvnet
    net = tiny_net()
    net.execution_order
    save_matconvnet(net, str(tmp_path / 'net-epoch-1.mat'))
    with pytest.raises(ptrain.CheckpointError, match='partially saved'):
        ptrain.load_checkpoint(str(tmp_path / 'net-epoch-1.mat'))
    assert ptrain.find_last_checkpoint(str(tmp_path)) == 1
    (tmp_path / 'net-epoch-12.mat.tmp').write_bytes(b'x')
    (tmp_path / '.net-epoch-13.mat.abc.tmp').write_bytes(b'x')
    assert ptrain.find_last_checkpoint(str(tmp_path)) == 1


def test_val_only_and_errors(tmp_path):
    imdb = tiny_imdb()
    net, stats, lines = run(tiny_net(bn=False), imdb, tmp_path, num_epochs=1, train=np.nan)
    assert not os.listdir(tmp_path)  # evaluate mode saves nothing
    assert stats['train'][0]['num'] == 0 and stats['val'][0]['num'] == 12
    with pytest.raises(ValueError, match='num_epochs'):
        cnn_train_dag(tiny_net(), imdb, exp_dir=str(tmp_path), learning_rate=0.1)


def test_get_batch_errors_reach_the_loop(tmp_path):
    imdb = tiny_imdb()

    def bad(imdb_, idx, mode, rng):
        if mode == 'train' and 30 in idx:
            raise OSError('cannot read image 30')
        return pdata.get_batch(imdb_, idx, mode, rng=rng)
    for prefetch in (True, False):
        with pytest.raises(OSError, match='cannot read image 30'):
            run(tiny_net(), imdb, tmp_path / str(prefetch), get_batch=bad, prefetch=prefetch)


def test_balance_loss_statistic(tmp_path):
    """A block declaring the BalanceLoss statistic (``train_stats``) on its (loss, RSD,
    w_sum) value gets it averaged into BalanceLoss, its var kept (``trainer_reads``)."""
    from pydagnn.layer import Layer, register

    @register('test.FakeBalance')
    class FakeBalance(Layer):
        always_backward = False
        trainer_reads = (0,)

        def train_stats(self, outputs):
            return {'BalanceLoss': outputs[0]}

        def forward(self, inputs, params):
            v = float(np.mean(inputs[0]))
            return [(np.array([[v]], dtype=np.float32), np.float32(0), None)]

        def backward(self, inputs, params, der_outputs, outputs):
            return [None], []

    imdb = tiny_imdb()
    net = tiny_net()
    net.add_layer('Balance_loss', FakeBalance(), 'prediction', 'Balance_loss')
    seen = []
    orig = ptrain._scalar

    def spy(v):
        r = orig(v)
        if isinstance(v, tuple):
            seen.append(r)
        return r
    ptrain._scalar = spy
    try:
        net, stats, lines = run(net, imdb, tmp_path, num_epochs=1, train=np.arange(32), batch_size=16)
    finally:
        ptrain._scalar = orig
    assert stats['train'][0]['BalanceLoss'] == pytest.approx(np.mean(seen[:2]), rel=1e-6)
    assert 'BalanceLoss:' in [l for l in lines if l.startswith('train')][0]
    assert net.get_var('Balance_loss').precious


def test_plots_and_missing_matplotlib(tmp_path, monkeypatch):
    from pydagnn import plots
    stats = {'train': [{'num': 1, 'time': 1, 'objective': 2.0, 'top1error': 0.5},
                       {'num': 1, 'time': 1, 'objective': 1.0, 'top1error': 0.4}],
             'val': [{'num': 1, 'time': 1, 'objective': 2.5, 'top1error': 0.6},
                     {'num': 1, 'time': 1, 'objective': 1.5, 'top1error': 0.5}]}
    assert plots.stat_names(stats) == ['objective', 'top1error']
    if HAVE_MPL:
        files = plots.plot_stats(stats, str(tmp_path / 'net-train'))
        assert files == [str(tmp_path / 'net-train.pdf'), str(tmp_path / 'net-train.png')]
        assert (tmp_path / 'net-train.pdf').read_bytes().startswith(b'%PDF')
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)  # what a missing matplotlib gives
    monkeypatch.setitem(sys.modules, 'matplotlib.backends.backend_agg', None)
    monkeypatch.setattr(plots, '_NOTICE_SHOWN', False)
    msgs = []
    assert plots.plot_stats(stats, str(tmp_path / 'x'), log=msgs.append) is None
    assert plots.plot_stats(stats, str(tmp_path / 'x'), log=msgs.append) is None
    assert len(msgs) == 1 and 'matplotlib is not installed' in msgs[0]


def test_train_opts_kwargs():
    kw = ptrain.train_opts_kwargs({'learningRate': np.array([[0.1, 0.1, 0.01]]), 'numEpochs': np.array([[3.0]]),
                                   'batchSize': 256.0, 'momentum': 0.9, 'weightDecay': 1e-4,
                                   'numSubBatches': 1})
    assert kw == {'learning_rate': [0.1, 0.1, 0.01], 'num_epochs': 3, 'batch_size': 256, 'momentum': 0.9,
                  'weight_decay': 1e-4, 'num_sub_batches': 1}
    with pytest.raises(ValueError, match='unknown training option'):
        ptrain.train_opts_kwargs({'solver': 'adam'})
    assert math.isclose(ptrain._lr_list(0.5)[0], 0.5)


# ---------------------------------------------------------------------------- evaluate
def test_topk_errors_ties_and_ignored_labels():
    from pydagnn.evaluate import topk_errors
    s = np.array([[3, 1, 2, 2], [1, 3, 2, 2], [0, 0, 2, 1]], dtype=np.float32)  # C=3 x N=4
    assert topk_errors(s, [1, 1, 3, 3], ks=(1, 2)) == [3, 2]  # ranks 0, 1, 2 (ties), 2
    assert topk_errors(s.reshape(1, 1, 3, 4), [0, 2, 1, 1], ks=(1, 2)) == [0, 0]


def test_evaluate_command(tmp_path, capsys):
    from pydagnn import evaluate as pev
    from pydagnn.io.imdb import save_imdb
    imdb = tiny_imdb()
    im = imdb['images']
    path = str(tmp_path / 'imdb.mat')
    save_imdb(path, im['data'], im['labels'], im['set'], {'rgbMean': imdb['meta']['rgbMean'],
                                                          'sets': ['train', 'val', 'test']}, version='7')
    net, stats, _ = run(tiny_net(), imdb, tmp_path / 'exp', num_epochs=2)
    ck = str(tmp_path / 'exp' / 'net-epoch-2.mat')
    res = pev.main(['--model', ck, '--imdb', path, '--batch-size', '5', '--quiet'])
    out = capsys.readouterr().out
    assert re.search(r'on val \(12 images\): top-1 error \d\.\d{4}, top-5 error 0\.0000, \d+\.\d images/s', out)
    # the same as the classerror Loss layer of the val pass (same net, test mode, no flips)
    assert res['top1error'] == pytest.approx(stats['val'][1]['top1error'])
    res = pev.main(['--model', ck, '--imdb', path, '--set', 'train', '--json', '--no-prefetch', '--quiet'])
    assert res['num'] == 40
    with pytest.raises(SystemExit):
        pev.main(['--model', ck, '--imdb', path, '--set', 'bogus'])


# ---------------------------------------------------------------------------- GPU
def _cupy():
    from pydagnn import backend
    return backend.cupy_or_none()


def feature_net(seed=0):
    """conv-free (Scale + BN + losses) on 1 x 1 x 3 x N mean colours: runs wherever
    Scale, BatchNorm and Loss run (the GPU check does not depend on a GPU conv)."""
    from pydagnn.layers.scale import Scale
    net = DagNN(seed=seed)
    net.add_layer('scale', Scale(size=[1, 1, 3], hasBias=True), 'input', 'x1', ['s_w', 's_b'])
    net.add_layer('bn', BatchNorm(numChannels=3), 'x1', 'prediction', ['bn_g', 'bn_b', 'bn_m'])
    net.add_layer('loss', Loss(loss='softmaxlog'), ['prediction', 'label'], 'objective')
    net.add_layer('top1err', Loss(loss='classerror'), ['prediction', 'label'], 'top1error')
    net.init_params(np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    net.get_param('s_w').value = (1 + 0.1 * rng.standard_normal((1, 1, 3))).astype(np.float32)
    net.get_param('s_b').value = np.zeros((1, 1, 3), np.float32)
    return net


def mean_colour_batch(imdb_, idx, mode, rng):
    b = pdata.get_batch(imdb_, idx, mode, rng=rng)
    return {'input': np.asfortranarray(b['input'].mean(axis=(0, 1), keepdims=True) / 50), 'label': b['label']}


def test_feature_net_learns_on_cpu(tmp_path):
    net, stats, _ = run(feature_net(), tiny_imdb(), tmp_path, get_batch=mean_colour_batch, num_epochs=3,
                        learning_rate=0.5)
    assert stats['val'][-1]['top1error'] < 0.3


@pytest.mark.gpu
def test_accumulate_gradients_on_gpu():
    cp = _cupy()
    if cp is None:
        pytest.skip('needs cupy and a CUDA device')
    cpu = _net_with_ders()
    gpu = _net_with_ders()
    gpu.move('gpu')
    for p in gpu.params:
        p.der = cp.asarray(cpu.get_param(p.name).der)
    for nesterov in (False, True):
        sc, sg = {}, {}
        for _ in range(2):
            accumulate_gradients(cpu, sc, learning_rate=0.1, batch_size=8, weight_decay=1e-3, nesterov=nesterov)
            accumulate_gradients(gpu, sg, learning_rate=0.1, batch_size=8, weight_decay=1e-3, nesterov=nesterov)
        for p in gpu.params:
            assert isinstance(p.value, cp.ndarray)
            np.testing.assert_allclose(cp.asnumpy(p.value), cpu.get_param(p.name).value, rtol=1e-12, err_msg=p.name)
        for k, m in sg['momentum'].items():
            assert isinstance(m, cp.ndarray)
            np.testing.assert_allclose(cp.asnumpy(m), sc['momentum'][k], rtol=1e-12)


@pytest.mark.gpu
def test_train_on_gpu_matches_cpu_and_resumes(tmp_path):
    cp = _cupy()
    if cp is None:
        pytest.skip('needs cupy and a CUDA device')
    imdb = tiny_imdb()
    kw = dict(get_batch=mean_colour_batch, learning_rate=[0.5, 0.3, 0.1])
    ref, st_ref, _ = run(feature_net(), imdb, tmp_path / 'cpu', num_epochs=3, **kw)
    straight, st_g, lines = run(feature_net(), imdb, tmp_path / 'gpu', num_epochs=3, gpus=[0], **kw)
    assert straight.device == 'cpu'  # handed back on the CPU
    for k, v in params_of(ref).items():
        np.testing.assert_allclose(params_of(straight)[k], v, rtol=2e-4, atol=1e-5, err_msg=k)
    assert st_g['val'][-1]['top1error'] == pytest.approx(st_ref['val'][-1]['top1error'], abs=0.09)
    # checkpoints written from the GPU hold NumPy momentum; a resumed GPU run continues exactly
    _, state, _ = ptrain.load_checkpoint(str(tmp_path / 'gpu' / 'net-epoch-3.mat'))
    assert all(isinstance(m, np.ndarray) for m in state['momentum'].values()) and state['momentum']
    run(feature_net(), imdb, tmp_path / 'gpu2', num_epochs=2, gpus=[0], **kw)
    resumed, _, lines = run(feature_net(), imdb, tmp_path / 'gpu2', num_epochs=3, gpus=[0], **kw)
    assert any('resuming by loading epoch 2' in l for l in lines)
    a, b = params_of(straight), params_of(resumed)
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    print('GPU resume max |difference|:', diff)
    assert diff <= 1e-6


@pytest.mark.gpu
def test_train_conv_net_on_gpu(tmp_path):
    cp = _cupy()
    if cp is None:
        pytest.skip('needs cupy and a CUDA device')
    from pydagnn.layers.conv import conv_forward
    try:
        conv_forward(cp.zeros((4, 4, 3, 1), cp.float32, order='F'), cp.zeros((3, 3, 3, 2), cp.float32, order='F'))
    except Exception as e:  # the GPU conv is not there yet
        pytest.skip(f'conv_forward does not run on CuPy arrays ({type(e).__name__})')
    imdb = tiny_imdb()
    ref, st_ref, _ = run(tiny_net(), imdb, tmp_path / 'cpu', num_epochs=2)
    net, st, _ = run(tiny_net(), imdb, tmp_path / 'gpu', num_epochs=2, gpus=[0])
    for k, v in params_of(ref).items():
        np.testing.assert_allclose(params_of(net)[k], v, rtol=1e-3, atol=1e-4, err_msg=k)


@pytest.mark.skipif(not HAVE_MPL, reason='matplotlib is not installed')
@pytest.mark.parametrize('epochs', [1, 3, 60])
def test_plot_ticks_are_whole_epochs(epochs):
    """After one epoch the x axis shows the label 1 alone (not 0.945 0.960 ... running into
    each other), after sixty at most 7 whole-epoch labels."""
    from pydagnn import plots
    rec = [{'num': 1, 'time': 1, 'objective': 1.0 / e, 'top1error': 0.5} for e in range(1, epochs + 1)]
    fig = plots.draw_figure({'train': rec, 'val': rec})
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert all(t == int(t) for t in ticks), ticks
        assert 1 <= len(ticks) <= 7, ticks
        assert (ticks == [1]) if epochs == 1 else ticks[-1] <= epochs
