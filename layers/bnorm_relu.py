"""Batch normalization followed by a ReLU, computed together (CPU speed).

``y = relu(g * (x - mu) / sigma + b)`` with the ReLU's ``leak`` (>= 0), where the BN
part is :mod:`pydagnn.layers.bnorm`'s (batch statistics or given moments, the same
formulas) and the ReLU is :mod:`pydagnn.layers.relu`'s. Backward is the BN backward
(MatConvNet's CPU formula, see bnorm.py) of the ReLU's derivative
``d = dy * (y > 0)`` (with a leak: ``dy * (leak + (1 - leak) * (y > 0))``); the
ReLU's output gives its sign pattern for leak >= 0, as MatConvNet's short circuit.

Why: run as two layers, BN writes its output (a pass over the map), the ReLU reads it
and writes another; backward, the ReLU writes the masked ``dy`` that BN then reads.
On the CPU the numba kernels of :mod:`pydagnn.layers.kernels.bnorm_cpu` apply the ReLU
inside BN's normalisation pass and the mask inside BN's backward passes: two passes
and one map fewer each way, and the BN output is never allocated. Backward also reuses
the batch moments of forward (:class:`BatchNormReLU` keeps them as state) instead of
recomputing them: the same numbers (the same kernel on the same x), two passes fewer.

Anything else (CuPy arrays, a dtype other than float32/float64, a negative leak,
synced batch statistics) runs the existing BN and ReLU one after the other, which is
always what the two layers compute.

:class:`BatchNormReLU` is not a MatConvNet type and is never saved:
:func:`pydagnn.models.fuse.fuse_bn_relu` makes it from a net's own ``dagnn.BatchNorm``
and ``dagnn.ReLU`` blocks as a :class:`pydagnn.plan.FusedGroup`.
"""
import numpy as np

from pydagnn.backend import is_gpu_array
from pydagnn.layer import Layer
from pydagnn.layers._common import as4d, as_scalar, dy_like, first_value, opts_to_dict
from pydagnn.layers.bnorm import (bnorm_backward, bnorm_backward_fixed_moments, bnorm_forward,
                                  bnorm_moments, backward_coefficients, on_planes)
from pydagnn.layers.kernels import bnorm_cpu as _kc
from pydagnn.layers.relu import relu_backward, relu_forward

__all__ = ['bnorm_relu_forward', 'bnorm_relu_backward', 'bnorm_relu_backward_fixed_moments',
           'BatchNormReLU']

#: the dtypes the fused CPU kernels take (anything else runs BN, then ReLU)
_KERNEL_DTYPES = (np.float32, np.float64)


def check_bn_args(x, g, b, op):
    """x as a 4-D map, checked against g and b (C elements each); ValueError naming
    ``op`` and the shapes otherwise."""
    x = as4d(x, 'x', op)
    C = x.shape[2]
    for name, a in (('g', g), ('b', b)):
        if a.size != C:
            raise ValueError(f'{op}: {name} has shape {a.shape} ({a.size} elements), '
                             f'x has shape {x.shape} with {C} channels')
    return x


def fused_cpu(x):
    """Whether the fused kernels take this map: a NumPy float32 or float64 array."""
    return not is_gpu_array(x) and x.dtype.type in _KERNEL_DTYPES


def bnorm_relu_forward(x, g, b, moments=None, epsilon=1e-5, leak=0):
    """``relu_forward(bnorm_forward(x, g, b, moments, epsilon)[0], leak)``.

    x: H x W x C x N; g, b: C elements; moments: None (batch statistics) or ``C x 2``
    ``[mu, sigma]`` used as given. Returns ``(y, moments)``: y Fortran-contiguous, the
    ``(C, 2)`` moments used."""
    x = check_bn_args(x, g, b, 'bnorm_relu_forward')
    leak = float(leak)
    if fused_cpu(x):
        return _bnorm_relu_forward_cpu(x, g, b, moments, epsilon, leak)
    y, m = bnorm_forward(x, g, b, moments=moments, epsilon=epsilon)
    return relu_forward(y, leak), m


def bnorm_relu_backward(x, g, b, y, dy, moments=None, epsilon=1e-5, leak=0):
    """``bnorm_backward(x, g, b, relu_backward(y, dy, leak), moments, epsilon)``:
    ``(dx, dg, db, moments)``.

    y: the forward output (the ReLU's, whose sign gives the mask: leak >= 0, else the
    sign is flipped where the input is negative). moments: None (the batch moments are
    recomputed) or ``C x 2``, given to BN's formula (the batch moments of forward give
    the same numbers as recomputing them)."""
    x, y, dy, leak = masked_backward_args(x, g, b, y, dy, leak, 'bnorm_relu_backward')
    if fused_cpu(x):
        return _bnorm_relu_backward_cpu(x, g, b, y, dy, moments, epsilon, leak)
    return bnorm_backward(x, g, b, relu_backward(y, dy, leak), moments=moments, epsilon=epsilon)


