"""Regression tests for MatConvNet files as found in the wild (issue 12's defects):
MATLAB_empty values in v7.3 files, strict=False with unknown types that carry params,
and structs that dagnn.DagNN.loadobj accepts (no vars, no params, unused params)."""
import warnings

import h5py
import numpy as np
import pytest
import scipy.io

import pydagnn
from pydagnn import DagNN
from pydagnn.io import load_matconvnet, save_matconvnet
from pydagnn.executor import EvalError
from pydagnn.io.errors import MatFileError
from pydagnn.io.matconvnet import UnusableLayer
from pydagnn.io.matfile import MatCell, MatStruct, read_mat
from pydagnn.layers.conv import Conv
from pydagnn.layers.sum import Sum

USERBLOCK = 512


def _matlab_v73(path):
    """An empty HDF5 file with MATLAB's 512-byte v7.3 header, as MATLAB writes it."""
    f = h5py.File(path, 'w', userblock_size=USERBLOCK)
    f.close()
    head = b'MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018 HDF5 schema 1.00 .'
    with open(path, 'r+b') as fh:
        fh.write(head.ljust(116, b' ') + b'\x00' * 8 + b'\x00\x02IM' + b'\x00' * (USERBLOCK - 128))
    return h5py.File(path, 'a')


def _empty(f, name, cls, dims):
    """A MATLAB_empty dataset as MATLAB writes one: uint64 data = the MATLAB dims in
    MATLAB's order (1-D, 2 elements), MATLAB_class, MATLAB_empty = 1 (uint8)."""
    ds = f.create_dataset(name, data=np.array(dims, dtype=np.uint64))
    ds.attrs['MATLAB_class'] = np.bytes_(cls)
    ds.attrs['MATLAB_empty'] = np.uint8(1)
    return ds


# ---------------------------------------------------------------------------- defect 1
def test_matlab_empty_of_every_kind_keeps_matlab_dims(tmp_path):
    path = tmp_path / 'empties.mat'
    with _matlab_v73(path) as f:
        _empty(f, 'd00', 'double', [0, 0])
        _empty(f, 'd03', 'double', [0, 3])     # zeros(0, 3)
        _empty(f, 's30', 'single', [3, 0])     # zeros(3, 0, 'single')
        _empty(f, 'c00', 'cell', [0, 0])       # {}
        _empty(f, 'c02', 'cell', [0, 2])       # cell(0, 2)
        _empty(f, 'st', 'struct', [1, 1])      # struct(): what a Sum block saves
        _empty(f, 'st13', 'struct', [1, 3])    # repmat(struct(), 1, 3)
        _empty(f, 'ch', 'char', [0, 0])        # ''
    m = read_mat(path)
    assert m['d00'].shape == (0, 0) and m['d00'].dtype == np.float64
    assert m['d03'].shape == (0, 3)
    assert m['s30'].shape == (3, 0) and m['s30'].dtype == np.float32
    assert isinstance(m['c00'], MatCell) and m['c00'].shape == (0, 0)
    assert isinstance(m['c02'], MatCell) and m['c02'].shape == (0, 2)
    assert isinstance(m['st'], MatStruct) and m['st'].shape == (1, 1) and m['st'].fields == []
    assert m['st'].elements == [{}]
    assert m['st13'].shape == (1, 3) and m['st13'].elements == [{}, {}, {}]
    assert m['ch'] == ''


def test_matlab_empty_struct_with_huge_dims_is_refused(tmp_path):
    path = tmp_path / 'huge.mat'
    with _matlab_v73(path) as f:
        _empty(f, 'st', 'struct', [2 ** 31, 2 ** 31])
    with pytest.raises(MatFileError, match="'st'.*fieldless struct"):
        read_mat(path)


def _sum_net():
    net = DagNN()
    net.add_layer('conv1', Conv(size=[3, 3, 2, 2], pad=1), ['input'], ['x1'], ['conv1_f', 'conv1_b'])
    net.add_layer('sum1', Sum(), ['x1', 'input'], ['x2'], [])
    net.init_params()
    return net


