"""imdb.mat: reading MATLAB's file, writing MATLAB's layout, lazy indexing, bad files,
conversion from downsampled-ImageNet batches and the synthetic data set."""
import multiprocessing
import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest
import scipy.io

from pydagnn.io.errors import MatFileError
from pydagnn.io.imdb import (ImageArray, Imdb, ImdbWriter, RgbStats, convert_imagenet64, load_imdb,
                             repack_imdb, save_imdb, synth_imdb)
from pydagnn.testing import shared_path

FAKE = ('data', 'imdb_fake.mat')


def _small(n=7, h=6, w=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    data = np.asfortranarray(rng.integers(0, 256, (h, w, c, n), dtype=np.uint8))
    labels = rng.integers(1, 5, n).astype(np.float64)
    sets = np.r_[np.ones(n - 2), 2 * np.ones(2)]
    meta = {'sets': ['train', 'val', 'test'], 'rgbMean': np.array([[1.5], [2.5], [3.5]]),
            'rgbCovariance': np.arange(9.0).reshape(3, 3), 'classes': ['a', 'bb', 'ccc', 'dddd'],
            'note': 'hello', 'nested': {'k': 3.0, 'flag': np.array([True, False])}}
    return data, labels, sets, meta


def _check_same(imdb, data, labels, sets):
    assert imdb.images.data.shape == data.shape
    got = np.asarray(imdb.images.data)
    assert got.flags.f_contiguous and got.dtype == np.uint8
    np.testing.assert_array_equal(got, data)
    np.testing.assert_array_equal(imdb.images.labels, labels)
    np.testing.assert_array_equal(imdb.images.set, sets)
    assert imdb.images.labels.ndim == 1 and imdb.images.set.ndim == 1


# ------------------------------------------------------------------------ MATLAB's file

def test_fake_matches_h5py():
    path = shared_path(*FAKE)
    with h5py.File(path, 'r') as f:
        data = f['images/data'][()].T
        labels = f['images/labels'][()].ravel()
        sets = f['images/set'][()].ravel()
        mean = f['meta/rgbMean'][()].ravel()
        cov = f['meta/rgbCovariance'][()].T
        names = [''.join(map(chr, f[r][()].ravel())) for r in f['meta/sets'][()].ravel()]
    with load_imdb(path) as imdb:
        assert imdb.version == '7.3' and imdb['images'] is imdb.images
        assert imdb.images.data.shape == (64, 64, 3, 10) and imdb.images.data.dtype == np.uint8
        assert not imdb.images.data.in_memory
        _check_same(imdb, data, labels, sets)
        assert list(imdb.images.keys()) == ['data', 'labels', 'set']
        assert imdb.meta.sets == names == ['train', 'val', 'test']
        np.testing.assert_array_equal(imdb.meta.rgbMean, mean)
        assert imdb.meta.rgbMean.shape == (3,)
        np.testing.assert_array_equal(imdb.meta.rgbCovariance, cov)
        np.testing.assert_array_equal(imdb.images.data[:, :, :, [9, 0, 3]], data[:, :, :, [9, 0, 3]])


def _tree(path):
    """name -> (kind, shape, dtype, {attr: (value, HDF5 type)}) for every object."""
    out = {}
    with h5py.File(path, 'r') as f:
        assert f.userblock_size == 512
        def visit(name, obj):
            attrs = {}
            for k in obj.attrs:
                aid = h5py.h5a.open(obj.id, k.encode())
                v = obj.attrs[k]
                if k == 'MATLAB_fields':
                    v = tuple(b''.join(x).decode() for x in v)
                elif isinstance(v, np.ndarray):
                    v = v.tolist()
                attrs[k] = (v, aid.get_type())
            kind = type(obj).__name__
            shape = getattr(obj, 'shape', None)
            dtype = str(obj.dtype) if kind == 'Dataset' else None
            out[name] = (kind, shape, dtype, attrs)
        f.visititems(visit)
    return out


def test_written_file_has_matlab_layout(tmp_path):
    fake = shared_path(*FAKE)
    with load_imdb(fake) as imdb:
        meta = {'sets': imdb.meta.sets, 'rgbMean': imdb.meta.rgbMean,   # 1-D: a 1 x 3 row
                'rgbCovariance': imdb.meta.rgbCovariance}
        for layout in ('contiguous', 'chunked'):
            out = tmp_path / f'{layout}.mat'
            save_imdb(out, imdb.images.data, imdb.images.labels, imdb.images.set, meta, layout=layout)
            ref, got = _tree(fake), _tree(out)
            assert sorted(ref) == sorted(got)
            for name in ref:
                rk, rs, rd, ra = ref[name]
                gk, gs, gd, ga = got[name]
                assert (rk, rs, rd) == (gk, gs, gd), name
                assert sorted(ra) == sorted(ga), name
                for k in ra:
                    assert ra[k][0] == ga[k][0], (name, k)
                    assert ra[k][1] == ga[k][1], (name, k, 'HDF5 attribute type')   # H5Tequal
            with open(out, 'rb') as fh:
                head = fh.read(128)
            assert head.startswith(b'MATLAB 7.3 MAT-file, Platform: ')
            assert head[116:124] == b'\0' * 8 and head[124:128] == b'\x00\x02IM'
            with h5py.File(out, 'r') as f:
                assert f['images/data'].compression is None
                if layout == 'chunked':
                    assert f['images/data'].chunks == (1, 3, 64, 64)
                    assert f['images/data'].maxshape == (None, 3, 64, 64)
                else:
                    assert f['images/data'].chunks is None
                assert f['images/labels'].id.get_create_plist().get_layout() == h5py.h5d.COMPACT
            back = load_imdb(out)
            np.testing.assert_array_equal(np.asarray(back.images.data), np.asarray(imdb.images.data))
            back.close()


# ------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize('version,layout,compression', [('7.3', 'contiguous', None), ('7.3', 'chunked', None),
                                                        ('7.3', 'chunked', 3), ('7', 'contiguous', None)])
