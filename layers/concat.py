"""Concatenation along one dimension: ``vl_nnconcat`` and ``dagnn.Concat``.

``dim`` is MatConvNet's 1-based dimension (3 = channels = Python axis 2).
"""
from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers._common import first_value, shape4

__all__ = ['concat_forward', 'concat_backward', 'Concat']


def _axis(dim, op):
    d = int(dim)
    if not 1 <= d <= 4:
        raise ValueError(f'{op}: dim must be 1..4 (MatConvNet, 1-based), got {dim!r}')
    return d - 1


def concat_forward(inputs, dim=3):
    """``cat(dim, inputs{:})`` for H x W x C x N arrays; result Fortran-contiguous."""
    if len(inputs) == 0:
        raise ValueError('concat_forward: no inputs')
    ax = _axis(dim, 'concat_forward')
    shapes = [shape4(a.shape, 'arrays', 'concat') for a in inputs]
    ref = shapes[0]
    for k, s in enumerate(shapes):
        if any(s[i] != ref[i] for i in range(4) if i != ax):
            raise ValueError(f'concat_forward: input {k} has shape {s}, input 0 has {ref}; '
                             f'they must agree except along dim {int(dim)}')
    xp = get_array_module(*inputs)
    out_shape = list(ref)
    out_shape[ax] = sum(s[ax] for s in shapes)
    dtype = xp.result_type(*inputs)
    y = xp.empty(tuple(out_shape), dtype=dtype, order='F')
    start = 0
    for a, s in zip(inputs, shapes):
        idx = [slice(None)] * 4
        idx[ax] = slice(start, start + s[ax])
        y[tuple(idx)] = a.reshape(s, order='F')
        start += s[ax]
    return y


def concat_backward(dy, input_sizes, dim=3):
    """Split ``dy`` along ``dim`` into pieces of the given input sizes (4-tuples or
    shapes); each piece a Fortran-contiguous copy."""
    xp = get_array_module(dy)
    ax = _axis(dim, 'concat_backward')
    shapes = [shape4(s, 'arrays', 'concat') for s in input_sizes]
    dy4 = dy.reshape(shape4(dy.shape, 'arrays', 'concat'))
    total = sum(s[ax] for s in shapes)
    if total != dy4.shape[ax]:
        raise ValueError(f'concat_backward: dy has shape {dy.shape} but the inputs {shapes} '
                         f'add up to {total} along dim {int(dim)}')
    out = []
    start = 0
    for s in shapes:
        idx = [slice(None)] * 4
        idx[ax] = slice(start, start + s[ax])
        out.append(xp.asfortranarray(dy4[tuple(idx)]))
        start += s[ax]
    return out


@register('dagnn.Concat')
class Concat(Layer):
    """``dagnn.Concat``: inputs [x1, ..., xk], outputs [y]; property ``dim`` (default 3).
    Old files may carry ``numInputs``: accepted and dropped, as Concat.m's load does."""
    properties = {'dim': 3}

    def __init__(self, **props):
        self.inputSizes = []
        super().__init__(**props)

    def load(self, props):
        props = dict(props)
        props.pop('numInputs', None)
        super().load(props)

    def _dim(self):
        return int(first_value(self.dim))

    def forward(self, inputs, params):
        self.inputSizes = [tuple(a.shape) for a in inputs]
        return [concat_forward(inputs, self._dim())]

    def backward(self, inputs, params, der_outputs, outputs):
        if inputs and all(a is not None for a in inputs):
            sizes = [a.shape for a in inputs]
        else:   # the engine freed the inputs: use the sizes forward recorded (as MatConvNet)
            sizes = self.inputSizes
        return concat_backward(der_outputs[0], sizes, self._dim()), []

    def get_output_sizes(self, input_sizes):
        if any(s is None for s in input_sizes):
            return [None]
        ax = self._dim() - 1
        out = list(shape4(input_sizes[0], 'arrays', 'concat'))
        out[ax] = sum(shape4(s, 'arrays', 'concat')[ax] for s in input_sizes)
        return [tuple(out)]

    def reset(self):
        self.inputSizes = []
