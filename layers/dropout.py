"""Dropout: ``vl_nndropout`` and ``dagnn.DropOut``.

'normal' mode: ``y = x .* mask`` with ``mask = (u >= rate) / (1 - rate)``, u uniform in
[0, 1); 'test' mode: identity. Backward: ``dx = dy .* mask``.
"""
import numpy as np

from pydagnn.backend import get_array_module, is_gpu_array, to_host
from pydagnn.layer import Layer, register
from pydagnn.layers._common import first_value
from pydagnn.layers.kernels import eltwise_gpu as _ke

__all__ = ['dropout_mask', 'dropout_forward', 'dropout_backward', 'DropOut']


def dropout_mask(shape, rate, rng, dtype=np.float32, xp=np):
    """A mask of 0 and ``1/(1-rate)`` of the given shape (Fortran order), drawn from the
    numpy Generator ``rng`` (on the GPU: a CuPy generator seeded from ``rng``)."""
    rate = float(rate)
    dt = np.dtype(dtype)
    scale = dt.type(1.0 / (1.0 - rate))
    n = int(np.prod(shape))
    if xp is np:
        u = rng.random(n, dtype=np.float32)
    else:
        seed = int(rng.integers(0, 2 ** 63 - 1))
        u = xp.random.RandomState(seed).random_sample(n, dtype=np.float32)
    keep = (u >= np.float32(rate)).astype(dt)
    return (keep * scale).reshape(tuple(shape), order='F')


def dropout_forward(x, rate=0.5, mask=None, rng=None):
    """``(y, mask)``: ``mask`` is used when given (already scaled, x's shape), else drawn
    with :func:`dropout_mask` from ``rng``."""
    xp = get_array_module(x)
    if mask is None:
        if rng is None:
            raise ValueError('dropout_forward: give a mask or a random generator')
        mask = dropout_mask(x.shape, rate, rng, x.dtype, xp)
        return _apply(x, mask), mask
    if xp is np:
        mask = to_host(mask)                     # a mask set while the net was on the GPU
    elif isinstance(mask, np.ndarray):
        mask = xp.asarray(mask)                  # a host mask for a GPU input
    if mask.shape != x.shape:
        if mask.size != x.size:
            raise ValueError(f'dropout_forward: mask has shape {mask.shape}, x has shape {x.shape}')
        mask = mask.reshape(x.shape, order='F')
    return _apply(x, mask), mask


def _apply(x, mask):
    if is_gpu_array(x):
        return _apply_gpu(x, mask)
    return _apply_cpu(x, mask)


def _apply_cpu(x, mask):
    return np.asfortranarray((x * mask).astype(x.dtype, copy=False))


def _apply_gpu(x, mask):
    """Coalesced in x's memory order (layers/kernels/eltwise_gpu.py)."""
    import cupy as cp
    return cp.asfortranarray(_ke.mul_forward(x, mask))


def dropout_backward(dy, mask):
    """``dy .* mask``."""
    if mask.size != dy.size:
        raise ValueError(f'dropout_backward: mask has shape {mask.shape}, dy has shape {dy.shape}')
    m = mask.reshape(dy.shape, order='F') if mask.shape != dy.shape else mask
    return _apply(dy, m)


@register('dagnn.DropOut')
class DropOut(Layer):
    """``dagnn.DropOut``: inputs [x], outputs [y]; properties ``rate`` (0.5), ``frozen``.

    Masks: the plain attribute ``mask`` (default None, not saved), when set, is used
    as is (already scaled, x's shape). Otherwise, with ``frozen`` true the last mask
    is reused (MatConvNet: ``frozen & ~isempty(mask)``), else a fresh mask is drawn
    from the net's generator ``self.rng``. The mask of the last 'normal' forward is
    kept in ``last_mask`` and used by backward, exactly as DropOut.m keeps ``obj.mask``:
    the engine declares one output per var, so the mask cannot travel as an output.
    Hence a DropOut block is not reentrant across two 'normal' forwards before one
    backward (the original is not either). ``reset()`` clears the masks and
    ``frozen``, as DropOut.m's reset does.
    """
    properties = {'rate': 0.5, 'frozen': False}
    #: backward uses the kept mask: the engine may free the input after forward
    backward_needs_inputs = False
    backward_needs_outputs = False

    def __init__(self, **props):
        self.mask = None
        self.last_mask = None
        super().__init__(**props)

    def _rate(self):
        return float(first_value(self.rate))

    def forward(self, inputs, params):
        x = inputs[0]
        if self.mode == 'test':
            return [x]
        if self.mask is not None:
            mask = self.mask
        elif bool(self.frozen) and self.last_mask is not None and self.last_mask.size == x.size:
            mask = self.last_mask
        else:
            mask = None
        y, mask = dropout_forward(x, self._rate(), mask=mask, rng=self.rng)
        self.last_mask = mask
        return [y]

    def backward(self, inputs, params, der_outputs, outputs):
        dy = der_outputs[0]
        if self.mode == 'test':
            return [dy], []
        if self.last_mask is None:
            raise ValueError('DropOut.backward: no mask (no forward was run in normal mode)')
        return [dropout_backward(dy, self.last_mask)], []

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]

    def reset(self):
        self.mask = None
        self.last_mask = None
        self.frozen = False
