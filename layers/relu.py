"""Rectified linear unit: ``vl_nnrelu`` and ``dagnn.ReLU``.

``y = max(x, 0)``, or with a leak ``y = x * (leak + (1 - leak) * (x > 0))``.
Backward: ``dx = dy * (x > 0)`` (so the derivative at exactly 0 is 0), or
``dy * (leak + (1 - leak) * (x > 0))`` with a leak.
"""
import numpy as np

from pydagnn.backend import is_gpu_array
from pydagnn.layer import Layer, register
from pydagnn.layers._common import as_scalar, dy_like, opts_to_dict
from pydagnn.layers.kernels import eltwise_cpu as _kc
from pydagnn.layers.kernels import eltwise_gpu as _ke
from pydagnn.layers.kernels.threads_cpu import parallel_for

__all__ = ['relu_forward', 'relu_backward', 'ReLU']


def _slope(x, leak):
    pos = x > 0
    if leak == 0:
        return pos
    dt = x.dtype.type
    return dt(leak) + dt(1 - leak) * pos


def relu_forward(x, leak=0):
    """``vl_nnrelu(x, [], 'leak', leak)``; result Fortran-contiguous, x's dtype."""
    leak = float(leak)
    if is_gpu_array(x):
        return _relu_forward_gpu(x, leak)
    return _relu_forward_cpu(x, leak)


#: CPU: maps smaller than this many elements run in the calling thread
PARALLEL_MIN = 1 << 16


def flat_parts(n, run):
    """``run(a, b)`` over a split of ``range(n)``: on the worker threads for big maps."""
    if n < PARALLEL_MIN:
        run(0, n)
    else:
        parallel_for(lambda a, b, _: run(a, b), n, uses_blas=False)


def _relu_forward_cpu(x, leak):
    if leak == 0 and x.flags.f_contiguous and x.dtype.kind == 'f':
        # numba kernel on the flat F-order arrays, split over the worker threads
        y = np.empty(x.shape, dtype=x.dtype, order='F')
        xf, yf = x.ravel(order='F'), y.ravel(order='F')
        flat_parts(x.size, lambda a, b: _kc.relu_forward(xf, yf, a, b))
        return y
    if leak == 0:
        y = np.maximum(x, x.dtype.type(0))
    else:
        y = x * _slope(x, leak)
    return np.asfortranarray(y)


def _relu_forward_gpu(x, leak):
    """One coalesced kernel in x's memory order (layers/kernels/eltwise_gpu.py)."""
    return _ke.relu_forward(x, leak)


def relu_backward(x, dy, leak=0):
    """``vl_nnrelu(x, dy, 'leak', leak)``: ``dy * (x > 0)`` (with a leak,
    ``dy * (leak + (1 - leak) * (x > 0))``). ``x`` may also be the forward output
    when ``leak >= 0`` (the sign pattern is the same), as MatConvNet's short circuit does."""
    dy = dy_like(x, dy, 'relu_backward')
    leak = float(leak)
    if is_gpu_array(x):
        return _relu_backward_gpu(x, dy, leak)
    return _relu_backward_cpu(x, dy, leak)


def _relu_backward_cpu(x, dy, leak):
    if (leak == 0 and x.flags.f_contiguous and dy.flags.f_contiguous and x.dtype.kind == 'f'
            and dy.dtype == x.dtype):
        dx = np.empty(x.shape, dtype=x.dtype, order='F')
        xf, dyf, dxf = x.ravel(order='F'), dy.ravel(order='F'), dx.ravel(order='F')
        flat_parts(x.size, lambda a, b: _kc.relu_backward(xf, dyf, dxf, a, b))
        return dx
    if leak == 0:
        dx = dy * (x > 0)
    else:
        dx = dy * _slope(x, leak)
    return np.asfortranarray(dx.astype(x.dtype, copy=False))


def _relu_backward_gpu(x, dy, leak):
    """One coalesced kernel in x's memory order (layers/kernels/eltwise_gpu.py)."""
    return _ke.relu_backward(x, dy, leak)


@register('dagnn.ReLU')
class ReLU(Layer):
    """``dagnn.ReLU``: inputs [x], outputs [y]. ``opts`` may carry ``{'leak', v}``
    (it overrides the property, as vl_argparse does in the original).

    ``useShortCircuit`` (MatConvNet: backward from the output, letting the input be
    freed): backward uses ``inputs[0]`` when the engine passes it, else ``outputs[0]``
    (equivalent for leak >= 0)."""
    properties = {'useShortCircuit': True, 'leak': 0, 'opts': []}
    batch_independent = True

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
