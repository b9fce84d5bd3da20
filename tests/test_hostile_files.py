"""Hostile files (issue 13, items 1-4): each test writes the hostile file itself and loads it
in a subprocess with a timeout and an address-space limit (``RLIMIT_AS``), through every
public loader that can meet it (``load_matconvnet`` v7 and v7.3, ``load_imdb``,
``load_checkpoint``, ``read_mat``, ``python -m pydagnn.imdb convert``). A pass means: a
clean MatFileError (CheckpointError for checkpoints) naming the file and the field, within
the time limit and under the memory bound; no value from a file outside it; no code run.
"""
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from itertools import chain

import h5py
import numpy as np
import pytest

from pydagnn import DagNN
from pydagnn.io.checkpoint import save_checkpoint
from pydagnn.io.imdb import save_imdb
from pydagnn.io.matconvnet import save_matconvnet
from pydagnn.io.matfile import read_mat, write_mat
from pydagnn.layers.conv import Conv
from pydagnn.layers.loss import Loss

TIME_LIMIT_S = 20          # a clean error comes in well under a second; CI's 2 cores are slow
MEM_LIMIT = 1536 << 20     # RLIMIT_AS of the child (python + numpy + h5py: ~350 MB of it)
RSS_BOUND_MB = 400         # peak resident memory of the child (~110 MB after the imports)
MARKER = 31337.0           # the value a file outside holds (uint8 data: 0xA5)

# --------------------------------------------------------------------------- the child
CHILD = r'''
import json, resource, sys, time
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
kind, path, marker = sys.argv[2], sys.argv[3], float(sys.argv[4])
import numpy as np
out = {'error': None, 'message': '', 'marker_seen': False}

def seen(v, depth=0):
    """Whether the marker value is anywhere in a loaded value."""
    if depth > 80:
        return False
    if isinstance(v, np.ndarray):
        return v.dtype.kind in 'biuf' and v.size > 0 and bool(np.any(v == marker) or
                                                            (v.dtype == np.uint8 and np.any(v == 0xA5)))
    if isinstance(v, dict):
        return any(seen(x, depth + 1) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(seen(x, depth + 1) for x in v)
    for attr in ('elements', 'items'):
        if hasattr(v, attr):
            return seen(list(getattr(v, attr)), depth + 1)
    return False

t0 = time.perf_counter()
try:
    if kind == 'model':
        from pydagnn.io.matconvnet import load_matconvnet
        net = load_matconvnet(path)
        out['marker_seen'] = any(seen(np.asarray(p.value)) for p in net.params) or seen(net.meta)
    elif kind == 'imdb':
        from pydagnn.io.imdb import load_imdb
        with load_imdb(path) as imdb:
            im = imdb.images
            out['marker_seen'] = seen(im.data[:, :, :, [0]]) or seen(im.labels) or seen(dict(imdb.meta))
    elif kind == 'checkpoint':
        from pydagnn.io.checkpoint import load_checkpoint
        net, state, stats = load_checkpoint(path)
        out['marker_seen'] = any(seen(np.asarray(p.value)) for p in net.params) or seen(stats)
    elif kind == 'read_mat':
        from pydagnn.io.matfile import read_mat
        out['marker_seen'] = seen(read_mat(path))
    else:
        raise SystemExit('unknown kind ' + kind)
except Exception as e:
    out['error'] = type(e).__name__
    out['message'] = str(e)
out['seconds'] = time.perf_counter() - t0
try:    # this process's own peak (ru_maxrss would carry the parent's peak across exec)
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]
    out['maxrss_mb'] = int(hwm.split()[1]) / 1024
except (OSError, IndexError):
    out['maxrss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
'''


def load_in_child(kind, path, env=None, timeout=TIME_LIMIT_S * 3):
    """Run loader ``kind`` on ``path`` in a limited subprocess: its JSON report."""
    e = dict(os.environ)
    e.update(env or {})
    try:
        r = subprocess.run([sys.executable, '-c', CHILD, str(MEM_LIMIT), kind, str(path), repr(MARKER)],
                           capture_output=True, text=True, timeout=timeout, env=e)
    except subprocess.TimeoutExpired:
        pytest.fail(f'{kind} loader on {path} did not finish in {timeout} s')
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n{kind:10s} {os.path.basename(str(path)):24s} {res['seconds']:7.3f} s "
          f"{res['maxrss_mb']:6.0f} MB  {res['error']}: {res['message'][-110:]}")   # with -s
    return res


