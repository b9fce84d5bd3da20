"""MatConvNet model files: load_matconvnet / save_matconvnet and the .mat layer under them."""
import os

import numpy as np
import pytest
import scipy.io

import pydagnn
from pydagnn import DagNN
from pydagnn.io import load_matconvnet, save_matconvnet
from pydagnn.io.errors import MatFileError
from pydagnn.io.matconvnet import UnknownLayerTypeError, UnusableLayer
from pydagnn.io.matfile import MatCell, MatStruct, read_mat, to_python, write_mat
from pydagnn.layer import REGISTRY
from pydagnn.testing import shared_path


def need(*types):
    missing = [t for t in types if t not in REGISTRY]
    if missing:
        pytest.skip(f'blocks not written yet: {missing}')


# ---------------------------------------------------------------------------- comparisons
def assert_same(a, b, where='value'):
    """Exact equality of nested Python values (dicts, lists, arrays with dtype and shape,
    scalars with their types). Dict key order is not compared: v7.3 files are read in
    HDF5's field order (see pydagnn.io.matfile, MATLAB_fields)."""
    if isinstance(a, dict):
        assert isinstance(b, dict), f'{where}: {type(b).__name__} instead of dict'
        assert sorted(a) == sorted(b), f'{where}: keys {list(a)} != {list(b)}'
        for k in a:
            assert_same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), f'{where}: {type(b).__name__} instead of {type(a).__name__}'
        assert len(a) == len(b), f'{where}: length {len(b)} instead of {len(a)}'
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f'{where}: {type(b).__name__} instead of an array'
        assert a.shape == b.shape, f'{where}: shape {b.shape} instead of {a.shape}'
        assert a.dtype == b.dtype, f'{where}: dtype {b.dtype} instead of {a.dtype}'
        if a.dtype == object:
            for i, (x, y) in enumerate(zip(a.ravel(order='F'), b.ravel(order='F'))):
                assert_same(x, y, f'{where}{{{i}}}')
        else:
            assert np.array_equal(a, b), f'{where}: values differ'
    else:
        assert type(a) is type(b), f'{where}: {type(b).__name__} {b!r} instead of {type(a).__name__} {a!r}'
        assert a == b, f'{where}: {b!r} != {a!r}'


def assert_nets_equal(a, b):
    assert [l.name for l in a.layers] == [l.name for l in b.layers]
    for la, lb in zip(a.layers, b.layers):
        w = f'layer {la.name}'
        assert type(la.block) is type(lb.block), w
        assert la.block.type_name == lb.block.type_name, w
        assert (la.inputs, la.outputs, la.params) == (lb.inputs, lb.outputs, lb.params), w
        assert la.route == lb.route, w
        assert_same(la.block.save(), lb.block.save(), f'{w}.block')
    assert [(v.name, v.precious) for v in a.vars] == [(v.name, v.precious) for v in b.vars]
    assert [p.name for p in a.params] == [p.name for p in b.params]
    for pa, pb in zip(a.params, b.params):
        w = f'param {pa.name}'
        assert (pa.learning_rate, pa.weight_decay, pa.train_method) == \
            (pb.learning_rate, pb.weight_decay, pb.train_method), w
        if pa.value is None:
            assert pb.value is None, w
        else:
            assert_same(pa.value, pb.value, w)
    assert_same(a.meta, b.meta, 'meta')
    assert a.execution_order == b.execution_order


# ---------------------------------------------------------------------------- a small net
def small_net(dtype=np.float32):
    from pydagnn.layers.bnorm import BatchNorm
    from pydagnn.layers.conv import Conv
    from pydagnn.layers.dropout import DropOut
    from pydagnn.layers.loss import Loss
    from pydagnn.layers.relu import ReLU
    from pydagnn.layers.softmax import SoftMax
    from pydagnn.layers.sum import Sum
    rng = np.random.default_rng(7)
    net = DagNN()
    net.add_layer('conv1', Conv(size=[3, 3, 3, 8], pad=1, stride=1), ['input'], ['x1'], ['conv1_f', 'conv1_b'])
    net.add_layer('bn1', BatchNorm(numChannels=8), ['x1'], ['x2'], ['bn1_g', 'bn1_b', 'bn1_m'])
    net.add_layer('relu1', ReLU(leak=0.1), ['x2'], ['x3'])
    net.add_layer('conv2', Conv(size=[1, 1, 8, 8], hasBias=False, pad=[0, 0, 0, 0], stride=[2, 2],
                                opts=['cudnnworkspacelimit', 1024]), ['x3'], ['x4'], ['conv2_f'])
    net.add_layer('sum', Sum(), ['x3', 'x4'], ['x5'])
    net.add_layer('drop', DropOut(rate=0.25), ['x5'], ['x6'])
    net.add_layer('fc', Conv(size=[1, 1, 8, 5]), ['x6'], ['prediction'], ['fc_f', 'fc_b'])
    net.add_layer('loss', Loss(loss='softmaxlog'), ['prediction', 'label'], ['objective'])
    net.add_layer('top2', Loss(loss='topkerror', opts=['topK', 2]), ['prediction', 'label'], ['top2error'])
    net.add_layer('prob', SoftMax(), ['prediction'], ['prob'])
    shapes = {'conv1_f': (3, 3, 3, 8), 'conv1_b': (8,), 'bn1_g': (8,), 'bn1_b': (8,), 'bn1_m': (8, 2),
              'conv2_f': (1, 1, 8, 8), 'fc_f': (1, 1, 8, 5), 'fc_b': (5,)}
    for name, shape in shapes.items():
        net.get_param(name).value = np.asfortranarray(rng.standard_normal(shape).astype(dtype))
    net.get_param('conv1_f').learning_rate = 1 / 3600
    net.get_param('conv1_f').weight_decay = 0.0
    net.get_param('bn1_m').learning_rate = 0.3
    net.get_var('objective').precious = True
    net.meta = {
        'normalization': {'imageSize': np.array([[32.0, 32.0, 3.0]]), 'averageImage': np.zeros((3, 1))},
        'classes': {'name': ['cat', 'dog', 'eel', 'fox', 'gnu'], 'description': ['a', 'b', 'c', 'd', 'e']},
        'inputs': [{'name': 'input', 'size': np.array([[32.0, 32.0, 3.0, 4.0]])},
                   {'name': 'label', 'size': np.array([[1.0, 4.0]])}],
        'note': 'hand-built', 'flag': True, 'count': 3.0, 'nothing': None, 'nocell': [],
        'counts': np.arange(6, dtype=np.int32).reshape(2, 3), 'single': np.float32(0.5),
    }
    return net


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def gm_path():
    return shared_path('fixtures', 'gmsop_resnet18_eval.mat')


