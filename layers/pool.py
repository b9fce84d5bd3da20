"""Pooling (MatConvNet's ``vl_nnpool`` and ``dagnn.Pooling``), CPU and GPU.

``pool_forward(x, pool_size, method='max', pad=0, stride=1) -> y``
``pool_backward(x, dy, pool_size, method='max', pad=0, stride=1) -> dx``

x is ``H x W x C x N``; ``pool_size`` = p or [ph pw]; ``pad`` = p, [vertical horizontal]
or [top bottom left right] (each smaller than the window, as ``vl_nnpool`` requires);
``stride`` = s or [sy sx]. Output ``Ho = floor((H + pt + pb - ph) / sy) + 1``.

* 'max': padding never wins (windows are clipped to the image); the derivative of a
  window goes to its first maximum in MatConvNet's scan order (column by column, then
  row), as ``vl_nnpool``'s CPU code does.
* 'avg': sum over the window elements inside the image divided by *their number*.
  This is what MatConvNet computes (CPU ``acc_sum`` and GPU ``pooling_average_kernel``
  both use the clipped window size); it equals the full window size whenever the window
  lies inside the image, e.g. without padding.

A window that covers the whole unpadded map (the 8x8 global average pool of the GAP
models) takes a fast path: a plain mean per channel.

The windows run in numba kernels (:mod:`pydagnn.layers.kernels.pool_cpu`) on the CPU and
in CUDA kernels (:mod:`pydagnn.layers.kernels.pool_gpu`) for CuPy inputs; the checks, the
output allocation and the global-average path are this module's, for both devices.
"""
import numpy as np

from pydagnn.backend import is_gpu_array
from pydagnn.layer import Layer, register
from pydagnn.layers._common import (first_value, float_map, fortran, output_derivative, parse_pad,
                                    parse_pair, window_outputs)
from pydagnn.layers.kernels import pool_cpu as _k
from pydagnn.layers.kernels import pool_gpu as _kg
from pydagnn.layers.kernels.threads_cpu import parallel_for

__all__ = ['pool_forward', 'pool_backward', 'pool_output_size', 'Pooling']

_METHODS = ('max', 'avg')


def _method(m, op):
    if isinstance(m, np.ndarray):
        m = first_value(m) if m.size else ''
    m = str(m).lower()
    if m not in _METHODS:
        raise ValueError(f"{op}: method must be 'max' or 'avg', got {m!r}")
    return m


class _PoolGeom:
    """Checked shapes and options of one pooling call, on either device: ``x`` stays an
    array of its own module ``xp`` (numpy or cupy); the GPU kernels
    (:mod:`pydagnn.layers.kernels.pool_gpu`) read the same geometry."""

    def __init__(self, x, pool_size, method, pad, stride, op):
        x, xp = float_map(x, op)
        self.xp = xp
        self.dtype = x.dtype
        self.x = fortran(x, x.dtype, xp)
        self.H, self.W, self.C, self.N = x.shape
        self.method = _method(method, op)
        self.ph, self.pw = parse_pair(pool_size, 'pool size', op)
        self.pt, self.pb, self.pl, self.pr = parse_pad(pad, op)
        self.sy, self.sx = parse_pair(stride, 'stride', op)
        if self.pt >= self.ph or self.pb >= self.ph or self.pl >= self.pw or self.pr >= self.pw:
            raise ValueError(f'{op}: a padding value {[self.pt, self.pb, self.pl, self.pr]} is '
                             f'larger than or equal to the pooling window {[self.ph, self.pw]}')
        if self.H + self.pt + self.pb < self.ph or self.W + self.pl + self.pr < self.pw:
            raise ValueError(f'{op}: the pooling window {[self.ph, self.pw]} is larger than the '
                             f'input {x.shape} (including padding '
                             f'{[self.pt, self.pb, self.pl, self.pr]})')
        self.Ho, self.Wo = window_outputs(self.H, self.W, (self.pt, self.pb, self.pl, self.pr),
                                          self.ph, self.pw, self.sy, self.sx)
        # the window is the whole map: one output per channel
        self.global_ = (self.ph == self.H and self.pw == self.W
                        and self.pt == self.pb == self.pl == self.pr == 0)

    @property
    def out_shape(self):
        return (self.Ho, self.Wo, self.C, self.N)

    def dy(self, dy, op):
        """``dy`` checked against the output shape, Fortran-contiguous in x's dtype."""
        return output_derivative(self, dy, op)

    def describe(self):
        return (f'x {self.x.shape}, pool {[self.ph, self.pw]}, pad '
                f'{[self.pt, self.pb, self.pl, self.pr]}, stride {[self.sy, self.sx]}')

    def kargs(self):
        """The geometry arguments of the numba kernels (:mod:`pool_cpu`)."""
        return (self.ph, self.pw, self.pt, self.pl, self.sy, self.sx)


def pool_output_size(H, W, pool_size, pad=0, stride=1):
    """(Ho, Wo) of a pooling, MatConvNet's formula."""
    ph, pw = parse_pair(pool_size, 'pool size', 'pool')
    return window_outputs(H, W, parse_pad(pad, 'pool'), ph, pw,
                          *parse_pair(stride, 'stride', 'pool'))


