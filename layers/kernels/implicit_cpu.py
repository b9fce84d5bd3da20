"""numba drivers (CPU) of the implicit-GEMM convolution (:mod:`pydagnn.layers.conv_implicit`):
a worker's part of the batch, one image per GEMM, as **one** nogil call.

Why: with one image per GEMM (maps of 32x32 and larger) a part loops over 4-16 images,
and each image cost 15-40 us of Python (the copy kernel's and the GEMM's calls, their
checks, views, a bias add) against a GEMM of 25-250 us. The Python holds the GIL, so the
other worker waited for it: ResNet18's 64x64 input layer ran no faster on two threads
than on one. Here the loop, the copies and the GEMM calls run in numba with the GIL
released; the GEMM is the generated kernel, called through its int64-argument view
(:attr:`gemm_cpu.Kernel.fn_int`) with the argument vector of a checked call
(:meth:`gemm_cpu.Prepared.addresses`), of which only the operand pointers move from
image to image, to arrays of the checked layouts (the callers pass such arrays: the
same work buffers, and images of one C-contiguous batch).
"""
import numpy as np
from numba import njit

from pydagnn.layers.kernels.gemm_cpu import A_SLOT as _A, B_SLOT as _B, C_SLOT as _C
from pydagnn.layers.kernels.im2col_cpu import pack_grid_transposed, rows_into, to_phases


@njit(nogil=True, cache=True)
def _gemm(fn, a):
    """One kernel call with the argument vector ``a`` (see gemm_cpu's argument list)."""
    fn(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12],
       a[13], a[14], a[15], a[16], np.int32(a[17]))


@njit(nogil=True, cache=True)
def _image(arr, n):
    """Address of image ``n`` of a C-contiguous batch ``arr`` (N, ...)."""
    return arr.ctypes.data + n * arr.strides[0]


@njit(nogil=True, cache=True)
def forward_images(fn, args, xT, n0, n1, buf3, pl, pt, yT3, bias):
    """Stride 1, images ``n0 .. n1-1`` of ``xT`` (N, C, W, H): each zero-padded into
    ``buf3`` (C, Wp, Hp; B of the prepared call) or, when ``buf3`` is empty, read in
    place (no padding), then ``yT3[n] (Cout, P) = filters @ columns`` (C of the call),
    plus ``bias`` (Cout; empty: none)."""
    a = args.copy()
    for n in range(n0, n1):
        if buf3.size == 0:
            a[_B] = _image(xT, n)
        else:
            rows_into(xT, n, 1, buf3, pl, pt, 0)
        a[_C] = _image(yT3, n)
        _gemm(fn, a)
        _add_bias(yT3[n], bias)


@njit(nogil=True, cache=True)
def forward_phase_images(fn, args, xT, n0, n1, buf5, pt, pl, yT3, bias):
    """Any stride, as :func:`forward_images` with each image split into the phase
    buffer ``buf5`` (C, sx, sy, Wph, Hph; its padding entries zero, as
    ``to_phases`` leaves them)."""
    a = args.copy()
    for n in range(n0, n1):
        to_phases(xT[n], buf5, pt, pl)
        a[_C] = _image(yT3, n)
        _gemm(fn, a)
        _add_bias(yT3[n], bias)


@njit(nogil=True, cache=True)
def _add_bias(y2, bias):
    """``y2 (R, P) += bias[:, None]`` (nothing for an empty bias)."""
    if bias.size == 0:
        return
    for r in range(y2.shape[0]):
        y2[r, :] += bias[r]


@njit(nogil=True, cache=True)
def backward_images(fn_dw, args_dw, fn_dx, args_dx, xT, dyT4, dxT, n0, n1, buf3, pl, pt,
                    dyt, Hph, dypad, dpl, dpt):
    """Stride 1, images ``n0 .. n1-1``: the filter derivative's sum and the input
    derivative.

    Per image: ``dyT4[n]`` (Cout, Wo, Ho) transposed onto the grid panels ``dyt`` (B of
    the ``dW`` call), the image padded into ``buf3`` (A of that call through its
    offsets; empty ``buf3``: read in place), ``dW.T += col @ dy.T`` (C of the call, the
    part's sum, accumulated); then ``dy`` zero-padded into ``dypad`` (B of the ``dx``
    call) and ``dxT[n] (C, W*H) = flipped filters @ dy columns`` (C of that call)."""
    adw = args_dw.copy()
    adx = args_dx.copy()
    for n in range(n0, n1):
        pack_grid_transposed(dyT4[n], dyt, Hph)
        if buf3.size == 0:
            adw[_A] = _image(xT, n)
        else:
            rows_into(xT, n, 1, buf3, pl, pt, 0)
        _gemm(fn_dw, adw)
        rows_into(dyT4, n, 1, dypad, dpl, dpt, 0)
        adx[_C] = _image(dxT, n)
        _gemm(fn_dx, adx)