@pytest.fixture(scope='module')
def gm(gm_path):
    return load_matconvnet(gm_path, return_extra=True)


@pytest.fixture(scope='module')
def gap_path():
    return shared_path('fixtures', 'gap_resnet18_init.mat')


@pytest.fixture(scope='module')
def gap(gap_path):
    need('dagnn.Pooling')
    return load_matconvnet(gap_path, return_extra=True)


def test_load_gmsop_fixture(gm):
    net, extra = gm
    assert (len(net.layers), len(net.vars), len(net.params)) == (213, 266, 128)
    types = {}
    for l in net.layers:
        types[l.block.type_name] = types.get(l.block.type_name, 0) + 1
        assert isinstance(l.block, REGISTRY[l.block.type_name])
    assert types['dagnn.OBJ_ConvNet_Cov_Sqrtm'] == 17 and types['dagnn.H_x'] == 1
    assert types['dagnn.gating'] == 1 and types['dagnn.CM_out'] == 1 and types['dagnn.Balance_loss'] == 1
    assert types['dagnn.Loss'] == 3 and types['dagnn.DropOut'] == 1
    expect = {'gating_w': (8256, 16), 'gating_noise_w': (8256, 16), 'gating1_f': (1, 1, 128, 256),
              'gating2_f': (1, 1, 256, 128), 'fusion_bn_bn_w': (8256,), 'fusion_bn_bn_b': (8256,),
              'fusion_bn_bn_m': (8256, 2), 'prediction_f': (1, 1, 8256, 1000), 'prediction_b': (1000,),
              'conv1_f': (3, 3, 3, 16), 'conv1_b': (16,), 'conv5_2b_f': (3, 3, 128, 128)}
    for i in range(1, 17):
        expect[f'CM_{i}_a_f'] = (1, 1, 128, 256)
        expect[f'CM_{i}_b_f'] = (1, 1, 256, 128)
    for name, shape in expect.items():
        v = net.get_param(name).value
        assert v.shape == shape and v.dtype == np.float32, name
    assert all(p.value.dtype == np.float32 for p in net.params)
    conv1 = net.get_layer('conv1_conv').block
    assert conv1.pad == [1, 1, 1, 1] and conv1.stride == [1, 1] and conv1.size == [3, 3, 3, 16]
    assert conv1.hasBias is True and conv1.opts == ['cudnnworkspacelimit', 1262485504]
    assert net.get_layer('conv2_1a_conv').block.hasBias is False
    sq = net.get_layer('CM_3_Cov_Sqrtm').block
    assert sq.coef == 1 and sq.iterNum == 3
    assert net.get_layer('H_x').block.size == [8256, 16]
    assert net.get_layer('gating').block.topk == 8
    assert net.get_layer('Balance_loss').block.loss_weight == 100
    assert net.get_layer('dropout').block.rate == 0.2
    assert net.get_layer('top5error').block.loss == 'topkerror'
    assert net.get_layer('top5error').block.opts == ['topK', 5]
    assert net.get_layer('conv1_bn').block.epsilon == 1e-5
    assert net.get_layer('conv1_bn').block.numChannels == 16
    # learning rates from the file, train methods from the blocks
    assert net.get_param('conv1_f').learning_rate == pytest.approx(1 / 3600)
    m = net.get_param('conv1_bn_m')
    assert (m.learning_rate, m.train_method) == (pytest.approx(0.3), 'average')
    assert net.get_param('conv1_f').train_method == 'gradient'
    assert [v.name for v in net.vars if v.precious] == ['Balance_loss']
    assert net.meta['trainOpts']['batchSize'] == 256.0
    assert net.meta['opt'] == 'ResNet18-GM-SOP-8from16-LR_0.1_w_100'
    # GM routing set once by the loader
    routed = {l.name: l.route for l in net.layers if l.route}
    assert routed == {f'CM_{i}_a_conv': ('gating', i) for i in range(1, 17)}
    assert 'executionOrder' in extra


