"""MPN-COV pooling by eigen-decomposition: ``dagnn.MPN_COV_Pool`` (GM-SOP's
``+dagnn/MPN_COV_Pool.m``, the MATLAB-code predecessor of iSQRT-COV), kept so that
older models load and run.

For one image (X the ``n x D`` matrix of positions, n = H*W):

* ``P = cov(X, 1) = Xc' Xc / n`` (population covariance), ``P = V diag(s) V'`` with the
  eigenvalues sorted in descending order;
* only the ``Dmin = min(#{s_j > eps(max s)}, n)`` leading eigenpairs are kept (the other
  columns of V and entries of S are zeroed);
* output ``V1 diag(f(s1)) V1'``: its upper triangle, column-major, ``1 x 1 x D(D+1)/2 x N``
  for ``method = 'covariance_small'``; the full matrix ``1 x 1 x D*D x N`` otherwise.
  Second and third outputs: V and the diagonal matrix S (both ``D x D x 1 x N``).

``f`` by ``regu_method``:
  'power', 'power+1st_order', 'AF', 'power+mat-fro': ``sqrt(s + epsilon)``. The original
  writes ``(s + epsilon) .^ alpha`` *if* ``isfield(opts, 'alpha')``, but ``opts`` is the
  layer object and MATLAB's ``isfield`` is false for objects, so the exponent is always
  0.5 there; this port does the same (``alpha`` is ignored for these methods).
  'power+mat-l2', 'mat-l2': ``(s + epsilon) .^ alpha / (s_1 + epsilon) .^ alpha``.
  'log': ``log(s + epsilon)``.
  ('Burg' needs learnt weights the block does not have; the original fails, so does this.)

Backward follows the original's formula (the standard eigen-decomposition derivative,
``dX = (2/n) Ibar X sym(V1 (diag(dL/ds) + K' .* (V1' dL/dV)) V1')``, ``K_ij = 1/(s_i - s_j)``,
0 where that is infinite), which is the exact derivative for distinct eigenvalues and
full rank. Batched over images (``xp.linalg.eigh`` on an ``N x D x D`` stack).
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers._common import as4d, first_value
from pydagnn.layers.cov import triu_indices_colmajor

__all__ = ['mpn_cov_forward', 'mpn_cov_backward', 'MPN_COV_Pool']

_POWER = ('power', 'power+1st_order', 'AF', 'power+mat-fro')
_MATL2 = ('power+mat-l2', 'mat-l2')


def _method(method):
    if isinstance(method, np.ndarray):   # a MATLAB char array read back as an array
        method = ''.join(np.asarray(method).ravel().tolist()) if method.size else ''
    return method


def _eps_of(a, xp):
    """MATLAB's eps(a): the spacing of floating point numbers at |a|."""
    _, e = xp.frexp(xp.abs(a))
    return xp.ldexp(xp.asarray(np.finfo(a.dtype).eps, dtype=a.dtype), e - 1)


def _decompose(x):
    """Sorted eigen-decomposition of the per-image covariance.

    Returns (xc (N, D, n) centred X', V (N, D, D) with the dropped columns zeroed,
    s (N, D) descending with the dropped entries zeroed, keep (N, D) bool)."""
    xp = get_array_module(x)
    H, W, D, N = x.shape
    n = H * W
    xt = x.T.reshape(N, D, W * H)
    xc = xt - xt.mean(axis=2, keepdims=True)
    P = (xc @ xc.swapaxes(1, 2)) * (1.0 / n)
    s, V = xp.linalg.eigh(P)
    s = s[:, ::-1]
    V = V[:, :, ::-1]
    ind = s > _eps_of(s[:, :1], xp)
    last = (ind * xp.arange(1, D + 1)).max(axis=1, keepdims=True)   # find(ind, 1, 'last')
    dmin = xp.minimum(last, n)
    keep = xp.arange(D)[None, :] < dmin
    s = xp.where(keep, s, 0)
    V = V * keep[:, None, :]
    return xc, xp.ascontiguousarray(V), xp.ascontiguousarray(s), keep


def _fun(s, keep, regu_method, alpha, epsilon, xp):
    with np.errstate(divide='ignore', invalid='ignore'):
        if regu_method in _POWER:
            f = xp.sqrt(s + epsilon)
        elif regu_method in _MATL2:
            f = (s + epsilon) ** alpha
            f = f / f[:, :1]
        elif regu_method == 'log':
            f = xp.log(s + epsilon)
        else:
            raise ValueError(f'mpn_cov: regu_method {regu_method!r} is not supported '
                             f"(use one of {', '.join(_POWER + _MATL2 + ('log',))})")
    return xp.where(keep, f, 0).astype(s.dtype, copy=False)


def mpn_cov_forward(x, method='covariance_small', regu_method='power', alpha=0.5, epsilon=1e-12):
    """x: ``H x W x D x N`` -> (y, V, S); see the module docstring."""
    xp = get_array_module(x)
    x = as4d(x, 'x', 'mpn_cov_forward')
    H, W, D, N = x.shape
    method, regu_method = _method(method), _method(regu_method)
    alpha = float(first_value(alpha))
    epsilon = float(first_value(epsilon))
    _, V, s, keep = _decompose(x)
    f = _fun(s, keep, regu_method, alpha, epsilon, xp)
    Pf = (V * f[:, None, :]) @ V.swapaxes(1, 2)          # (N, D, D)
    if method == 'covariance_small':
        r, c = triu_indices_colmajor(D, xp)
        vec = Pf[:, r, c]
    else:
        vec = Pf.swapaxes(1, 2).reshape(N, D * D)       # column-major P(:)
    L = vec.shape[1]
    y = xp.asfortranarray(vec.T).reshape(1, 1, L, N, order='F')
    Vo = xp.asfortranarray(V.transpose(1, 2, 0)).reshape(D, D, 1, N, order='F')
    S = xp.zeros((D, D, 1, N), dtype=x.dtype, order='F')
    i = xp.arange(D)
    S[i, i, 0, :] = s.T
    return y, Vo, S


