"""``dagnn.CM_out``: the weighted fusion of the component modules (CMs) of GM-SOP
(``+dagnn/CM_out.m``).

Inputs: the gating tuple ``(sfm, mask, ...)`` (``K x N``), then the K CM outputs
``y_1 .. y_K``. ``y_i`` is ``1 x 1 x D' x n_i``: the images whose mask selects CM i, in
batch order, or ``None`` (or an array with ``n_i = 0``) when CM i got no image.
Output ``z`` (``1 x 1 x D' x N``): ``z_n = sum over selected i of s(i, n) * y_i(n)``, the
CMs added in index order (the original's summation order).
Backward: ``dy_i(n) = s(i, n) * dz_n`` (``None`` for a CM without images) and
``d s(i, n) = y_i(n) . dz_n`` (``K x N``, zero where unselected), which goes to the
gating var's derivative.

A CM without images contributes nothing: no value left over from an earlier eval is
used (the original's defect; SPEC 4). Vectorised per CM: the images of CM i are found
from the gate's :class:`pydagnn.routing.RouteIndex`: the one argsort per step that the
engine's routing also uses (no host round trip, no loop over images).

:func:`fuse_pairs_forward` / :func:`fuse_pairs_backward` are the same fusion for the
batched mixture (:mod:`pydagnn.layers.mixture`): the CM outputs of all (image, CM)
pairs as one ``1 x 1 x D' x P`` stack (:class:`pydagnn.routing.Pairs` order), fused by
one scatter-add.
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.routing import route_index, route_order, scatter_add
from pydagnn.layers._common import first_value

__all__ = ['cm_out_forward', 'cm_out_backward', 'fuse_pairs_forward', 'fuse_pairs_backward', 'CM_out']


def _counts(ys, K, op):
    if len(ys) != K:
        raise ValueError(f'{op}: got {len(ys)} CM outputs for {K} CMs '
                         f'(the gating mask has {K} rows)')
    n = []
    for i, y in enumerate(ys):
        if y is None or y.size == 0:
            n.append(0)
            continue
        if y.ndim != 4 or y.shape[:2] != (1, 1):
            raise ValueError(f'{op}: CM {i + 1} output must be 1 x 1 x D x n, got shape {y.shape}')
        n.append(y.shape[3])
    return n


def _check_routing(mask, n, op):
    if isinstance(mask, np.ndarray):                      # free on the CPU; skipped on the GPU
        have = mask.sum(axis=1)
        for i, (a, b) in enumerate(zip(have.tolist(), n)):
            if a != b:
                raise ValueError(f'{op}: CM {i + 1} output has {b} images, '
                                 f'its gating mask selects {a}')


def _dim(ys, default, op):
    dims = {y.shape[2] for y in ys if y is not None and y.size}
    if len(dims) > 1:
        raise ValueError(f'{op}: CM outputs have different sizes {sorted(dims)}')
    return dims.pop() if dims else int(first_value(default))


def cm_out_forward(sfm, mask, ys, hdim=None, order=None):
    """Weighted fusion; see the module docstring. ``hdim``: D' when no CM has an image.
    ``order``: the mask's :func:`~pydagnn.routing.route_order` when the caller has it."""
    xp = get_array_module(sfm)
    K, N = sfm.shape
    mask = mask.astype(bool, copy=False)
    n = _counts(ys, K, 'CM_out')
    _check_routing(mask, n, 'CM_out')
    D = _dim(ys, hdim if hdim is not None else 0, 'CM_out')
    z = xp.zeros((D, N), dtype=sfm.dtype)
    if order is None:
        order = route_order(mask)
    for i, y in enumerate(ys):
        if n[i] == 0:
            continue
        idx = order[i, :n[i]]
        z[:, idx] += y.reshape(D, n[i], order='F') * sfm[i, idx][None, :]
    return xp.asfortranarray(z).reshape(1, 1, D, N, order='F')