def test_gmsop_execution_order_matches_file(gm):
    pytest.importorskip('pydagnn.models.gm', reason='pydagnn.models.gm (finalize_gm) not written yet')
    net, extra = gm
    file_order = [int(i) - 1 for i in np.asarray(extra['executionOrder']).ravel()]
    assert net.execution_order == file_order
    # the GM order (not just the stored one) is what the loader leaves: rebuilt without it
    s = read_mat(shared_path('fixtures', 'gmsop_resnet18_eval.mat'), ['vars', 'params', 'layers', 'meta'])
    from pydagnn.io.matconvnet import net_from_struct
    assert net_from_struct(s).execution_order == file_order


def test_load_gap_fixture(gap):
    net, extra = gap
    assert (len(net.layers), len(net.vars), len(net.params)) == (70, 72, 83)
    assert net.execution_order == [int(i) - 1 for i in np.asarray(extra['executionOrder']).ravel()]
    pool = net.get_layer('GAP').block
    assert pool.type_name == 'dagnn.Pooling' and pool.method == 'avg'
    assert pool.poolSize == [8, 8]
    assert net.get_param('prediction_f').value.shape == (1, 1, 128, 1000)
    assert net.get_param('conv1_f').value.shape == (3, 3, 3, 16)
    assert net.get_param('conv1_bn_m').value.shape == (16, 2)
    assert not any(l.route for l in net.layers)


@pytest.mark.parametrize('version', ['7', '7.3'])
def test_round_trip_gmsop(gm, tmp_path, version):
    net = gm[0]
    path = tmp_path / f'gm{version}.mat'
    save_matconvnet(net, path, version=version, compress=False)
    assert_nets_equal(net, load_matconvnet(path))


@pytest.mark.parametrize('version', ['7', '7.3'])
def test_round_trip_gap(gap, tmp_path, version):
    net = gap[0]
    path = tmp_path / f'gap{version}.mat'
    save_matconvnet(net, path, version=version)
    assert_nets_equal(net, load_matconvnet(path))


@pytest.mark.parametrize('version', ['7', '7.3'])
def test_round_trip_small_net(tmp_path, version):
    net = small_net()
    path = tmp_path / 'small.mat'
    save_matconvnet(net, path, version=version)
    back = load_matconvnet(path)
    assert_nets_equal(net, back)
    # and again: a second round trip is the identity as well
    save_matconvnet(back, path, version=version)
    assert_nets_equal(net, load_matconvnet(path))
    assert not [f for f in os.listdir(tmp_path) if f != 'small.mat']  # no temporary left behind


def test_round_trip_float64_params(tmp_path):
    net = small_net(np.float64)
    save_matconvnet(net, tmp_path / 'f64.mat')
    back = load_matconvnet(tmp_path / 'f64.mat')
    assert back.get_param('conv1_f').value.dtype == np.float64
    assert_nets_equal(net, back)


def test_saved_struct_is_what_loadobj_reads(tmp_path):
    """The v7 file read back with plain scipy: the saveobj layout MATLAB's loadobj takes."""
    save_matconvnet(small_net(), tmp_path / 'n.mat')
    m = scipy.io.loadmat(tmp_path / 'n.mat')
    assert {'vars', 'params', 'layers', 'meta'} <= set(m)
    assert m['layers'].shape == (1, 10) and m['params'].shape == (1, 8) and m['vars'].shape == (1, 12)
    assert m['layers'].dtype.names == ('name', 'type', 'inputs', 'outputs', 'params', 'block')
    assert m['params'].dtype.names == ('name', 'value', 'learningRate', 'weightDecay', 'trainMethod')
    assert m['vars'].dtype.names == ('name', 'precious')
    conv1 = m['layers'][0, 0]
    assert conv1['type'][0] == 'dagnn.Conv'
    assert conv1['inputs'].dtype == object and conv1['inputs'].shape == (1, 1)
    assert conv1['block']['size'][0, 0].tolist() == [[3.0, 3.0, 3.0, 8.0]]
    assert m['layers'][0, 2]['params'].shape == (0, 0)  # {} for a layer without params
    assert m['layers'][0, 3]['block']['opts'][0, 0].dtype == object  # a cell
    bias = m['params'][0, 1]
    assert bias['name'][0] == 'conv1_b' and bias['value'].shape == (8, 1) and bias['value'].dtype == np.float32
    assert m['params'][0, 4]['trainMethod'][0] == 'average'
    assert m['params'][0, 4]['value'].shape == (8, 2)


