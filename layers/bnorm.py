"""Batch normalization: ``vl_nnbnorm`` and ``dagnn.BatchNorm``.

For a map ``x`` (H x W x C x N) with per-channel gain ``g`` and bias ``b``:
``y = g * (x - mu) / sigma + b`` where ``mu`` and ``sigma = sqrt(var + epsilon)`` are
either the batch statistics over (H, W, N) (``var`` the biased, 1/M variance) or the
given ``moments`` (a ``C x 2`` array ``[mu, sigma]``, epsilon already included).

Backward follows the original CPU code (``bits/impl/bnorm_cpu.cpp``): with moments
``[mu, sigma]`` (the batch ones, or the given ones)

    db = sum(dy)
    dg = sum(dy * (x - mu)) / sigma
    dx = g/sigma * (dy - db/M) - g/sigma * dg/(M*sigma) * (x - mu)

which is the exact derivative of the batch-statistics forward when the moments are
the batch moments. With *given* moments the original still applies this formula (it
is not the derivative of the given-moments forward); :func:`bnorm_backward` does the
same, so that it matches ``vl_nnbnorm(x, g, b, dzdy, 'moments', m)``. The fourth
output is the moments used (the recomputed batch moments, or the given ones).

The statistics are two-pass (mean first, then the mean of the squared deviations),
summed in float64 on the CPU (numba kernels, :mod:`pydagnn.layers.kernels.bnorm_cpu`)
and returned in the input dtype; the original uses one pass (``E[x^2] - mu^2``). Both
agree to float32 rounding unless ``|mu| >> sigma``, where the two-pass form is the
accurate one.

On the GPU (CuPy inputs) each function takes its ``_..._gpu`` path below: the same
formulas as per-plane fused reductions and one elementwise pass each (the kernels are in
:mod:`pydagnn.layers.kernels.bnorm_gpu`).
"""
import numpy as np

from pydagnn.backend import get_array_module, is_gpu_array
from pydagnn.layer import Layer, property_ints, register
from pydagnn.layers._common import as4d, dy_like, first_value
from pydagnn.layers.kernels import bnorm_cpu as _kc
from pydagnn.layers.kernels import bnorm_gpu as _kb
from pydagnn.layers.kernels.threads_cpu import parallel_for

__all__ = ['bnorm_moments', 'bnorm_forward', 'bnorm_backward', 'bnorm_backward_fixed_moments',
           'bnorm_forward_synced', 'bnorm_backward_synced', 'BatchNorm']


#: CPU passes over maps of fewer elements run in the calling thread: waking a worker
#: costs more than it saves. Measured at batch 32 on the 2-core machine (regions 80 us):
#: BN+ReLU at 8x8x128 (262K elements) forward 0.45-0.49 ms on 2 threads against 0.24-0.29
#: on one, backward 0.51-0.56 against 0.31-0.35; at 16x16x64 (524K) the backward is
#: faster on 2 (0.67-0.71 against 0.75-0.83), the forward about even.
PARALLEL_MIN_ELEMENTS = 1 << 19


def _check(x, g, b, moments, op):
    x = as4d(x, 'x', op)
    C = x.shape[2]
    for name, a in (('g', g), ('b', b)):
        if a is not None and a.size != C:
            raise ValueError(f'{op}: {name} has shape {a.shape} ({a.size} elements), '
                             f'x has shape {x.shape} with {C} channels')
    if moments is not None and moments.size != 2 * C:
        raise ValueError(f'{op}: moments has shape {moments.shape}, expected ({C}, 2) '
                         f'for x of shape {x.shape}')
    return x


def _ncm(x):
    """(N, C, H*W) view of an H x W x C x N array (a view when x is F-contiguous)."""
    H, W, C, N = x.shape
    return x.T.reshape(N, C, W * H)


def _back(a3, shape):
    """(N, C, H*W) -> H x W x C x N, Fortran-contiguous."""
    H, W, C, N = shape
    return a3.reshape(N, C, W, H).T


def _channels(v, C, dt):
    """A per-channel parameter (C elements, any shape) as a (C,) vector of dtype ``dt``."""
    return v.reshape(C).astype(dt, copy=False)


def _split_moments(moments, C, dt, xp):
    """Given moments (``C x 2``, or 2C values in MATLAB order) -> ``(mu, sigma, m)``: mu and
    sigma contiguous (C,) vectors and ``m`` the ``(C, 2)`` moments, all of dtype ``dt``."""
    m = moments.astype(dt, copy=False)
    if m.shape != (C, 2):
        m = m.reshape(C, 2, order='F')
    return xp.ascontiguousarray(m[:, 0]), xp.ascontiguousarray(m[:, 1]), m


