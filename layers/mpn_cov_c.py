"""MPN-COV pooling, the compiled variant: ``dagnn.MPN_COV_Pool_C`` (GM-SOP's
``+dagnn/MPN_COV_Pool_C.m`` calling the mex ``vl_nnmpn_cov``, whose eigen-decomposition
is the MATLAB helper ``EIG.m``).

What differs from :mod:`pydagnn.layers.mpn_cov` (``dagnn.MPN_COV_Pool``, the MATLAB-code
version):

* the matrix function is always ``f(s) = (s + epsilon) ^ alpha`` with
  ``f'(s) = alpha (s + epsilon) ^ (alpha - 1)``: ``alpha`` is used (it must be > 0);
  ``regu_method`` is only validated ('power' or 'mat-l2', case-insensitive; both compute
  the same power) and ``method`` is ignored: the output is always the upper triangle,
  column-major, ``1 x 1 x D(D+1)/2 x N``;
* the kept eigenpairs are ``Dmin = min(find(s > eps(max s), 1, 'last'), D)`` (EIG.m
  bounds by the matrix size D, not by the number of positions);
* four outputs, the mex's layout: ``y``, ``aux_S`` (``1 x D x 3N x 1``: the eigenvalues of
  every image, then their ``f``, then their ``f'``, zero beyond Dmin), ``aux_V``
  (``D x D x N x 1``, eigenvectors by descending eigenvalue, columns beyond Dmin zeroed)
  and ``aux_D`` (``N x 1 x 1 x 1``, Dmin as a float).

With ``P = Xc' Xc / n`` (population covariance of the n = H*W positions) the output is
``V diag(f(s)) V'``; the backward is the mex's formula
``dX = (2/n) Xc sym(V (diag(f'(s) .* diag(V' G V)) - (V' dLdV) .* K) V')``,
``G = sym(dL/dP)``, ``dLdV = 2 G V diag(f(s))``, ``K_ij = 1/(s_i - s_j)`` (0 where
infinite or outside Dmin), read from the forward's aux outputs, so it is the exact
derivative for distinct eigenvalues. The upper-triangle layout and the eigenvalue
cut-off are shared with :mod:`pydagnn.layers.cov` / :mod:`pydagnn.layers.mpn_cov`.
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers._common import as4d, as_text
from pydagnn.layers.cov import triu_indices_colmajor

__all__ = ['mpn_cov_c_forward', 'mpn_cov_c_backward', 'MPN_COV_Pool_C']

_REGU = ('power', 'mat-l2')


def _options(regu_method, alpha, epsilon, op):
    r = as_text(regu_method)
    if r.lower() not in _REGU:
        raise ValueError(f"{op}: regu_method must be 'power' or 'mat-l2' (what vl_nnmpn_cov "
                         f"accepts), got {r!r}")
    alpha = float(np.asarray(alpha).ravel()[0])
    if not alpha > 0:
        raise ValueError(f'{op}: alpha must be positive, got {alpha}')
    return alpha, float(np.asarray(epsilon).ravel()[0])


def _centred(x):
    H, W, D, N = x.shape
    xt = x.T.reshape(N, D, W * H)
    return xt - xt.mean(axis=2, keepdims=True)


def _eps_of(a, xp):
    """MATLAB's eps(a) for a >= 0 (the spacing of floats at a)."""
    _, e = xp.frexp(xp.abs(a))
    return xp.ldexp(xp.asarray(np.finfo(a.dtype).eps, dtype=a.dtype), e - 1)


def mpn_cov_c_forward(x, regu_method='power', alpha=0.5, epsilon=1e-12):
    """x ``H x W x D x N`` -> ``(y, aux_S, aux_V, aux_D)``; see the module docstring."""
    xp = get_array_module(x)
    x = as4d(x, 'x', 'mpn_cov_c_forward')
    if x.dtype.kind != 'f':
        raise ValueError(f'mpn_cov_c_forward: x must be float32 or float64, got {x.dtype}')
    alpha, epsilon = _options(regu_method, alpha, epsilon, 'mpn_cov_c_forward')
    H, W, D, N = x.shape
    xc = _centred(x)
    P = (xc @ xc.swapaxes(1, 2)) * x.dtype.type(1.0 / (H * W))
    s, V = xp.linalg.eigh(P)
    s, V = s[:, ::-1], V[:, :, ::-1]                          # descending
    ind = s > _eps_of(s.max(axis=1, keepdims=True), xp)
    dmin = (ind * xp.arange(1, D + 1)).max(axis=1)            # find(ind, 1, 'last'), <= D
    keep = xp.arange(D)[None, :] < dmin[:, None]
    s = xp.where(keep, s, 0).astype(x.dtype, copy=False)
    V = (V * keep[:, None, :]).astype(x.dtype, copy=False)
    with np.errstate(invalid='ignore', divide='ignore'):
        f = xp.where(keep, (s + epsilon) ** alpha, 0).astype(x.dtype, copy=False)
        fd = xp.where(keep, alpha * (s + epsilon) ** (alpha - 1), 0).astype(x.dtype, copy=False)
    C = (V * f[:, None, :]) @ V.swapaxes(1, 2)
    r, c = triu_indices_colmajor(D, xp)
    L = D * (D + 1) // 2
    y = xp.asfortranarray(C[:, r, c].T).reshape(1, 1, L, N, order='F')
    aux_S = xp.asfortranarray(xp.concatenate([s, f, fd], axis=0).T).reshape(1, D, 3 * N, 1,
                                                                            order='F')
    aux_V = xp.asfortranarray(V.transpose(1, 2, 0)).reshape(D, D, N, 1, order='F')
    aux_D = dmin.astype(x.dtype).reshape(N, 1, 1, 1)
    return y, aux_S, aux_V, xp.asfortranarray(aux_D)