def test_v73_layout(tmp_path):
    """The v7.3 file: MATLAB's 512-byte header and HDF5 layout (classes, struct arrays of
    references, empty markers)."""
    import h5py
    path = tmp_path / 'n.mat'
    save_matconvnet(small_net(), path, version='7.3')
    head = path.read_bytes()[:128]
    assert head.startswith(b'MATLAB 7.3 MAT-file') and head[124:128] == b'\x00\x02IM'
    with h5py.File(path, 'r') as f:
        assert f.userblock_size == 512
        layers = f['layers']
        assert layers.attrs['MATLAB_class'] == b'struct'
        assert [b''.join(x).decode() for x in layers.attrs['MATLAB_fields']] == \
            ['name', 'type', 'inputs', 'outputs', 'params', 'block']
        assert layers['name'].shape == (10, 1) and layers['name'].dtype == h5py.ref_dtype
        first = f[layers['name'][0, 0]]
        assert first.attrs['MATLAB_class'] == b'char' and first.dtype == np.uint16
        value = f[f['params']['value'][0, 0]]
        assert value.attrs['MATLAB_class'] == b'single' and value.shape == (8, 3, 3, 3)
        empty = f[layers['params'][2, 0]]
        assert empty.attrs['MATLAB_class'] == b'cell' and empty.attrs['MATLAB_empty'] == 1
        prec = f[f['vars']['precious'][0, 0]]
        assert prec.attrs['MATLAB_class'] == b'logical'


def test_checkpoint_layout(tmp_path):
    net = small_net()
    state = {'momentum': [np.zeros((3, 3, 3, 8), np.float32), np.ones((8, 1), np.float32)]}
    stats = {'train': [{'num': 10.0, 'time': 1.5, 'objective': 2.25}, {'num': 10.0, 'time': 1.25, 'objective': 2.0}],
             'val': [{'num': 4.0, 'time': 0.5, 'objective': 2.5}, {'num': 4.0, 'time': 0.5, 'objective': 2.125}]}
    for version in ('7', '7.3'):
        path = tmp_path / f'net-epoch-2-v{version}.mat'
        save_matconvnet(net, path, version=version, extra={'state': state, 'stats': stats})
        names = set(read_mat(path))
        assert names == {'net', 'state', 'stats'}
        back, extra = load_matconvnet(path, return_extra=True)
        assert_nets_equal(net, back)
        assert set(extra) == {'state', 'stats'}
        assert_same(stats, extra['stats'])
        assert_same(state['momentum'][0], extra['state']['momentum'][0])
    m = scipy.io.loadmat(tmp_path / 'net-epoch-2-v7.mat')
    assert m['net'].dtype.names == ('vars', 'params', 'layers', 'meta')
    assert m['stats']['train'][0, 0].shape == (1, 2)  # a struct array, as cnn_train writes it


def test_load_checkpoint_written_like_matlab(tmp_path):
    """`net` nested in a checkpoint, written by scipy the way MATLAB lays it out."""
    src = tmp_path / 'top.mat'
    save_matconvnet(small_net(), src)
    top = scipy.io.loadmat(src)
    for layer in top['layers'][0]:
        if layer['block'].dtype == object:  # loadmat's form of a struct without fields
            layer['block'] = {}
    net_struct = {k: top[k] for k in ('vars', 'params', 'layers', 'meta')}
    scipy.io.savemat(tmp_path / 'ckpt.mat', {'net': net_struct, 'state': {'solverState': np.zeros((0, 0))},
                                             'stats': {'train': np.zeros((1, 0))}})
    expect = small_net()
    expect.meta['flag'] = np.uint8(1)  # scipy.io.loadmat read the logical as uint8
    assert_nets_equal(expect, load_matconvnet(tmp_path / 'ckpt.mat'))


# ---------------------------------------------------------------------------- hand-written structs
def _cell(*items):
    c = np.empty((1, len(items)), dtype=object)
    for i, x in enumerate(items):
        c[0, i] = x
    return c


def _struct_array(rows, fields):
    s = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f in fields:
            s[0, i][f] = row[f]
    return s


def _dag_struct(layers, params, vars_=None, with_type=True):
    fields = ['name', 'type', 'inputs', 'outputs', 'params', 'block'] if with_type else \
        ['name', 'inputs', 'outputs', 'params', 'block']
    names = []
    for l in layers:
        for v in list(l['inputs'].ravel()) + list(l['outputs'].ravel()):
            if v not in names:
                names.append(v)
    vars_ = vars_ if vars_ is not None else [{'name': n, 'precious': False} for n in names]
    return {
        'layers': _struct_array(layers, fields),
        'params': _struct_array(params, ['name', 'value', 'learningRate', 'weightDecay']),
        'vars': _struct_array(vars_, ['name', 'precious']),
        'meta': {},
    }


def _conv_layer(name, size, inp, out, params, has_bias=True, pad=0.0):
    return {'name': name, 'type': 'dagnn.Conv', 'inputs': _cell(inp), 'outputs': _cell(out),
            'params': _cell(*params),
            'block': {'size': np.array([size], float), 'hasBias': np.array([[has_bias]]), 'opts': _cell(),
                      'pad': np.array([[pad]]), 'stride': np.array([[1.0]]), 'dilate': np.array([[1.0]])}}


def _param(name, value, lr=1.0, wd=1.0):
    return {'name': name, 'value': value, 'learningRate': np.array([[lr]]), 'weightDecay': np.array([[wd]])}