def bnorm_relu_backward_fixed_moments(x, g, b, y, dy, moments, leak=0):
    """The 'test'-mode derivative: ``bnorm_backward_fixed_moments`` of the ReLU's
    derivative -> ``(dx, dg, db)``. Not fused (a backward in test mode is rare)."""
    return bnorm_backward_fixed_moments(x, g, b, relu_backward(y, dy, float(leak)), moments)


# ---------------------------------------------------------------------------- CPU
# The same (N, C, H*W) view and split of its planes over the worker threads as bnorm.py.
# The helpers are public: the fused residual tail (layers/bnorm_sum_relu.py) uses them.
def plane_view(a, dt):
    """The C-contiguous (N, C, H*W) view of an H x W x C x N map in dtype ``dt`` (a copy
    only when it is not F-contiguous or of another dtype)."""
    H, W, C, N = a.shape
    return np.ascontiguousarray(a.astype(dt, copy=False).T.reshape(N, C, W * H))


def relu_slopes(leak, dt):
    """The ReLU's slopes ``(leak + (1 - leak), leak)`` as scalars of dtype ``dt``,
    computed as relu.py's ``_slope`` does (so that ``dy * slope`` rounds the same)."""
    t = dt.type
    return t(leak) + t(1 - leak), t(leak)


def moments_used(x, moments, epsilon):
    """``(mu, sigma, m)``: the batch moments of x (``moments`` None) or the given ones as
    bnorm.py takes them (2C values in MATLAB order), mu and sigma contiguous (C,) and
    ``m`` the ``(C, 2)`` moments used, all in x's dtype."""
    C, dt = x.shape[2], x.dtype
    if moments is None:
        m = bnorm_moments(x, epsilon)
    else:
        m = moments.astype(dt, copy=False)
        if m.shape != (C, 2):
            m = m.reshape(C, 2, order='F')
    return np.ascontiguousarray(m[:, 0]), np.ascontiguousarray(m[:, 1]), m


def channel_vector(v, C, dt):
    """A per-channel param (C elements, any shape) as a contiguous (C,) vector of ``dt``."""
    return np.ascontiguousarray(v.reshape(C).astype(dt, copy=False))


def moments_derivative(x, mom, m):
    """BatchNorm.backward's "derivative" of the moments param ``m``: the batch moments
    ``mom`` times N (images), in ``m``'s shape."""
    n = x.shape[3] if x.ndim == 4 else 1
    return (mom * x.dtype.type(n)).reshape(m.shape, order='F')


def _bnorm_relu_forward_cpu(x, g, b, moments, epsilon, leak):
    return fused_forward_cpu(x, g, b, moments, epsilon, leak, _kc.normalize_relu)


def fused_forward_cpu(x, g, b, moments, epsilon, leak, kernel):
    """The normalisation pass of a fused BN (+ ...) + ReLU: moments, per-channel scale
    and shift, ReLU slopes, then ``kernel(x3, y3, p0, p1, mu, scale, shift, leaky, spos,
    sneg)`` on the planes split over the workers. Returns ``(y, moments)``."""
    C, dt = x.shape[2], x.dtype
    x3 = plane_view(x, dt)
    mu, sigma, m = moments_used(x, moments, epsilon)
    scale = np.ascontiguousarray(channel_vector(g, C, dt) / sigma)
    shift = channel_vector(b, C, dt)
    spos, sneg = relu_slopes(leak, dt)
    y = np.empty(x.shape, dtype=dt, order='F')
    y3 = y.T.reshape(x3.shape)
    on_planes(x3, lambda p0, p1: kernel(x3, y3, p0, p1, mu, scale, shift, leak != 0,
                                        spos, sneg))
    return y, m


def masked_backward_args(x, g, b, y, dy, leak, op):
    """The checked ``(x, y, dy, leak)`` of a fused backward whose ReLU mask is read from
    the fused output ``y`` (which needs ``leak >= 0``)."""
    x = check_bn_args(x, g, b, op)
    y = dy_like(x, y, op)
    dy = dy_like(x, dy, op)
    leak = float(leak)
    if leak < 0:
        raise ValueError(f'{op}: the ReLU mask is read from the forward output, which '
                         f'needs leak >= 0, got leak {leak}')
    return x, y, dy, leak


def _bnorm_relu_backward_cpu(x, g, b, y, dy, moments, epsilon, leak):
    dx, _, dg, db, m = masked_backward_cpu(x, g, b, y, dy, moments, epsilon, leak)
    return dx, dg, db, m