def bnorm_moments(x, epsilon=1e-5):
    """Batch moments of ``x`` (H x W x C x N): ``(C, 2)`` array ``[mean, sqrt(var + epsilon)]``
    with the biased variance over H, W and N, in x's dtype."""
    x = _check(x, None, None, None, 'bnorm_moments')
    if is_gpu_array(x):
        return _bnorm_moments_gpu(x, epsilon)
    return _bnorm_moments_cpu(x, epsilon)


# CPU: numba kernels (:mod:`pydagnn.layers.kernels.bnorm_cpu`) on the C-contiguous
# (N, C, H*W) view, its N * C planes split over worker threads in memory order: two
# streaming passes forward and two backward, instead of numpy's six or seven with
# map-sized temporaries.
def _bnorm_moments_cpu(x, epsilon):
    mu, sigma = _batch_stats(_x3_cpu(x), epsilon, x.shape)
    return np.stack([mu, sigma], axis=1)


def _x3_cpu(x):
    """The C-contiguous (N, C, H*W) view of x (a copy only when x is not F-contiguous)."""
    return np.ascontiguousarray(_ncm(x))


def on_planes(x3, run):
    """``run(p0, p1)`` (a kernel call on the planes ``[p0, p1)`` of the (N, C, H*W) map
    ``x3``, see :mod:`bnorm_cpu`) over a split of its N * C planes on the worker threads:
    each thread streams through a contiguous run of memory. Maps under
    :data:`PARALLEL_MIN_ELEMENTS` run in the calling thread."""
    workers = 1 if x3.size < PARALLEL_MIN_ELEMENTS else None
    parallel_for(lambda p0, p1, _: run(p0, p1), x3.shape[0] * x3.shape[1], uses_blas=False,
                 workers=workers)


def channel_moments(sums, sqdevs, N, C, HW):
    """The (C,) float64 mean and biased variance of each channel from its N planes' sums
    and squared deviations from their own means (:func:`bnorm_cpu.plane_stats`): Chan,
    Golub and LeVeque's combination, ``M2 = sum(sqdevs) + HW * sum((plane mean -
    mean)**2)``, exact in exact arithmetic, without the cancellation of ``E[x^2] - mu^2``."""
    M = N * HW
    mu = channel_totals(sums, C) / M
    shift = sums.reshape(N, C) / HW - mu
    return mu, (channel_totals(sqdevs, C) + HW * (shift * shift).sum(axis=0)) / M


def backward_coefficients(db_planes, dot_planes, g, sigma, M, dt):
    """The backward formula (module docstring) from the per-plane float64 sums
    ``db_planes = sum(d)``, ``dot_planes = sum(d * (x - mu))`` (N * C each, M values per
    channel): ``(db, dg, G1, G2, muz)`` in dtype ``dt``, for ``dx = G1 * (d - muz) - G2 *
    (x - mu)``; G1 contiguous, for the kernels."""
    C = sigma.shape[0]
    M = dt.type(M)
    db = channel_totals(db_planes, C).astype(dt)
    dg = channel_totals(dot_planes, C).astype(dt) / sigma
    G1 = np.ascontiguousarray(_channels(g, C, dt) / sigma)
    G2 = G1 * dg / (M * sigma)
    return db, dg, G1, G2, db / M


def channel_totals(per_plane, C):
    """The (C,) float64 sums over the images of per-plane sums (N * C,), image by image."""
    return per_plane.reshape(-1, C).sum(axis=0) if C else np.zeros(0)


def _batch_stats(x3, epsilon, shape):
    """(mu, sigma) of the (N, C, H*W) map in its dtype (float64 sums)."""
    N, C, HW = x3.shape
    if N * HW == 0:
        raise ValueError(f'bnorm: batch statistics of an empty batch (x shape {shape})')
    sums, sqdevs = np.empty(N * C), np.empty(N * C)
    on_planes(x3, lambda p0, p1: _kc.plane_stats(x3, p0, p1, sums, sqdevs))
    mu, var = channel_moments(sums, sqdevs, N, C, HW)
    sigma = np.sqrt(var + float(epsilon))
    return mu.astype(x3.dtype), sigma.astype(x3.dtype)


