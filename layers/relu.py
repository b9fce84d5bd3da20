"""Rectified linear unit: ``vl_nnrelu`` and ``dagnn.ReLU``.

``y = max(x, 0)``, or with a leak ``y = x * (leak + (1 - leak) * (x > 0))``.
Backward: ``dx = dy * (x > 0)`` (so the derivative at exactly 0 is 0), or
``dy * (leak + (1 - leak) * (x > 0))`` with a leak.
"""
from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register

from .loss import as_scalar, opts_to_dict

__all__ = ['relu_forward', 'relu_backward', 'ReLU']


def _slope(x, leak):
    pos = x > 0
    if leak == 0:
        return pos
    dt = x.dtype.type
    return dt(leak) + dt(1 - leak) * pos


def relu_forward(x, leak=0):
    """``vl_nnrelu(x, [], 'leak', leak)``; result Fortran-contiguous, x's dtype."""
    xp = get_array_module(x)
    leak = float(leak)
    if xp.__name__ == 'cupy':   # one coalesced kernel in x's memory order
        from pydagnn.layers.kernels import eltwise_gpu
        return eltwise_gpu.relu_forward(x, leak)
    if leak == 0:
        y = xp.maximum(x, x.dtype.type(0))
    else:
        y = x * _slope(x, leak)
    return xp.asfortranarray(y)


def relu_backward(x, dy, leak=0):
    """``vl_nnrelu(x, dy, 'leak', leak)``: ``dy * (x > 0)`` (with a leak,
    ``dy * (leak + (1 - leak) * (x > 0))``). ``x`` may also be the forward output
    when ``leak >= 0`` (the sign pattern is the same), as MatConvNet's short circuit does."""
    xp = get_array_module(x)
    if dy.shape != x.shape:
        if dy.size != x.size:
            raise ValueError(f'relu_backward: dy has shape {dy.shape}, x has shape {x.shape}')
        dy = dy.reshape(x.shape, order='F')
    leak = float(leak)
    if xp.__name__ == 'cupy':
        from pydagnn.layers.kernels import eltwise_gpu
        return eltwise_gpu.relu_backward(x, dy, leak)
    if leak == 0:
        dx = dy * (x > 0)
    else:
        dx = dy * _slope(x, leak)
    return xp.asfortranarray(dx.astype(x.dtype, copy=False))


@register('dagnn.ReLU')
class ReLU(Layer):
    """``dagnn.ReLU``: inputs [x], outputs [y]. ``opts`` may carry ``{'leak', v}``
    (it overrides the property, as vl_argparse does in the original).

    ``useShortCircuit`` (MatConvNet: backward from the output, letting the input be
    freed): backward uses ``inputs[0]`` when the engine passes it, else ``outputs[0]``
    (equivalent for leak >= 0)."""
    properties = {'useShortCircuit': True, 'leak': 0, 'opts': []}

    @property
    def backward_needs_inputs(self):
        """False (the engine may free the input after forward, MatConvNet's short
        circuit) when ``useShortCircuit`` and leak >= 0: the output's sign pattern is
        the input's then."""
        return not (bool(self.useShortCircuit) and self._leak() >= 0)

    def _leak(self):
        o = opts_to_dict(self.opts, 'ReLU.opts')
        return float(as_scalar(o.get('leak', self.leak)))

    def forward(self, inputs, params):
        return [relu_forward(inputs[0], self._leak())]

    def backward(self, inputs, params, der_outputs, outputs):
        ref = inputs[0] if inputs and inputs[0] is not None else outputs[0]
        return [relu_backward(ref, der_outputs[0], self._leak())], []

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]
