"""Logistic sigmoid: ``vl_nnsigmoid`` and ``dagnn.Sigmoid``.

``y = 1 / (1 + exp(-x))`` (evaluated without overflow); backward ``dy * y * (1 - y)``.
"""
from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register

__all__ = ['sigmoid_forward', 'sigmoid_backward', 'Sigmoid']


def sigmoid_forward(x):
    """Elementwise logistic function, x's dtype, Fortran-contiguous."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))          # in (0, 1]: never overflows
    one = x.dtype.type(1)
    y = xp.where(x >= 0, one / (one + e), e / (one + e))
    return xp.asfortranarray(y.astype(x.dtype, copy=False))


def sigmoid_backward(x, dy, y=None):
    """``dy * s * (1 - s)`` with ``s = sigmoid(x)`` (pass ``y`` to reuse the forward output)."""
    xp = get_array_module(x if x is not None else y)
    s = sigmoid_forward(x) if y is None else y
    if dy.shape != s.shape:
        if dy.size != s.size:
            raise ValueError(f'sigmoid_backward: dy has shape {dy.shape}, x has shape {s.shape}')
        dy = dy.reshape(s.shape, order='F')
    return xp.asfortranarray((dy * (s * (s.dtype.type(1) - s))).astype(s.dtype, copy=False))


@register('dagnn.Sigmoid')
class Sigmoid(Layer):
    """``dagnn.Sigmoid``: inputs [x], outputs [y]; no properties."""
    properties = {}

    def forward(self, inputs, params):
        return [sigmoid_forward(inputs[0])]

    def backward(self, inputs, params, der_outputs, outputs):
        y = outputs[0] if outputs and outputs[0] is not None else None
        return [sigmoid_backward(inputs[0], der_outputs[0], y=y)], []

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]