def _moments_cpu(x3, moments, epsilon, shape):
    """``(mu, sigma, m)``: the batch moments (``moments`` None) or the given ones, and the
    (C, 2) moments used."""
    if moments is None:
        mu, sigma = _batch_stats(x3, epsilon, shape)
        return mu, sigma, np.stack([mu, sigma], axis=1)
    return _split_moments(moments, x3.shape[1], x3.dtype, np)


def bnorm_forward(x, g, b, moments=None, epsilon=1e-5, test_mode=False):
    """``vl_nnbnorm`` forward.

    x: H x W x C x N; g, b: C elements (any shape); moments: ``None`` (use the batch
    statistics) or a ``C x 2`` array ``[mu, sigma]`` that is used as given (this is
    'test' mode; ``test_mode=True`` only asserts that moments are given).
    Returns ``(y, moments)``: y Fortran-contiguous, moments the ``(C, 2)`` moments used.
    """
    x = _check(x, g, b, moments, 'bnorm_forward')
    if moments is None and test_mode:
        raise ValueError('bnorm_forward: test_mode needs the moments')
    if is_gpu_array(x):
        return _bnorm_forward_gpu(x, g, b, moments, epsilon)
    return _bnorm_forward_cpu(x, g, b, moments, epsilon)


def _bnorm_forward_cpu(x, g, b, moments, epsilon):
    C, dt = x.shape[2], x.dtype
    x3 = _x3_cpu(x)
    mu, sigma, out_moments = _moments_cpu(x3, moments, epsilon, x.shape)
    y = np.empty(x.shape, dtype=dt, order='F')
    scale = np.ascontiguousarray(_channels(g, C, dt) / sigma)
    shift = np.ascontiguousarray(_channels(b, C, dt))
    y3 = _ncm(y)
    on_planes(x3, lambda p0, p1: _kc.normalize(x3, y3, p0, p1, mu, scale, shift))
    return y, out_moments


def bnorm_backward(x, g, b, dy, moments=None, epsilon=1e-5):
    """``vl_nnbnorm`` backward: ``(dx, dg, db, moments)``.

    Without moments the batch moments are recomputed (and returned as the 4th output);
    with moments (``C x 2``) the original's formula is applied with those moments and
    they are returned unchanged (``vl_nnbnorm(x, g, b, dy, 'moments', m)``).
    dg, db have g's and b's shapes; dx is Fortran-contiguous.
    """
    x = _check(x, g, b, moments, 'bnorm_backward')
    dy = dy_like(x, dy, 'bnorm_backward')
    if is_gpu_array(x):
        return _bnorm_backward_gpu(x, g, b, dy, moments, epsilon)
    return _bnorm_backward_cpu(x, g, b, dy, moments, epsilon)


def _bnorm_backward_cpu(x, g, b, dy, moments, epsilon):
    C, dt = x.shape[2], x.dtype
    x3 = _x3_cpu(x)
    dy3 = _x3_cpu(dy.astype(dt, copy=False))
    mu, sigma, out_moments = _moments_cpu(x3, moments, epsilon, x.shape)
    db64, dot64 = np.empty(dy3.shape[0] * C), np.empty(dy3.shape[0] * C)
    on_planes(x3, lambda p0, p1: _kc.backward_sums(x3, dy3, p0, p1, mu, db64, dot64))
    db, dg, G1, G2, muz = backward_coefficients(db64, dot64, g, sigma,
                                                dy3.shape[0] * dy3.shape[2], dt)
    dx = np.empty(x.shape, dtype=dt, order='F')
    dx3 = _ncm(dx)
    on_planes(x3, lambda p0, p1: _kc.backward_dx(x3, dy3, dx3, p0, p1, mu, muz, G1, G2))
    return dx, dg.reshape(g.shape), db.reshape(b.shape), out_moments


def bnorm_backward_fixed_moments(x, g, b, dy, moments):
    """Exact derivative of the given-moments forward ``y = g (x - mu)/sigma + b``
    (moments treated as constants): ``(dx, dg, db)`` with ``dx = g/sigma * dy``.
    Used by :class:`BatchNorm` in 'test' mode."""
    x = _check(x, g, b, moments, 'bnorm_backward_fixed_moments')
    dy = dy_like(x, dy, 'bnorm_backward_fixed_moments')
    if is_gpu_array(x):
        return _bnorm_backward_fixed_moments_gpu(x, g, b, dy, moments)
    return _bnorm_backward_fixed_moments_cpu(x, g, b, dy, moments)


