"""Bilinear resampling (MatConvNet's ``vl_nnbilinearsampler`` and ``dagnn.BilinearSampler``).

``bilinear_sampler_forward(x, grid) -> y``
``bilinear_sampler_backward(x, grid, dy) -> (dx, dgrid)``

x is ``H x W x C x N``; grid is ``2 x Ho x Wo x No`` with No a multiple of N (output
images ``k*No/N ... (k+1)*No/N - 1`` sample input image k); y is ``Ho x Wo x C x No``.
``grid(1,...)`` is the vertical, ``grid(2,...)`` the horizontal coordinate, normalised to
[-1, 1] (-1: the centre of the first pixel, +1: the centre of the last). As the CPU code of
MatConvNet: ``py = (gv + 1)/2 (H - 1)``, ``sy = floor(py)``, likewise x; the sample is the
bilinear blend of the four pixels ``(sy + i, sx + j)``, i, j in {0, 1}, where pixels outside
the image count as zero (a sample with ``sy`` outside ``[-1, H)`` or ``sx`` outside
``[-1, W)`` is 0). The grid derivative is the derivative of the blend weights with
``sy, sx`` held fixed, scaled by ``(H-1)/2`` and ``(W-1)/2``.

Vectorised on whole arrays (gathers with ``take_along_axis``; the scatter of dx is a
weighted ``bincount``), so the same code runs on CuPy.
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register
from pydagnn.layers._common import as4d

__all__ = ['bilinear_sampler_forward', 'bilinear_sampler_backward', 'BilinearSampler']


class _Geom:
    def __init__(self, x, grid, op):
        self.xp = xp = get_array_module(x, grid)
        x = as4d(x, 'x', op, xp)
        grid = as4d(grid, 'grid', op, xp)
        if x.dtype.kind != 'f':
            raise ValueError(f'{op}: x must be float32 or float64, got {x.dtype}')
        self.dtype = x.dtype
        self.H, self.W, self.C, self.N = x.shape
        if grid.shape[0] != 2:
            raise ValueError(f'{op}: grid must be 2 x Ho x Wo x No, got shape {grid.shape}')
        _, self.Ho, self.Wo, self.No = grid.shape
        if self.N == 0 or self.No % self.N:
            raise ValueError(f'{op}: the grid has {self.No} images, not a multiple of the '
                             f'{self.N} images of x {x.shape}')
        self.x, self.grid = x, grid.astype(x.dtype, copy=False)
        t = self.dtype.type
        g = self.grid.T.reshape(self.No, self.Wo * self.Ho, 2)       # (No, P, [v, u])
        py = t(0.5) * (g[:, :, 0] + t(1)) * t(self.H - 1)
        px = t(0.5) * (g[:, :, 1] + t(1)) * t(self.W - 1)
        sy, sx = xp.floor(py), xp.floor(px)
        self.wy, self.wx = py - sy, px - sx
        sy, sx = sy.astype(np.int64), sx.astype(np.int64)
        inside = (sy >= -1) & (sy < self.H) & (sx >= -1) & (sx < self.W)
        # the four corners: (i, j, flat index into the H x W map, weight factors, valid)
        self.corners = []
        for j in (0, 1):
            for i in (0, 1):
                yy, xx = sy + i, sx + j
                ok = inside & (yy >= 0) & (yy < self.H) & (xx >= 0) & (xx < self.W)
                idx = xp.where(ok, yy + xx * self.H, 0)
                self.corners.append((i, j, idx, ok))
        self.img = xp.arange(self.No) // (self.No // self.N)          # input image per output

    def weights(self, i, j):
        t = self.dtype.type
        wwx = self.wx if j else t(1) - self.wx
        wwy = self.wy if i else t(1) - self.wy
        return wwx, wwy

    def gather(self, idx):
        """x at flat spatial index idx (No, P) of each output's input image -> (No, C, P)."""
        xp = self.xp
        xf = self.x.T.reshape(self.N, self.C, self.W * self.H)[self.img]   # (No, C, HW)
        return xp.take_along_axis(xf, xp.broadcast_to(idx[:, None, :], (self.No, self.C,
                                                                         idx.shape[1])), axis=2)


