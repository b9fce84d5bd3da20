"""numba kernels (CPU) for elementwise layers on flat arrays: the ReLU, the Sum and
the SGD-momentum step of a param.

Each kernel works on the flat range ``[a, b)`` of its arrays so that the callers split
a map over worker threads (:mod:`threads_cpu`); serial, GIL released, unsigned indices
as in :mod:`im2col_cpu`. One read and one write per element forward, two reads and one
write backward, on every core: numpy's ``maximum`` and ``dy * (x > 0)`` run on one core
and the latter makes a map-sized boolean temporary.

NaN propagates as with numpy: ``relu_forward`` keeps a NaN input (``v <= 0`` is false
for NaN), ``relu_backward`` multiplies ``dy`` by 0 or 1, so an infinite or NaN ``dy``
stays non-finite where numpy's product would.
"""
import numpy as np
from numba import njit

_U = np.uint64


@njit(nogil=True, cache=True)
def relu_forward(xf, yf, a, b):
    """``y = max(x, 0)`` on ``[a, b)`` of the flat arrays."""
    zero = yf.dtype.type(0)
    for i in range(_U(a), _U(b)):
        v = xf[i]
        yf[i] = zero if v <= zero else v


@njit(nogil=True, cache=True)
def relu_backward(xf, dyf, dxf, a, b):
    """``dx = dy * (x > 0)`` on ``[a, b)`` of the flat arrays."""
    zero = dxf.dtype.type(0)
    one = dxf.dtype.type(1)
    for i in range(_U(a), _U(b)):
        dxf[i] = dyf[i] * (one if xf[i] > zero else zero)


@njit(nogil=True, cache=True)
def add(af, bf, yf, a, b):
    """``y = a + b`` on ``[a, b)`` of the flat arrays (numpy's ``+`` runs on one core)."""
    for i in range(_U(a), _U(b)):
        yf[i] = af[i] + bf[i]


@njit(nogil=True, cache=True)
def sgd_momentum(df, vf, mf, mo, vo, k, has_mom, nesterov, a, b):
    """One SGD-momentum step on ``[a, b)``: ``g = k0 der + k1 value``, ``mom' = k2 mom - g``
    (``-g`` without ``has_mom``), ``value' = value + k3 delta`` with ``delta = mom'`` or,
    ``nesterov``, ``k2 mom' - g``; ``k`` = (inv_bs, decay, momentum, lr) in the arrays'
    dtype, each operation as :mod:`pydagnn.layers.sgd`'s numpy form does it."""
    inv_bs, decay, mu, lr = k[0], k[1], k[2], k[3]
    for i in range(_U(a), _U(b)):
        v = vf[i]
        g = inv_bs * df[i] + decay * v
        m = mu * mf[i] - g if has_mom else -g
        mo[i] = m
        vo[i] = v + lr * (mu * m - g if nesterov else m)