def _two_conv_struct(f2=None):
    """conv a (3x3x3x16: MATLAB keeps it 4-D) then conv b (1x1x16x1: MATLAB saves 1x1x16)."""
    layers = [_conv_layer('a', [3, 3, 3, 16], 'input', 'x1', ['af', 'ab']),
              _conv_layer('b', [1, 1, 16, 1], 'x1', 'x2', ['bf'], has_bias=False)]
    params = [_param('af', np.ones((3, 3, 3, 16), np.float32)), _param('ab', np.zeros((16, 1), np.float32)),
              _param('bf', np.ones((1, 1, 16), np.float32) if f2 is None else f2)]
    return _dag_struct(layers, params)


def test_trailing_singleton_dims_restored(tmp_path):
    need('dagnn.Conv')
    scipy.io.savemat(tmp_path / 's.mat', _two_conv_struct())
    net = load_matconvnet(tmp_path / 's.mat')
    assert net.get_param('af').value.shape == (3, 3, 3, 16)
    assert net.get_param('ab').value.shape == (16,)
    assert net.get_param('bf').value.shape == (1, 1, 16, 1)
    assert net.get_layer('a').block.pad == 0 and net.get_layer('b').block.size == [1, 1, 16, 1]
    assert net.get_param('af').train_method == 'gradient'


def test_old_format_without_type(tmp_path):
    need('dagnn.Conv', 'dagnn.ReLU', 'dagnn.Sum')
    s = _two_conv_struct()
    rows = [dict(zip(s['layers'].dtype.names, s['layers'][0, i])) for i in range(2)]
    rows.append({'name': 'relu', 'inputs': _cell('x2'), 'outputs': _cell('x3'), 'params': np.zeros((0, 0)),
                 'block': {'useShortCircuit': np.array([[True]]), 'leak': np.array([[0.0]]), 'opts': _cell()}})
    rows.append({'name': 'sum', 'inputs': _cell('x3', 'x2'), 'outputs': _cell('x4'), 'params': np.zeros((0, 0)),
                 'block': {}})
    s2 = _dag_struct(rows, [dict(zip(s['params'].dtype.names, s['params'][0, i])) for i in range(3)],
                     with_type=False)
    scipy.io.savemat(tmp_path / 'old.mat', s2)
    net = load_matconvnet(tmp_path / 'old.mat')
    assert [l.block.type_name for l in net.layers] == ['dagnn.Conv', 'dagnn.Conv', 'dagnn.ReLU', 'dagnn.Sum']
    assert net.get_layer('relu').block.useShortCircuit is True


def simplenn_struct():
    rng = np.random.default_rng(3)
    f32 = np.float32
    layers = [
        {'type': 'conv', 'name': 'conv1', 'weights': _cell(rng.standard_normal((5, 5, 3, 8)).astype(f32),
                                                           np.zeros((1, 8), f32)),
         'pad': np.array([[2.0]]), 'stride': np.array([[1.0]]), 'learningRate': np.array([[1.0, 2.0]]),
         'weightDecay': np.array([[1.0, 0.0]])},
        {'type': 'bnorm', 'name': 'bn1', 'weights': _cell(np.ones((8, 1), f32), np.zeros((8, 1), f32)),
         'learningRate': np.array([[2.0, 1.0, 0.05]]), 'weightDecay': np.array([[0.0, 0.0]]),
         'epsilon': np.array([[1e-4]])},
        {'type': 'relu'},  # no name, no leak: tidy defaults
        {'type': 'pool', 'name': 'pool1', 'method': 'max', 'pool': np.array([[3.0, 3.0]]),
         'stride': np.array([[2.0]]), 'pad': np.array([[0.0, 1.0, 0.0, 1.0]])},
        # the old field names of conv weights; a 1x1x8x1 filter MATLAB saves as 1x1x8
        {'type': 'conv', 'name': 'conv2', 'filters': rng.standard_normal((1, 1, 8)).astype(f32),
         'biases': np.zeros((0, 0), f32), 'stride': np.array([[1.0]]), 'pad': np.array([[0.0]])},
        {'type': 'dropout', 'name': 'drop'},
        {'type': 'conv', 'name': 'fc', 'weights': _cell(rng.standard_normal((4, 4, 1, 10)).astype(f32),
                                                        rng.standard_normal((10, 1)).astype(f32)),
         'stride': np.array([[1.0]]), 'pad': np.array([[0.0]])},
        {'type': 'softmaxloss', 'name': 'loss'},
    ]
    cell = np.empty((1, len(layers)), dtype=object)
    for i, l in enumerate(layers):
        cell[0, i] = l
    return {'layers': cell, 'meta': {'inputs': _struct_array([{'name': 'data', 'size': np.array([[32.0, 32, 3, 1]])}],
                                                             ['name', 'size'])},
            'classes': {'name': _cell('a', 'b'), 'description': _cell('A', 'B')},
            'normalization': {'imageSize': np.array([[32.0, 32.0, 3.0]]), 'border': np.array([[32.0, 32.0]])}}