def bilinear_sampler_forward(x, grid):
    """``vl_nnbilinearsampler(x, grid)`` -> y ``Ho x Wo x C x No`` (x's dtype, Fortran)."""
    g = _Geom(x, grid, 'bilinear_sampler_forward')
    xp = g.xp
    acc = xp.zeros((g.No, g.C, g.Ho * g.Wo), dtype=g.dtype)
    for i, j, idx, ok in g.corners:
        wwx, wwy = g.weights(i, j)
        w = xp.where(ok, wwx * wwy, 0).astype(g.dtype, copy=False)
        acc += w[:, None, :] * g.gather(idx)
    return xp.asfortranarray(acc.reshape(g.No, g.C, g.Wo, g.Ho).T)


def bilinear_sampler_backward(x, grid, dy, der_x=True, der_grid=True):
    """Derivatives of :func:`bilinear_sampler_forward` projected on dy:
    ``(dx, dgrid)`` (either ``None`` when not asked for)."""
    g = _Geom(x, grid, 'bilinear_sampler_backward')
    xp = g.xp
    dy = xp.asarray(dy, dtype=g.dtype)
    if dy.size != g.Ho * g.Wo * g.C * g.No:
        raise ValueError(f'bilinear_sampler_backward: dy has shape {dy.shape}, expected '
                         f'{(g.Ho, g.Wo, g.C, g.No)}')
    dyt = dy.reshape(g.Ho, g.Wo, g.C, g.No, order='F').T.reshape(g.No, g.C, g.Wo * g.Ho)
    P, HW = g.Ho * g.Wo, g.H * g.W
    dx = dgrid = None
    if der_x:
        base = (g.img[:, None] * g.C + xp.arange(g.C)[None, :]) * HW      # (No, C)
        lins, vals = [], []
        for i, j, idx, ok in g.corners:
            wwx, wwy = g.weights(i, j)
            w = xp.where(ok, wwx * wwy, 0).astype(g.dtype, copy=False)
            lins.append((base[:, :, None] + idx[:, None, :]).ravel())
            vals.append((w[:, None, :] * dyt).ravel())
        acc = xp.bincount(xp.concatenate(lins), weights=xp.concatenate(vals),
                          minlength=g.N * g.C * HW).astype(g.dtype, copy=False)
        dx = xp.asfortranarray(acc.reshape(g.N, g.C, g.W, g.H).T)
    if der_grid:
        dgx = xp.zeros((g.No, P), dtype=g.dtype)
        dgy = xp.zeros((g.No, P), dtype=g.dtype)
        for i, j, idx, ok in g.corners:
            wwx, wwy = g.weights(i, j)
            s = (dyt * g.gather(idx)).sum(axis=1)                          # (No, P)
            s = xp.where(ok, s, 0)
            dgx += (2 * j - 1) * wwy * s
            dgy += (2 * i - 1) * wwx * s
        t = g.dtype.type
        out = xp.stack([dgy * t(0.5 * (g.H - 1)), dgx * t(0.5 * (g.W - 1))], axis=2)
        dgrid = xp.asfortranarray(out.reshape(g.No, g.Wo, g.Ho, 2).T)
    return dx, dgrid


@register('dagnn.BilinearSampler')
class BilinearSampler(Layer):
    """``dagnn.BilinearSampler``: inputs [x, grid], no params, outputs [y]; derivatives
    for both inputs. No properties."""
    properties = {}

    def forward(self, inputs, params):
        return [bilinear_sampler_forward(inputs[0], inputs[1])]

    def backward(self, inputs, params, der_outputs, outputs=None):
        if der_outputs[0] is None:
            return [None, None], []
        dx, dg = bilinear_sampler_backward(inputs[0], inputs[1], der_outputs[0])
        return [dx.reshape(np.shape(inputs[0]), order='F'),
                dg.reshape(np.shape(inputs[1]), order='F')], []

    def get_output_sizes(self, input_sizes):
        xs, gs = (list(input_sizes) + [None, None])[:2]
        if xs is None or gs is None:
            return [None]
        xs = tuple(int(v) for v in xs) + (1,) * (4 - len(xs))
        gs = tuple(int(v) for v in gs) + (1,) * (4 - len(gs))
        return [(gs[1], gs[2], xs[2], gs[3])]