def _bnorm_backward_fixed_moments_cpu(x, g, b, dy, moments):
    C, dt = x.shape[2], x.dtype
    dy3 = _ncm(dy.astype(dt, copy=False))
    mu, sigma, _ = _split_moments(moments, C, dt, np)
    db = dy3.sum(axis=(0, 2))
    dg = (dy3 * (_ncm(x) - mu[:, None])).sum(axis=(0, 2)) / sigma
    dx3 = dy3 * (_channels(g, C, dt) / sigma)[:, None]
    return _back(dx3, x.shape), dg.reshape(g.shape), db.reshape(b.shape)


# ---------------------------------------------------------------------------- GPU
# CuPy arrays: the statistics and the backward sums as fused reductions, the normalization
# and the input derivative as one elementwise pass each (the kernels:
# :mod:`pydagnn.layers.kernels.bnorm_gpu`). A map ``x`` (H x W x C x N, Fortran order) is
# read as the C-contiguous ``(N, C, H*W)`` array ``x3``. Every per-channel sum is computed
# in two steps: a reduction over each ``(image, channel)`` plane (the contiguous last axis:
# one ``ReductionKernel`` launch with N*C outputs, which keeps the whole GPU busy, unlike
# a reduction over axes (0, 2) with only C outputs), then a sum over the N images.
# Statistics as on the CPU: two-pass, biased (1/M), in x's dtype.
def _x3_gpu(x, cp, dtype=None):
    """(F-contiguous x, its (N, C, H*W) view)."""
    x = cp.asfortranarray(x, dtype=dtype)
    H, W, C, N = x.shape
    return x, x.T.reshape(N, C, W * H)


def _ch(v):
    """A (C,) vector as (1, C, 1) for broadcasting against (N, C, H*W)."""
    return v.reshape(1, -1, 1)


def _channel_sum(plane_values):
    """(N, C) per-plane values -> (C,) sums over the images."""
    return plane_values.sum(axis=0)


def _stats_gpu(x3, epsilon):
    k = _kb.kernels()
    N, C, HW = x3.shape
    M = N * HW
    if M == 0:
        raise ValueError(f'bnorm: batch statistics of an empty batch (x shape {x3.shape[::-1]})')
    dt = x3.dtype.type
    mu = _channel_sum(k['sum'](x3, axis=2)) / dt(M)
    var = _channel_sum(k['sqdev'](x3, _ch(mu), axis=2)) / dt(M)
    import cupy as cp
    sigma = cp.sqrt(var + dt(epsilon))
    return mu, sigma


def _moments_gpu(x3, moments, epsilon, cp):
    """``(mu, sigma, m)``: the batch moments of x3 (``moments`` None) or the given ones, and
    the (C, 2) moments used."""
    if moments is None:
        mu, sigma = _stats_gpu(x3, epsilon)
        return mu, sigma, cp.stack([mu, sigma], axis=1)
    return _split_moments(moments, x3.shape[1], x3.dtype, cp)


def _x_dy_gpu(x, dy, cp):
    """x and dy (already x's shape) Fortran-contiguous in x's dtype: ``(x, x3, dy3)``."""
    x, x3 = _x3_gpu(x, cp)
    _, dy3 = _x3_gpu(dy, cp, x.dtype)
    return x, x3, dy3


def _db_dg_gpu(dy3, x3, mu, sigma):
    """``db = sum(dy)``, ``dg = sum(dy * (x - mu)) / sigma`` per channel."""
    k = _kb.kernels()
    db = _channel_sum(k['sum'](dy3, axis=2))
    dg = _channel_sum(k['dotdev'](dy3, x3, _ch(mu), axis=2)) / sigma
    return db, dg


def _bnorm_moments_gpu(x, epsilon):
    """GPU ``bnorm_moments`` (x checked, 4-D)."""
    import cupy as cp
    _, x3 = _x3_gpu(x, cp)
    mu, sigma = _stats_gpu(x3, epsilon)
    return cp.stack([mu, sigma], axis=1)


def _bnorm_forward_gpu(x, g, b, moments, epsilon):
    """GPU ``bnorm_forward`` -> ``(y, moments)`` (x already checked, 4-D; moments given
    unless the batch statistics are wanted)."""
    import cupy as cp
    x, x3 = _x3_gpu(x, cp)
    N, C, HW = x3.shape
    dt = x.dtype
    mu, sigma, out_moments = _moments_gpu(x3, moments, epsilon, cp)
    y3 = _kb.kernels()['norm'](x3, _ch(mu), _ch(_channels(g, C, dt) / sigma),
                               _ch(_channels(b, C, dt)))
    return y3.reshape(N, C, *x.shape[1::-1]).T, out_moments