def masked_backward_cpu(x, g, b, y, dy, moments, epsilon, leak):
    """BN's backward of the ReLU-masked ``d = relu_backward(y, dy, leak)`` (``y`` the
    fused output, of BN+ReLU or BN+Sum+ReLU): the sums pass writes ``d`` while it sums
    it, the dx pass reads it. Returns ``(dx, d, dg, db, moments)``, dx and d
    Fortran-contiguous (``d`` is the shortcut's derivative in BN+Sum+ReLU)."""
    C, dt = x.shape[2], x.dtype
    x3, y3, dy3 = plane_view(x, dt), plane_view(y, dt), plane_view(dy, dt)
    mu, sigma, m = moments_used(x, moments, epsilon)
    spos, sneg = relu_slopes(leak, dt)
    d = np.empty(x.shape, dtype=dt, order='F')
    d3 = d.T.reshape(x3.shape)
    db64, dot64 = np.empty(x3.shape[0] * C), np.empty(x3.shape[0] * C)
    on_planes(x3, lambda p0, p1: _kc.backward_sums_masked(x3, y3, dy3, d3, p0, p1, mu,
                                                          spos, sneg, db64, dot64))
    db, dg, G1, G2, muz = backward_coefficients(db64, dot64, g, sigma,
                                                dy3.shape[0] * dy3.shape[2], dt)
    dx = np.empty(x.shape, dtype=dt, order='F')
    dx3 = dx.T.reshape(x3.shape)
    on_planes(x3, lambda p0, p1: _kc.backward_dx(x3, d3, dx3, p0, p1, mu, muz, G1, G2))
    return dx, d, dg.reshape(g.shape), db.reshape(b.shape), m


# ---------------------------------------------------------------------------- block
class BatchNormReLU(Layer):
    """A ``dagnn.BatchNorm`` block followed by a ``dagnn.ReLU`` block, as one plan entry:
    inputs [x], params the BN's [g, b, moments], outputs [the ReLU's y] and one state
    output (the batch moments of forward, for backward; None in 'test' mode).

    Reads the options of the two blocks it is made of at every call (``epsilon``, the
    ReLU's ``leak`` / ``opts``) and the net's mode, and gives what the two layers give:
    the same y, dx, dg, db and moments "derivative" (the batch moments times N) in
    'normal' mode, dx, dg, db in 'test' mode. Where the fused path does not apply (a
    negative leak, synced batch statistics) it runs the two blocks themselves."""
    type_name = 'pydagnn.BatchNormReLU'
    state_outputs = 1

    def __init__(self, bn, relu):
        super().__init__()
        self.bn = bn
        self.relu = relu

    def _eps(self):
        return float(first_value(self.bn.epsilon))

    def _leak(self):
        o = opts_to_dict(self.relu.opts, 'ReLU.opts')
        return float(as_scalar(o.get('leak', self.relu.leak)))

    def fusable(self):
        """Whether the ReLU's options let the pair run fused (leak >= 0); with a negative
        leak the block still computes the pair, as the two blocks."""
        return self._leak() >= 0

    def _composed(self, leak):
        """Whether to run the two blocks one after the other (see the class docstring)."""
        return leak < 0 or (self.bn.batch_synced and self.mode != 'test')

    def forward(self, inputs, params):
        x = inputs[0]
        g, b, m = params[0], params[1], params[2]
        leak = self._leak()
        if self._composed(leak):
            z = self.bn.forward(inputs, params)[0]
            return [self.relu.forward([z], [])[0], None]
        if self.mode == 'test':
            y, _ = bnorm_relu_forward(x, g, b, moments=m, epsilon=self._eps(), leak=leak)
            return [y, None]
        y, mom = bnorm_relu_forward(x, g, b, epsilon=self._eps(), leak=leak)
        return [y, mom]

    def backward(self, inputs, params, der_outputs, outputs):
        x = inputs[0]
        g, b, m = params[0], params[1], params[2]
        dy, (y, mom) = der_outputs[0], outputs
        leak = self._leak()
        if self._composed(leak):
            return self._composed_backward(inputs, params, dy, y)
        if self.mode == 'test':
            dx, dg, db = bnorm_relu_backward_fixed_moments(x, g, b, y, dy, m, leak)
            return [dx], [dg, db, None]
        dx, dg, db, mom = bnorm_relu_backward(x, g, b, y, dy, moments=mom, epsilon=self._eps(),
                                              leak=leak)
        return [dx], [dg, db, moments_derivative(x, mom, m)]

    def _composed_backward(self, inputs, params, dy, y):
        """The ReLU block's backward, then the BN block's. The ReLU reads its input when
        the leak is negative (the output's sign is not the input's then): the BN output
        is recomputed for it."""
        z = self.bn.forward(inputs, params)[0] if self._leak() < 0 else None
        (dz,), _ = self.relu.backward([z], [], [dy], [y])
        return self.bn.backward(inputs, params, [dz], [None])

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]