def test_round_trip(tmp_path, version, layout, compression):
    data, labels, sets, meta = _small()
    path = tmp_path / 'x.mat'
    save_imdb(path, data, labels, sets, meta, version=version, layout=layout, compression=compression)
    with load_imdb(path) as imdb:
        assert imdb.version == version
        _check_same(imdb, data, labels, sets)
        m = imdb.meta
        assert m.sets == ['train', 'val', 'test'] and m.classes == ['a', 'bb', 'ccc', 'dddd']
        assert m.note == 'hello'
        np.testing.assert_array_equal(m.rgbMean, [1.5, 2.5, 3.5])
        np.testing.assert_array_equal(m.rgbCovariance, np.arange(9.0).reshape(3, 3))
        assert float(np.squeeze(m.nested.k)) == 3.0
        np.testing.assert_array_equal(np.ravel(m.nested.flag), [True, False])
    assert os.listdir(tmp_path) == ['x.mat']            # no temporary left behind
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask   # not mkstemp's 0600
    if version == '7':
        raw = scipy.io.loadmat(path)                   # MATLAB v7 as scipy (and MATLAB) read it
        assert raw['images']['data'][0, 0].shape == data.shape


def test_round_trip_across_versions(tmp_path):
    fake = shared_path(*FAKE)
    ref = load_imdb(fake)
    a, b = tmp_path / 'a7.mat', tmp_path / 'b73.mat'
    save_imdb(a, ref.images.data, ref.images.labels, ref.images.set, ref.meta, version='7')
    with load_imdb(a) as v7:
        assert v7.version == '7' and v7.images.data.in_memory
        save_imdb(b, v7.images.data, v7.images.labels, v7.images.set, v7.meta, version='7.3')
    with load_imdb(b) as v73:
        _check_same(v73, np.asarray(ref.images.data), ref.images.labels, ref.images.set)
        np.testing.assert_array_equal(v73.meta.rgbCovariance, ref.meta.rgbCovariance)
        assert v73.meta.sets == ref.meta.sets
    ref.close()