@pytest.mark.parametrize('nested', [False, True])
def test_simplenn(tmp_path, nested):
    need('dagnn.Conv', 'dagnn.BatchNorm', 'dagnn.ReLU', 'dagnn.Pooling', 'dagnn.DropOut', 'dagnn.Loss')
    s = simplenn_struct()
    scipy.io.savemat(tmp_path / 'simple.mat', {'net': s} if nested else s)
    net = load_matconvnet(tmp_path / 'simple.mat')
    assert [l.name for l in net.layers] == ['conv1', 'bn1', 'layer3', 'pool1', 'conv2', 'drop', 'fc', 'loss']
    assert [l.block.type_name for l in net.layers] == [
        'dagnn.Conv', 'dagnn.BatchNorm', 'dagnn.ReLU', 'dagnn.Pooling', 'dagnn.Conv', 'dagnn.DropOut',
        'dagnn.Conv', 'dagnn.Loss']
    assert [(l.inputs, l.outputs) for l in net.layers[:2]] == [(['x0'], ['x1']), (['x1'], ['x2'])]
    assert net.layers[-1].inputs == ['x7', 'label'] and net.layers[-1].outputs == ['x8']
    assert [p.name for p in net.params] == ['conv1f', 'conv1b', 'bn1m', 'bn1b', 'bn1x', 'conv2f', 'fcf', 'fcb']
    shapes = {'conv1f': (5, 5, 3, 8), 'conv1b': (8,), 'bn1m': (8,), 'bn1b': (8,), 'bn1x': (8, 2),
              'conv2f': (1, 1, 8, 1), 'fcf': (4, 4, 1, 10), 'fcb': (10,)}
    assert {n: net.get_param(n).value.shape for n in shapes} == shapes
    assert net.get_param('bn1x').value.dtype == np.float32 and not net.get_param('bn1x').value.any()
    lr = {p.name: (p.learning_rate, p.weight_decay, p.train_method) for p in net.params}
    assert lr['conv1f'] == (1.0, 1.0, 'gradient') and lr['conv1b'] == (2.0, 0.0, 'gradient')
    assert lr['bn1x'] == (0.05, 0.0, 'average') and lr['bn1m'] == (2.0, 0.0, 'gradient')
    c1 = net.get_layer('conv1').block
    assert (c1.size, c1.pad, c1.stride, c1.dilate, c1.hasBias, c1.opts) == \
        ([5, 5, 3, 8], [2, 2, 2, 2], [1, 1], [1, 1], True, [])
    bn = net.get_layer('bn1').block
    assert (bn.numChannels, bn.epsilon) == (8, 1e-4)
    c2 = net.get_layer('conv2').block
    assert c2.hasBias is False and c2.size == [1, 1, 8, 1] and c2.pad == [0, 0, 0, 0]
    pool = net.get_layer('pool1').block
    assert (pool.method, pool.poolSize, pool.stride, pool.pad) == ('max', [3, 3], [2, 2], [0, 1, 0, 1])
    assert net.get_layer('layer3').block.leak == 0
    assert net.get_layer('drop').block.rate == 0.5
    assert net.get_layer('loss').block.loss == 'softmaxlog'
    assert net.meta['classes']['name'] == ['a', 'b']
    assert net.meta['normalization']['cropSize'].tolist() == [[0.5, 0.5]]
    assert net.meta['inputs']['name'] == 'x0'
    assert net.execution_order == list(range(8))


def test_simplenn_unknown_type(tmp_path):
    need('dagnn.Conv', 'dagnn.ReLU')
    cell = _cell({'type': 'relu', 'name': 'r'}, {'type': 'custom', 'name': 'mine'}, {'type': 'relu'})
    scipy.io.savemat(tmp_path / 'c.mat', {'layers': cell})
    with pytest.raises(UnknownLayerTypeError, match="'mine'.*'custom'"):
        load_matconvnet(tmp_path / 'c.mat')
    with pytest.warns(UserWarning):
        net = load_matconvnet(tmp_path / 'c.mat', strict=False)
    assert isinstance(net.layers[1].block, UnusableLayer) and len(net.layers) == 3


# ---------------------------------------------------------------------------- bad inputs
def _save_struct(tmp_path, s, name='bad.mat'):
    scipy.io.savemat(tmp_path / name, s)
    return str(tmp_path / name)


def test_missing_layers_variable(tmp_path):
    # (a struct without params or vars loads, as in loadobj: tests/test_io_compat.py)
    need('dagnn.Conv')
    s = _two_conv_struct()
    del s['layers']
    path = _save_struct(tmp_path, s)
    with pytest.raises(MatFileError, match='layers') as e:
        load_matconvnet(path)
    assert path in str(e.value)


def test_param_shape_disagrees_with_block(tmp_path):
    need('dagnn.Conv')
    s = _two_conv_struct()
    s['params'][0, 0]['value'] = np.ones((3, 3, 3, 8), np.float32)
    path = _save_struct(tmp_path, s)
    with pytest.raises(MatFileError, match=r"layers\(1\).*'af'.*\(3, 3, 3, 8\).*\[3, 3, 3, 16\]") as e:
        load_matconvnet(path)
    assert path in str(e.value)
    s = _two_conv_struct()
    s['params'][0, 1]['value'] = np.zeros((2, 8), np.float32)  # a bias that is not a vector
    with pytest.raises(MatFileError, match=r"params\(2\).value.*'ab'.*vector"):
        load_matconvnet(_save_struct(tmp_path, s))


