"""Elementwise sum of any number of inputs: ``dagnn.Sum``."""
import numpy as np

from pydagnn.backend import is_gpu_array
from pydagnn.layer import Layer, register
from pydagnn.layers.kernels import eltwise_cpu as _kc
from pydagnn.layers.kernels import eltwise_gpu as _ke
from pydagnn.layers.relu import flat_parts

__all__ = ['sum_forward', 'sum_backward', 'Sum']


def sum_forward(inputs):
    """``inputs[0] + inputs[1] + ...`` (same shapes), Fortran-contiguous."""
    if len(inputs) == 0:
        raise ValueError('sum_forward: no inputs')
    shape = inputs[0].shape
    for k, a in enumerate(inputs[1:], 1):
        if a.shape != shape:
            raise ValueError(f'sum_forward: input {k} has shape {a.shape}, '
                             f'input 0 has shape {shape} '
                             f'(all shapes: {[tuple(t.shape) for t in inputs]})')
    if any(is_gpu_array(a) for a in inputs):
        return _sum_forward_gpu(inputs)
    return _sum_forward_cpu(inputs)


def _sum_forward_cpu(inputs):
    a = inputs[0]
    if (len(inputs) == 2 and a.dtype.kind == 'f' and a.dtype == inputs[1].dtype
            and a.flags.f_contiguous and inputs[1].flags.f_contiguous):
        # the common case (a residual connection): a numba pass on the worker threads
        y = np.empty(a.shape, dtype=a.dtype, order='F')
        af, bf, yf = a.ravel(order='F'), inputs[1].ravel(order='F'), y.ravel(order='F')
        flat_parts(a.size, lambda lo, hi: _kc.add(af, bf, yf, lo, hi))
        return y
    y = inputs[0] + inputs[1] if len(inputs) > 1 else inputs[0].copy(order='F')
    for a in inputs[2:]:
        y += a
    return np.asfortranarray(y)


def _sum_forward_gpu(inputs):
    """One coalesced pass in the inputs' memory order (layers/kernels/eltwise_gpu.py)."""
    import cupy as cp
    return cp.asfortranarray(_ke.sum_forward(inputs))


def sum_backward(dy, num_inputs):
    """The derivative of every input is ``dy`` itself (the same array object, not copies,
    as in MatConvNet: treat it as read-only)."""
    return [dy] * num_inputs


@register('dagnn.Sum')
class Sum(Layer):
    """``dagnn.Sum``: inputs [x1, ..., xk], outputs [y]. No stored properties:
    MatConvNet's ``numInputs`` is transient (set by forward, never saved); it is kept
    here as a plain attribute and accepted (ignored) by ``load`` for old files."""
    #: backward only passes dy on: the engine may free the inputs after forward
    backward_needs_inputs = False
    backward_needs_outputs = False
    properties = {}

    def __init__(self, **props):
        self.numInputs = None
        super().__init__(**props)

    def load(self, props):
        props = dict(props)
        props.pop('numInputs', None)
        super().load(props)

    def forward(self, inputs, params):
        self.numInputs = len(inputs)
        return [sum_forward(inputs)]

    def backward(self, inputs, params, der_outputs, outputs):
        return sum_backward(der_outputs[0], len(inputs)), []

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]