def test_repack_matlab_file(tmp_path):
    fake = shared_path(*FAKE)
    out = repack_imdb(fake, tmp_path / 'fast.mat')
    with load_imdb(fake) as a, load_imdb(out) as b:
        assert type(b.images.data._source).__name__ == '_PreadSource'
        _check_same(b, np.asarray(a.images.data), a.images.labels, a.images.set)
        np.testing.assert_array_equal(b.meta.rgbMean, a.meta.rgbMean)
        np.testing.assert_array_equal(b.meta.rgbCovariance, a.meta.rgbCovariance)
        assert b.meta.sets == a.meta.sets


def test_struct_wrapped_in_imdb_variable(tmp_path):
    data, labels, sets, _ = _small()
    p = tmp_path / 'wrapped.mat'
    scipy.io.savemat(p, {'imdb': {'images': {'data': data, 'labels': labels, 'set': sets},
                                  'meta': {'sets': np.array([['train', 'val']], dtype=object)}}})
    with load_imdb(p) as imdb:
        _check_same(imdb, data, labels, sets)
        assert imdb.meta.sets == ['train', 'val']


# ---------------------------------------------------------------------------------- indexing

@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    """The same 23 images stored every way the reader handles."""
    d = tmp_path_factory.mktemp('src')
    rng = np.random.default_rng(1)
    n = 23
    data = np.asfortranarray(rng.integers(0, 256, (9, 7, 3, n), dtype=np.uint8))
    labels, sets = np.arange(1, n + 1), np.ones(n)
    out = {}
    for name, kw in {'contiguous': dict(layout='contiguous'), 'chunked': dict(layout='chunked'),
                     'gzip': dict(layout='chunked', compression=4), 'v7': dict(version='7')}.items():
        save_imdb(d / f'{name}.mat', data, labels, sets, None, **kw)
        out[name] = d / f'{name}.mat'
    # MATLAB-like: several images per gzip chunk, the width split in two chunks
    p = d / 'matlab_chunks.mat'
    save_imdb(p, data, labels, sets, None, layout='contiguous')
    with h5py.File(p, 'r+') as f:
        raw = f['images/data'][()]
        del f['images/data']
        ds = f['images'].create_dataset('data', data=raw, chunks=(5, 3, 4, 9), compression='gzip',
                                        maxshape=(None, 3, 7, 9))
        ds.attrs['MATLAB_class'] = np.bytes_('uint8')
    out['matlab_chunks'] = p
    # shuffle + fletcher32: the generic h5py path
    p = d / 'generic.mat'
    save_imdb(p, data, labels, sets, None, layout='contiguous')
    with h5py.File(p, 'r+') as f:
        raw = f['images/data'][()]
        del f['images/data']
        f['images'].create_dataset('data', data=raw, chunks=(3, 3, 7, 9), shuffle=True, fletcher32=True)
    out['generic'] = p
    return data, out


INDEXES = [
    ('int', 5), ('neg int', -1), ('np int', np.int64(3)), ('slice', slice(2, 11)),
    ('step slice', slice(1, None, 4)), ('reverse slice', slice(None, None, -3)),
    ('list', [4, 0, 22]), ('unsorted dup', [9, 3, 9, 0, 3, 22, 21]), ('neg list', [-1, -23, 5]),
    ('array', np.array([7, 8, 9, 10])), ('bool', np.arange(23) % 3 == 1), ('empty', []),
    ('all', slice(None)),
]


