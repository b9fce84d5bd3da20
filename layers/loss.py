"""Losses: ``vl_nnloss`` and ``dagnn.Loss``.

``x`` is H x W x C x N (scores). Categorical losses take 1-based class labels, one per
image (N elements, the same label for every pixel) or one per pixel (H*W*N elements);
attribute (binary) losses take labels of +1 / -1, one per score (H*W*C*N elements).
A label 0 means "ignore" (weight 0). Optional instance weights multiply every term
(categorical: broadcast to H x W x 1 x N; binary: to H x W x C x N; MATLAB bsxfun rules,
i.e. missing trailing dimensions are singletons; N or H*W*N elements are also accepted
for categorical losses).

Per term t (summed, weighted, over all pixels and images; the output is a 1x1x1x1 array):

- ``softmaxlog``: ``logsumexp_c(x) - x(label)``           (backward ``softmax(x) - onehot``)
- ``log``: ``-log(x(label))``                            (backward ``-1/max(x(label), 1e-8)``)
- ``classerror``: ``argmax_c x != label`` (first maximum wins)  (backward 0)
- ``topkerror``: label not among the top-k scores (a stable descending sort: ties rank
  by index)                                             (backward 0)
- ``mhinge``: ``max(0, 1 - x(label))``;
  ``mshinge``: ``max(0, 1 - x(label) + max_{q != label} x(q))``
- ``binaryerror``: ``sign(x - threshold) != c``          (backward 0)
- ``binarylog``: ``-log(c (x - 1/2) + 1/2)``; ``logistic``: ``log(1 + exp(-c x))``;
  ``hinge``: ``max(0, 1 - c x)``

Output dtype: x's, except ``topkerror`` without instance weights, which is float64 as in
the original (whose sum of logical comparisons is double). The original also turns
topkerror single when some label is 0; pydagnn keeps float64 there (the values are
exact counts either way).
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers._common import as4d, as_scalar, first_value, opts_to_dict

__all__ = ['loss_forward', 'loss_backward', 'Loss', 'opts_to_dict', 'as_scalar',
           'CATEGORICAL_LOSSES', 'BINARY_LOSSES']

CATEGORICAL_LOSSES = ('softmaxlog', 'log', 'classerror', 'topkerror', 'mhinge', 'mshinge')
BINARY_LOSSES = ('binaryerror', 'binarylog', 'logistic', 'hinge')


def _prepare(x, label, loss, instance_weights, op):
    """Returns (x4, c, w, loss): c the labels shaped like the terms, (H,W,1,N) or
    (H,W,C,N), in x's dtype; w the per-term weights (label != 0, times the instance
    weights), broadcastable to c."""
    xp = get_array_module(x)
    loss = str(loss).lower()
    if loss not in CATEGORICAL_LOSSES and loss not in BINARY_LOSSES:
        known = ', '.join(CATEGORICAL_LOSSES + BINARY_LOSSES)
        raise ValueError(f'{op}: unknown loss {loss!r} (known: {known})')
    x4 = as4d(x, 'x', op)
    H, W, C, N = x4.shape
    label = xp.asarray(label)
    n = label.size
    if loss in CATEGORICAL_LOSSES:
        tshape = (H, W, 1, N)
        if n == N:
            c = xp.broadcast_to(label.reshape(1, 1, 1, N, order='F'), tshape)
        elif n == H * W * N:
            c = label.reshape(tshape, order='F')
        else:
            raise ValueError(f'{op} ({loss}): label has shape {label.shape} ({n} elements); '
                             f'x has shape {x4.shape}: expected N = {N} or H*W*N = {H * W * N} '
                             f'labels')
    else:
        tshape = (H, W, C, N)
        if n == H * W * C * N:
            c = label.reshape(tshape, order='F')
        elif C == 1 and n == N:
            c = xp.broadcast_to(label.reshape(1, 1, 1, N, order='F'), tshape)
        else:
            raise ValueError(f'{op} ({loss}): label has shape {label.shape} ({n} elements); '
                             f'x has shape {x4.shape}: expected H*W*C*N = {H * W * C * N} '
                             f'labels (+1/-1, 0 = ignore)')
    c = c.astype(x.dtype, copy=False)
    w = (c != 0).astype(x.dtype)
    if instance_weights is not None:
        iw = xp.asarray(instance_weights).astype(x.dtype, copy=False)
        iw4 = as4d(iw, 'instance weights', op)
        if all(iw4.shape[i] in (1, tshape[i]) for i in range(4)):
            pass                                    # MATLAB bsxfun broadcasting
        elif loss in CATEGORICAL_LOSSES and iw.size == N:
            iw4 = iw.reshape(1, 1, 1, N)            # one weight per image
        elif iw.size == int(np.prod(tshape)):
            iw4 = iw.reshape(tshape, order='F')     # one weight per term
        else:
            raise ValueError(f'{op} ({loss}): instance weights of shape {iw.shape} do not '
                             f'broadcast to the per-term shape {tshape} (x has shape {x4.shape})')
        w = w * iw4
    return x4, c, w, loss


def _label_index(c, C, xp):
    """0-based class index per term, ``max(c - 1, 0)`` as MatConvNet (label 0 -> class 1),
    as an int array of c's shape; checks the range on the host (NumPy only)."""
    if xp is np:
        bad = (c < 0) | (c > C) | (c != np.floor(c))
        if bad.any():
            v = c[bad].reshape(-1)[0]
            raise ValueError(f'loss: labels must be integers in 0..{C} (0 = ignore); got {v}')
    return xp.maximum(c - 1, 0).astype(np.int64)


