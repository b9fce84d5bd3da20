"""Elementwise kernels on the GPU (CuPy) on Fortran-order maps and their launchers, called by
the GPU paths of :mod:`pydagnn.layers.relu`, :mod:`~pydagnn.layers.sum`,
:mod:`~pydagnn.layers.dropout` and :mod:`~pydagnn.layers.sgd` (the fused SGD-momentum
update). This module imports no layer, and cupy only when a kernel runs.

CuPy's ufuncs always allocate C-order outputs, so ``cupy.maximum(x, 0)`` on a Fortran
``H x W x C x N`` map runs a transposing (uncoalesced) kernel and the layer's
``asfortranarray`` then transposes back: about ten times the memory traffic of the op.
Here every operand is read as a flat 1-D view in its own memory order (all operands of
one call share it), one ``ElementwiseKernel`` runs over it, and the result is viewed
back in that order, so Fortran in gives Fortran out with coalesced accesses.
"""
import functools

__all__ = ['relu_forward', 'relu_backward', 'sum_forward', 'mul_forward', 'sgd_momentum']


@functools.lru_cache(maxsize=None)
def _k():
    import cupy as cp
    return {
        'relu': cp.ElementwiseKernel('T x', 'T y', 'y = x > (T)0 ? x : (T)0', 'pd_relu'),
        'lrelu': cp.ElementwiseKernel('T x, T leak', 'T y', 'y = x > (T)0 ? x : x * leak', 'pd_lrelu'),
        'relu_b': cp.ElementwiseKernel('T r, T d', 'T y', 'y = r > (T)0 ? d : (T)0', 'pd_relu_b'),
        'lrelu_b': cp.ElementwiseKernel('T r, T d, T leak', 'T y', 'y = r > (T)0 ? d : d * leak',
                                        'pd_lrelu_b'),
        'sgd': cp.ElementwiseKernel(
            'T der, T val, T mom, T inv_bs, T decay, T momentum, T lr, bool has_m, bool nesterov',
            'T m_out, T v_out',
            '''T g = inv_bs * der + decay * val;
               T m = has_m ? momentum * mom - g : -g;
               m_out = m;
               v_out = val + lr * (nesterov ? momentum * m - g : m);''', 'pd_sgd_momentum'),
    }


def _order(*arrays):
    """'F' when every array is Fortran-contiguous, else 'C'."""
    return 'F' if all(a.flags.f_contiguous for a in arrays) else 'C'


def _flat(a, order):
    import cupy as cp
    if order == 'F':
        a = a if a.flags.f_contiguous else cp.asfortranarray(a)
        return a.reshape(-1, order='F')
    return cp.ascontiguousarray(a).reshape(-1)


def _back(flat, shape, order):
    return flat.reshape(shape, order=order)


def relu_forward(x, leak=0.0):
    """``max(x, 0)`` (or ``x * leak`` below 0), in x's memory order."""
    o = _order(x)
    xf = _flat(x, o)
    if leak == 0:
        y = _k()['relu'](xf)
    else:
        y = _k()['lrelu'](xf, x.dtype.type(leak))
    return _back(y, x.shape, o)


def relu_backward(ref, dy, leak=0.0):
    """``dy * (ref > 0)`` (or ``dy * leak`` where ref <= 0); ref: the input, or the
    output when leak >= 0. Fortran order in, Fortran order out."""
    o = 'F' if ref.flags.f_contiguous else 'C'
    if dy.shape != ref.shape:
        dy = dy.reshape(ref.shape, order='F')
    rf, df = _flat(ref, o), _flat(dy.astype(ref.dtype, copy=False), o)
    if leak == 0:
        dx = _k()['relu_b'](rf, df)
    else:
        dx = _k()['lrelu_b'](rf, df, ref.dtype.type(leak))
    return _back(dx, ref.shape, o)


def sum_forward(inputs):
    """``inputs[0] + inputs[1] + ...`` in the first input's memory order."""
    import cupy as cp
    o = 'F' if inputs[0].flags.f_contiguous else 'C'
    flats = [_flat(a, o) for a in inputs]
    if len(flats) == 1:
        y = flats[0].copy()
    else:
        y = cp.add(flats[0], flats[1])
        for a in flats[2:]:
            y += a
    return _back(y, inputs[0].shape, o)


def mul_forward(x, m):
    """``x * m`` (same shapes, m cast to x's dtype), in x's memory order."""
    import cupy as cp
    o = 'F' if x.flags.f_contiguous else 'C'
    if m.shape != x.shape:
        m = m.reshape(x.shape, order='F')
    y = cp.multiply(_flat(x, o), _flat(m.astype(x.dtype, copy=False), o))
    return _back(y, x.shape, o)


def sgd_momentum(der, value, mom, inv_bs, decay, momentum, lr, nesterov=False):
    """One fused pass of MatConvNet's SGD with momentum: returns ``(mom', value')``
    with ``g = inv_bs * der + decay * value``, ``mom' = momentum * mom - g`` (``-g`` when
    ``mom`` is None), ``value' = value + lr * (mom'`` or, Nesterov, ``momentum * mom' - g)``."""
    import numpy as np
    dt = value.dtype.type
    o = 'F' if value.flags.f_contiguous else 'C'
    vf = _flat(value, o)
    df = _flat(der.astype(value.dtype, copy=False), o)
    mf = vf if mom is None else _flat(mom.astype(value.dtype, copy=False), o)
    m_out, v_out = _k()['sgd'](df, vf, mf, dt(inv_bs), dt(decay), dt(momentum), dt(lr),
                               np.bool_(mom is not None), np.bool_(nesterov))
    return _back(m_out, value.shape, o), _back(v_out, value.shape, o)