def mpn_cov_backward(x, V, S, dy, method='covariance_small', regu_method='power', alpha=0.5,
                     epsilon=1e-12):
    """Derivative of :func:`mpn_cov_forward` with respect to x (V, S: its 2nd and 3rd
    outputs, recomputed when ``None``)."""
    xp = get_array_module(x)
    x = as4d(x, 'x', 'mpn_cov_backward')
    H, W, D, N = x.shape
    n = H * W
    method, regu_method = _method(method), _method(regu_method)
    alpha = float(first_value(alpha))
    epsilon = float(first_value(epsilon))
    xt = x.T.reshape(N, D, W * H)
    xc = xt - xt.mean(axis=2, keepdims=True)
    if V is None or S is None:
        _, V, S = mpn_cov_forward(x, method, regu_method, alpha, epsilon)
    Vm = V.reshape(D, D, N, order='F').transpose(2, 0, 1)           # (N, D, D)
    s = xp.diagonal(S.reshape(D, D, N, order='F'), axis1=0, axis2=1)  # (N, D)
    # Dmin again from the stored S, as the original does
    ind = s > _eps_of(s[:, :1], xp)
    last = (ind * xp.arange(1, D + 1)).max(axis=1, keepdims=True)
    keep = xp.arange(D)[None, :] < xp.minimum(last, n)
    Vm = Vm * keep[:, None, :]
    # dL/dC
    if method == 'covariance_small':
        L = D * (D + 1) // 2
        if dy.size != L * N:
            raise ValueError(f'mpn_cov_backward: dy has shape {dy.shape}, '
                             f'expected (1, 1, {L}, {N})')
        G = xp.zeros((N, D, D), dtype=x.dtype)
        r, c = triu_indices_colmajor(D, xp)
        G[:, r, c] = dy.reshape(L, N, order='F').T
        G = (G + G.swapaxes(1, 2)) * 0.5
    else:
        if dy.size != D * D * N:
            raise ValueError(f'mpn_cov_backward: dy has shape {dy.shape}, '
                             f'expected (1, 1, {D * D}, {N})')
        G = dy.reshape(D, D, N, order='F').transpose(2, 0, 1)
    Gs = (G + G.swapaxes(1, 2)) * 0.5
    f = _fun(s, keep, regu_method, alpha, epsilon, xp)
    dLdV = 2 * (Gs @ (Vm * f[:, None, :]))
    z = xp.diagonal(Vm.swapaxes(1, 2) @ G @ Vm, axis1=1, axis2=2)    # diag(V' dLdC V)
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        if regu_method in _MATL2:
            sa = s ** alpha
            sa = sa / sa[:, :1] * (alpha / s[:, :1])
            dLdS = s[:, :1] * sa / s * z
            dLdS[:, 0] -= xp.where(keep, sa * z, 0).sum(axis=1)
        elif regu_method in _POWER:
            dLdS = 0.5 / xp.sqrt(s + epsilon) * z
        elif regu_method == 'log':
            dLdS = z / (s + epsilon)
        else:
            raise ValueError(f'mpn_cov: regu_method {regu_method!r} is not supported')
        dLdS = xp.where(keep, dLdS, 0).astype(x.dtype, copy=False)
        K = 1.0 / (s[:, :, None] - s[:, None, :])                  # K_ij = 1/(s_i - s_j)
        K = xp.where(xp.isinf(K) | ~(keep[:, :, None] & keep[:, None, :]), 0, K).astype(x.dtype,
                                                                                      copy=False)
    inner = K.swapaxes(1, 2) * (Vm.swapaxes(1, 2) @ dLdV)
    i = xp.arange(D)
    inner[:, i, i] += dLdS
    Q = Vm @ inner @ Vm.swapaxes(1, 2)
    Q = (Q + Q.swapaxes(1, 2)) * (1.0 / n)           # (2/n) * sym(Q)
    dxt = Q @ xc                                      # (N, D, n) = ((2/n) Ibar X sym(Q))'
    return xp.asfortranarray(dxt.reshape(N, D, W, H).T)


@register('dagnn.MPN_COV_Pool')
class MPN_COV_Pool(Layer):
    """Eigen-decomposition MPN-COV pooling (three outputs ``[y, V, S]``)."""
    properties = {'method': 'covariance_small', 'regu_method': 'power', 'alpha': 0.5,
                  'epsilon': 1e-12, 'opts': ['cuDNN']}

    def forward(self, inputs, params):
        return list(mpn_cov_forward(inputs[0], self.method, self.regu_method, self.alpha,
                                    self.epsilon))

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None], []
        V = S = None
        if outputs is not None and len(outputs) == 3:
            V, S = outputs[1], outputs[2]
        return [mpn_cov_backward(inputs[0], V, S, der_outputs[0], self.method, self.regu_method,
                                 self.alpha, self.epsilon)], []

    def get_output_sizes(self, input_sizes):
        s = input_sizes[0]
        if s is None:
            return [None, None, None]
        D, N = s[2], s[3]
        L = D * (D + 1) // 2 if _method(self.method) == 'covariance_small' else D * D
        return [(1, 1, L, N), (D, D, 1, N), (D, D, 1, N)]