def assert_clean(res, path, *words):
    """A clean, bounded error naming the file and each of ``words`` (field, reason)."""
    assert res['error'] in ('MatFileError', 'CheckpointError'), res
    msg = res['message']
    for bad in ('MemoryError', 'RecursionError', 'Traceback'):
        assert bad not in msg, res
    assert str(path) in msg, res
    rest = msg.replace(str(path), '')        # the words must be in what it says, not the path
    for w in words:
        assert w in rest, (w, res)
    assert res['seconds'] < TIME_LIMIT_S, res
    assert res['maxrss_mb'] < RSS_BOUND_MB, res
    assert not res['marker_seen'], res


# --------------------------------------------------------------------------- valid files
def tiny_net(value=None):
    net = DagNN()
    net.add_layer('conv1', Conv(size=[1, 1, 3, 2]), ['input'], ['prediction'], ['conv1_f', 'conv1_b'])
    net.add_layer('loss', Loss(loss='softmaxlog'), ['prediction', 'label'], ['objective'])
    rng = np.random.default_rng(0)
    for name, shape in (('conv1_f', (1, 1, 3, 2)), ('conv1_b', (2,))):
        v = rng.standard_normal(shape).astype(np.float32) if value is None else np.full(shape, value, np.float32)
        net.get_param(name).value = np.asfortranarray(v)
    return net


def tiny_imdb(path, version='7.3', fill=None):
    data = np.asfortranarray(np.random.default_rng(0).integers(0, 100, (4, 4, 3, 3), dtype=np.uint8))
    if fill is not None:
        data[...] = fill
    save_imdb(path, data, np.array([1.0, 2.0, 1.0]), np.array([1.0, 1.0, 2.0]),
              {'sets': ['train', 'val', 'test']}, version=version)
    return path


def tiny_checkpoint73(tmp_path, name='ckpt.mat'):
    """A checkpoint (net, state, stats) rewritten as v7.3: what load_checkpoint also reads."""
    v7 = tmp_path / 'ckpt_v7.mat'
    stats = {'train': [{'objective': 1.0, 'num': 3.0, 'time': 0.5}], 'val': []}
    save_checkpoint(v7, tiny_net(), {'momentum': {}}, stats)
    out = tmp_path / name
    write_mat(out, read_mat(v7), version='7.3')
    return out


# --------------------------------------------------------------------------- v5 bytes by hand
def v5_header():
    text = b'MATLAB 5.0 MAT-file, written by tests/test_hostile_files.py'
    return text.ljust(116, b' ') + b'\0' * 8 + struct.pack('<H', 0x0100) + b'IM'


def v5_tag(mtype, payload):
    pad = b'\0' * (-len(payload) % 8)
    return struct.pack('<II', mtype, len(payload)) + payload + pad


def v5_matrix_head(cls, dims, name):
    """The array flags, dimensions and name of a miMATRIX (its data elements follow)."""
    return (v5_tag(6, struct.pack('<II', cls, 0)) + v5_tag(5, struct.pack(f'<{len(dims)}i', *dims))
            + v5_tag(1, name.encode()))


def v5_matrix(cls, dims, name, body=b''):
    return v5_tag(14, v5_matrix_head(cls, dims, name) + body)


def v5_compressed(chunks):
    """A miCOMPRESSED element whose stream is the concatenation of ``chunks`` (an iterable
    of bytes, never held at once)."""
    c = zlib.compressobj(9)
    comp = b''.join([c.compress(piece) for piece in chunks] + [c.flush()])
    return struct.pack('<II', 15, len(comp)) + comp


def zeros(n, piece=1 << 24):
    while n > 0:
        k = min(n, piece)
        yield bytes(k)
        n -= k


# --------------------------------------------------------------------------- v7.3 by hand
def mark_matlab(obj, cls):
    obj.attrs['MATLAB_class'] = np.bytes_(cls)


def h5_empty(group, name):
    ds = group.create_dataset(name, data=np.array([0, 0], np.uint64))
    mark_matlab(ds, 'double')
    ds.attrs['MATLAB_empty'] = np.uint8(1)
    return ds


