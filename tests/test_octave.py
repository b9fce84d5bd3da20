"""GNU Octave, an independent MAT-file reader, reads what pydagnn writes: a model, a
checkpoint and an imdb (MATLAB v7), with the struct layout dagnn.DagNN.loadobj reads and
pydagnn's values. Skipped cleanly where ``octave-cli`` is absent (CI installs it).

v7.3 is not covered: Octave's ``load`` (checked with 7.3) reads HDF5 files in Octave's
own layout only; MATLAB's v7.3 layout stores every struct array, cell and string through
HDF5 object references, which Octave reports as "unknown datatype" and skips (the
layers then come back without names, types, inputs or params). pydagnn's v7.3 layout is
checked against MATLAB-written files instead (tests/test_io_compat.py,
tests/test_io_matconvnet.py).
"""
import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import pydagnn
from pydagnn import DagNN
from pydagnn.io.checkpoint import save_checkpoint
from pydagnn.io.imdb import save_imdb
from pydagnn.layers.bnorm import BatchNorm
from pydagnn.layers.conv import Conv
from pydagnn.layers.loss import Loss
from pydagnn.layers.pool import Pooling
from pydagnn.layers.relu import ReLU
from pydagnn.layers.sum import Sum

OCTAVE = shutil.which('octave-cli')
SCRIPT = pathlib.Path(__file__).resolve().parent / 'octave' / 'describe_mat.m'
pytestmark = [pytest.mark.octave, pytest.mark.skipif(OCTAVE is None, reason='octave-cli is not installed')]
CLASSES = {'name': ['n01', 'n02', 'n03'], 'description': ['kit fox', 'tabby cat', 'barn owl']}


def small_net():
    net = DagNN()
    net.add_layer('conv1', Conv(size=[3, 3, 3, 4], pad=1), ['input'], ['x1'], ['conv1_f', 'conv1_b'])
    net.add_layer('bn1', BatchNorm(numChannels=4), ['x1'], ['x2'], ['bn1_g', 'bn1_b', 'bn1_m'])
    net.add_layer('relu1', ReLU(), ['x2'], ['x3'], [])
    net.add_layer('sum1', Sum(), ['x3', 'x1'], ['x4'], [])
    net.add_layer('conv2', Conv(size=[1, 1, 4, 3]), ['x4'], ['x5'], ['conv2_f', 'conv2_b'])
    net.add_layer('pool', Pooling(poolSize=[8, 8], method='avg'), ['x5'], ['prediction'], [])
    net.add_layer('loss', Loss(loss='softmaxlog'), ['prediction', 'label'], ['objective'], [])
    net.init_params(np.random.default_rng(3))
    net.get_var('prediction').precious = True
    net.meta = {'normalization': {'imageSize': np.array([[8.0, 8.0, 3.0]]),
                                  'averageImage': np.array([[120.0], [115.0], [100.0]])},
                'classes': CLASSES}
    return net


