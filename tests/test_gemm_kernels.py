"""The generated GEMM kernels (layers/kernels/gemm_cpu.py) and the implicit-GEMM
convolution path built on them (layers/conv.py, _Implicit): every variant against a
float64 product on edge shapes, the offset-table bounds checks, and the convolutions
against the im2col + OpenBLAS path (PYDAGNN_CONV_GEMM=blas)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from pydagnn.layers import conv as cv
from pydagnn.layers import conv_implicit as ci
from pydagnn.layers.kernels import gemm_cpu as G
from pydagnn.layers.kernels import im2col_cpu as K
from pydagnn.layers.kernels.threads_cpu import num_workers

pytestmark = pytest.mark.skipif(not G._library(), reason='the GEMM kernels did not compile here')

SHAPES = [(16, 144, 4096), (5, 7, 33), (13, 1, 17), (1, 300, 70), (40, 9, 1), (3, 0, 5), (0, 4, 6),
          (9, 31, 100)]


def _variants(dt, mode=''):
    lib = G._library()
    return [k for (d, _, m), k in lib.kernels.items() if d == np.dtype(dt) and m == mode]


def _tol(dt, K):
    return (1e-5 if dt == np.float32 else 1e-13) * np.sqrt(K + 1) * 10


@pytest.mark.parametrize('dt', [np.float32, np.float64])
@pytest.mark.parametrize('M,Kr,N', SHAPES)
def test_strided_and_packed_operands(dt, M, Kr, N):
    rng = np.random.default_rng(M * 1000 + Kr * 10 + N)
    A = rng.standard_normal((M, Kr)).astype(dt)
    B = rng.standard_normal((Kr, N)).astype(dt)
    ref = A.astype(np.float64) @ B
    for k in _variants(dt):
        C = np.full((M, N), 7, dt)
        k.run(A, B, C)
        np.testing.assert_allclose(C, ref, atol=_tol(dt, Kr), err_msg=repr(k))
        # A transposed view (column strides), packed row blocks; B as a strided view;
        # accumulate onto ones
        C = np.ones((M, N), dt)
        k.run(np.asfortranarray(A), np.ascontiguousarray(B), C, accumulate=True)
        np.testing.assert_allclose(C, ref + 1, atol=_tol(dt, Kr), err_msg=repr(k))
        if M and Kr:
            ap = np.empty(k.a_panel_shape(M, Kr), dt)
            K.pack_row_blocks(A, ap)
            C = np.zeros((M, N + 3), dt)[:, 1:N + 1]   # C a view with a row stride
            k.run(ap, B, C, a_panels=True)
            np.testing.assert_allclose(C, ref, atol=_tol(dt, Kr), err_msg=repr(k))


@pytest.mark.parametrize('dt', [np.float32, np.float64])
def test_offset_tables(dt):
    """B's rows (mode btab) and A's rows (mode atab) through offset tables into one
    vector: the same product as the gathered matrix."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(500).astype(dt)
    M, Kr, N = 11, 13, 37
    offs = rng.integers(0, 500 - N, size=Kr).astype(np.int64)
    B = np.stack([base[o:o + N] for o in offs])
    A = rng.standard_normal((M, Kr)).astype(dt)
    for k in _variants(dt, 'btab'):
        C = np.empty((M, N), dt)
        ap = np.empty(k.a_panel_shape(M, Kr), dt)
        K.pack_row_blocks(A, ap)
        k.run(ap, base, C, a_panels=True, b_offsets=offs)
        np.testing.assert_allclose(C, A.astype(np.float64) @ B, atol=_tol(dt, Kr), err_msg=repr(k))
    aoffs = rng.integers(0, 500 - Kr, size=M).astype(np.int64)
    A2 = np.stack([base[o:o + Kr] for o in aoffs])
    B2 = rng.standard_normal((Kr, N)).astype(dt)
    for k in _variants(dt, 'atab'):
        C = np.ones((M, N), dt)
        k.run(base, B2, C, accumulate=True, a_offsets=aoffs)
        np.testing.assert_allclose(C, A2.astype(np.float64) @ B2 + 1, atol=_tol(dt, Kr), err_msg=repr(k))