def _take(x4, idx):
    """x4 (H,W,C,N) gathered along axis 2 at idx (H,W,1,N)."""
    xp = get_array_module(x4)
    return xp.take_along_axis(x4, idx, axis=2)


def _logsumexp(x4):
    xp = get_array_module(x4)
    m = x4.max(axis=2, keepdims=True)
    return m + xp.log(xp.exp(x4 - m).sum(axis=2, keepdims=True))


def _sigmoid(z):
    xp = get_array_module(z)
    e = xp.exp(-xp.abs(z))
    one = z.dtype.type(1)
    return xp.where(z >= 0, one / (one + e), e / (one + e))


def _terms(x4, c, loss, top_k, threshold):
    xp = get_array_module(x4)
    C = x4.shape[2]
    dt = x4.dtype.type
    if loss in ('softmaxlog', 'log', 'mhinge', 'mshinge'):
        idx = _label_index(c, C, xp)
        xc = _take(x4, idx)
        if loss == 'softmaxlog':
            return _logsumexp(x4) - xc
        if loss == 'log':
            return -xp.log(xc)
        if loss == 'mhinge':
            return xp.maximum(dt(0), dt(1) - xc)
        q = x4.copy()
        xp.put_along_axis(q, idx, -xp.inf, axis=2)
        return xp.maximum(dt(0), dt(1) - xc + q.max(axis=2, keepdims=True))
    if loss == 'classerror':
        chat = xp.argmax(x4, axis=2)[:, :, None, :] + 1
        return (c != chat).astype(x4.dtype)
    if loss == 'topkerror':
        k = int(top_k)
        if k < 1 or k > C:
            raise ValueError(f'loss topkerror: topK = {k} must be in 1..C = {C} '
                             f'(x has shape {x4.shape})')
        valid = (c >= 1) & (c <= C)
        idx = xp.clip(c - 1, 0, C - 1).astype(np.int64)
        s = _take(x4, idx)
        ar = xp.arange(C).reshape(1, 1, C, 1)
        rank = (x4 > s).sum(axis=2, keepdims=True) \
            + ((x4 == s) & (ar < idx)).sum(axis=2, keepdims=True)
        return 1.0 - (valid & (rank < k)).astype(np.float64)
    if loss == 'binaryerror':
        return (xp.sign(x4 - dt(threshold)) != c).astype(x4.dtype)
    if loss == 'binarylog':
        return -xp.log(c * (x4 - dt(0.5)) + dt(0.5))
    if loss == 'logistic':
        a = -c * x4
        b = xp.maximum(dt(0), a)
        return b + xp.log(xp.exp(-b) + xp.exp(a - b))
    if loss == 'hinge':
        return xp.maximum(dt(0), dt(1) - c * x4)
    raise AssertionError(loss)


def loss_forward(x, label, loss='softmaxlog', instance_weights=None, top_k=5, threshold=0):
    """``vl_nnloss(x, label, 'loss', loss, 'instanceWeights', w, 'topK', k)``: the weighted
    sum of the per-term losses as a ``(1, 1, 1, 1)`` array (x's dtype; float64 for
    topkerror without instance weights)."""
    x4, c, w, loss = _prepare(x, label, loss, instance_weights, 'loss_forward')
    t = _terms(x4, c, loss, top_k, threshold)
    if loss == 'topkerror' and instance_weights is None:
        y = (w.astype(np.float64) * t).sum()
    else:
        y = (w * t.astype(x4.dtype, copy=False)).sum()
    return y.reshape(1, 1, 1, 1)