def pool_forward(x, pool_size, method='max', pad=0, stride=1):
    """MatConvNet ``vl_nnpool(x, pool_size, 'method', method, 'pad', pad, 'stride', stride)``.
    Returns y (Ho, Wo, C, N), Fortran-contiguous, x's dtype, on x's device."""
    g = _PoolGeom(x, pool_size, method, pad, stride, 'pool_forward')
    xp = g.xp
    y = xp.empty(g.out_shape, dtype=g.dtype, order='F')
    if y.size == 0:
        return y
    xT, yT = g.x.T, y.T
    if g.global_ and g.method == 'avg':   # the same xp code on both devices
        y2 = yT.reshape(g.N, g.C)
        xp.sum(xT.reshape(g.N, g.C, g.H * g.W), axis=2, out=y2)
        y2 *= g.dtype.type(1) / g.dtype.type(g.H * g.W)
        return y
    if is_gpu_array(g.x):
        _pool_forward_gpu(g, xT, yT)
    else:
        _pool_forward_cpu(g, xT, yT)
    return y


def _pool_forward_cpu(g, xT, yT):
    """numba windows, the images split over worker threads."""
    kern = _k.max_forward if g.method == 'max' else _k.avg_forward
    parallel_for(lambda a, b, _: kern(xT, yT, a, b, *g.kargs()), g.N, uses_blas=False)


def _pool_forward_gpu(g, xT, yT):
    """CUDA windows (layers/kernels/pool_gpu.py), one thread per output."""
    (_kg.max_forward if g.method == 'max' else _kg.avg_forward)(xT, yT, g)


def pool_backward(x, dy, pool_size, method='max', pad=0, stride=1):
    """Derivative of ``pool_forward`` projected on ``dy`` (Ho, Wo, C, N); returns dx like x
    (Fortran-contiguous, x's dtype, on x's device)."""
    g = _PoolGeom(x, pool_size, method, pad, stride, 'pool_backward')
    dy = g.dy(dy, 'pool_backward')
    xp = g.xp
    dx = xp.empty(g.x.shape, dtype=g.dtype, order='F')
    if dx.size == 0:
        return dx
    xT, dyT, dxT = g.x.T, dy.T, dx.T
    if g.global_ and g.method == 'avg':   # the same xp code on both devices
        scale = g.dtype.type(1) / g.dtype.type(g.H * g.W)
        xp.multiply(dyT.reshape(g.N, g.C, 1), scale, out=dxT.reshape(g.N, g.C, g.H * g.W))
        return dx
    if is_gpu_array(g.x):
        _pool_backward_gpu(g, xT, dyT, dxT)
    else:
        _pool_backward_cpu(g, xT, dyT, dxT)
    return dx


def _pool_backward_cpu(g, xT, dyT, dxT):
    """numba windows, the images split over worker threads."""
    if g.method == 'max':
        def part(a, b, _):
            _k.max_backward(xT, dyT, dxT, a, b, *g.kargs())
    else:
        def part(a, b, _):
            _k.avg_backward(dyT, dxT, a, b, *g.kargs())
    parallel_for(part, g.N, uses_blas=False)


def _pool_backward_gpu(g, xT, dyT, dxT):
    """CUDA gathers (layers/kernels/pool_gpu.py), one thread per input element."""
    if g.method == 'max':
        _kg.max_backward(xT, dyT, dxT, g)
    else:
        _kg.avg_backward(dyT, dxT, g)


@register('dagnn.Pooling')
class Pooling(Layer):
    """``dagnn.Pooling``: inputs [x], no params, outputs [y].

    ``dilate`` is stored because MatConvNet's ``dagnn.Filter`` base class has it (saved
    nets carry it); ``vl_nnpool`` has no dilation, so only 1 is accepted.
    """
    #: backward reads x (the max positions), not y
    backward_needs_outputs = False
    batch_independent = True
    properties = {
        'method': 'max',
        'poolSize': [1, 1],
        'opts': [],
        'pad': 0,
        'stride': 1,
        'dilate': 1,
    }

    def _check_dilate(self):
        d = parse_pair(self.dilate, 'dilate', 'Pooling')
        if d != (1, 1):
            raise ValueError(f'Pooling: dilate must be 1 (vl_nnpool has no dilation), '
                             f'got {list(d)}')

    def forward(self, inputs, params):
        self._check_dilate()
        return [pool_forward(inputs[0], self.poolSize, self.method,
                             pad=self.pad, stride=self.stride)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        self._check_dilate()
        dx = pool_backward(inputs[0], der_outputs[0], self.poolSize, self.method,
                           pad=self.pad, stride=self.stride)
        return [dx.reshape(np.shape(inputs[0]), order='F')], []

    def get_output_sizes(self, input_sizes):
        s = input_sizes[0] if input_sizes else None
        if s is None:
            return [None]
        s = tuple(int(v) for v in s) + (1,) * (4 - len(s))
        ho, wo = pool_output_size(s[0], s[1], self.poolSize, self.pad, self.stride)
        return [(ho, wo, s[2], s[3])]