def test_param_not_used_and_bad_fields(tmp_path):
    need('dagnn.Conv')
    s = _two_conv_struct()
    p = [dict(zip(s['params'].dtype.names, s['params'][0, i])) for i in range(3)]
    s['params'] = _struct_array(p + [_param('stray', np.ones((2, 2), np.float32))], list(s['params'].dtype.names))
    with pytest.warns(UserWarning, match="'stray' is not used"):
        load_matconvnet(_save_struct(tmp_path, s))
    s = _two_conv_struct()
    s['layers'][0, 1]['inputs'] = np.array([[1.0, 2.0]])
    with pytest.raises(MatFileError, match=r"layers\(2\).inputs"):
        load_matconvnet(_save_struct(tmp_path, s))
    s = _two_conv_struct()
    s['params'][0, 0]['learningRate'] = 'fast'
    with pytest.raises(MatFileError, match=r"params\(1\).learningRate"):
        load_matconvnet(_save_struct(tmp_path, s))
    s = _two_conv_struct()
    s['executionOrder'] = np.array([[1.0, 1.0]])
    with pytest.raises(MatFileError, match='executionOrder'):
        load_matconvnet(_save_struct(tmp_path, s))
    s = _two_conv_struct()
    s['layers'][0, 0]['block']['nonsense'] = 1.0
    with pytest.raises(MatFileError, match="'a'.*nonsense"):
        load_matconvnet(_save_struct(tmp_path, s))
    with pytest.warns(UserWarning, match='nonsense'):
        load_matconvnet(_save_struct(tmp_path, s), strict=False)


def test_unknown_type(tmp_path):
    need('dagnn.Conv')
    s = _two_conv_struct()
    s['layers'][0, 1]['type'] = 'dagnn.Frobnicate'
    s['layers'][0, 1]['block'] = {'alpha': np.array([[0.5]]), 'mode': 'fast'}
    path = _save_struct(tmp_path, s)
    with pytest.raises(UnknownLayerTypeError) as e:
        load_matconvnet(path)
    msg = str(e.value)
    assert "'b'" in msg and 'dagnn.Frobnicate' in msg and path in msg
    with pytest.warns(UserWarning, match='Frobnicate'):
        net = load_matconvnet(path, strict=False)
    block = net.get_layer('b').block
    assert isinstance(block, UnusableLayer) and block.type_name == 'dagnn.Frobnicate'
    assert net.get_param('bf').value.shape == (1, 1, 16)  # kept as stored
    with pytest.raises(Exception, match=r"'b'.*dagnn\.Frobnicate"):
        net.eval({'input': np.ones((4, 4, 3, 1), np.float32)})
    # what it cannot run, it still saves unchanged
    save_matconvnet(net, tmp_path / 'again.mat')
    m = scipy.io.loadmat(tmp_path / 'again.mat')
    assert m['layers'][0, 1]['type'][0] == 'dagnn.Frobnicate'
    assert m['layers'][0, 1]['block']['mode'][0, 0][0] == 'fast'


