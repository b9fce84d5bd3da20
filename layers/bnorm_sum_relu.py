"""The residual tail -- batch normalization, a Sum with a shortcut, a ReLU -- computed
together (CPU speed).

``z = relu(g * (x - mu) / sigma + b + s)`` with the ReLU's ``leak`` (>= 0): the BN part
is :mod:`pydagnn.layers.bnorm`'s (batch statistics or given moments, the same formulas),
``s`` the Sum's other input (the shortcut, x's shape), the ReLU
:mod:`pydagnn.layers.relu`'s. Backward: the ReLU's derivative ``ds = dz * (z > 0)``
(with a leak: ``dz * (leak + (1 - leak) * (z > 0))``; the output's sign pattern is the
input's for leak >= 0, MatConvNet's short circuit) is the derivative of both Sum inputs,
so it is returned for ``s`` and BN's backward (MatConvNet's CPU formula, see bnorm.py)
takes it for x.

Why: run as three layers, BN writes its output h (a pass over the map), the Sum reads h
and s and writes another map, the ReLU reads that and writes a third; backward, the ReLU
writes ``ds`` and BN reads it twice. On the CPU the numba kernels of
:mod:`pydagnn.layers.kernels.bnorm_cpu` add s and apply the ReLU inside BN's
normalisation pass (neither h nor the Sum's output is allocated), and write ``ds``
while taking BN's backward sums (the pass that reads dz anyway); BN's dx pass reads
``ds``. Backward reuses the batch moments of forward (:class:`BatchNormSumReLU` keeps
them as state), as :class:`pydagnn.layers.bnorm_relu.BatchNormReLU` does.

Anything else (CuPy arrays, a dtype other than float32/float64 or an ``s`` of another
dtype, a negative leak, synced batch statistics) runs the existing BN, Sum and ReLU one
after the other, which is always what the three layers compute.

:class:`BatchNormSumReLU` is not a MatConvNet type and is never saved:
:func:`pydagnn.models.fuse.fuse_bn_relu` makes it from a net's own ``dagnn.BatchNorm``,
``dagnn.Sum`` and ``dagnn.ReLU`` blocks as a :class:`pydagnn.plan.FusedGroup`.
"""

from pydagnn.layers.bnorm import bnorm_backward, bnorm_backward_fixed_moments, bnorm_forward
from pydagnn.layers.bnorm_relu import (BatchNormReLU, check_bn_args, fused_cpu,
                                       fused_forward_cpu, masked_backward_args,
                                       masked_backward_cpu, moments_derivative, plane_view)
from pydagnn.layers.kernels import bnorm_cpu as _kc
from pydagnn.layers.relu import relu_backward, relu_forward
from pydagnn.layers.sum import sum_forward

__all__ = ['bnorm_sum_relu_forward', 'bnorm_sum_relu_backward',
           'bnorm_sum_relu_backward_fixed_moments', 'BatchNormSumReLU']


def _check_s(x, s, op):
    if s.shape != x.shape:
        raise ValueError(f'{op}: the shortcut s has shape {s.shape}, x has shape {x.shape} '
                         f'(the Sum needs equal shapes)')
    return s


def bnorm_sum_relu_forward(x, s, g, b, moments=None, epsilon=1e-5, leak=0):
    """``relu_forward(sum_forward([bnorm_forward(x, g, b, moments, epsilon)[0], s]), leak)``.

    x, s: H x W x C x N (the same shape); g, b: C elements; moments: None (batch
    statistics) or ``C x 2`` ``[mu, sigma]`` used as given. Returns ``(z, moments)``: z
    Fortran-contiguous, the ``(C, 2)`` moments used."""
    x = check_bn_args(x, g, b, 'bnorm_sum_relu_forward')
    s = _check_s(x, s, 'bnorm_sum_relu_forward')
    leak = float(leak)
    if fused_cpu(x) and fused_cpu(s) and s.dtype == x.dtype:
        return _forward_cpu(x, s, g, b, moments, epsilon, leak)
    h, m = bnorm_forward(x, g, b, moments=moments, epsilon=epsilon)
    return relu_forward(sum_forward([h, s]), leak), m


def bnorm_sum_relu_backward(x, g, b, z, dz, moments=None, epsilon=1e-5, leak=0):
    """The three layers' backward: ``ds = relu_backward(z, dz, leak)`` (the derivative of
    the shortcut, and of the BN output), then ``bnorm_backward(x, g, b, ds, moments,
    epsilon)``. Returns ``(dx, ds, dg, db, moments)``, dx and ds Fortran-contiguous.

    z: the forward output (its sign gives the ReLU mask, which needs leak >= 0).
    moments: None (the batch moments are recomputed) or ``C x 2``, given to BN's formula
    (the batch moments of forward give the same numbers as recomputing them)."""
    x, z, dz, leak = masked_backward_args(x, g, b, z, dz, leak, 'bnorm_sum_relu_backward')
    if fused_cpu(x):
        return masked_backward_cpu(x, g, b, z, dz, moments, epsilon, leak)
    ds = relu_backward(z, dz, leak)
    dx, dg, db, m = bnorm_backward(x, g, b, ds, moments=moments, epsilon=epsilon)
    return dx, ds, dg, db, m


