"""The sparsity-constrained gating module of GM-SOP: ``dagnn.H_x`` (noisy gating
scores) and ``dagnn.gating`` (top-k selection and softmax), after the original
``+dagnn/H_x.m`` and ``+dagnn/gating.m``.

Var values are tuples, as the original's cell arrays:

* ``H_x``   -> ``(H, gamma)``: H ``K x N`` (x's dtype), gamma ``1 x N`` float64.
* ``gating`` -> ``(sfm, mask, masked_H, None, None, cm_sums)``: sfm ``K x N`` softmax over
  the selected entries (0 elsewhere), mask ``K x N`` bool, masked_H ``K x N`` (H at the
  selected entries, 0 elsewhere), cm_sums ``1 x K`` (per-CM sum of sfm over the batch).

The derivative of a tuple var is the derivative with respect to its first element.

H_x:  ``H = Wg' x + gamma .* softplus(Wn' x)`` with ``softplus(t) = log(1 + exp(t))``
computed in x's dtype, replaced by ``t`` where it overflows to inf (for float32 that is
``t > ~88.72``; float64 ``t > ~709.78``), as the original does. gamma ~ N(0, 1) per image
from the net's ``rng`` in 'normal' mode (or ``block.noise`` when set), 0 in 'test' mode;
it multiplies in x's dtype (MATLAB's single .* double is single).

gating: per image the k = ``topk`` largest entries of H are selected (``H >= q_k``, the
k-th largest value). Ties at q_k, as the original:
  * if every image already has exactly k selected: done;
  * else if *every* entry of the mask is selected (all columns tie from the k-th value
    down, e.g. the all-equal scores of the constant init) and k < K: the selection is
    re-drawn per image as the top k of a ``K x N`` standard normal draw from the net's
    ``rng`` (the original draws ``randn``; a column such as [5 1 1 ... 1] is then also
    drawn at random, as in the original);
  * else (some columns tie, others do not, including fully tied columns among untied
    ones): in each column the last tied indices are dropped, so the first ones in index
    order are kept and exactly k are selected.
A selected entry whose H is exactly 0 gets softmax weight 0 (the original maps it to
-inf) but stays selected. A column whose selected entries are all exactly 0 has an
undefined softmax (NaN; the original asserts).
Backward: ``dH = s .* (dS - sum(dS .* s))`` per image (0 where s is 0).

On the GPU a forward makes one device-to-host read: the per-CM counts of the final
mask together with the all-tie flag (one small array). The counts travel with the
output value (:class:`pydagnn.routing.GateValue`, a tuple with a ``counts`` attribute), and the engine
routes the CMs with them, so a training step needs no other read. Everything else stays
on the device.
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, property_ints, register
from pydagnn.layers._common import first_value
from pydagnn.routing import GateValue  # the gate format lives with the engine's routing

__all__ = ['softplus', 'hx_forward', 'hx_backward', 'topk_mask', 'gating_forward',
           'gating_backward', 'GateValue', 'H_x', 'gating']


def _first(v):
    """The first element of a tuple var value (the original's ``value{1}``)."""
    return v[0] if isinstance(v, (tuple, list)) else v


def _cols(x, op):
    """An ``H x W x D x N`` (or 2-D ``D x N``) array as the ``D x N`` matrix
    ``reshape(x, [], N)``."""
    if x.ndim == 2:
        return x
    N = x.shape[-1] if x.ndim == 4 else 1
    if x.ndim > 4:
        raise ValueError(f'{op}: expected an H x W x D x N array, got shape {x.shape}')
    return x.reshape(-1, N, order='F')


def softplus(t):
    """``log(1 + exp(t))`` in t's dtype, ``t`` where that overflows to inf (H_x.m)."""
    xp = get_array_module(t)
    with np.errstate(over='ignore'):
        sp = xp.log(1 + xp.exp(t))
    return xp.where(xp.isinf(sp), t, sp)


def _sigmoid_as_original(t):
    """``1 - 1 ./ (1 + exp(t))``, the form H_x.m's backward uses (exp overflow gives 1)."""
    xp = get_array_module(t)
    with np.errstate(over='ignore'):
        return 1 - 1 / (1 + xp.exp(t))


def _check_w(x2, wg, wn, op):
    D = x2.shape[0]
    if wg.ndim != 2 or wg.shape[0] != D or wn.shape != wg.shape:
        raise ValueError(f'{op}: gating weights have shapes {wg.shape} and {wn.shape}, '
                         f'expected ({D}, K) for an input with {D} values per image')


def hx_forward(x, wg, wn, gamma):
    """``H = Wg' x + gamma .* softplus(Wn' x)``. x: ``1 x 1 x D x N`` (any shape with
    ``D*N`` elements ending in N), wg, wn: ``D x K``, gamma: N values. Returns H ``K x N``."""
    xp = get_array_module(x)
    x2 = _cols(x, 'hx_forward')
    _check_w(x2, wg, wn, 'hx_forward')
    N = x2.shape[1]
    g = xp.asarray(gamma).reshape(1, N).astype(x2.dtype)
    H = wg.T @ x2 + softplus(wn.T @ x2) * g
    return xp.asfortranarray(H)


def hx_backward(x, wg, wn, gamma, dH):
    """Derivatives of :func:`hx_forward`: ``(dx (shaped as x), dWg, dWn)``."""
    xp = get_array_module(x)
    x2 = _cols(x, 'hx_backward')
    _check_w(x2, wg, wn, 'hx_backward')
    N = x2.shape[1]
    if dH.shape != (wg.shape[1], N):
        raise ValueError(f'hx_backward: dH has shape {dH.shape}, expected {(wg.shape[1], N)}')
    g = xp.asarray(gamma).reshape(1, N).astype(x2.dtype)
    dwntx = dH * _sigmoid_as_original(wn.T @ x2) * g
    dx = wg @ dH + wn @ dwntx
    dwg = x2 @ dH.T
    dwn = x2 @ dwntx.T
    return (xp.asfortranarray(dx.reshape(x.shape, order='F')), xp.asfortranarray(dwg),
            xp.asfortranarray(dwn))


def topk_mask(H, topk, rng=None):
    """The original's top-k selection mask (``K x N`` bool) with its tie rules (module
    docstring). ``rng``: a ``numpy.random.Generator`` for the all-tie case (``None``:
    ``numpy.random.default_rng()``)."""
    return topk_mask_counts(H, topk, rng)[0]


def topk_mask_counts(H, topk, rng=None):
    """``(mask, counts)``: :func:`topk_mask` and the number of selected images per row
    (a host NumPy int64 array). On the GPU this is the forward's single device-to-host
    read (the counts and the all-tie flag in one transfer)."""
    xp = get_array_module(H)
    K, N = H.shape
    k = int(topk)
    if not 1 <= k <= K:
        raise ValueError(f'gating: topk {k} must be between 1 and the number of CMs {K}')
    q = -xp.partition(-H, k - 1, axis=0)[k - 1]           # k-th largest per column
    mask = H >= q[None, :]
    if N == 0:
        return mask, np.zeros(K, np.int64)
    # keep the first tied entries in index order (a no-op where exactly k are selected)
    strict = H > q[None, :]
    tied = mask & ~strict
    room = k - strict.sum(axis=0)
    keep_tied = tied & (xp.cumsum(tied, axis=0) <= room[None, :])
    keep = strict | keep_tied
    if xp is np:
        all_tied = bool(mask.all())
        counts = None if all_tied else keep.sum(axis=1).astype(np.int64)
    else:
        info = xp.concatenate([keep.sum(axis=1).astype(np.int64),
                               mask.all().reshape(1).astype(np.int64)]).get()
        all_tied, counts = bool(info[-1]), info[:-1]
    if k < K and all_tied:
        # every score ties: a random pick per image, drawn and ranked on the host
        rng = rng if rng is not None else np.random.default_rng()
        t = rng.standard_normal((K, N))
        qt = -np.partition(-t, k - 1, axis=0)[k - 1]
        m = t >= qt[None, :]
        return (m if xp is np else xp.asarray(m)), m.sum(axis=1).astype(np.int64)
    if counts is None:
        counts = keep.sum(axis=1).astype(np.int64)
    return keep, counts


def gating_forward(H, topk, rng=None, return_counts=False):
    """``(sfm, mask, masked_H, cm_sums)`` for scores H (``K x N``); see the module docstring.
    With ``return_counts`` a fifth element: the per-CM image counts (host int64)."""
    xp = get_array_module(H)
    if H.ndim != 2:
        H = H.reshape(-1, H.shape[-1], order='F') if H.ndim == 4 else xp.squeeze(H)
    mask, counts = topk_mask_counts(H, topk, rng)
    masked = xp.where(mask, H, 0).astype(H.dtype, copy=False)
    t = xp.where(masked == 0, -xp.inf, masked)
    with np.errstate(invalid='ignore'):
        t = t - t.max(axis=0, keepdims=True)
        e = xp.exp(t)
        sfm = e / e.sum(axis=0, keepdims=True)
    sfm = xp.asfortranarray(sfm.astype(H.dtype, copy=False))
    sums = sfm.sum(axis=1).reshape(1, -1)
    if return_counts:
        return sfm, xp.asfortranarray(mask), xp.asfortranarray(masked), sums, counts
    return sfm, xp.asfortranarray(mask), xp.asfortranarray(masked), sums


def gating_backward(sfm, dS):
    """Softmax Jacobian on the selected entries: ``dH = s .* (dS - sum(dS .* s))``."""
    if dS.shape != sfm.shape:
        raise ValueError(f'gating_backward: dS has shape {dS.shape}, sfm has shape {sfm.shape}')
    dH = sfm * (dS - (dS * sfm).sum(axis=0, keepdims=True))
    return get_array_module(sfm).asfortranarray(dH)


@register('dagnn.H_x')
class H_x(Layer):
    """Noisy gating scores. Params ``[gating_w, gating_noise_w]`` (``D x K``); input
    ``1 x 1 x D x N``; output value the tuple ``(H K x N, gamma 1 x N float64)``.

    ``noise``: a plain (not saved) attribute; when set (N values) it is used as gamma in
    'normal' mode instead of drawing from the net's rng. 'test' mode always uses 0.
    ``size`` is ``[D, K]`` (``init_params`` makes both params ``ones(D, K) / D``);
    ``hasBias``, ``topk``, ``CM_num``, ``f_size`` and ``dim_in`` are stored as the
    original does (the derivative is reshaped to the input's own shape).
    """
    properties = {'size': [], 'hasBias': False, 'topk': 8, 'CM_num': 16, 'f_size': [1, 1],
                  'dim_in': 128}
    param_roles = ('matrix', 'matrix')

    def __init__(self, **props):
        self.noise = None
        super().__init__(**props)

    def check_param_shapes(self, values, names):
        """Both weight matrices have the shape ``size`` = [D, K] (when it is set)."""
        size = property_ints(self.size)
        for k, v in enumerate(values[:2]):
            if v is not None and len(size) == 2 and tuple(v.shape) != tuple(size):
                raise ValueError(f'param {names[k]!r} has shape {tuple(v.shape)} but the block\'s '
                                 f'size is {size}')

    def _gamma(self, N, xp):
        if self.mode == 'test':
            return xp.zeros((1, N), dtype=np.float64)
        if self.noise is not None:
            g = xp.asarray(self.noise, dtype=np.float64)
            if g.size != N:
                raise ValueError(f'H_x: noise has {g.size} values, the batch has {N} images')
            return g.reshape(1, N)
        return xp.asarray(self.rng.standard_normal((1, N)))

    def forward(self, inputs, params):
        x = inputs[0]
        xp = get_array_module(x)
        N = _cols(x, 'H_x').shape[1]
        gamma = self._gamma(N, xp)
        return [(hx_forward(x, params[0], params[1], gamma), gamma)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        dH = der_outputs[0]
        if dH is None:
            return [None], [None, None]
        gamma = outputs[0][1]
        dx, dwg, dwn = hx_backward(inputs[0], params[0], params[1], gamma, dH)
        return [dx], [dwg, dwn]

    def get_output_sizes(self, input_sizes):
        """``[(K, N)]`` (the size of H, the value's first element); K from ``size``."""
        s = input_sizes[0] if input_sizes else None
        size = np.asarray(self.size).ravel()
        if s is None or size.size != 2:
            return [None]
        return [(int(size[1]), int(s[-1]))]

    def init_params(self, rng, dtype=np.float32):
        size = [int(v) for v in np.asarray(self.size).ravel()]
        if len(size) != 2:
            raise ValueError(f'H_x: size must be [D, K], got {self.size!r}')
        w = (np.ones(size, order='F') / size[0]).astype(dtype, order='F')
        return [w, w.copy(order='F')]


@register('dagnn.gating')
class gating(Layer):
    """Top-k selection and softmax. Input: the ``H_x`` tuple (its first element is used;
    a plain ``K x N`` or ``1 x 1 x K x N`` array works too). Output value: the tuple
    ``(sfm, mask, masked_H, None, None, cm_sums)``. The all-tie random pick draws from the
    net's ``rng``. ``size``, ``hasBias``, ``CM_num`` and ``f_size`` are stored as the
    original does; ``topk`` is used."""
    properties = {'size': [], 'hasBias': False, 'topk': 8, 'CM_num': 16, 'f_size': [8, 8]}
    #: the trainer keeps the gate after eval (precious), as the original's cnn_train_GM_dag
    trainer_reads = (0,)
    #: a loaded net with a gating layer gets its CM routes and the original's order
    net_finalizer = 'pydagnn.models.gm:finalize_gm'

    def forward(self, inputs, params):
        H = _first(inputs[0])
        topk = int(first_value(self.topk))
        sfm, mask, masked, sums, counts = gating_forward(H, topk, self.rng, return_counts=True)
        return [GateValue((sfm, mask, masked, None, None, sums), counts)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        dS = der_outputs[0]
        if dS is None:
            return [None], []
        sfm = outputs[0][0]
        dH = gating_backward(sfm, dS)
        H = _first(inputs[0])
        if H.shape != dH.shape:
            dH = get_array_module(dH).asfortranarray(dH.reshape(H.shape, order='F'))
        return [dH], []

    def get_output_sizes(self, input_sizes):
        """``[(K, N)]``: sfm, the value's first element, is shaped like the scores."""
        s = input_sizes[0] if input_sizes else None
        if s is None:
            return [None]
        s = tuple(int(v) for v in s)
        return [s if len(s) == 2 else (int(np.prod(s[:-1])), s[-1])]