@pytest.mark.parametrize('version', ['7', '7.3'])
def test_truncated_file(tmp_path, version):
    path = tmp_path / 'n.mat'
    save_matconvnet(small_net(), path, version=version)
    data = path.read_bytes()
    for cut in (0, 100, 128, 600, len(data) // 2, len(data) - 10):
        bad = tmp_path / f'cut{cut}.mat'
        bad.write_bytes(data[:cut])
        with pytest.raises(MatFileError) as e:
            load_matconvnet(bad)
        assert str(bad) in str(e.value)


def test_not_a_mat_file(tmp_path):
    txt = tmp_path / 'notes.mat'
    txt.write_text('this is not a MATLAB file\n' * 20)
    with pytest.raises(MatFileError, match='notes.mat'):
        load_matconvnet(txt)
    with pytest.raises(MatFileError, match='no such file'):
        load_matconvnet(tmp_path / 'absent.mat')
    scipy.io.savemat(tmp_path / 'other.mat', {'x': np.ones(3)})
    with pytest.raises(MatFileError, match='layers'):
        load_matconvnet(tmp_path / 'other.mat')
    scipy.io.savemat(tmp_path / 'weird.mat', {'layers': 'conv', 'params': 1.0, 'vars': 2.0})
    with pytest.raises(MatFileError, match='layers'):
        load_matconvnet(tmp_path / 'weird.mat')


@pytest.mark.filterwarnings("ignore:.*is not (an input|used):UserWarning")  # loadobj ignores those
def test_fuzz_mutated_files(tmp_path):
    """Mutated bytes of small valid files: the load works or raises MatFileError, nothing else."""
    rng = np.random.default_rng(20240611)
    net = small_net()
    outcomes = {'ok': 0, 'MatFileError': 0}
    for version in ('7', '7.3'):
        src = tmp_path / f'src{version}.mat'
        save_matconvnet(net, src, version=version, compress=False)
        data = bytearray(src.read_bytes())
        for trial in range(50):
            bad = bytearray(data)
            kind = trial % 5
            if kind == 4:  # cut and splice
                a, b = sorted(rng.integers(0, len(bad), 2))
                bad = bad[:a] + bad[b:]
            else:
                for _ in range(int(rng.integers(1, 9))):
                    pos = int(rng.integers(0, len(bad)))
                    bad[pos] = int(rng.integers(0, 256)) if kind else bad[pos] ^ (1 << int(rng.integers(0, 8)))
            path = tmp_path / 'mut.mat'
            path.write_bytes(bytes(bad))
            try:
                load_matconvnet(path, strict=True)
                outcomes['ok'] += 1
            except MatFileError:
                outcomes['MatFileError'] += 1
    assert sum(outcomes.values()) == 100


# ---------------------------------------------------------------------------- the .mat layer
GENERIC = {
    'num': 2.5, 'flag': False, 'text': 'héllo wörld', 'empty_text': '', 'none': None, 'empty_cell': [],
    'row': np.array([[1.0, 2.0, 3.0]]), 'col': np.arange(4, dtype=np.float32).reshape(4, 1),
    'cube': np.arange(24, dtype=np.int16).reshape(2, 3, 4, order='F'), 'mask': np.array([[True, False], [False, True]]),
    'u8': np.array([[1, 2, 255]], dtype=np.uint8), 'i64': np.int64(-5), 'cplx': np.array([[1 + 2j, 3 - 1j]]),
    'cell': ['a', 1.0, [2.0, 'b'], {'x': 'y'}],
    'nested': {'s': {'t': {'u': np.ones((2, 2), np.float32)}}, 'list': ['p', 'q']},
    'sarray': [{'a': 1.0, 'b': 'x'}, {'a': 2.0, 'b': np.zeros((0, 3))}],
    'cellmat': np.array([['a', 'b'], ['c', 'd']], dtype=object),
}


@pytest.mark.parametrize('version', ['7', '7.3'])
def test_generic_round_trip(tmp_path, version):
    path = tmp_path / 'g.mat'
    write_mat(path, GENERIC, version=version)
    back = {k: to_python(v) for k, v in read_mat(path).items()}
    assert set(back) == set(GENERIC)
    expect = dict(GENERIC)
    expect['i64'] = np.int64(-5)
    for k in GENERIC:
        assert_same(expect[k], back[k], k)
    raw = read_mat(path)
    assert isinstance(raw['sarray'], MatStruct) and raw['sarray'].shape == (1, 2)
    assert isinstance(raw['cell'], MatCell) and raw['cell'].shape == (1, 4)
    assert raw['empty_cell'].shape == (0, 0) and raw['none'].shape == (0, 0)


def test_read_matlab_v73_file():
    """A v7.3 file written by MATLAB itself."""
    d = read_mat(shared_path('data', 'imdb_fake.mat'))
    assert d['images'].shape == (1, 1)
    images = d['images'][0]
    assert images['data'].shape == (64, 64, 3, 10) and images['data'].dtype == np.uint8
    assert images['labels'].shape == (1, 10)
    meta = to_python(d['meta'])
    assert meta['sets'] == ['train', 'val', 'test']
    assert meta['rgbCovariance'].shape == (3, 3)


def test_write_is_atomic(tmp_path, monkeypatch):
    from pydagnn.io import matfile
    path = tmp_path / 'keep.mat'
    write_mat(path, {'x': 1.0})
    before = path.read_bytes()

    def boom(tmp, mvars, compress):
        with open(tmp, 'wb') as f:
            f.write(b'MATLAB 5.0 half a file')
        raise OSError('disk full')
    monkeypatch.setattr(matfile, '_write_v5', boom)
    with pytest.raises(OSError, match='disk full'):
        write_mat(path, {'x': 2.0})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['keep.mat']
    with pytest.raises(MatFileError, match='keep.mat'):
        write_mat(path, {'x': object()}, version='7.3')
    assert os.listdir(tmp_path) == ['keep.mat']


def test_exports():
    assert pydagnn.io.load_matconvnet is load_matconvnet
    assert pydagnn.load_matconvnet is load_matconvnet and pydagnn.save_matconvnet is save_matconvnet


def test_corrupt_global_heap_does_not_hang():
    """A v7.3 file whose HDF5 global heap was damaged by fuzzing (kept in tests/data):
    reading MATLAB_fields from it made HDF5 spin forever. Loading must end, with the
    project's error for a file that holds no net. Run in a subprocess so a regression
    fails on the timeout instead of hanging the suite."""
    import subprocess
    import sys
    path = os.path.join(os.path.dirname(__file__), 'data', 'corrupt_heap_v73.mat')
    code = ('import sys; from pydagnn.io.matconvnet import load_matconvnet; from pydagnn.io.errors import MatFileError\n'
            'try:\n    load_matconvnet(sys.argv[1])\nexcept MatFileError as e:\n    print("MatFileError", e)\n')
    r = subprocess.run([sys.executable, '-c', code, path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'MatFileError' in r.stdout and 'corrupt_heap_v73.mat' in r.stdout
