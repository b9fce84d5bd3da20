"""The SGD-with-momentum step of one param: MatConvNet's ``accumulateGradients``
('gradient' train method), used by :func:`pydagnn.train.accumulate_gradients`.

``sgd_momentum_update(der, value, mom, inv_bs, decay, momentum, lr, nesterov=False)
-> (mom', value')`` with

    g = inv_bs * der + decay * value
    mom' = momentum * mom - g            (-g when mom is None: zero momentum)
    value' = value + lr * delta,  delta = mom'  (Nesterov: momentum * mom' - g)

The scalars are applied in value's dtype; the results have value's shape, dtype and
device. On the GPU one fused elementwise kernel does the whole step
(:mod:`pydagnn.layers.kernels.eltwise_gpu`).
"""
from pydagnn.backend import is_gpu_array
from pydagnn.layers.kernels import eltwise_gpu as _ke

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