def test_v73_dagnn_with_a_fieldless_block_loads(tmp_path):
    """A MATLAB-saved v7.3 ResNet/DnCNN: each Sum layer's block is struct(), stored as a
    MATLAB_empty dataset [1 1] (the layout of DnCNN's DnCNN-epoch-50.mat, #refs#/tp)."""
    net = _sum_net()
    path = tmp_path / 'net.mat'
    save_matconvnet(net, path, version='7.3')
    with h5py.File(path, 'r') as f:
        ref = f['layers']['block'][()].reshape(-1)[1]
        block = f[ref]
        # pydagnn writes it exactly as MATLAB does
        assert isinstance(block, h5py.Dataset) and block.shape == (2,) and block.dtype == np.uint64
        assert block[()].tolist() == [1, 1]
        assert block.attrs['MATLAB_class'] == b'struct' and block.attrs['MATLAB_empty'] == 1
        assert 'MATLAB_fields' not in block.attrs
    again = load_matconvnet(path, strict=True)
    assert isinstance(again.get_layer('sum1').block, Sum)
    x = np.random.default_rng(0).standard_normal((5, 5, 2, 1)).astype(np.float32)
    net.eval({'input': x})
    again.eval({'input': x})
    np.testing.assert_array_equal(again.get_var('x2').value, net.get_var('x2').value)


def test_checkpoint_struct_with_fieldless_block_built_by_hand(tmp_path):
    """The same struct inside a checkpoint's `net` group, built with h5py alone."""
    path = tmp_path / 'ckpt.mat'
    f = _matlab_v73(path)
    refs = f.create_group('#refs#')
    _empty(refs, 'a', 'canonical empty', [0, 0])

    def put(name, value, cls):
        ds = refs.create_dataset(name, data=value)
        ds.attrs['MATLAB_class'] = np.bytes_(cls)
        if cls == 'char':
            ds.attrs['MATLAB_int_decode'] = np.int32(2)
        return ds.ref

    def text(name, s):
        return put(name, np.frombuffer(s.encode('utf-16-le'), '<u2').reshape(-1, 1), 'char')

    def cell(name, items):
        ds = refs.create_dataset(name, data=np.array([[r] for r in items], dtype=h5py.ref_dtype).T)
        ds.attrs['MATLAB_class'] = np.bytes_('cell')
        return ds.ref

    net = f.create_group('net')
    net.attrs['MATLAB_class'] = np.bytes_('struct')
    layers = net.create_group('layers')
    layers.attrs['MATLAB_class'] = np.bytes_('struct')
    fields = {
        'name': [text('n1', 'relu1')], 'type': [text('t1', 'dagnn.ReLU')],
        'inputs': [cell('i1', [text('i1a', 'input')])], 'outputs': [cell('o1', [text('o1a', 'x1')])],
        'params': [_empty(refs, 'p1', 'cell', [0, 0]).ref],
        'block': [],
    }
    blk = refs.create_group('b1')
    blk.attrs['MATLAB_class'] = np.bytes_('struct')
    relu_props = {'leak': (np.zeros((1, 1)), 'double'),
                  'useShortCircuit': (np.ones((1, 1), np.uint8), 'logical')}
    for k, (value, cls) in relu_props.items():
        d = blk.create_dataset(k, data=value)
        d.attrs['MATLAB_class'] = np.bytes_(cls)
    blk.create_dataset('opts', data=np.array([0, 0], np.uint64))
    blk['opts'].attrs['MATLAB_class'] = np.bytes_('cell')
    blk['opts'].attrs['MATLAB_empty'] = np.uint8(1)
    fields['block'] = [blk.ref]
    # layer 2: a Sum whose block is struct(), as MATLAB writes it
    fields['name'].append(text('n2', 'sum1'))
    fields['type'].append(text('t2', 'dagnn.Sum'))
    fields['inputs'].append(cell('i2', [text('i2a', 'x1'), text('i2b', 'input')]))
    fields['outputs'].append(cell('o2', [text('o2a', 'x2')]))
    fields['params'].append(_empty(refs, 'p2', 'cell', [0, 0]).ref)
    fields['block'].append(_empty(refs, 'b2', 'struct', [1, 1]).ref)
    for k, v in fields.items():
        layers.create_dataset(k, data=np.array([v], dtype=h5py.ref_dtype).T)  # a 1x2 struct array
    _empty(net, 'meta', 'double', [0, 0])
    f.close()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        loaded = load_matconvnet(path, strict=True)  # no vars, no params: loadobj's minimum
    assert [l.block.type_name for l in loaded.layers] == ['dagnn.ReLU', 'dagnn.Sum']
    x = -np.ones((2, 2, 1, 1), np.float32)
    loaded.eval({'input': x})
    np.testing.assert_array_equal(loaded.get_var('x2').value, x)