def cm_out_backward(sfm, mask, ys, dz, order=None):
    """``(d sfm K x N, [dy_1 or None, ..., dy_K or None])``; ``order`` as in
    :func:`cm_out_forward`."""
    xp = get_array_module(sfm)
    K, N = sfm.shape
    mask = mask.astype(bool, copy=False)
    n = _counts(ys, K, 'CM_out backward')
    D = dz.size // N if N else 0
    if dz.size != D * N:
        raise ValueError(f'CM_out backward: dz has shape {dz.shape} for {N} images')
    dz2 = dz.reshape(D, N, order='F')
    ds = xp.zeros((K, N), dtype=sfm.dtype)
    dys = []
    if order is None:
        order = route_order(mask)
    for i, y in enumerate(ys):
        if n[i] == 0:
            dys.append(None)
            continue
        idx = order[i, :n[i]]
        dzi = dz2[:, idx]
        dys.append(xp.asfortranarray(dzi * sfm[i, idx][None, :]).reshape(1, 1, D, n[i], order='F'))
        ds[i, idx] = (y.reshape(D, n[i], order='F') * dzi).sum(axis=0)
    return xp.asfortranarray(ds), dys


def _pair_weights(sfm, pairs):
    """``(P,)`` gate weight ``s(component, image)`` of every pair."""
    return sfm[pairs.component, pairs.image]


def fuse_pairs_forward(sfm, pairs, y):
    """The fusion of all pairs at once: ``z_n = sum over the pairs p of image n of
    s(i_p, n) * y_p``. sfm: ``K x N``; y: ``1 x 1 x D' x P`` (P = len(pairs)) ->
    z ``1 x 1 x D' x N``."""
    K, N = sfm.shape
    P = len(pairs)
    D = y.size // P if P else 0
    if y.size != D * P:
        raise ValueError(f'fuse_pairs_forward: y has shape {y.shape} for {P} pairs')
    yw = y.reshape(D, P, order='F') * _pair_weights(sfm, pairs)[None, :]
    return scatter_add((D, N), pairs, yw).reshape(1, 1, D, N, order='F')


def fuse_pairs_backward(sfm, pairs, y, dz):
    """``(d sfm K x N, dy 1 x 1 x D' x P)`` of :func:`fuse_pairs_forward`: ``dy_p =
    s(i_p, n_p) dz_{n_p}``, ``d s(i_p, n_p) = y_p . dz_{n_p}`` (zero off the pairs; the
    pairs are distinct, so a plain indexed store)."""
    xp = get_array_module(sfm)
    K, N = sfm.shape
    P = len(pairs)
    D = dz.size // N if N else 0
    if dz.size != D * N or y.size != D * P:
        raise ValueError(f'fuse_pairs_backward: dz has shape {dz.shape}, y {y.shape}, '
                         f'for {N} images and {P} pairs')
    dzp = dz.reshape(D, N, order='F')[:, pairs.image]           # (D, P)
    dy = xp.asfortranarray(dzp * _pair_weights(sfm, pairs)[None, :])
    ds = xp.zeros((K, N), dtype=sfm.dtype)
    ds[pairs.component, pairs.image] = (y.reshape(D, P, order='F') * dzp).sum(axis=0)
    return xp.asfortranarray(ds), dy.reshape(1, 1, D, P, order='F')


@register('dagnn.CM_out')
class CM_out(Layer):
    """Fusion of the CM outputs. Inputs ``[gating tuple, y_1, ..., y_K]``; output
    ``1 x 1 x hdim x N``. ``CM_num``, ``topk`` and ``hdim`` are stored as the original does
    (the sizes actually used come from the inputs; ``hdim`` only when no CM has an image)."""
    properties = {'CM_num': 16, 'topk': 8, 'hdim': 256}
    #: the engine passes None for a CM that ran on no image instead of skipping this layer
    accepts_missing_inputs = True

    def forward(self, inputs, params):
        g = inputs[0]
        return [cm_out_forward(g[0], g[1], list(inputs[1:]), self.hdim, route_index(g).order)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        dz = der_outputs[0]
        if dz is None:
            return [None] * len(inputs), []
        g = inputs[0]
        ds, dys = cm_out_backward(g[0], g[1], list(inputs[1:]), dz, route_index(g).order)
        return [ds] + dys, []

    def get_output_sizes(self, input_sizes):
        """``[(1, 1, D', N)]``: N from the gate (``K x N``), D' from the CM outputs
        (``hdim`` when none is known)."""
        gate = input_sizes[0] if input_sizes else None
        if gate is None:
            return [None]
        dims = [int(s[2]) for s in input_sizes[1:] if s is not None and len(s) == 4]
        D = dims[0] if dims else int(np.asarray(self.hdim).ravel()[0])
        return [(1, 1, D, int(gate[-1]))]