def test_offset_tables_are_bounds_checked():
    k = G.kernel_for(4, 8, np.float32, mode='btab')
    base = np.zeros(20, np.float32)
    A = np.zeros(k.a_panel_shape(4, 2), np.float32)
    C = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match='outside'):
        k.run(A, base, C, a_panels=True, b_offsets=np.array([0, 13], np.int64))   # 13 + 8 > 20
    with pytest.raises(ValueError, match='outside'):
        k.run(A, base, C, a_panels=True, b_offsets=np.array([-1, 0], np.int64))
    with pytest.raises(TypeError, match='int64'):
        k.run(A, base, C, a_panels=True, b_offsets=np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match='mode'):
        k.run(A, base, C, a_panels=True)
    ka = G.kernel_for(4, 8, np.float32, mode='atab')
    with pytest.raises(ValueError, match='outside'):
        ka.run(base, np.zeros((5, 8), np.float32), C, a_offsets=np.array([0, 1, 2, 16], np.int64))
    with pytest.raises(TypeError, match='float64'):
        G.kernel_for(4, 8, np.float32).run(np.zeros((4, 2)), np.zeros((2, 8), np.float32), C)


def test_kernel_choice_and_switch(monkeypatch):
    assert G.kernel_for(16, 4096, np.float32).nr >= 32
    assert G.kernel_for(144, 16, np.float32).nr == G._library().lanes(np.dtype(np.float32))
    assert G.kernel_for(4, 4, np.int32) is None
    monkeypatch.setenv('PYDAGNN_CONV_GEMM', 'blas')
    assert G.kernel_for(16, 4096, np.float32) is None
    x = np.ones((8, 8, 4, 2), np.float32)
    w = np.ones((3, 3, 4, 4), np.float32)
    assert ci.Implicit.of(cv._Geom(x, w, None, 1, 1, 1, 'x')) is None


