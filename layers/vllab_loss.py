"""LapSRN's regression loss (``dagnn.vllab_dag_loss`` of github phoenix104104/LapSRN, a
``dagnn.Loss`` subclass its released models carry), CPU and GPU (array code over ``xp``).

``vllab_loss_forward(x, z, loss_type='L1', lambda_=1, average_by_size=False) -> y`` (1x1),
``vllab_loss_backward(x, z, dy, ...) -> dx``. With ``d = x - z``:

* 'L1' (Charbonnier): ``y = sum sqrt(d^2 + 1e-6)``, ``dx = d / sqrt(d^2 + 1e-6) * dy``;
* 'L2': ``y = 0.5 * sum d^2``, ``dx = d * dy``;

both times ``lambda``, and divided by ``H * W`` when ``average_by_size``. The original's
backward leaves out that division (its derivative is then ``H * W`` times too large);
here the derivative is the derivative of the forward. The label ``z`` gets no derivative.
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import register
from pydagnn.layers._common import as_scalar, as_text, flag
from pydagnn.layers.loss import Loss

__all__ = ['vllab_loss_forward', 'vllab_loss_backward', 'vllab_dag_loss']

_EPS = 1e-6   # vllab_nn_L1_loss's Charbonnier epsilon


def _prep(x, z, loss_type, op):
    xp = get_array_module(x)
    x = xp.asarray(x)
    z = xp.asarray(z)
    if x.dtype.kind != 'f':
        raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
    if z.size != x.size:
        raise ValueError(f'{op}: the target has shape {z.shape}, x has shape {x.shape}')
    kind = as_text(loss_type)
    if kind not in ('L1', 'L2'):
        raise ValueError(f"{op}: loss_type must be 'L1' or 'L2', got {kind!r}")
    d = x - z.reshape(x.shape, order='F').astype(x.dtype, copy=False)
    return xp, x, d, kind


def _scale(x, lambda_, average_by_size):
    s = float(as_scalar(lambda_))
    if flag(average_by_size):
        shape = np.shape(x) + (1, 1)
        s /= shape[0] * shape[1]
    return s


def vllab_loss_forward(x, z, loss_type='L1', lambda_=1, average_by_size=False):
    """The loss of ``x`` against the target ``z`` (x's size): a 1 x 1 array of x's dtype."""
    xp, x, d, kind = _prep(x, z, loss_type, 'vllab_loss_forward')
    y = xp.sqrt(d * d + x.dtype.type(_EPS)).sum() if kind == 'L1' else x.dtype.type(0.5) * (d * d).sum()
    return (y * x.dtype.type(_scale(x, lambda_, average_by_size))).reshape(1, 1)


def vllab_loss_backward(x, z, dy, loss_type='L1', lambda_=1, average_by_size=False):
    """The derivative with respect to ``x`` (x's shape, Fortran-contiguous)."""
    xp, x, d, kind = _prep(x, z, loss_type, 'vllab_loss_backward')
    g = d / xp.sqrt(d * d + x.dtype.type(_EPS)) if kind == 'L1' else d
    s = x.dtype.type(_scale(x, lambda_, average_by_size))
    dyv = xp.asarray(dy, dtype=x.dtype).reshape(())
    return xp.asfortranarray(g * (s * dyv))


@register('dagnn.vllab_dag_loss')
class vllab_dag_loss(Loss):  # noqa: N801  (the MatConvNet class name)
    """``dagnn.vllab_dag_loss``: inputs [x, target], outputs [y]. Properties: ``lambda``,
    ``loss_type`` ('L1' | 'L2'), ``average_by_size``, and those of dagnn.Loss (kept, unused:
    the original's forward ignores them). ``average`` accumulates per image, as the
    original's does."""
    properties = {'loss': 'softmaxlog', 'ignoreAverage': False, 'opts': [],
                  'lambda': 1, 'loss_type': 'L2', 'average_by_size': False}

    def _args(self, inputs):
        return dict(loss_type=self.loss_type, lambda_=getattr(self, 'lambda'),
                    average_by_size=self.average_by_size)

    def forward(self, inputs, params):
        y = vllab_loss_forward(inputs[0], inputs[1], **self._args(inputs))
        n = self.numAveraged
        m = n + (np.shape(inputs[0]) + (1, 1, 1, 1))[3]
        self.average = (n * self.average + y.reshape(())) / m
        self.numAveraged = m
        return [y]

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None, None], []
        dx = vllab_loss_backward(inputs[0], inputs[1], der_outputs[0], **self._args(inputs))
        return [dx.reshape(np.shape(inputs[0]), order='F'), None], []

    def get_output_sizes(self, input_sizes):
        return [(1, 1, 1, 1)]