def mpn_cov_c_backward(x, aux_S, aux_V, aux_D, dy, regu_method='power', alpha=0.5,
                       epsilon=1e-12):
    """Derivative of :func:`mpn_cov_c_forward` with respect to x, from its aux outputs
    (recomputed when any is ``None``)."""
    xp = get_array_module(x)
    x = as4d(x, 'x', 'mpn_cov_c_backward')
    H, W, D, N = x.shape
    if aux_S is None or aux_V is None or aux_D is None:
        _, aux_S, aux_V, aux_D = mpn_cov_c_forward(x, regu_method, alpha, epsilon)
    L = D * (D + 1) // 2
    if dy.size != L * N:
        raise ValueError(f'mpn_cov_c_backward: dy has shape {dy.shape}, '
                         f'expected (1, 1, {L}, {N})')
    if aux_S.size != 3 * D * N or aux_V.size != D * D * N or aux_D.size != N:
        raise ValueError(f'mpn_cov_c_backward: aux outputs of shapes {aux_S.shape}, '
                         f'{aux_V.shape}, {aux_D.shape} do not fit x {x.shape}')
    S3 = aux_S.reshape(D, N, 3, order='F')
    s, f, fd = (S3[:, :, k].T for k in range(3))              # (N, D) each
    V = aux_V.reshape(D, D, N, order='F').transpose(2, 0, 1)  # (N, D, D)
    dmin = aux_D.reshape(N)
    keep = xp.arange(D)[None, :] < dmin[:, None]
    G = xp.zeros((N, D, D), dtype=x.dtype)
    r, c = triu_indices_colmajor(D, xp)
    G[:, r, c] = xp.asarray(dy, dtype=x.dtype).reshape(L, N, order='F').T
    G = (G + G.swapaxes(1, 2)) * x.dtype.type(0.5)           # the mex's symmetric()
    GV = G @ V
    dLdV = 2 * GV * f[:, None, :]
    dLdS = fd * xp.diagonal(V.swapaxes(1, 2) @ GV, axis1=1, axis2=2)
    with np.errstate(divide='ignore', invalid='ignore'):
        K = 1.0 / (s[:, :, None] - s[:, None, :])
    both = keep[:, :, None] & keep[:, None, :]
    K = xp.where(xp.isfinite(K) & both, K, 0).astype(x.dtype, copy=False)
    Dm = -(V.swapaxes(1, 2) @ dLdV) * K
    i = xp.arange(D)
    Dm[:, i, i] += dLdS
    Q = V @ Dm @ V.swapaxes(1, 2)
    Q = (Q + Q.swapaxes(1, 2)) * x.dtype.type(1.0 / (H * W))  # (2/n) sym(Q)
    dxt = Q @ _centred(x)                                     # (N, D, n)
    return xp.asfortranarray(dxt.reshape(N, D, W, H).T)


@register('dagnn.MPN_COV_Pool_C')
class MPN_COV_Pool_C(Layer):
    """``dagnn.MPN_COV_Pool_C``: inputs [x], outputs [y, aux_S, aux_V, aux_D] (only y
    takes a derivative; backward reads the aux outputs, as the original's
    ``backwardAdvanced``)."""
    properties = {'method': 'covariance_small', 'regu_method': 'power', 'alpha': 0.5,
                  'epsilon': 1e-12, 'opts': ['cuDNN']}

    def forward(self, inputs, params):
        return list(mpn_cov_c_forward(inputs[0], self.regu_method, self.alpha, self.epsilon))

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None], []
        aux = outputs[1:4] if outputs is not None and len(outputs) == 4 else (None,) * 3
        dx = mpn_cov_c_backward(inputs[0], *aux, der_outputs[0], self.regu_method,
                                self.alpha, self.epsilon)
        return [dx.reshape(np.shape(inputs[0]), order='F')], []

    def get_output_sizes(self, input_sizes):
        s = input_sizes[0]
        if s is None:
            return [None] * 4
        s = tuple(int(v) for v in s) + (1,) * (4 - len(s))
        D, N = s[2], s[3]
        return [(1, 1, D * (D + 1) // 2, N), (1, D, 3 * N, 1), (D, D, N, 1), (N, 1, 1, 1)]