@pytest.fixture(scope='module')
def octave_read(tmp_path_factory):
    d = tmp_path_factory.mktemp('octave')
    net = small_net()
    pydagnn.save_matconvnet(net, d / 'net.mat', version='7')
    moms = {p.name: np.full(p.value.shape, 0.5, p.value.dtype) for p in net.params}
    stats = {'train': [{'objective': 1.5}, {'objective': 1.25}], 'val': [{'objective': 2.0}, {'objective': 1.75}]}
    save_checkpoint(d / 'net-epoch-2.mat', net, {'momentum': moms}, stats)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (8, 8, 3, 5), dtype=np.uint8)
    labels, sets = np.array([1, 3, 2, 2, 1]), np.array([1, 1, 1, 2, 2])
    save_imdb(d / 'imdb.mat', data, labels, sets, version='7',
              meta={'rgbMean': np.array([1.0, 2.0, 3.0]), 'classes': CLASSES})
    out = d / 'out.json'
    r = subprocess.run([OCTAVE, '--no-gui', '--norc', '--quiet', str(SCRIPT), str(d / 'net.mat'),
                        str(d / 'net-epoch-2.mat'), str(d / 'imdb.mat'), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert out.exists(), f'Octave failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}'
    return net, moms, stats, data, labels, sets, json.loads(out.read_text())


def _listify(v):
    return v if isinstance(v, list) else [v]


def _check_net(desc, net):
    layers = _listify(desc['layers'])
    assert [l['name'] for l in layers] == [l.name for l in net.layers]
    for got, l in zip(layers, net.layers):
        assert got['type'] == l.block.type_name
        assert _listify(got['inputs']) == l.inputs and _listify(got['outputs']) == l.outputs
        assert [p for p in _listify(got['params']) if p] == l.params
        assert set(got['block']) == set(l.block.properties), l.name
        for k, want in l.block.save().items():
            if isinstance(want, str):
                assert got['block'][k] == want, (l.name, k)
            elif not isinstance(want, (list, tuple)) or all(not isinstance(x, str) for x in want):
                if isinstance(want, (list, tuple)) and not want:
                    continue                        # {} in a cell: Octave reports 'cell 0x0'
                flat = np.asarray(want, dtype=np.float64).ravel(order='F').tolist()
                assert _listify(got['block'][k]) == flat, (l.name, k)
    assert layers[0]['block']['size'] == [3, 3, 3, 4]
    params = _listify(desc['params'])
    assert [p['name'] for p in params] == [p.name for p in net.params]
    for got, p in zip(params, net.params):
        v = p.value
        assert got['value']['class'] == 'single', p.name
        shape = list(v.shape) + [1] * (2 - v.ndim)
        if v.ndim == 1:
            shape = [v.shape[0], 1]                      # MATLAB's C x 1 vector
        assert got['value']['size'][:len(shape)] == shape, p.name
        assert got['value']['sum'] == pytest.approx(float(v.astype(np.float64).sum()), rel=1e-6, abs=1e-6)
        flat = v.reshape(-1, order='F')
        assert got['value']['first'] == pytest.approx(float(flat[0])), p.name
        assert got['value']['last'] == pytest.approx(float(flat[-1])), p.name
        assert got['learningRate'] == p.learning_rate and got['weightDecay'] == p.weight_decay
    vars_ = _listify(desc['vars'])
    assert [v['name'] for v in vars_] == [v.name for v in net.vars]
    assert [v['precious'] for v in vars_] == [v.precious for v in net.vars]
    assert desc['meta']['imageSize'] == [8, 8, 3]
    assert desc['meta']['averageImage'] == [120, 115, 100]
    assert desc['meta']['classes'] == CLASSES['description']


def test_octave_reads_the_model(octave_read):
    net, *_, out = octave_read
    _check_net(out['model'], net)


def test_octave_reads_the_checkpoint(octave_read):
    net, moms, stats, *_, out = octave_read
    _check_net(out['checkpoint'], net)
    expect = [float(moms[p.name].astype(np.float64).sum()) for p in net.params]
    assert out['momentum'] == pytest.approx(expect)
    assert _listify(out['stats_train_objective']) == [1.5, 1.25]
    assert _listify(out['stats_val_objective']) == [2.0, 1.75]


def test_octave_reads_the_imdb(octave_read):
    *_, data, labels, sets, out = octave_read
    db = out['imdb']
    assert db['data']['class'] == 'uint8' and db['data']['size'] == list(data.shape)
    assert db['data']['sum'] == float(data.astype(np.float64).sum())
    assert db['data']['first'] == data.reshape(-1, order='F')[0]
    assert db['data']['last'] == data.reshape(-1, order='F')[-1]
    assert db['labels'] == labels.tolist() and db['set'] == sets.tolist()
    assert db['sets'] == ['train', 'val', 'test']
    assert db['classes'] == CLASSES['description'] and db['rgbMean'] == [1, 2, 3]