@pytest.mark.parametrize('dt', [np.float32, np.float64])
@pytest.mark.parametrize('shape', [(3, 3, 16, 8), (3, 2, 13, 5), (1, 1, 4, 3), (5, 3, 1, 7)])
def test_pack_flipped_row_blocks(dt, shape):
    """The one-pass packing of the flipped filters is the flip + transpose + pack it
    replaces, every row-block height (rows past Cin zero)."""
    w = np.asfortranarray(np.random.default_rng(3).standard_normal(shape).astype(dt))
    g = cv._Geom(np.zeros((8, 8, shape[2], 1), dt), w, None, 0, 1, 1, 't')
    im = ci.Implicit(g, 1)
    for mr in (1, 4, 6, 8, 16):
        ref = np.zeros((-(-shape[2] // mr), shape[3] * shape[0] * shape[1], mr), dt)
        K.pack_row_blocks(im.flipped_filters(w), ref)
        got = np.full_like(ref, np.nan)
        K.pack_flipped_row_blocks(np.ascontiguousarray(w.T), got)
        np.testing.assert_array_equal(got, ref)


def test_pack_grid_transposed():
    rng = np.random.default_rng(4)
    d3 = rng.standard_normal((20, 5, 6)).astype(np.float32)   # (R, Wo, Ho)
    Hp = 8
    Q = 4 * Hp + 6
    for nr in (16, 32, 5):
        bp = np.full((-(-20 // nr), Q, nr), np.nan, np.float32)
        K.pack_grid_transposed(d3, bp, Hp)
        full = bp.transpose(1, 0, 2).reshape(Q, -1)[:, :20]   # (Q, R)
        grid = np.zeros((5 * Hp, 20), np.float32)
        grid.reshape(5, Hp, 20)[:, :6] = d3.transpose(1, 2, 0)
        np.testing.assert_array_equal(full, grid[:Q])


# (x shape, w shape, pad, stride, dilate): the implicit form is eligible unless the map
# is small; stride 1 with padding beyond the filter takes the per-phase dx
CONV_CASES = [((64, 64, 16, 3), (3, 3, 16, 16), 1, 1, 1),
              ((20, 17, 5, 2), (3, 3, 5, 7), 1, 1, 1),
              ((21, 19, 4, 2), (3, 2, 4, 3), [2, 1, 0, 1], 1, 2),
              ((24, 24, 6, 3), (5, 5, 6, 9), 2, 1, 1),
              ((30, 25, 8, 1), (3, 3, 8, 40), 0, 1, 1),
              ((26, 26, 8, 2), (3, 3, 8, 4), 3, 1, 1),
              ((40, 40, 3, 2), (3, 3, 3, 16), 1, 1, 1),
              ((64, 64, 16, 2), (3, 3, 16, 32), 1, 2, 1),
              ((33, 30, 9, 2), (3, 3, 9, 8), 1, 2, 1),
              ((32, 32, 32, 2), (1, 1, 32, 64), 0, 2, 1),
              ((31, 29, 7, 2), (3, 4, 7, 5), [1, 2, 0, 3], [3, 2], 1),
              ((36, 35, 8, 1), (3, 3, 8, 6), 2, 2, 2),
              ((40, 40, 8, 2), (2, 2, 8, 8), 0, 2, 1),
              # small maps: several images stacked per GEMM (9 images: chunks of 3 and 2)
              ((8, 8, 16, 9), (3, 3, 16, 24), 1, 1, 1),
              ((12, 10, 4, 5), (3, 3, 4, 6), [1, 0, 1, 1], 1, 1),
              ((10, 9, 3, 4), (3, 3, 3, 5), 2, 1, 2),
              ((6, 7, 8, 3), (2, 3, 8, 4), [0, 1, 2, 0], 1, 1),
              ((20, 18, 6, 9), (3, 3, 6, 10), 1, 1, 1),   # stacked forward (Ho 16..31)
              # small maps, forward image-interleaved (11 images: chunks of 3 and 2)
              ((16, 16, 8, 11), (3, 3, 8, 12), 1, 2, 1),
              ((9, 7, 5, 7), (3, 3, 5, 6), [1, 0, 2, 1], [2, 3], 1),
              ((12, 12, 4, 6), (3, 3, 4, 5), 2, 1, 2),
              ((11, 13, 3, 5), (2, 3, 3, 4), [0, 1, 1, 0], 1, 1),
              ((6, 6, 4, 5), (3, 3, 4, 3), 4, 1, 1),   # padding beyond the filter
              ((13, 12, 4, 6), (3, 3, 4, 5), 2, 2, 2)]   # strided and dilated


@pytest.mark.parametrize('dt', [np.float32, np.float64])
@pytest.mark.parametrize('xs,ws,pad,stride,dil', CONV_CASES)
def test_implicit_conv_matches_im2col_path(monkeypatch, dt, xs, ws, pad, stride, dil):
    # the strided implicit path runs only where it is faster; here everywhere, to test it
    monkeypatch.setattr(ci, 'IMPLICIT_STRIDED_MIN_HO', 1)
    monkeypatch.setattr(ci, 'IMPLICIT_STRIDED_BACKWARD', True)
    monkeypatch.setattr(ci, 'IMPLICIT_MAX_PAD_RATIO', 2.0)
    rng = np.random.default_rng(sum(xs) + sum(ws))
    x = rng.standard_normal(xs).astype(dt)
    w = rng.standard_normal(ws).astype(dt)
    b = rng.standard_normal(ws[3]).astype(dt)
    monkeypatch.setenv('PYDAGNN_CONV_GEMM', 'blas')
    y0 = cv.conv_forward(x, w, b, pad, stride, dil)
    dy = rng.standard_normal(y0.shape).astype(dt)
    r0 = cv.conv_backward(x, w, b, dy, pad, stride, dil)
    monkeypatch.setenv('PYDAGNN_CONV_GEMM', '')
    # a call on other arrays of the same shapes first: the kept form's buffers and
    # checked kernel calls must serve the next call's arrays, not point at these
    other = [rng.standard_normal(a.shape).astype(dt) for a in (x, w, b, dy)]
    cv.conv_backward(other[0], other[1], other[2], other[3], pad, stride, dil)
    cv.conv_forward(other[0], other[1], other[2], pad, stride, dil)
    del other
    calls = {'fwd': 0, 'bwd': 0, 'il': 0}
    fwd, bwd, fil = ci.forward, ci.backward_part, ci.forward_interleaved
    monkeypatch.setattr(ci, 'forward',
                        lambda *a: (calls.__setitem__('fwd', calls['fwd'] + 1), fwd(*a))[1])
    monkeypatch.setattr(ci, 'forward_interleaved',
                        lambda *a: (calls.__setitem__('il', calls['il'] + 1), fil(*a))[1])
    monkeypatch.setattr(ci, 'backward_part',
                        lambda *a: (calls.__setitem__('bwd', calls['bwd'] + 1), bwd(*a))[1])
    y1 = cv.conv_forward(x, w, b, pad, stride, dil)
    r1 = cv.conv_backward(x, w, b, dy, pad, stride, dil)
    g = cv._Geom(x, w, b, pad, stride, dil, 'test')
    interleaved = ci.interleave_count(g) > 1
    assert calls['il'] == interleaved
    assert calls['fwd'] == (not interleaved and ci.Implicit.of(g) is not None)
    if xs[3] in (7, 11) or xs[:2] in ((12, 12), (11, 13), (6, 6), (13, 12)):
        assert interleaved   # the cases meant for it
    assert calls['bwd'] == (ci.Implicit.of(g, backward=True) is not None)
    assert ci.Implicit.of(g) is not None or ws[0] * ws[1] == 1
    if g.Ho < ci.IMPLICIT_STACK_BELOW and (stride, xs[3]) == (1, 9):
        assert ci.Implicit.of(g).m > 1   # stacked, with a shorter last chunk in some parts
    rtol = 1e-5 if dt == np.float32 else 1e-12
    for got, want in zip((y1,) + tuple(r1), (y0,) + tuple(r0)):
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.f_contiguous
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


DRIVER_CASES = [((40, 40, 3, 5), (3, 3, 3, 16), 1, 1, True),     # padded (the input layer)
                ((34, 36, 4, 3), (3, 3, 4, 8), 0, 1, False),    # unpadded: read in place
                ((40, 38, 5, 4), (3, 2, 5, 7), [1, 2, 0, 1], 1, True),
                ((64, 64, 6, 3), (3, 3, 6, 9), 1, 2, True)]     # strided forward


@pytest.mark.parametrize('dt', [np.float32, np.float64])
@pytest.mark.parametrize('xs,ws,pad,stride,bias', DRIVER_CASES)
def test_one_image_drivers_match_the_python_loop(monkeypatch, dt, xs, ws, pad, stride, bias):
    """The numba drivers of one-image chunks (kernels/implicit_cpu.py) run the same
    kernels in the same order as the Python loop they replace: the same bits, forward
    and backward, over several parts per thread; and they are the path taken."""
    rng = np.random.default_rng(sum(xs))
    x = rng.standard_normal(xs).astype(dt)
    w = rng.standard_normal(ws).astype(dt)
    b = rng.standard_normal(ws[3]).astype(dt) if bias else None
    g = cv._Geom(x, w, b, pad, stride, 1, 'test')
    im = ci.Implicit.of(g)
    assert im is not None and im.m == 1
    monkeypatch.setattr(ci, 'ONE_IMAGE_DRIVERS', False)
    y0 = cv.conv_forward(x, w, b, pad, stride)
    dy = rng.standard_normal(y0.shape).astype(dt)
    r0 = cv.conv_backward(x, w, b, dy, pad, stride)
    monkeypatch.setattr(ci, 'ONE_IMAGE_DRIVERS', True)
    calls = []
    for name in ('forward_images', 'forward_phase_images', 'backward_images'):
        fn = getattr(ci._drv, name)
        monkeypatch.setattr(ci._drv, name, lambda *a, _f=fn, _n=name: (calls.append(_n), _f(*a))[1])
    y1 = cv.conv_forward(x, w, b, pad, stride)
    r1 = cv.conv_backward(x, w, b, dy, pad, stride)
    assert ('forward_images' if stride == 1 else 'forward_phase_images') in calls
    assert ('backward_images' in calls) == (ci.Implicit.of(g, backward=True) is not None)
    for got, want in zip((y1,) + tuple(r1), (y0,) + tuple(r0)):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.flags.f_contiguous
        np.testing.assert_array_equal(got, want)


def test_prepared_addresses_are_the_call_arguments():
    """``Prepared.addresses`` is the argument list of the checked call, with the
    operands given in their slots and the layout checks of a call; None for an empty
    product."""
    kern = G.kernel_for(8, 40, np.float32)
    a, b, c = (np.ones((8, 5), np.float32), np.ones((5, 40), np.float32),
               np.zeros((8, 40), np.float32))
    call = kern.prepare(a, b, c)
    args = call.addresses()
    assert args.dtype == np.int64 and len(args) == 18
    assert (args[G.A_SLOT], args[G.B_SLOT], args[G.C_SLOT]) == (
        a.ctypes.data, b.ctypes.data, c.ctypes.data)
    c2 = np.zeros_like(c)
    assert call.addresses(c=c2)[G.C_SLOT] == c2.ctypes.data
    with pytest.raises(ValueError, match='operand c'):
        call.addresses(c=np.zeros((8, 41), np.float32)[:, :40])
    assert kern.prepare(a[:, :0], b[:0], c).addresses() is None


def test_implicit_path_is_taken_for_the_resnet_convs():
    """The 3x3 stride-1 convs of ResNet18 at 64x64..16x16 run implicit, backward too, and
    the stride-2 3x3 convs to 32x32 and 16x16 forward, and the 3-channel input layer;
    the other strided convs do not."""
    def of(H, C, Co, s=1, backward=False, k=3):
        x = np.zeros((H, H, C, 32), np.float32)
        g = cv._Geom(x, np.zeros((k, k, C, Co), np.float32), None, (k - 1) // 2, s, 1, 'x')
        return ci.Implicit.of(g, backward) is not None
    assert of(64, 16, 16, backward=True) and of(32, 32, 32, backward=True) and of(16, 64, 64, backward=True)
    assert of(64, 16, 32, s=2) and not of(64, 16, 32, s=2, backward=True)
    assert of(32, 32, 64, s=2) and not of(16, 64, 128, s=2) and not of(64, 16, 32, s=2, k=1)
    assert of(64, 3, 16, backward=True)
    assert not of(64, 1, 16, backward=True, k=3)   # K = 9: too few rows
    assert of(8, 128, 128, backward=True)   # 8 images stacked per GEMM
    assert of(16, 64, 64, backward=True)

    def interleaved(H, C, Co, s=1, k=3):
        x = np.zeros((H, H, C, 32), np.float32)
        g = cv._Geom(x, np.zeros((k, k, C, Co), np.float32), None, (k - 1) // 2, s, 1, 'x')
        return ci.interleave_count(g)
    if G.vector_registers() == 32 and num_workers() <= 4:
        # the forward of the 8x8 maps and of the stride-2 convs to 16x16 and 8x8
        # interleaves 8 and 4 images; the 16x16 and larger stride-1 maps and the
        # stride-2 conv to 32x32 do not
        assert interleaved(8, 128, 128) == 8 and interleaved(16, 64, 128, s=2) == 8
        assert interleaved(32, 32, 64, s=2) == 4
        assert interleaved(16, 64, 64) == interleaved(64, 16, 32, s=2) == 1
        assert interleaved(16, 64, 128, s=2, k=1) == 1
        # a big image with a tiny output: fewer images, to keep the buffer bounded
        x = np.zeros((64, 64, 256, 32), np.float32)
        g = cv._Geom(x, np.zeros((63, 63, 256, 8), np.float32), None, 0, 1, 1, 'x')
        assert ci.interleave_count(g) * 64 * 64 * 256 * 4 <= ci.INTERLEAVE_MAX_BYTES


def test_to_phases():
    rng = np.random.default_rng(5)
    img = rng.standard_normal((3, 7, 6)).astype(np.float32)   # (C, W, H)
    for sx, sy, pt, pl, Wp, Hp in [(1, 1, 1, 2, 10, 8), (2, 2, 1, 1, 9, 8), (3, 2, 0, 2, 9, 6)]:
        buf = np.zeros((3, sx, sy, -(-Wp // sx), -(-Hp // sy)), np.float32)
        K.to_phases(img, buf, pt, pl)
        padded = np.zeros((3, -(-Wp // sx) * sx, -(-Hp // sy) * sy), np.float32)
        padded[:, pl:pl + 7, pt:pt + 6] = img
        for a in range(sx):
            for b in range(sy):
                np.testing.assert_array_equal(buf[:, a, b], padded[:, a::sx, b::sy])


def test_avx2_variants_in_a_subprocess():
    """The 16-register (AVX2) variants, forced on this machine: same products."""
    code = ('import numpy as np\n'
            'from pydagnn.layers.kernels import gemm_cpu as G\n'
            'assert G._library().regs == 16\n'
            'rng = np.random.default_rng(0)\n'
            'for dt in (np.float32, np.float64):\n'
            '    A = rng.standard_normal((13, 29)).astype(dt); B = rng.standard_normal((29, 71)).astype(dt)\n'
            '    for key, k in G._library().kernels.items():\n'
            '        if key[0] != np.dtype(dt) or key[2]: continue\n'
            '        C = np.empty((13, 71), dt); k.run(A, B, C)\n'
            '        assert np.allclose(C, A @ B, atol=1e-3), k\n'
            'from pydagnn.layers import conv as cv, conv_implicit as ci\n'
            'def of(H, C):\n'
            '    x = np.zeros((H, H, C, 8), np.float32); w = np.zeros((3, 3, C, C), np.float32)\n'
            '    return ci.Implicit.of(cv._Geom(x, w, None, 1, 1, 1, "t")) is not None\n'
            'assert of(64, 16) and not of(16, 64)   # IMPLICIT_AVX2_MIN_PIXELS\n'
            'print("ok")\n')
    env = dict(os.environ, PYDAGNN_GEMM_BITS='256')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-2000:]


def test_rows_into_and_from():
    """rows_into writes every entry of the tall map (data or zero: the buffer needs no
    zeroing); rows_from takes the images back out, with a bias."""
    rng = np.random.default_rng(6)
    src = rng.standard_normal((5, 3, 4, 6)).astype(np.float32)   # (N, R, Wx, h)
    dst = np.full((3, 7, 2 + 3 * 8), np.nan, np.float32)          # 3 images, step 8, top 1
    K.rows_into(src, 1, 3, dst, 2, 1, 8)
    want = np.zeros_like(dst)
    for j in range(3):
        want[:, 2:6, 1 + j * 8:1 + j * 8 + 6] = src[1 + j]
    np.testing.assert_array_equal(dst, want)
    out = np.full((5, 3, 4, 6), np.nan, np.float32)
    bias = np.array([1, 2, 3], np.float32)
    K.rows_from(dst[:, 2:6], out, 1, 3, 1, 8, bias)
    np.testing.assert_array_equal(out[1:4], src[1:4] + bias[:, None, None])
    assert np.isnan(out[0]).all() and np.isnan(out[4]).all()


@pytest.mark.parametrize('dt', [np.float32, np.float64])
def test_column_groups(dt):
    """groups=(G, N, gsb, gsc): G products of N columns, B's rows shifted by g * gsb, C's
    columns by g * gsc; C's gap columns untouched; the bounds of both are checked."""
    rng = np.random.default_rng(8)
    M, Kr, G_, N, gsb, gsc = 13, 9, 5, 21, 25, 23
    base = rng.standard_normal(400).astype(dt)
    offs = rng.integers(0, 400 - N - (G_ - 1) * gsb, size=Kr).astype(np.int64)
    A = rng.standard_normal((M, Kr)).astype(dt)
    for k in _variants(dt, 'btab'):
        ap = np.empty(k.a_panel_shape(M, Kr), dt)
        K.pack_row_blocks(A, ap)
        C = np.full((M, (G_ - 1) * gsc + N), 7, dt)
        k.run(ap, base, C, a_panels=True, b_offsets=offs, groups=(G_, N, gsb, gsc))
        for g_ in range(G_):
            B = np.stack([base[o + g_ * gsb:o + g_ * gsb + N] for o in offs])
            np.testing.assert_allclose(C[:, g_ * gsc:g_ * gsc + N], A.astype(np.float64) @ B,
                                       atol=_tol(dt, Kr), err_msg=repr(k))
            if g_ < G_ - 1:   # the gaps between groups keep their values
                assert (C[:, g_ * gsc + N:(g_ + 1) * gsc] == 7).all()
        need = int(offs.max()) + N + (G_ - 1) * gsb   # elements the last group reads
        k.run(ap, base[:need], C, a_panels=True, b_offsets=offs, groups=(G_, N, gsb, gsc))
        with pytest.raises(ValueError, match='outside'):   # one element short
            k.run(ap, base[:need - 1], C, a_panels=True, b_offsets=offs, groups=(G_, N, gsb, gsc))
        with pytest.raises(ValueError, match='groups'):
            k.run(ap, base, C[:, :-1], a_panels=True, b_offsets=offs, groups=(G_, N, gsb, gsc))


@pytest.mark.parametrize('H,pad,stride', [(64, 1, 1), (8, 1, 1), (34, 0, 1), (32, 1, 2),
                                          (16, 1, 2)])   # one image, stacked, in place, strided, interleaved
def test_implicit_conv_keeps_no_array_alive(H, pad, stride):
    """A convolution call leaves nothing that keeps its arrays alive: no reference cycle
    (one through the implicit form once held every layer input of a training step until
    the garbage collector ran: 100 MB more peak memory on ResNet18-GAP), and the forms
    kept for the next call (their buffers and checked kernel calls) hold no input,
    filters, output or derivative."""
    import gc
    import weakref
    rng = np.random.default_rng(9)
    x = np.asfortranarray(rng.standard_normal((H, H, 16, 8)).astype(np.float32))
    w = np.asfortranarray(rng.standard_normal((3, 3, 16, 16)).astype(np.float32))
    g = cv._Geom(x, w, None, pad, stride, 1, 't')
    assert ci.Implicit.of(g) is not None or ci.interleave_count(g) > 1
    gc.disable()
    try:
        y = cv.conv_forward(x, w, None, pad, stride)
        dy = np.ones_like(y, order='F')
        dx, dw, _ = cv.conv_backward(x, w, None, dy, pad, stride)
        refs = [weakref.ref(a) for a in (x, w, y, dy, dx, dw)]
        del x, w, y, dy, dx, dw, g
        assert [r() is None for r in refs] == [True] * 6
    finally:
        gc.enable()


@pytest.mark.parametrize('stride', [1, 2])
def test_dropped_forms_are_freed_at_once(monkeypatch, stride):
    """A form dropped from the kept ones (with its input-derivative step, buffers and
    checked calls, made by a backward pass) is freed without the garbage collector: no
    reference cycle keeps its buffers."""
    import gc
    import weakref
    monkeypatch.setattr(ci, 'IMPLICIT_STRIDED_BACKWARD', True)
    rng = np.random.default_rng(2)
    x = np.asfortranarray(rng.standard_normal((40, 40, 8, 4)).astype(np.float32))
    w = np.asfortranarray(rng.standard_normal((3, 3, 8, 8)).astype(np.float32))
    im = ci.Implicit.of(cv._Geom(x, w, None, 1, stride, 1, 't'), backward=True)
    assert im is not None
    y = cv.conv_forward(x, w, None, 1, stride)
    cv.conv_backward(x, w, None, np.ones_like(y, order='F'), 1, stride)
    assert im._dx_step is not None   # the backward made and kept its step
    ref = weakref.ref(im)
    del im
    gc.disable()
    try:
        ci.clear_forms()
        assert ref() is None
    finally:
        gc.enable()


def test_implicit_forms_are_kept_and_bounded(monkeypatch):
    """One kept form per geometry (the same object from call to call), a new one when a
    setting that decides it changes, and no more than FORM_CACHE_SIZE of them."""
    x = np.zeros((16, 16, 8, 4), np.float32)
    w = np.zeros((3, 3, 8, 8), np.float32)
    of = lambda H: ci.Implicit.of(cv._Geom(np.zeros((H, H, 8, 4), np.float32), w, None, 1, 1, 1, 't'))  # noqa: E731
    im = ci.Implicit.of(cv._Geom(x, w, None, 1, 1, 1, 't'))
    assert im is not None and of(16) is im
    assert ci.Implicit.of(cv._Geom(x, w, None, 1, 1, 1, 't'), backward=True) is not im
    monkeypatch.setattr(ci, 'IMPLICIT_STACK_ROWS', 32)
    assert of(16) is not im
    monkeypatch.setattr(ci, 'FORM_CACHE_SIZE', 3)
    for H in (17, 18, 19, 20):
        of(H)
    assert len(ci._forms) == 3
    ci.clear_forms()
    assert not ci._forms
    # and a byte budget: the buffers the threads keep are counted, the oldest forms
    # dropped past it, never the one in use
    monkeypatch.setattr(ci, 'FORM_CACHE_SIZE', 64)
    rng = np.random.default_rng(1)
    w8 = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    for H in (30, 31):
        cv.conv_forward(rng.standard_normal((H, H, 8, 4)).astype(np.float32), w8, None, 1, 1)
    forms = list(ci._forms.values())
    assert len(forms) == 2 and all(f.nbytes >= 8 * 32 * 32 * 4 for f in forms)
    monkeypatch.setattr(ci, 'FORM_CACHE_BYTES', forms[1].nbytes + 1)
    cv.conv_forward(rng.standard_normal((32, 32, 8, 4)).astype(np.float32), w8, None, 1, 1)
    assert forms[0] not in ci._forms.values() and len(ci._forms) <= 2
    monkeypatch.setattr(ci, 'FORM_CACHE_BYTES', 0)
    y = cv.conv_forward(rng.standard_normal((33, 33, 8, 4)).astype(np.float32), w8, None, 1, 1)
    assert len(ci._forms) == 1 and y.shape == (33, 33, 8, 4)
    ci.clear_forms()


def test_keep_freed_memory_switch(monkeypatch):
    from pydagnn.layers.kernels import memory_cpu
    monkeypatch.setenv('PYDAGNN_KEEP_FREED_MEMORY', '0')
    assert memory_cpu.keep_freed_memory() is False
    monkeypatch.setenv('PYDAGNN_KEEP_FREED_MEMORY', '1')
    import ctypes
    try:
        ctypes.CDLL(None).mallopt
    except AttributeError:
        pytest.skip('no mallopt (not glibc)')
    assert memory_cpu.keep_freed_memory() is True


@pytest.mark.parametrize('dt', [np.float32, np.float64])
@pytest.mark.parametrize('layout', ['CC', 'CF', 'FC', 'FF'])
@pytest.mark.parametrize('out_order', ['C', 'F'])
@pytest.mark.parametrize('M,Kr,N', [(32, 700, 1000), (1000, 32, 700), (1000, 900, 5), (7, 1200, 900)])
def test_threaded_matmul_on_the_kernels(dt, layout, out_order, M, Kr, N):
    """threads_cpu.matmul (the prediction layers' GEMMs) on every operand order: the
    kernels, direct or transposed, split over the workers, against a float64 product."""
    from pydagnn.layers.kernels import threads_cpu as T
    rng = np.random.default_rng(M + Kr + N)
    A = np.asarray(rng.standard_normal((M, Kr)), dtype=dt, order=layout[0])
    B = np.asarray(rng.standard_normal((Kr, N)), dtype=dt, order=layout[1])
    out = np.full((M, N), np.nan, dtype=dt, order=out_order)
    assert M * N * Kr >= T.MATMUL_SPLIT_MIN
    assert T._kernel_matmul(A, B, out.copy(order='K'))     # the kernels take it
    T.matmul(A, B, out)
    np.testing.assert_allclose(out, A.astype(np.float64) @ B, rtol=0, atol=_tol(dt, Kr) * 4)