# ---------------------------------------------------------------------------- defect 2
def _conv(name, size, inp, out, params):
    return {'name': name, 'type': 'dagnn.Conv', 'inputs': _cell(inp), 'outputs': _cell(out),
            'params': _cell(*params),
            'block': {'size': np.array([size], float), 'hasBias': np.array([[True]]), 'opts': _cell(),
                      'pad': np.array([[0.0]]), 'stride': np.array([[1.0]]), 'dilate': np.array([[1.0]])}}


def _cell(*items):
    c = np.empty((1, len(items)), dtype=object)
    for i, x in enumerate(items):
        c[0, i] = x
    return c


def _table(rows, fields):
    s = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for k in fields:
            s[0, i][k] = row[k]
    return s


def _param(name, value):
    return {'name': name, 'value': value, 'learningRate': np.array([[1.0]]), 'weightDecay': np.array([[1.0]])}


def _three_layer_struct():
    """conv a -> an unknown type with a filter and a bias (like LapSRN's custom layers) -> conv c."""
    odd = {'name': 'odd', 'type': 'dagnn.Frobnicate', 'inputs': _cell('x1'), 'outputs': _cell('x2'),
           'params': _cell('odd_f', 'odd_b'),
           'block': {'size': np.array([[4.0, 4.0, 4.0, 4.0]]), 'upsample': np.array([[2.0, 2.0]])}}
    layers = [_conv('a', [3, 3, 3, 4], 'input', 'x1', ['af', 'ab']), odd,
              _conv('c', [1, 1, 4, 2], 'x2', 'x3', ['cf', 'cb'])]
    params = [_param('af', np.ones((3, 3, 3, 4), np.float32)), _param('ab', np.zeros((4, 1), np.float32)),
              _param('odd_f', np.ones((4, 4, 4, 4), np.float32)), _param('odd_b', np.zeros((1, 4), np.float32)),
              _param('cf', np.ones((1, 1, 4, 2), np.float32)), _param('cb', np.zeros((2, 1), np.float32))]
    names = ['input', 'x1', 'x2', 'x3']
    return {'layers': _table(layers, ['name', 'type', 'inputs', 'outputs', 'params', 'block']),
            'params': _table(params, ['name', 'value', 'learningRate', 'weightDecay']),
            'vars': _table([{'name': n, 'precious': False} for n in names], ['name', 'precious']),
            'meta': {}}


@pytest.mark.parametrize('version', ['7', '7.3'])
def test_strict_false_unknown_type_with_params(tmp_path, version):
    path = tmp_path / 'odd.mat'
    if version == '7':
        scipy.io.savemat(path, _three_layer_struct())
    else:
        with pytest.warns(UserWarning):
            net = load_matconvnet(_save7(tmp_path, _three_layer_struct()), strict=False)
        save_matconvnet(net, path, version='7.3')
    with pytest.raises(MatFileError, match='Frobnicate'):
        load_matconvnet(path, strict=True)
    with pytest.warns(UserWarning, match='Frobnicate'):
        net = load_matconvnet(path, strict=False)
    block = net.get_layer('odd').block
    assert isinstance(block, UnusableLayer)
    assert net.get_param('odd_f').value.shape == (4, 4, 4, 4)
    assert net.get_param('cf').value.shape == (1, 1, 4, 2)
    assert isinstance(net.get_layer('c').block, Conv)
    with pytest.raises(EvalError, match=r"'odd'.*dagnn\.Frobnicate.*cannot evaluate"):
        net.eval({'input': np.ones((5, 5, 3, 1), np.float32)})


def _save7(tmp_path, s, name='s.mat'):
    scipy.io.savemat(tmp_path / name, s)
    return str(tmp_path / name)