@pytest.mark.parametrize('kind', ['contiguous', 'chunked', 'gzip', 'v7', 'matlab_chunks', 'generic'])
def test_indexing_matches_memory(sources, kind):
    ref, paths = sources
    with load_imdb(paths[kind]) as imdb:
        data = imdb.images.data
        assert isinstance(data, ImageArray) and data.shape == ref.shape
        for label, idx in INDEXES:
            got = data[:, :, :, idx]
            want = ref[:, :, :, idx]
            assert got.shape == want.shape, label
            assert got.flags.f_contiguous, label
            np.testing.assert_array_equal(got, want, err_msg=label)
        np.testing.assert_array_equal(data[..., [2, 1]], ref[..., [2, 1]])
        np.testing.assert_array_equal(data[1:4, ::2, 0, [5, 6]], ref[1:4, ::2, 0, [5, 6]])
        np.testing.assert_array_equal(data[0, :, 1, 7], ref[0, :, 1, 7])
        np.testing.assert_array_equal(data[2, 1:, :, np.array(4)], ref[2, 1:, :, 4])
        np.testing.assert_array_equal(np.asarray(data), ref)
        np.testing.assert_array_equal(np.asarray(data, dtype=np.float32), ref.astype(np.float32))
        buf = np.zeros((9, 7, 3, 5), np.uint8, order='F')               # a reused output buffer
        for idx in ([4, 3, 2, 1, 0], [22, 21, 22, 0, 1], slice(10, 15)):
            assert data.read(idx, out=buf) is not None
            np.testing.assert_array_equal(buf, ref[:, :, :, idx])
        with pytest.raises(ValueError, match='Fortran'):
            data.read([1, 2], out=buf)
        with pytest.raises(IndexError):
            data[:, :, :, 23]
        with pytest.raises(IndexError):
            data[:, :, :, [0, -24]]
        with pytest.raises(IndexError):
            data[:, :, :, np.ones(5, bool)]
        with pytest.raises(IndexError):
            data[0]
        with pytest.raises(IndexError):
            data[:, :, :, [0.5]]


def test_pickle_close_and_processes(sources):
    ref, paths = sources
    for kind in ('contiguous', 'gzip'):
        imdb = load_imdb(paths[kind])
        blob = pickle.dumps(imdb)
        imdb.close()
        with pytest.raises(ValueError, match='closed'):
            imdb.images.data[:, :, :, 0]
        copy = pickle.loads(blob)                       # a copy reopens the file on first read
        assert isinstance(copy, Imdb) and copy.path == imdb.path
        np.testing.assert_array_equal(copy.images.data[:, :, :, [3, 1]], ref[:, :, :, [3, 1]])
        ctx = multiprocessing.get_context('fork')
        with ctx.Pool(1) as pool:                       # a forked child inherits the open file
            got = pool.apply(_read_in_child, (copy, [4, 2, 4]))
        np.testing.assert_array_equal(got, ref[:, :, :, [4, 2, 4]])
        copy.close()
    # a fresh interpreter, given the pickle
    code = ('import pickle,sys,numpy as np; imdb = pickle.loads(sys.stdin.buffer.read()); '
            'sys.stdout.buffer.write(np.ascontiguousarray(imdb.images.data[:, :, :, [0, 22]]).tobytes())')
    res = subprocess.run([sys.executable, '-c', code], input=pickle.dumps(load_imdb(paths['contiguous'])),
                         capture_output=True, check=True)
    np.testing.assert_array_equal(np.frombuffer(res.stdout, np.uint8),
                                  np.ascontiguousarray(ref[:, :, :, [0, 22]]).ravel())


def test_file_replaced_after_load(tmp_path):
    data, labels, sets, meta = _small()
    p = tmp_path / 'x.mat'
    save_imdb(p, data, labels, sets, meta)
    blob = pickle.dumps(load_imdb(p))
    save_imdb(p, data[:, :, :, :5], labels[:5], sets[:5], meta)
    with pytest.raises(MatFileError, match='changed'):
        pickle.loads(blob).images.data[:, :, :, 0]


def _read_in_child(imdb, idx):
    return imdb.images.data[:, :, :, idx]


# ---------------------------------------------------------------------------------- bad input

def _h5_imdb(path, data=None, labels=None, sets=None, drop=(), data_class='uint8'):
    n = 4
    data = np.zeros((n, 3, 5, 5), np.uint8) if data is None else data
    labels = np.ones((n, 1)) if labels is None else labels
    sets = np.ones((n, 1)) if sets is None else sets
    with h5py.File(path, 'w', userblock_size=512) as f:
        if 'images' in drop:
            f.create_dataset('other', data=np.zeros(3))
            return path
        g = f.create_group('images')
        g.attrs['MATLAB_class'] = np.bytes_('struct')
        for name, v, cls in (('data', data, data_class), ('labels', labels, 'double'), ('set', sets, 'double')):
            if name in drop:
                continue
            ds = g.create_dataset(name, data=v)
            ds.attrs['MATLAB_class'] = np.bytes_(cls)
    return path


