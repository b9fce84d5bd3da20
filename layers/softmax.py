"""Softmax over the channels (dim 3): ``vl_nnsoftmax`` and ``dagnn.SoftMax``.

``y = exp(x - max_c x) / sum_c exp(x - max_c x)``; backward
``dx = y * (dy - sum_c(dy * y))``.
"""
from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers._common import as4d, dy_like

__all__ = ['softmax_forward', 'softmax_backward', 'SoftMax']


def softmax_forward(x):
    """Softmax along axis 2 (MatConvNet dim 3) of an H x W x C x N array."""
    xp = get_array_module(x)
    x4 = as4d(x, 'x', 'softmax_forward')
    e = xp.exp(x4 - x4.max(axis=2, keepdims=True))
    e /= e.sum(axis=2, keepdims=True)
    return xp.asfortranarray(e.reshape(x.shape))


def softmax_backward(x, dy, y=None):
    """``vl_nnsoftmax(x, dy)``; pass ``y`` (the forward output) to skip recomputing it."""
    xp = get_array_module(x if x is not None else y)
    y = softmax_forward(x) if y is None else y
    y4 = as4d(y, 'y', 'softmax_backward')
    dy4 = dy_like(y4, dy, 'softmax_backward')
    dx = y4 * (dy4 - (dy4 * y4).sum(axis=2, keepdims=True))
    return xp.asfortranarray(dx.astype(y.dtype, copy=False).reshape(y.shape))


@register('dagnn.SoftMax')
class SoftMax(Layer):
    """``dagnn.SoftMax``: inputs [x], outputs [y]; no properties."""
    properties = {}

    def forward(self, inputs, params):
        return [softmax_forward(inputs[0])]

    def backward(self, inputs, params, der_outputs, outputs):
        y = outputs[0] if outputs and outputs[0] is not None else None
        return [softmax_backward(inputs[0], der_outputs[0], y=y)], []

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]