def h5_cell(group, name, targets):
    ds = group.create_dataset(name, data=np.array([t.ref for t in targets], dtype=h5py.ref_dtype))
    mark_matlab(ds, 'cell')
    return ds


def dag73(path, var, levels):
    """A cell whose two references both point at the next level, ``levels`` deep: a DAG of
    ``levels + 1`` objects that is a tree of 2^levels leaves."""
    with h5py.File(path, 'w') as f:
        refs = f.create_group('#refs#')
        below = h5_empty(refs, 'leaf')
        for k in range(levels - 1, 0, -1):
            below = h5_cell(refs, f'l{k}', [below, below])
        h5_cell(f, var, [below, below])
    return path


def many_empties73(path, var, n=1 << 26):
    """A cell of ``n`` references to one empty array, written as compressed raw chunks
    (references on disk are object addresses): an 850 KB file."""
    with h5py.File(path, 'w') as f:
        e = h5_empty(f.create_group('#refs#'), 'e')
        addr = h5py.h5o.get_info(e.id).addr
        ch = 1 << 16
        ds = f.create_dataset(var, shape=(n,), dtype=h5py.ref_dtype, chunks=(ch,), compression='gzip')
        raw = zlib.compress(np.full(ch, addr, '<u8').tobytes(), 9)
        for i in range(n // ch):
            ds.id.write_direct_chunk((i * ch,), raw)
        mark_matlab(ds, 'cell')
    return path


def first_param_ref(f):
    """The reference dataset of ``params(:).value`` and its refs."""
    ds = f['params/value'] if 'params' in f else f['net/params/value']   # a checkpoint: 'net'
    return ds, ds[...]


def outside_bin(tmp_path, n, dtype):
    p = tmp_path / 'outside.bin'
    fill = 0xA5 if np.dtype(dtype) == np.uint8 else MARKER
    np.full(n, fill, dtype).tofile(p)
    return p


def outside_h5(tmp_path, shape, dtype):
    p = tmp_path / 'outside.h5'
    fill = 0xA5 if np.dtype(dtype) == np.uint8 else MARKER
    with h5py.File(p, 'w') as f:
        f.create_dataset('x', data=np.full(shape, fill, dtype))
    return p


def make_fifo_of(p):
    """Replace the outside file by a FIFO: opening it for reading blocks, so a loader that
    as much as opens it hangs (and the test fails on its timeout)."""
    os.unlink(p)
    os.mkfifo(p)


# =========================================================================== item 2
@pytest.mark.parametrize('kind,var', [('model', 'net'), ('imdb', 'images'), ('checkpoint', 'stats'),
                                      ('read_mat', 'x')])
def test_reference_dag_is_decoded_once_and_capped(tmp_path, kind, var):
    """48 levels of a cell whose references share the next level: each object is decoded
    once, and the tree it stands for (2^48 values) is over the element cap."""
    p = dag73(tmp_path / f'dag_{kind}.mat', var, 48)
    assert os.path.getsize(p) < 64 << 10
    assert_clean(load_in_child(kind, p), p, var, 'values', 'PYDAGNN_MAX_ELEMENTS')


def test_reference_dag_within_the_caps_loads_fast(tmp_path):
    """A 14-level DAG (10 s before: the tree was expanded) decodes in one pass, and the
    repeated subtree is the same object."""
    p = dag73(tmp_path / 'dag14.mat', 'x', 14)
    res = load_in_child('read_mat', p)
    assert res['error'] is None and res['seconds'] < 2.0, res
    x = read_mat(p)['x']
    assert x.items[0] is x.items[1]


@pytest.mark.parametrize('kind,var', [('model', 'net'), ('read_mat', 'x')])
def test_reference_cycle_is_an_error(tmp_path, kind, var):
    p = tmp_path / 'cycle.mat'
    with h5py.File(p, 'w') as f:
        refs = f.create_group('#refs#')
        a = refs.create_dataset('a', shape=(1,), dtype=h5py.ref_dtype)
        mark_matlab(a, 'cell')
        a[0] = a.ref                                         # the cell holds itself
        h5_cell(f, var, [a])
    assert_clean(load_in_child(kind, p), p, var, 'cycle')


# =========================================================================== item 3
def test_external_link_is_refused(tmp_path):
    """``params`` (the saved struct's field) as an HDF5 external link to another model's params (all MARKER)."""
    other = tmp_path / 'outside.h5'
    save_matconvnet(tiny_net(MARKER), other, version='7.3')
    p = tmp_path / 'extlink.mat'
    save_matconvnet(tiny_net(), p, version='7.3')
    with h5py.File(p, 'r+') as f:
        del f['params']
        f['params'] = h5py.ExternalLink(str(other), '/params')
    assert_clean(load_in_child('model', p), p, 'params', 'external link')
    make_fifo_of(other)
    assert_clean(load_in_child('model', p), p, 'params', 'external link')


def _swap_param_value(p, make):
    """Point ``params(1).value`` at a new dataset ``make(refs_group)`` returns."""
    with h5py.File(p, 'r+') as f:
        ds, refs = first_param_ref(f)
        new = make(f['#refs#'])
        mark_matlab(new, 'single')
        refs[0] = new.ref
        ds[...] = refs


@pytest.mark.parametrize('kind', ['model', 'checkpoint'])
def test_external_raw_storage_is_refused(tmp_path, kind):
    """A filter whose bytes live in another file (HDF5 external storage)."""
    p = tmp_path / 'ext.mat'
    if kind == 'model':
        save_matconvnet(tiny_net(), p, version='7.3')
    else:
        p = tiny_checkpoint73(tmp_path, 'ext.mat')
    src = outside_bin(tmp_path, 6, np.float32)
    _swap_param_value(p, lambda g: g.create_dataset('zz', shape=(2, 3, 1, 1), dtype=np.float32,
                                                    external=[(str(src), 0, 24)]))
    field = 'params(1).value' if kind == 'model' else 'net.params(1).value'
    assert_clean(load_in_child(kind, p), p, field, 'external file')
    make_fifo_of(src)
    assert_clean(load_in_child(kind, p), p, field, 'external file')


def test_virtual_dataset_is_refused(tmp_path):
    src = outside_h5(tmp_path, (2, 3, 1, 1), np.float32)
    p = tmp_path / 'vds.mat'
    save_matconvnet(tiny_net(), p, version='7.3')

    def make(g):
        layout = h5py.VirtualLayout(shape=(2, 3, 1, 1), dtype=np.float32)
        layout[...] = h5py.VirtualSource(str(src), 'x', shape=(2, 3, 1, 1))
        return g.create_virtual_dataset('zz', layout)
    _swap_param_value(p, make)
    assert_clean(load_in_child('model', p), p, 'params(1).value', 'virtual dataset')
    make_fifo_of(src)
    assert_clean(load_in_child('model', p), p, 'params(1).value', 'virtual dataset')


def test_imdb_images_from_another_file_are_refused(tmp_path):
    """``images.data`` (left on disk, read lazily) in external storage, ``images.labels``
    a virtual dataset, ``meta`` an external link: each refused by name."""
    src = outside_bin(tmp_path, 4 * 4 * 3 * 3, np.uint8)
    p = tiny_imdb(tmp_path / 'ext_data.mat')
    with h5py.File(p, 'r+') as f:
        del f['images/data']
        ds = f['images'].create_dataset('data', shape=(3, 3, 4, 4), dtype=np.uint8,
                                        external=[(str(src), 0, 144)])
        mark_matlab(ds, 'uint8')
    assert_clean(load_in_child('imdb', p), p, 'images.data', 'external file')

    labels = outside_h5(tmp_path, (3, 1), np.float64)
    p2 = tiny_imdb(tmp_path / 'vds_labels.mat')
    with h5py.File(p2, 'r+') as f:
        del f['images/labels']
        layout = h5py.VirtualLayout(shape=(3, 1), dtype=np.float64)
        layout[...] = h5py.VirtualSource(str(labels), 'x', shape=(3, 1))
        mark_matlab(f['images'].create_virtual_dataset('labels', layout), 'double')
    assert_clean(load_in_child('imdb', p2), p2, 'images.labels', 'virtual dataset')

    p3 = tiny_imdb(tmp_path / 'ext_meta.mat')
    with h5py.File(p3, 'r+') as f:
        del f['meta']
        f['meta'] = h5py.ExternalLink(str(labels), '/')
    assert_clean(load_in_child('imdb', p3), p3, 'meta', 'external link')
    for q in (src, labels):
        make_fifo_of(q)
    for q, field in ((p, 'images.data'), (p2, 'images.labels'), (p3, 'meta')):
        assert_clean(load_in_child('imdb', q), q, field)


def test_soft_link_leaving_refs_is_refused(tmp_path):
    p = tmp_path / 'soft.mat'
    save_matconvnet(tiny_net(), p, version='7.3')
    with h5py.File(p, 'r+') as f:
        f.create_dataset('secret', data=np.full((1, 1), MARKER))
        del f['meta']
        f['meta'] = h5py.SoftLink('/secret')
    assert_clean(load_in_child('model', p), p, 'meta', 'soft link', '/secret')


def test_unknown_filter_is_refused_before_hdf5_looks_for_a_plugin(tmp_path):
    p = tmp_path / 'filter.mat'
    with h5py.File(p, 'w') as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((4,))
        dcpl.set_filter(32001, h5py.h5z.FLAG_OPTIONAL)     # blosc: a plugin, if installed
        sid = h5py.h5s.create_simple((4,))
        h5py.h5d.create(f.id, b'x', h5py.h5t.IEEE_F64LE, sid, dcpl=dcpl)
    assert_clean(load_in_child('read_mat', p), p, "'x'", 'filter 32001')


# =========================================================================== item 4
def v5_struct_of_2_40(var):
    """208 bytes: a struct without fields declaring 2^20 x 2^20 elements."""
    body = v5_tag(5, struct.pack('<i', 1)) + v5_tag(1, b'')
    return v5_header() + v5_matrix(2, [1 << 20, 1 << 20], var, body)


@pytest.mark.parametrize('kind,var', [('model', 'net'), ('imdb', 'images'), ('checkpoint', 'stats')])
def test_v5_struct_declaring_2_40_elements(tmp_path, kind, var):
    p = tmp_path / 'huge_struct.mat'
    p.write_bytes(v5_struct_of_2_40(var))
    assert os.path.getsize(p) == 208
    assert_clean(load_in_child(kind, p), p, var, 'values')


@pytest.fixture(scope='module')
def zlib_bombs():
    """Two v7 variables of ~1 MB inflating to 1 GiB: ``lying`` (its tag declares a 1x1
    double, 1 GiB of zeros follow) and ``honest`` (a 2^30 x 1 uint8 array of zeros)."""
    n = 1 << 30
    scalar = v5_matrix(6, [1, 1], 'net', v5_tag(9, struct.pack('<d', 1.0)))
    lying = v5_compressed(chain([scalar], zeros(n)))
    head = v5_matrix_head(9, [n, 1], 'net')
    body_tag = struct.pack('<II', 2, n)
    honest_tag = struct.pack('<II', 14, len(head) + 8 + n)
    honest = v5_compressed(chain([honest_tag, head, body_tag], zeros(n)))
    return {'lying': v5_header() + lying, 'honest': v5_header() + honest}


@pytest.mark.parametrize('kind', ['model', 'checkpoint', 'read_mat'])
def test_v5_zlib_bomb_is_inflated_only_as_far_as_declared(tmp_path, zlib_bombs, kind):
    p = tmp_path / 'bomb.mat'
    p.write_bytes(zlib_bombs['lying'])
    assert os.path.getsize(p) < 2 << 20
    res = load_in_child(kind, p)
    assert res['seconds'] < TIME_LIMIT_S and res['maxrss_mb'] < RSS_BOUND_MB, res
    if kind == 'model':          # a 1x1 double 'net' is no model: a clean error
        assert_clean(res, p, 'net')
    elif kind == 'checkpoint':   # 'net' is skipped by its name, unread: no 'stats'
        assert_clean(res, p, 'stats')


def test_v5_zlib_bomb_is_stopped_by_the_cap(tmp_path, zlib_bombs):
    p = tmp_path / 'bomb_honest.mat'
    p.write_bytes(zlib_bombs['honest'])
    res = load_in_child('model', p, env={'PYDAGNN_MAX_ARRAY_BYTES': '256M'})
    assert_clean(res, p, 'over the cap', 'PYDAGNN_MAX_ARRAY_BYTES')


@pytest.mark.parametrize('kind,var', [('model', 'net'), ('imdb', 'images'), ('checkpoint', 'stats')])
def test_v5_cell_of_2_26_empties(tmp_path, kind, var):
    """~500 KB compressed: a cell declaring 2^26 empty items (512 MB inflated)."""
    n = 1 << 26
    head = v5_matrix_head(1, [n, 1], var)
    empty = struct.pack('<II', 14, 0)
    tag = struct.pack('<II', 14, len(head) + 8 * n)
    body = (empty * (1 << 20) for _ in range(n >> 20))
    p = tmp_path / 'empties_v5.mat'
    p.write_bytes(v5_header() + v5_compressed(chain([tag, head], body)))
    assert os.path.getsize(p) < 2 << 20
    assert_clean(load_in_child(kind, p), p, var, 'values')


@pytest.mark.parametrize('kind,var', [('model', 'net'), ('imdb', 'images'), ('checkpoint', 'stats')])
def test_v73_cell_of_2_26_empties(tmp_path, kind, var):
    p = many_empties73(tmp_path / 'empties.mat', var)
    assert os.path.getsize(p) < 2 << 20
    assert_clean(load_in_child(kind, p), p, var, 'values')


@pytest.mark.parametrize('kind,var,field', [('model', 'net', 'net'), ('read_mat', 'x', 'x'),
                                            ('imdb', 'images', 'images.labels')])
def test_hdf5_declared_shape_of_2gb(tmp_path, kind, var, field):
    """A contiguous dataset declaring 2 GB in a file of a few KB."""
    p = tmp_path / 'shape.mat'
    if kind == 'imdb':
        tiny_imdb(p)
        with h5py.File(p, 'r+') as f:
            del f['images/labels']
            mark_matlab(f['images'].create_dataset('labels', shape=(1 << 28, 1), dtype=np.float64), 'double')
    else:
        with h5py.File(p, 'w') as f:
            mark_matlab(f.create_dataset(var, shape=(1 << 31,), dtype=np.uint8), 'uint8')
    assert os.path.getsize(p) < 64 << 10
    assert_clean(load_in_child(kind, p), p, field, 'bytes')


def test_lazy_images_stay_lazy_past_the_cap(tmp_path):
    """``images.data`` declaring 1 GiB (zeros, gzip chunks: a 1 MB file) loads under a
    64 MB cap: it is left on disk and read an image at a time."""
    p = tiny_imdb(tmp_path / 'big_lazy.mat')
    n, item = 1 << 16, (3, 64, 64)
    with h5py.File(p, 'r+') as f:
        del f['images/data'], f['images/labels'], f['images/set']
        ch = 256
        ds = f['images'].create_dataset('data', shape=(n,) + item, dtype=np.uint8, chunks=(ch,) + item,
                                        compression='gzip')
        raw = zlib.compress(bytes(ch * 3 * 64 * 64), 9)
        for i in range(n // ch):
            ds.id.write_direct_chunk((i * ch, 0, 0, 0), raw)
        mark_matlab(ds, 'uint8')
        for name in ('labels', 'set'):
            mark_matlab(f['images'].create_dataset(name, data=np.ones((n, 1))), 'double')
    assert os.path.getsize(p) < 4 << 20
    res = load_in_child('imdb', p, env={'PYDAGNN_MAX_ARRAY_BYTES': '64M'})
    assert res['error'] is None and res['maxrss_mb'] < RSS_BOUND_MB, res


def test_max_bytes_argument_and_environment(tmp_path, monkeypatch):
    from pydagnn.io.errors import MatFileError
    from pydagnn.io.imdb import load_imdb
    from pydagnn.io.matconvnet import load_matconvnet
    for version in ('7', '7.3'):
        p = tmp_path / f'm{version}.mat'
        save_matconvnet(tiny_net(), p, version=version)
        load_matconvnet(p, max_bytes=1 << 20)
        with pytest.raises(MatFileError, match=r'over the cap.*max_bytes='):
            load_matconvnet(p, max_bytes=8)
        monkeypatch.setenv('PYDAGNN_MAX_ARRAY_BYTES', '8')
        with pytest.raises(MatFileError, match='PYDAGNN_MAX_ARRAY_BYTES'):
            load_matconvnet(p)
        monkeypatch.setenv('PYDAGNN_MAX_ARRAY_BYTES', 'lots')
        with pytest.raises(ValueError, match='PYDAGNN_MAX_ARRAY_BYTES'):
            load_matconvnet(p)
        monkeypatch.delenv('PYDAGNN_MAX_ARRAY_BYTES')
        q = tiny_imdb(tmp_path / f'i{version}.mat', version=version)
        with pytest.raises(MatFileError, match='over the cap'):
            load_imdb(q, max_bytes=16)
        load_imdb(q, max_bytes='1M').close()


# =========================================================================== item 1
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def _convert(src, out):
    return subprocess.run([sys.executable, '-m', 'pydagnn.imdb', 'convert', '--src', str(src), '--out', str(out)],
                          capture_output=True, text=True, timeout=TIME_LIMIT_S * 3)


def _good_batch(k=2, side=4):
    return {'data': np.arange(k * 3 * side * side, dtype=np.uint8).reshape(k, -1) % 251,
            'labels': list(range(1, k + 1)), 'mean': np.zeros(3 * side * side)}


@pytest.mark.parametrize('where', ['train_data_batch_1', 'val_data'])
def test_convert_runs_no_code_from_the_batches(tmp_path, where):
    src = tmp_path / 'src'
    src.mkdir()
    marker = tmp_path / 'pwned'
    for name in ('train_data_batch_1', 'val_data'):
        payload = _good_batch()
        if name == where:
            payload['labels'] = _RunsCode(marker)
        with open(src / name, 'wb') as fh:
            pickle.dump(payload, fh, protocol=2)
    r = _convert(src, tmp_path / 'out.mat')
    assert not marker.exists(), 'the batch ran a command'
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith('error: ') and str(src / where) in lines[-1], r.stderr
    assert 'posix.system' in lines[-1] or 'os.system' in lines[-1], r.stderr
    assert not (tmp_path / 'out.mat').exists()


def test_convert_refuses_hostile_pickles(tmp_path):
    """Other ways a pickle could cost: an object-dtype array (unpickles objects), a
    declared 2^40-byte string, labels as nested lists that share one another (a DAG a
    flat conversion would expand), an ndarray subclass."""
    cases = {}
    cases['object'] = pickle.dumps({'data': np.array([1, 'x'], dtype=object), 'labels': [1]}, protocol=2)
    cases['huge_bytes'] = b'\x80\x04\x8e' + struct.pack('<Q', 1 << 40) + b'abc'
    nested = [1]
    for _ in range(60):
        nested = [nested, nested]
    cases['dag_labels'] = pickle.dumps({'data': np.zeros((2, 48), np.uint8), 'labels': nested}, protocol=2)
    cases['subclass'] = pickle.dumps({'data': np.ma.masked_array(np.zeros((2, 48), np.uint8)),
                                      'labels': [1, 2]}, protocol=2)
    for name, blob in cases.items():
        src = tmp_path / name
        src.mkdir()
        (src / 'train_data_batch_1').write_bytes(blob)
        r = _convert(src, tmp_path / f'{name}.mat')
        assert r.returncode == 2, (name, r)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith('error: ') and 'train_data_batch_1' in last, (name, r.stderr)
        assert 'Traceback' not in r.stderr, (name, r.stderr)


def test_convert_still_reads_real_batches(tmp_path):
    """The format's own pickles (protocols 2 and 4, Python 2-style latin1 strings) pass."""
    from pydagnn.io.batch_pickle import load_batch_pickle
    src = tmp_path / 'src'
    src.mkdir()
    for proto, name in ((2, 'train_data_batch_1'), (4, 'val_data')):
        with open(src / name, 'wb') as fh:
            pickle.dump(_good_batch(), fh, protocol=proto)
    back = load_batch_pickle(src / 'val_data')
    np.testing.assert_array_equal(back['data'], _good_batch()['data'])
    assert back['labels'] == [1, 2]
    r = _convert(src, tmp_path / 'ok.mat')
    assert r.returncode == 0, r.stderr