# ---------------------------------------------------------------------------- defect 3
def _two_conv():
    layers = [_conv('a', [3, 3, 3, 4], 'input', 'x1', ['af', 'ab']),
              _conv('c', [1, 1, 4, 2], 'x1', 'x2', ['cf', 'cb'])]
    params = [_param('af', np.ones((3, 3, 3, 4), np.float32)), _param('ab', np.zeros((4, 1), np.float32)),
              _param('cf', np.ones((1, 1, 4, 2), np.float32)), _param('cb', np.zeros((2, 1), np.float32))]
    return {'layers': _table(layers, ['name', 'type', 'inputs', 'outputs', 'params', 'block']),
            'params': _table(params, ['name', 'value', 'learningRate', 'weightDecay']),
            'vars': _table([{'name': n, 'precious': n == 'x1'} for n in ['input', 'x1', 'x2']],
                           ['name', 'precious']),
            'meta': {}}


def test_struct_without_vars_loads(tmp_path):
    s = _two_conv()
    del s['vars']
    net = load_matconvnet(_save7(tmp_path, s))
    assert [v.name for v in net.vars] == ['input', 'x1', 'x2']
    assert not net.get_var('x1').precious           # the default addLayer gives
    net.eval({'input': np.ones((4, 4, 3, 1), np.float32)})
    assert net.get_var('x2').value.shape == (2, 2, 2, 1)


def test_struct_without_params_loads_with_empty_params(tmp_path):
    s = _two_conv()
    del s['params']
    net = load_matconvnet(_save7(tmp_path, s))
    assert [p.name for p in net.params] == ['af', 'ab', 'cf', 'cb']
    assert all(p.value is None for p in net.params)  # as addLayer leaves them: empty
    assert net.get_var('x1').precious
    net.init_params()
    assert net.get_param('af').value.shape == (3, 3, 3, 4)


def test_table_missing_one_param_leaves_it_empty(tmp_path):
    s = _two_conv()
    s['params'] = s['params'][:, :3]
    net = load_matconvnet(_save7(tmp_path, s))
    assert net.get_param('cb').value is None
    assert net.get_param('cf').value.shape == (1, 1, 4, 2)


def test_unused_param_and_unknown_var_are_ignored_with_a_warning(tmp_path):
    s = _two_conv()
    rows = [dict(zip(s['params'].dtype.names, s['params'][0, i])) for i in range(4)]
    s['params'] = _table(rows + [_param('stray', np.ones((2, 2), np.float32))], list(s['params'].dtype.names))
    s['vars'] = _table([{'name': n, 'precious': False} for n in ['input', 'x1', 'x2', 'ghost']],
                       ['name', 'precious'])
    path = _save7(tmp_path, s)
    with pytest.warns(UserWarning) as rec:
        net = load_matconvnet(path)
    msgs = ' | '.join(str(w.message) for w in rec)
    assert "params(5)" in msgs and "'stray' is not used" in msgs and path in msgs
    assert "vars(4)" in msgs and "'ghost'" in msgs
    assert [p.name for p in net.params] == ['af', 'ab', 'cf', 'cb']
    assert 'ghost' not in [v.name for v in net.vars]


def test_what_loadobj_rejects_is_still_an_error(tmp_path):
    s = _two_conv()
    del s['layers']
    with pytest.raises(MatFileError, match='layers'):
        load_matconvnet(_save7(tmp_path, s, 'a.mat'))
    s = _two_conv()
    s['layers'][0, 1]['name'] = 'a'                  # addLayer: duplicate name
    with pytest.raises(MatFileError, match="duplicate layer name 'a'"):
        load_matconvnet(_save7(tmp_path, s, 'b.mat'))
    s = _two_conv()
    s['layers'][0, 0]['block']['nonsense'] = 1.0     # block.load: no such property
    with pytest.raises(MatFileError, match="'a'.*nonsense"):
        load_matconvnet(_save7(tmp_path, s, 'c.mat'))
    s = _two_conv()
    s['params'][0, 0]['value'] = np.ones((3, 3, 3, 8), np.float32)
    with pytest.raises(MatFileError, match="'af'"):
        load_matconvnet(_save7(tmp_path, s, 'd.mat'))