def _v7_imdb(path, data=None, labels=None, drop=()):
    data = np.zeros((5, 5, 3, 4), np.uint8) if data is None else data
    images = {'data': data, 'labels': np.ones((1, 4)) if labels is None else labels, 'set': np.ones((1, 4))}
    for k in drop:
        images.pop(k, None)
    scipy.io.savemat(path, {'images': images} if 'images' not in drop else {'x': 1.0})
    return path


BAD = {
    'h5 no images': (lambda p: _h5_imdb(p, drop=('images',)), 'images'),
    'h5 no data': (lambda p: _h5_imdb(p, drop=('data',)), 'images.data'),
    'h5 no labels': (lambda p: _h5_imdb(p, drop=('labels',)), 'images.labels'),
    'h5 no set': (lambda p: _h5_imdb(p, drop=('set',)), 'images.set'),
    'h5 label count': (lambda p: _h5_imdb(p, labels=np.ones((3, 1))), 'images.labels'),
    'h5 float data': (lambda p: _h5_imdb(p, data=np.zeros((4, 3, 5, 5), np.float32), data_class='single'),
                      'images.data'),
    'h5 2-D data': (lambda p: _h5_imdb(p, data=np.zeros((4, 75), np.uint8)), 'images.data'),
    'h5 char labels': (lambda p: _h5_imdb(p, labels=np.array([[1, 2, 3, 4]], np.uint16).T), None),
    'v7 no images': (lambda p: _v7_imdb(p, drop=('images',)), 'images'),
    'v7 no data': (lambda p: _v7_imdb(p, drop=('data',)), 'images.data'),
    'v7 no labels': (lambda p: _v7_imdb(p, drop=('labels',)), 'images.labels'),
    'v7 label count': (lambda p: _v7_imdb(p, labels=np.ones((1, 5))), 'images.labels'),
    'v7 double data': (lambda p: _v7_imdb(p, data=np.zeros((5, 5, 3, 4))), 'images.data'),
    'v7 2-D data': (lambda p: _v7_imdb(p, data=np.zeros((75, 4), np.uint8)), 'images.data'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_imdb_fields(tmp_path, case):
    make, field = BAD[case]
    p = str(make(str(tmp_path / 'bad.mat')))
    if case == 'h5 char labels':   # labels stored as MATLAB char: not numeric
        with h5py.File(p, 'r+') as f:
            f['images/labels'].attrs['MATLAB_class'] = np.bytes_('char')
        field = 'images.labels'
    with pytest.raises(MatFileError) as e:
        load_imdb(p)
    assert p in str(e.value) and e.value.path == p
    assert e.value.field == field and repr(field) in str(e.value)
    assert pickle.loads(pickle.dumps(e.value)).field == field


def test_bad_files(tmp_path):
    data, labels, sets, meta = _small(n=50)
    good73 = tmp_path / 'good73.mat'
    save_imdb(good73, data, labels, sets, meta)
    good7 = tmp_path / 'good7.mat'
    save_imdb(good7, data, labels, sets, meta, version='7')
    blobs = {'text': b'this is not a mat file\n' * 20, 'empty': b'',
             'header only 7.3': good73.read_bytes()[:512], 'header only 7': good7.read_bytes()[:100],
             'npy': b'\x93NUMPY' + b'\0' * 200}
    b73 = good73.read_bytes()
    with h5py.File(good73, 'r') as f:
        end_of_images = f['images/data'].id.get_offset() + data.size
    for cut in (600, 4000, end_of_images - 100, len(b73) - 300):
        blobs[f'7.3 cut at {cut}'] = b73[:cut]
    b7 = good7.read_bytes()
    for cut in (130, 300, len(b7) // 2, len(b7) - 10):
        blobs[f'7 cut at {cut}'] = b7[:cut]
    for name, blob in blobs.items():
        p = tmp_path / 'bad.mat'
        p.write_bytes(blob)
        try:
            imdb = load_imdb(p)
        except MatFileError as e:
            assert str(p) in str(e), name
            continue
        # the cut only hit image bytes: reading them must say so
        with pytest.raises(MatFileError, match='images.data'):
            np.asarray(imdb.images.data)
    with pytest.raises(FileNotFoundError):
        load_imdb(tmp_path / 'missing.mat')
    with pytest.raises(MatFileError, match='directory'):
        load_imdb(tmp_path)


def test_fuzz_mutations(tmp_path):
    rng = np.random.default_rng(1234)
    data, labels, sets, meta = _small(n=3, h=4, w=4)
    outcomes = {'ok': 0, 'error': 0}
    for version in ('7.3', '7'):
        good = tmp_path / f'good{version}.mat'
        save_imdb(good, data, labels, sets, meta, version=version)
        blob = bytearray(good.read_bytes())
        for trial in range(50):
            b = bytearray(blob)
            for _ in range(int(rng.integers(1, 6))):
                pos = int(rng.integers(0, len(b)))
                b[pos] = int(rng.integers(0, 256))
            if trial % 10 == 9:
                b = b[:int(rng.integers(1, len(b)))]
            p = tmp_path / 'fuzz.mat'
            p.write_bytes(bytes(b))
            try:
                with load_imdb(p) as imdb:
                    np.asarray(imdb.images.data)
                    imdb.images.data[:, :, :, [0, 0]]
                outcomes['ok'] += 1
            except MatFileError as e:
                assert str(p) in str(e)
                outcomes['error'] += 1
    assert outcomes['ok'] + outcomes['error'] == 100
    assert outcomes['error'] > 0


def test_writer_never_leaves_half_a_file(tmp_path):
    data, labels, sets, meta = _small()
    path = tmp_path / 'out.mat'
    path.write_bytes(b'previous contents')
    with pytest.raises(RuntimeError):
        with ImdbWriter(path, 7, image_size=(6, 5)) as w:
            w.append(data[:, :, :, :3], labels[:3], 1)
            raise RuntimeError('crash while writing')
    with pytest.raises(ValueError, match='3 images written'):
        with ImdbWriter(path, 7, image_size=(6, 5)) as w:
            w.append(data[:, :, :, :3], labels[:3], 1)
    with ImdbWriter(path, 7, image_size=(6, 5)) as w:
        with pytest.raises(ValueError, match='exceed'):
            w.append(np.zeros((6, 5, 3, 8), np.uint8), np.ones(8), 1)
        with pytest.raises(TypeError, match='uint8'):
            w.append(data.astype(np.float32), labels, sets)
        with pytest.raises(ValueError, match='6 x 5 x 3'):
            w.append(np.zeros((5, 6, 3, 1), np.uint8), [1], 1)
        with pytest.raises(ValueError, match='labels'):
            w.append(data, labels[:3], sets)
        w.append(data[:, :, :, :4], labels[:4], sets[:4])
        w.append(data[:, :, :, 4], labels[4], sets[4])            # one H x W x C image
        w.append(data[:, :, :, 5:], labels[5:], sets[5:])
        w.meta['rgbMean'] = np.array([1.0, 2.0, 3.0])
    assert sorted(os.listdir(tmp_path)) == ['out.mat']
    with load_imdb(path) as imdb:
        _check_same(imdb, data, labels, sets)
        np.testing.assert_array_equal(imdb.meta.rgbMean, [1, 2, 3])
    for bad in (dict(data=data.astype(np.int16)), dict(labels=labels[:-1]), dict(set=sets[:2]),
                dict(data=data[:, :, 0, 0])):
        args = dict(data=data, labels=labels, set=sets)
        args.update(bad)
        with pytest.raises((ValueError, TypeError)):
            save_imdb(tmp_path / 'x.mat', args['data'], args['labels'], args['set'])
        with pytest.raises((ValueError, TypeError)):
            save_imdb(tmp_path / 'x.mat', args['data'], args['labels'], args['set'], version='7')
    assert sorted(os.listdir(tmp_path)) == ['out.mat']


# -------------------------------------------------------------------------- colour statistics

def test_rgb_stats_exact_and_chunk_invariant():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (8, 9, 3, 40), dtype=np.uint8)
    a, b = RgbStats(3), RgbStats(3)
    a.update(x)
    for i in range(0, 40, 7):
        b.update(x[:, :, :, i:i + 7], block=3)
    pix = x.transpose(2, 0, 1, 3).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(a.mean(), pix.mean(1), rtol=1e-14)
    np.testing.assert_allclose(a.covariance(), np.cov(pix, bias=True), rtol=1e-12)
    np.testing.assert_array_equal(a.covariance(), b.covariance())
    np.testing.assert_array_equal(a.mean(), b.mean())


# ------------------------------------------------------------------------------- conversion

def _fake_batches(d, side=8, sizes=(5, 4), nval=3, npz=False, seed=0):
    """Downsampled-ImageNet batches: rows of 3 row-major planes; image i has
    R = row index, G = column index, B = 10 * i (mod 256), so orientation is checkable."""
    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(side), np.arange(side), indexing='ij')
    allx, ally = [], []
    count = 0
    for fi, k in enumerate(list(sizes) + [nval]):
        rows = []
        for _ in range(k):
            planes = np.stack([r, c, np.full_like(r, (10 * count) % 256)]) + rng.integers(0, 3, (3, side, side))
            rows.append(planes.astype(np.uint8).reshape(-1))
            count += 1
        x = np.stack(rows)
        y = list(rng.integers(1, 1001, k).tolist())
        name = f'train_data_batch_{fi + 1}' if fi < len(sizes) else 'val_data'
        payload = {'data': x, 'labels': y, 'mean': x.mean(0)}
        if npz:
            np.savez(os.path.join(d, name + '.npz'), **payload)
        else:
            with open(os.path.join(d, name), 'wb') as fh:
                pickle.dump(payload, fh, protocol=2)
        allx.append(x)
        ally += y
    return np.concatenate(allx), np.array(ally, np.float64)


@pytest.mark.parametrize('npz', [False, True])
def test_convert_imagenet64(tmp_path, npz):
    src = tmp_path / 'src'
    src.mkdir()
    # batch files beyond 9 must sort numerically (train_data_batch_10 after _2)
    sizes = (3, 2, 2, 2, 2, 2, 2, 2, 2, 4)
    rows, labels = _fake_batches(str(src), sizes=sizes, npz=npz)
    out = tmp_path / 'imdb.mat'
    convert_imagenet64(src, out, chunk=3)
    ntrain = sum(sizes)
    with load_imdb(out) as imdb:
        d = np.asarray(imdb.images.data)
        assert d.shape == (8, 8, 3, ntrain + 3)
        r, c = np.meshgrid(np.arange(8), np.arange(8), indexing='ij')
        assert np.all(d[:, :, 0, :] - r[:, :, None] <= 2) and np.all(d[:, :, 0, :] >= r[:, :, None])  # upright
        assert np.all(d[:, :, 1, :] - c[:, :, None] <= 2) and np.all(d[:, :, 1, :] >= c[:, :, None])
        np.testing.assert_array_equal(d[0, 0, 2, :] // 10 * 10, (10 * np.arange(ntrain + 3)) % 256 // 10 * 10)
        np.testing.assert_array_equal(d, rows.reshape(-1, 3, 8, 8).transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(imdb.images.labels, labels)
        np.testing.assert_array_equal(imdb.images.set, np.r_[np.ones(ntrain), 2 * np.ones(3)])
        pix = rows[:ntrain].reshape(ntrain, 3, -1).transpose(1, 0, 2).reshape(3, -1).astype(np.float64)
        np.testing.assert_allclose(imdb.meta.rgbMean, pix.mean(1), rtol=1e-13)
        np.testing.assert_allclose(imdb.meta.rgbCovariance, np.cov(pix, bias=True), rtol=1e-11, atol=1e-12)
        assert imdb.meta.sets == ['train', 'val', 'test']
    with h5py.File(out, 'r') as f:
        assert f['meta/rgbMean'].shape == (1, 3)   # MATLAB 3 x 1


def test_cli_convert_repack_synth_info(tmp_path):
    from pydagnn.imdb import main
    src = tmp_path / 'src'
    src.mkdir()
    rows, labels = _fake_batches(str(src), sizes=(4,), nval=2)
    out = tmp_path / 'a.mat'
    assert main(['convert', '--src', str(src), '--out', str(out), '--layout', 'chunked']) == 0
    with h5py.File(out, 'r') as f:
        assert f['images/data'].chunks == (1, 3, 8, 8)
    again = tmp_path / 'b.mat'
    assert main(['convert', '--src', str(out), '--out', str(again)]) == 0    # repack a .mat
    with load_imdb(out) as x, load_imdb(again) as y:
        np.testing.assert_array_equal(np.asarray(x.images.data), np.asarray(y.images.data))
        np.testing.assert_array_equal(x.meta.rgbCovariance, y.meta.rgbCovariance)
        np.testing.assert_array_equal(x.meta.rgbMean, y.meta.rgbMean)
    assert main(['convert', '--src', str(tmp_path / 'nothing'), '--out', str(tmp_path / 'c.mat')]) == 2
    assert main(['info', str(tmp_path / 'src' / 'val_data')]) == 2          # a pickle is no MAT-file
    assert not (tmp_path / 'c.mat').exists()
    res = subprocess.run([sys.executable, '-m', 'pydagnn.imdb', 'synth', '--out', str(tmp_path / 's.mat'),
                          '--num-train', '12', '--num-val', '4', '--num-classes', '3', '--size', '16'],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr
    assert '"data": [16, 16, 3, 16]' in res.stdout


# ------------------------------------------------------------------------------------- synth

def test_synth_is_deterministic_balanced_and_learnable(tmp_path):
    kw = dict(num_train=400, num_val=60, num_classes=6, size=12)
    a, b, c = tmp_path / 'a.mat', tmp_path / 'b.mat', tmp_path / 'c.mat'
    synth_imdb(a, seed=7, **kw)
    synth_imdb(b, seed=7, chunk=300, **kw)
    synth_imdb(c, seed=8, **kw)
    with load_imdb(a) as x, load_imdb(b) as y, load_imdb(c) as z:
        X = np.asarray(x.images.data)
        np.testing.assert_array_equal(X, np.asarray(y.images.data))
        assert not np.array_equal(X, np.asarray(z.images.data))
        lab, st = x.images.labels, x.images.set
        assert X.shape == (12, 12, 3, 460)
        np.testing.assert_array_equal(st, np.r_[np.ones(400), 2 * np.ones(60)])
        assert set(np.unique(lab)) == set(range(1, 7))
        counts = np.bincount(lab[:400].astype(int))[1:]
        assert counts.max() - counts.min() <= 1 and np.all(np.bincount(lab[400:].astype(int))[1:] == 10)
        pix = X[:, :, :, :400].transpose(2, 0, 1, 3).reshape(3, -1).astype(np.float64)
        np.testing.assert_allclose(x.meta.rgbMean, pix.mean(1), rtol=1e-12)
        np.testing.assert_allclose(x.meta.rgbCovariance, np.cov(pix, bias=True), rtol=1e-10)
        # learnable: even a nearest-class-mean rule on (flip-averaged) pixels separates the classes
        feats = X.astype(np.float64)
        feats = (feats + feats[:, ::-1]).reshape(-1, 460).T
        means = np.stack([feats[:400][lab[:400] == k].mean(0) for k in range(1, 7)])
        pred = np.argmin(((feats[400:, None, :] - means[None]) ** 2).sum(-1), axis=1) + 1
        assert np.mean(pred == lab[400:]) > 0.9
    v7 = tmp_path / 'v7.mat'
    synth_imdb(v7, seed=7, version='7', **kw)
    with load_imdb(v7) as w:
        np.testing.assert_array_equal(np.asarray(w.images.data), X)