def bnorm_sum_relu_backward_fixed_moments(x, g, b, z, dz, moments, leak=0):
    """The 'test'-mode derivative: ``ds`` as :func:`bnorm_sum_relu_backward`, then
    ``bnorm_backward_fixed_moments`` of it -> ``(dx, ds, dg, db)``. Not fused (a
    backward in test mode is rare)."""
    ds = relu_backward(z, dz, float(leak))
    dx, dg, db = bnorm_backward_fixed_moments(x, g, b, ds, moments)
    return dx, ds, dg, db


# ---------------------------------------------------------------------------- CPU
# The (N, C, H*W) views and the split of their planes of bnorm_relu.py.
def _forward_cpu(x, s, g, b, moments, epsilon, leak):
    s3 = plane_view(s, x.dtype)
    return fused_forward_cpu(x, g, b, moments, epsilon, leak,
                             lambda x3, z3, *rest: _kc.normalize_sum_relu(x3, s3, z3, *rest))


# ---------------------------------------------------------------------------- block
class BatchNormSumReLU(BatchNormReLU):
    """A ``dagnn.BatchNorm`` block, a two-input ``dagnn.Sum`` block adding its output to a
    shortcut, and a ``dagnn.ReLU`` block, as one plan entry: inputs [x (the BN's input),
    s (the Sum's other input)], params the BN's [g, b, moments], outputs [the ReLU's z]
    and one state output (the batch moments of forward, for backward; None in 'test'
    mode).

    Reads the blocks' options at every call and the net's mode, as
    :class:`~pydagnn.layers.bnorm_relu.BatchNormReLU` (whose option readers it shares),
    and gives what the three layers give: the same z; dx, ds, dg, db and the moments
    "derivative" (the batch moments times N) in 'normal' mode; dx, ds, dg, db in 'test'
    mode. Where the fused path does not apply (a negative leak, synced batch
    statistics) it runs the three blocks themselves."""
    type_name = 'pydagnn.BatchNormSumReLU'
    state_outputs = 1

    def __init__(self, bn, sum_block, relu):
        super().__init__(bn, relu)
        self.sum = sum_block

    def forward(self, inputs, params):
        x, s = inputs[0], inputs[1]
        g, b, m = params[0], params[1], params[2]
        leak = self._leak()
        if self._composed(leak):
            return [self.relu.forward([self._sum(inputs, params)], [])[0], None]
        if self.mode == 'test':
            z, _ = bnorm_sum_relu_forward(x, s, g, b, moments=m, epsilon=self._eps(), leak=leak)
            return [z, None]
        z, mom = bnorm_sum_relu_forward(x, s, g, b, epsilon=self._eps(), leak=leak)
        return [z, mom]

    def _sum(self, inputs, params):
        """The Sum block's output: the BN block's output plus s."""
        h = self.bn.forward(inputs[:1], params)[0]
        return self.sum.forward([h, inputs[1]], [])[0]

    def backward(self, inputs, params, der_outputs, outputs):
        x = inputs[0]
        g, b, m = params[0], params[1], params[2]
        dz, (z, mom) = der_outputs[0], outputs
        leak = self._leak()
        if self._composed(leak):
            return self._composed_backward(inputs, params, dz, z)
        if self.mode == 'test':
            dx, ds, dg, db = bnorm_sum_relu_backward_fixed_moments(x, g, b, z, dz, m, leak)
            return [dx, ds], [dg, db, None]
        dx, ds, dg, db, mom = bnorm_sum_relu_backward(x, g, b, z, dz, moments=mom,
                                                      epsilon=self._eps(), leak=leak)
        return [dx, ds], [dg, db, moments_derivative(x, mom, m)]

    def _composed_backward(self, inputs, params, dz, z):
        """The ReLU block's backward, the Sum's, then the BN block's. The ReLU reads its
        input when the leak is negative (the output's sign is not the input's then): the
        Sum's output is recomputed for it."""
        u = self._sum(inputs, params) if self._leak() < 0 else None
        (du,), _ = self.relu.backward([u], [], [dz], [z])
        (dh, ds), _ = self.sum.backward([None, None], [], [du], [None])
        (dx,), dpar = self.bn.backward(inputs[:1], params, [dh], [None])
        return [dx, ds], dpar

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]
