"""The SGD-with-momentum step of one param: MatConvNet's ``accumulateGradients``
('gradient' train method), used by :func:`pydagnn.train.accumulate_gradients`.

``sgd_momentum_update(der, value, mom, inv_bs, decay, momentum, lr, nesterov=False)
-> (mom', value')`` with

    g = inv_bs * der + decay * value
    mom' = momentum * mom - g            (-g when mom is None: zero momentum)
    value' = value + lr * delta,  delta = mom'  (Nesterov: momentum * mom' - g)

The scalars are applied in value's dtype; the results have value's shape, dtype and
device. One fused elementwise kernel does the whole step, on the GPU
(:mod:`pydagnn.layers.kernels.eltwise_gpu`) and on the CPU
(:mod:`pydagnn.layers.kernels.eltwise_cpu`, over the worker threads; the numpy form's
six temporaries of a 8256 x 1000 prediction filter bank took 17.7 ms a step, the kernel
3.6 ms, with the same result to the bit).
"""
import numpy as np

from pydagnn.backend import is_gpu_array
from pydagnn.layers.kernels import eltwise_cpu as _kc
from pydagnn.layers.kernels import eltwise_gpu as _ke
from pydagnn.layers.kernels.threads_cpu import parallel_for

#: params of fewer elements run the CPU kernel in the calling thread
SGD_SPLIT_MIN = 1 << 16

__all__ = ['sgd_momentum_update']


def sgd_momentum_update(der, value, mom, inv_bs, decay, momentum, lr, nesterov=False,
                        name='param'):
    """One SGD-with-momentum step: ``(mom', value')`` (see the module docstring). ``der``
    has value's shape (the caller reshapes it); ``mom`` is None or has value's number of
    elements; ``name`` names the param in errors."""
    if mom is not None and mom.shape != value.shape:
        if mom.size != value.size:
            raise ValueError(f'sgd_momentum_update: the momentum of {name!r} has shape '
                             f'{mom.shape}, the param {value.shape}')
        mom = mom.reshape(value.shape)
    if is_gpu_array(value):
        return _sgd_momentum_update_gpu(der, value, mom, inv_bs, decay, momentum, lr, nesterov)
    return _sgd_momentum_update_cpu(der, value, mom, inv_bs, decay, momentum, lr, nesterov)


def _sgd_momentum_update_cpu(der, value, mom, inv_bs, decay, momentum, lr, nesterov):
    dt = value.dtype
    if dt.kind == 'f' and der.dtype == dt and (mom is None or mom.dtype == dt):
        return _sgd_fused_cpu(der, value, mom, inv_bs, decay, momentum, lr, nesterov)
    return _sgd_numpy_cpu(der, value, mom, inv_bs, decay, momentum, lr, nesterov)


def _sgd_fused_cpu(der, value, mom, inv_bs, decay, momentum, lr, nesterov):
    """The fused kernel on flat views in value's memory order (others are copied)."""
    order = 'F' if value.flags.f_contiguous and not value.flags.c_contiguous else 'C'
    flat = lambda a: np.ravel(a, order=order)  # noqa: E731
    mo = np.empty(value.shape, dtype=value.dtype, order=order)
    vo = np.empty(value.shape, dtype=value.dtype, order=order)
    df, vf, mof, vof = flat(der), flat(value), flat(mo), flat(vo)
    mf = vf if mom is None else flat(mom)          # not read without a momentum
    k = np.array([inv_bs, decay, momentum, lr], dtype=value.dtype)
    has_mom, nest = mom is not None, bool(nesterov)
    parallel_for(lambda a, b, _: _kc.sgd_momentum(df, vf, mf, mof, vof, k, has_mom, nest, a, b),
                 vf.size, uses_blas=False, workers=1 if vf.size < SGD_SPLIT_MIN else None)
    return mo, vo


def _sgd_numpy_cpu(der, value, mom, inv_bs, decay, momentum, lr, nesterov):
    """The step in numpy (mixed dtypes)."""
    dt = value.dtype.type
    g = dt(inv_bs) * der + dt(decay) * value
    if mom is None:
        m = -g
    else:
        m = dt(momentum) * mom - g
    m = m.astype(value.dtype, copy=False)
    delta = (dt(momentum) * m - g) if nesterov else m
    return m, (value + dt(lr) * delta).astype(value.dtype, copy=False)


def _sgd_momentum_update_gpu(der, value, mom, inv_bs, decay, momentum, lr, nesterov):
    """One fused pass in value's memory order."""
    return _ke.sgd_momentum(der, value, mom, inv_bs, decay, momentum, lr, nesterov)
