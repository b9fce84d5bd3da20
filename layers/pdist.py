"""p-distance to a target (MatConvNet's ``vl_nnpdist`` and ``dagnn.PDist``).

``pdist_forward(x, x0, p=2, no_root=False, epsilon=1e-6, aggregate=False,
instance_weights=None) -> y``
``pdist_backward(x, x0, dy, p=2, ...) -> (dx, dx0)``

x is ``H x W x C x N``; x0 has the same shape or is ``1 x 1 x C x N`` (one target per
image, broadcast over space). With ``d = x - x0``:

* ``y = (sum_c |d|^p)^(1/p)`` per location (``H x W x 1 x N``); ``no_root``: without the
  1/p power (p = 2: the squared L2 distance).
* ``instance_weights`` (a scalar or one weight per location, ``H x W x 1 x N``)
  multiplies y; ``aggregate`` sums everything into a ``1 x 1 x 1 x 1`` scalar.

Derivatives as ``vl_nnpdist`` writes them (dy is first multiplied by the weights):
p = 1: ``dy sign(d)``; with the root, p = 2: ``dy d / sqrt(max(sum d^2, eps))``;
p < 1: ``dy (sum |d|^p)^((1-p)/p) max(|d|, eps)^(p-1) sign(d)``; other p:
``dy max(sum |d|^p, eps)^((1-p)/p) |d|^(p-1) sign(d)``; without the root, p = 2:
``2 dy d``; p < 1: ``p dy max(|d|, eps)^(p-1) sign(d)``; other p: ``p dy |d|^(p-1) sign(d)``.
``epsilon`` only enters the derivatives. ``dx0 = -dx``, of x's shape even when x0 is
``1 x 1 x C x N`` (as MatConvNet returns it); the block sums it over space to x0's shape,
which is the derivative a graph needs.
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import register
from pydagnn.layers._common import as4d
from pydagnn.layers.loss import Loss, as_scalar, opts_to_dict

__all__ = ['pdist_forward', 'pdist_backward', 'PDist']


def _prep(x, x0, op):
    xp = get_array_module(x, x0)
    x = as4d(x, 'x', op, xp)
    x0 = as4d(x0, 'x0', op, xp)
    if x.dtype.kind != 'f':
        raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
    H, W, C, N = x.shape
    if x0.shape != x.shape and x0.shape != (1, 1, C, N):
        raise ValueError(f'{op}: x0 has shape {x0.shape}; expected {x.shape} or (1, 1, {C}, {N})')
    return xp, x, x0.astype(x.dtype, copy=False)


def _weights(w, x, xp, op):
    """None, or the weights as an array broadcastable to ``H x W x 1 x N``."""
    if w is None:
        return None
    w = xp.asarray(w, dtype=x.dtype)
    if w.size == 0:
        return None
    if w.size == 1:
        return w.reshape(1, 1, 1, 1)
    H, W, C, N = x.shape
    if w.size != H * W * N:
        raise ValueError(f'{op}: instanceWeights has shape {w.shape}; expected a scalar or '
                         f'{H * W * N} elements (H x W x 1 x N = {(H, W, 1, N)})')
    return w.reshape(H, W, 1, N, order='F')


def _p(p):
    return float(as_scalar(p))


def pdist_forward(x, x0, p=2, no_root=False, epsilon=1e-6, aggregate=False,
                  instance_weights=None):
    """``vl_nnpdist(x, x0, p, 'noRoot', no_root, 'aggregate', aggregate,
    'instanceWeights', w)``; see the module docstring."""
    xp, x, x0 = _prep(x, x0, 'pdist_forward')
    p = _p(p)
    d = x - x0
    if p == 1:
        y = xp.abs(d).sum(axis=2, keepdims=True)
    elif p == 2:
        y = (d * d).sum(axis=2, keepdims=True)
        if not no_root:
            y = xp.sqrt(y)
    else:
        y = (xp.abs(d) ** p).sum(axis=2, keepdims=True)
        if not no_root:
            y = y ** (1.0 / p)
    w = _weights(instance_weights, x, xp, 'pdist_forward')
    if w is not None:
        y = w * y
    if aggregate:
        y = y.sum().reshape(1, 1, 1, 1)
    return xp.asfortranarray(y.astype(x.dtype, copy=False))


def pdist_backward(x, x0, dy, p=2, no_root=False, epsilon=1e-6, aggregate=False,
                   instance_weights=None):
    """Derivatives of :func:`pdist_forward` projected on dy: ``(dx, dx0)``, both of x's
    shape (``dx0 = -dx``, as ``vl_nnpdist``)."""
    xp, x, x0 = _prep(x, x0, 'pdist_backward')
    p = _p(p)
    H, W, C, N = x.shape
    dy = xp.asarray(dy, dtype=x.dtype)
    want = (1, 1, 1, 1) if aggregate else (H, W, 1, N)
    if dy.size != int(np.prod(want)):
        raise ValueError(f'pdist_backward: dy has shape {dy.shape}, expected {want}')
    dy = dy.reshape(want, order='F')
    w = _weights(instance_weights, x, xp, 'pdist_backward')
    if w is not None:
        dy = w * dy
    eps = x.dtype.type(float(as_scalar(epsilon)))
    d = x - x0
    sd = xp.sign(d)
    if p == 1:
        dx = dy * sd
    elif not no_root:
        if p == 2:
            dx = dy * xp.maximum((d * d).sum(axis=2, keepdims=True), eps) ** -0.5 * d
        elif p < 1:
            s = (xp.abs(d) ** p).sum(axis=2, keepdims=True) ** ((1 - p) / p)
            dx = dy * s * (xp.maximum(xp.abs(d), eps) ** (p - 1) * sd)
        else:
            s = xp.maximum((xp.abs(d) ** p).sum(axis=2, keepdims=True), eps) ** ((1 - p) / p)
            dx = dy * s * (xp.abs(d) ** (p - 1) * sd)
    else:
        if p == 2:
            dx = 2 * dy * d
        elif p < 1:
            dx = p * dy * (xp.maximum(xp.abs(d), eps) ** (p - 1) * sd)
        else:
            dx = p * dy * (xp.abs(d) ** (p - 1) * sd)
    dx = xp.asfortranarray(xp.broadcast_to(dx, x.shape).astype(x.dtype, copy=False))
    return dx, xp.asfortranarray(-dx)


@register('dagnn.PDist')
class PDist(Loss):
    """``dagnn.PDist`` (a ``dagnn.Loss``): inputs [x, x0] or [x, x0, instanceWeights],
    outputs [y]. Properties: ``p`` (2), ``aggregate`` (True), ``noRoot`` (False),
    ``epsilon`` (1e-6), and the Loss ones (``loss`` = 'pdist', ``ignoreAverage``,
    ``opts``: a vl_nnpdist option cell, applied after the properties as in PDist.m).
    The derivative of x0 is summed to x0's shape; the weights get none.
    """
    properties = {'loss': 'pdist', 'ignoreAverage': False, 'opts': [],
                  'p': 2, 'aggregate': True, 'noRoot': False, 'epsilon': 1e-6}

    def _pd_args(self, inputs):
        if len(inputs) not in (2, 3):
            raise ValueError(f'PDist: expected 2 or 3 inputs, got {len(inputs)}')
        a = {'noroot': self.noRoot, 'epsilon': self.epsilon, 'aggregate': self.aggregate,
             'instanceweights': inputs[2] if len(inputs) == 3 else None}
        o = opts_to_dict(self.opts, 'PDist.opts')
        unknown = set(o) - set(a) - {'nocudnn', 'cudnn'}
        if unknown:
            raise ValueError(f'PDist.opts: unknown option(s) {sorted(unknown)} '
                             f'(known: noRoot, epsilon, aggregate, instanceWeights)')
        a.update({k: v for k, v in o.items() if k in a})
        return dict(p=self.p, no_root=bool(as_scalar(a['noroot'])),
                    epsilon=float(as_scalar(a['epsilon'])),
                    aggregate=bool(as_scalar(a['aggregate'])),
                    instance_weights=a['instanceweights'])

    def forward(self, inputs, params):
        y = pdist_forward(inputs[0], inputs[1], **self._pd_args(inputs))
        if not bool(as_scalar(self.ignoreAverage)):
            s = inputs[0].shape + (1,) * (4 - inputs[0].ndim)
            n = self.numAveraged
            m = n + s[0] * s[1] * s[3]
            self.average = (n * self.average + (y.reshape(()) if y.size == 1 else y)) / m
            self.numAveraged = m
        return [y]

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None] * len(inputs), []
        dx, dx0 = pdist_backward(inputs[0], inputs[1], der_outputs[0],
                                 **self._pd_args(inputs))
        x0 = inputs[1]
        if dx0.shape != x0.shape:
            xp = get_array_module(dx0)
            dx0 = xp.asfortranarray(dx0.sum(axis=(0, 1), keepdims=True)).reshape(x0.shape)
        dx = dx.reshape(np.shape(inputs[0]), order='F')
        return [dx, dx0] + [None] * (len(inputs) - 2), []

    def get_output_sizes(self, input_sizes):
        s = input_sizes[0]
        if bool(as_scalar(self.aggregate)):
            return [(1, 1, 1, 1)]
        if s is None:
            return [None]
        s = tuple(int(v) for v in s) + (1,) * (4 - len(s))
        return [(s[0], s[1], 1, s[3])]