def loss_backward(x, label, dy, loss='softmaxlog', instance_weights=None, top_k=5, threshold=0):
    """``vl_nnloss(x, label, dy, ...)``: the derivative with respect to x (x's shape and
    dtype, Fortran-contiguous); ``dy`` is a scalar (any array with one element)."""
    xp = get_array_module(x)
    x4, c, w, loss = _prepare(x, label, loss, instance_weights, 'loss_backward')
    dyv = xp.asarray(dy)
    if dyv.size != 1:
        raise ValueError(f'loss_backward: dy must be a scalar (the loss is a scalar), '
                         f'got shape {dyv.shape}')
    dt = x4.dtype
    g = w * dyv.astype(dt).reshape(())           # per-term weight times dy
    C = x4.shape[2]
    if loss in ('classerror', 'topkerror', 'binaryerror'):
        dx = xp.zeros(x4.shape, dtype=dt, order='F')
    elif loss == 'softmaxlog':
        idx = _label_index(c, C, xp)
        m = x4.max(axis=2, keepdims=True)
        dx = xp.exp(x4 - m)
        dx /= dx.sum(axis=2, keepdims=True)
        xp.put_along_axis(dx, idx, _take(dx, idx) - dt.type(1), axis=2)
        dx *= g
    elif loss == 'log':
        idx = _label_index(c, C, xp)
        dx = xp.zeros(x4.shape, dtype=dt, order='F')
        xp.put_along_axis(dx, idx, -g / xp.maximum(_take(x4, idx), dt.type(1e-8)), axis=2)
    elif loss == 'mhinge':
        idx = _label_index(c, C, xp)
        dx = xp.zeros(x4.shape, dtype=dt, order='F')
        xp.put_along_axis(dx, idx, -g * (_take(x4, idx) < 1), axis=2)
    elif loss == 'mshinge':
        idx = _label_index(c, C, xp)
        q = x4.copy()
        xp.put_along_axis(q, idx, -xp.inf, axis=2)
        qi = xp.argmax(q, axis=2)[:, :, None, :]
        wv = g * ((_take(x4, idx) - _take(x4, qi)) < 1)
        dx = xp.zeros(x4.shape, dtype=dt, order='F')
        xp.put_along_axis(dx, idx, -wv, axis=2)
        xp.put_along_axis(dx, qi, wv, axis=2)
    elif loss == 'binarylog':
        dx = -g / (x4 + (c - dt.type(1)) * dt.type(0.5))
    elif loss == 'logistic':
        # -dy c / (1 + exp(c x)) = -dy c sigmoid(-c x), without overflow
        dx = -g * c * _sigmoid(-c * x4)
    elif loss == 'hinge':
        dx = -g * c * (c * x4 < 1)
    else:
        raise AssertionError(loss)
    return xp.asfortranarray(dx.astype(dt, copy=False)).reshape(x.shape, order='F')


@register('dagnn.Loss')
class Loss(Layer):
    """``dagnn.Loss``: inputs [x, label] or [x, label, instance_weights], outputs [y].

    Properties: ``loss`` ('softmaxlog'), ``ignoreAverage`` (False), ``opts`` (a cell
    ``{'topK', 5, 'instanceWeights', w, 'threshold', t}`` as a list, or a dict; names
    are case-insensitive; ``opts`` may also override ``loss``). A third input, when
    given, is the instance weights (it takes precedence over ``opts``).

    Transient statistics, as Loss.m (GM-SOP fork): ``numAveraged`` (an int) and
    ``average = (numAveraged * average + y) / (numAveraged + H*W*N)``, a NumPy scalar
    (a 0-d CuPy array on the GPU: no host sync) after the first forward; ``reset()``
    zeroes both. The training printout shows ``average``.
    """
    properties = {'loss': 'softmaxlog', 'ignoreAverage': False, 'opts': []}
    is_loss = True

    def __init__(self, **props):
        self.average = 0
        self.numAveraged = 0
        super().__init__(**props)

    def _args(self, inputs):
        o = opts_to_dict(self.opts, 'Loss.opts')
        unknown = set(o) - {'topk', 'instanceweights', 'threshold', 'loss', 'classweights'}
        if unknown:
            raise ValueError(f'Loss.opts: unknown option(s) {sorted(unknown)} '
                             f'(known: topK, instanceWeights, threshold, loss, classWeights)')
        loss = o.get('loss', self.loss)
        if isinstance(loss, np.ndarray):
            loss = str(first_value(loss))
        iw = inputs[2] if len(inputs) > 2 and inputs[2] is not None else o.get('instanceweights')
        if isinstance(iw, np.ndarray) and iw.size == 0:
            iw = None
        return dict(loss=str(loss), instance_weights=iw, top_k=int(as_scalar(o.get('topk', 5))),
                    threshold=float(as_scalar(o.get('threshold', 0))))

    def forward(self, inputs, params):
        x, label = inputs[0], inputs[1]
        y = loss_forward(x, label, **self._args(inputs))
        if not bool(self.ignoreAverage):
            s = x.shape + (1,) * (4 - x.ndim)
            n = self.numAveraged
            m = n + s[0] * s[1] * s[3]
            self.average = (n * self.average + y.reshape(())) / m
            self.numAveraged = m
        return [y]

    def backward(self, inputs, params, der_outputs, outputs):
        x, label = inputs[0], inputs[1]
        dx = loss_backward(x, label, der_outputs[0], **self._args(inputs))
        return [dx] + [None] * (len(inputs) - 1), []

    def get_output_sizes(self, input_sizes):
        return [(1, 1, 1, 1)]

    def reset(self):
        self.average = 0
        self.numAveraged = 0