def _bnorm_backward_gpu(x, g, b, dy, moments, epsilon):
    """GPU ``bnorm_backward`` -> ``(dx, dg, db, moments)`` (x checked, dy of x's shape)."""
    import cupy as cp
    x, x3, dy3 = _x_dy_gpu(x, dy, cp)
    N, C, HW = x3.shape
    dt = x.dtype
    mu, sigma, out_moments = _moments_gpu(x3, moments, epsilon, cp)
    M = dt.type(N * HW)
    db, dg = _db_dg_gpu(dy3, x3, mu, sigma)
    G1 = _channels(g, C, dt) / sigma
    G2 = G1 * dg / (M * sigma)
    muz = db / M
    dx3 = _kb.kernels()['dx'](dy3, x3, _ch(mu), _ch(G1), _ch(G2), _ch(muz))
    dx = dx3.reshape(N, C, *x.shape[1::-1]).T
    return dx, dg.reshape(g.shape), db.reshape(b.shape), out_moments


def _bnorm_backward_fixed_moments_gpu(x, g, b, dy, moments):
    """GPU ``bnorm_backward_fixed_moments`` -> ``(dx, dg, db)`` (x checked, dy of x's shape)."""
    import cupy as cp
    x, x3, dy3 = _x_dy_gpu(x, dy, cp)
    N, C, HW = x3.shape
    dt = x.dtype
    mu, sigma, _ = _split_moments(moments, C, dt, cp)
    db, dg = _db_dg_gpu(dy3, x3, mu, sigma)
    dx3 = _kb.kernels()['scale'](dy3, _ch(_channels(g, C, dt) / sigma))
    return dx3.reshape(N, C, *x.shape[1::-1]).T, dg.reshape(g.shape), db.reshape(b.shape)


# ---------------------------------------------------------------------------- synced (--sync-bn)
def _synced_stats(x, epsilon, batch_sum):
    """Moments of the whole data-parallel batch (``batch_sum`` sums a small array over the
    ranks): the count and per-channel sums first, the mean, then the squared deviations
    from it (two passes, as the local statistics). Returns ``(mu, sigma, xm, M)``."""
    xp = get_array_module(x)
    x3 = _ncm(x)
    dt = x.dtype
    C = x.shape[2]
    first = batch_sum(xp.concatenate([x3.sum(axis=(0, 2)), xp.full(1, x3.shape[0] * x3.shape[2], dtype=dt)]))
    M = first[C]
    if float(M) == 0:
        raise ValueError(f'bnorm: batch statistics of an empty batch on every rank (x shape {x.shape})')
    mu = first[:C] / M
    xm = x3 - mu[:, None]
    var = batch_sum((xm * xm).sum(axis=(0, 2))) / M
    return mu, xp.sqrt(var + dt.type(epsilon)), xm, M


def bnorm_forward_synced(x, g, b, epsilon, batch_sum):
    """:func:`bnorm_forward` with the moments of the whole data-parallel batch (sync mode;
    one path, ``xp`` code, for both devices). Returns ``(y, moments)``."""
    x = _check(x, g, b, None, 'bnorm_forward_synced')
    xp = get_array_module(x)
    C, dt = x.shape[2], x.dtype
    mu, sigma, xm, _ = _synced_stats(x, epsilon, batch_sum)
    y3 = xm * (_channels(g, C, dt) / sigma)[:, None] + _channels(b, C, dt)[:, None]
    return xp.asfortranarray(_back(y3, x.shape)), xp.stack([mu, sigma], axis=1)


def bnorm_backward_synced(x, g, b, dy, epsilon, batch_sum):
    """The derivative of :func:`bnorm_forward_synced`: the per-channel sums of ``dy`` and
    ``dy * (x - mu)`` over the whole batch enter dx; dg, db are this rank's shares (the
    gradient allreduce adds them up). Returns ``(dx, dg, db, moments)``."""
    x = _check(x, g, b, None, 'bnorm_backward_synced')
    dy = dy_like(x, dy, 'bnorm_backward_synced')
    xp = get_array_module(x)
    C, dt = x.shape[2], x.dtype
    dy3 = _ncm(dy.astype(dt, copy=False))
    mu, sigma, xm, M = _synced_stats(x, epsilon, batch_sum)
    db = dy3.sum(axis=(0, 2))
    dg = (dy3 * xm).sum(axis=(0, 2)) / sigma
    both = batch_sum(xp.concatenate([db, dg]))
    G1 = _channels(g, C, dt) / sigma
    G2 = G1 * both[C:] / (M * sigma)
    dx3 = G1[:, None] * (dy3 - (both[:C] / M)[:, None]) - G2[:, None] * xm
    return (xp.asfortranarray(_back(dx3, x.shape)), dg.reshape(g.shape), db.reshape(b.shape),
            xp.stack([mu, sigma], axis=1))


@register('dagnn.BatchNorm')
class BatchNorm(Layer):
    """``dagnn.BatchNorm``: inputs [x], params [g, b, moments], outputs [y].

    'normal' mode normalizes with the batch statistics; 'test' mode with the stored
    moments (param 3). Backward in 'normal' mode returns dx, dg, db and, as the
    "derivative" of the moments, the batch moments times N (images), exactly as
    ``dagnn.BatchNorm`` does (the 'average' update divides by the batch size again).
    Backward in 'test' mode (the original cannot run it: it passes empty moments to
    vl_nnbnorm) returns the exact derivative of the test-mode forward for x, g and b,
    and no moments derivative.
    """
    properties = {'numChannels': None, 'epsilon': 1e-5, 'opts': ['NoCuDNN']}
    #: backward reads x, not y: the engine may free y after its last forward consumer
    #: when that one does not need it either (BN -> ReLU)
    backward_needs_outputs = False
    param_roles = ('vector', 'vector', 'moments')
    #: a loaded net runs each BN -> ReLU pair fused (:func:`pydagnn.models.fuse.set_fused_bn_relu`)
    net_finalizer = 'pydagnn.models.fuse:set_fused_bn_relu'

    def check_param_shapes(self, values, names):
        """g, b and the moments have one row per channel, ``numChannels`` of them (when set)."""
        nc = property_ints(self.numChannels)
        counts = []
        for k, v in enumerate(values[:3]):
            if v is not None:
                counts.append((names[k], v.shape[0]))
        if nc:
            counts.insert(0, ('numChannels', nc[0]))
        if len({c for _, c in counts}) > 1:
            raise ValueError('channel counts disagree: ' + ', '.join(f'{n} {c}' for n, c in counts))

    def _eps(self):
        return float(first_value(self.epsilon))

    def forward(self, inputs, params):
        x = inputs[0]
        g, b, m = params[0], params[1], params[2]
        if self.mode == 'test':
            y, _ = bnorm_forward(x, g, b, moments=m, epsilon=self._eps(), test_mode=True)
        elif self.batch_synced:
            y, _ = bnorm_forward_synced(x, g, b, self._eps(), self.batch_sum)
        else:
            y, _ = bnorm_forward(x, g, b, epsilon=self._eps())
        return [y]

    def backward(self, inputs, params, der_outputs, outputs):
        x = inputs[0]
        g, b, m = params[0], params[1], params[2]
        dy = der_outputs[0]
        if self.mode == 'test':
            dx, dg, db = bnorm_backward_fixed_moments(x, g, b, dy, m)
            return [dx], [dg, db, None]
        if self.batch_synced:
            dx, dg, db, mom = bnorm_backward_synced(x, g, b, dy, self._eps(), self.batch_sum)
        else:
            dx, dg, db, mom = bnorm_backward(x, g, b, dy, epsilon=self._eps())
        n = x.shape[3] if x.ndim == 4 else 1
        dm = (mom * x.dtype.type(n)).reshape(m.shape, order='F')
        return [dx], [dg, db, dm]

    def get_output_sizes(self, input_sizes):
        return [input_sizes[0]]

    def init_params(self, rng, dtype=np.float32):
        if self.numChannels is None:
            raise ValueError('BatchNorm.init_params: numChannels is not set')
        C = int(first_value(self.numChannels))
        return [np.ones(C, dtype), np.zeros(C, dtype), np.zeros((C, 2), dtype, order='F')]

    def param_defaults(self):
        # BatchNorm.m attach(): only the moments change (trainMethod 'average',
        # learningRate 0.1); g, b and the moments keep addParam's weightDecay 1.
        return [{}, {}, {'train_method': 'average', 'learning_rate': 0.1}]
