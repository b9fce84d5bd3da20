"""One step's parameter derivatives, summed over sub-batches and ranks in one fixed order.

The trainer splits a batch of ``W = N * S`` sub-batches over ``N`` ranks (sub-batch
``g = s * N + r`` runs on rank ``r``). To give the same bits whatever ``N`` is, the
derivatives of the sub-batches are summed by one canonical binary tree over ``g``::

    T(o, k) = T(o, 2k) + T(o + k, 2k)    over the sub-batches g = o, o + k, o + 2k, ... < W

(a leaf is one sub-batch's derivative; an empty set, a sub-batch without images, is
left out). The step's sum is ``T(0, 1)``. Rank ``r`` computes ``T(r, N)`` from its own
sub-batches; when ``N`` is a power of two the ranks' values are the nodes of the tree one
level below ``T(0, 1)``'s subtrees, and the allreduce (a single addition for 2 ranks;
:meth:`pydagnn.parallel.MPIComm.allreduce` with ``exact=True`` pairs ranks ``r`` and
``r ^ d`` for ``d = N/2, ..., 1`` for more) finishes the same tree, so ``N`` ranks x ``S``
sub-batches and 1 process x ``N*S`` sub-batches give identical derivatives.

:class:`GradBuffer` lays every param's derivative out in one flat vector per dtype (on
the params' device), keeps one such vector per local sub-batch of the step, sums them by
the tree, allreduces the result in place, and hands the params their derivative as a view
into it (``der is None`` where no sub-batch on any rank computed one: the mask is
allreduced beside the statistics). Memory: ``S`` flat vectors of all derivatives.
"""
import numpy as np

from . import backend

__all__ = ['GradBuffer', 'tree_sum', 'is_power_of_two', 'params_checksum', 'broadcast_params']


def is_power_of_two(n):
    return n >= 1 and n & (n - 1) == 0


def tree_sum(items, offset, stride, total):
    """``T(offset, stride)`` over ``items`` (dict g -> array, missing g left out) for
    ``g < total``; None when no g of the set is in ``items``. Adds in place into the
    left operand (a vector of ``items``, which is consumed)."""
    present = [g for g in range(offset, total, stride) if g in items]
    if not present:
        return None
    if len(present) == 1:
        return items[present[0]]
    a = tree_sum(items, offset, 2 * stride, total)
    b = tree_sum(items, offset + stride, 2 * stride, total)
    if a is None or b is None:
        return a if b is None else b
    a += b
    return a


class GradBuffer:
    """The flat derivative layout of ``net.params`` (grouped by value dtype, in param
    order; each slice Fortran-ordered as the param) and one step's collection.

    Use per step: :meth:`start`, then :meth:`add` ``(g)`` after each sub-batch's eval
    (``accumulate_param_ders`` off), then :meth:`reduce` ``(comm, host_stats)``, which
    sets every ``p.der`` and returns the allreduced ``host_stats`` (a float64 vector).
    """

    def __init__(self, net):
        self.net = net
        self.layout = {}  # dtype -> list of (param index, offset, size, shape)
        self.sizes = {}
        for i, p in enumerate(net.params):
            if p.value is None:
                continue
            dt = np.dtype(p.value.dtype)
            off = self.sizes.get(dt, 0)
            self.layout.setdefault(dt, []).append((i, off, int(p.value.size), tuple(p.value.shape)))
            self.sizes[dt] = off + int(p.value.size)
        self.items = {}
        self.counts = np.zeros(len(net.params))
        self.bytes_per_step = sum(n * dt.itemsize for dt, n in self.sizes.items())

    def start(self):
        self.items = {}
        self.counts = np.zeros(len(self.net.params))

    def _xp(self):
        values = [p.value for p in self.net.params if p.value is not None]
        return backend.get_array_module(values[0]) if values else np

    def add(self, g):
        """Pack the derivatives the last eval left in ``net.params[i].der`` as sub-batch ``g``."""
        xp = self._xp()
        vecs = {}
        for dt, rows in self.layout.items():
            vec = xp.zeros(self.sizes[dt], dtype=dt)
            for i, off, n, shape in rows:
                der = self.net.params[i].der
                if der is None:
                    continue
                if der.size != n:
                    raise ValueError(f'GradBuffer: param {self.net.params[i].name!r} has {n} elements, '
                                     f'its derivative {der.shape}')
                vec[off:off + n] = der.reshape(-1, order='F')
                self.counts[i] += 1
            vecs[dt] = vec
        self.items[int(g)] = vecs

    def local_sum(self, rank, size, total):
        """``T(rank, size)`` per dtype over this rank's sub-batches (zeros when none)."""
        xp = self._xp()
        out = {}
        for dt in self.layout:
            per_g = {g: v[dt] for g, v in self.items.items()}
            s = tree_sum(per_g, rank, size, total)
            out[dt] = s if s is not None else xp.zeros(self.sizes[dt], dtype=dt)
        self.items = {}
        return out

    def reduce(self, comm, total, host_stats=None):
        """Sum the step over sub-batches and ranks (``total`` = N*S sub-batches); set each
        ``p.der`` to its view or None; return ``host_stats`` summed over the ranks."""
        sums = self.local_sum(comm.rank, comm.size, total)
        for vec in sums.values():
            comm.allreduce(vec, 'sum', exact=True)
        extra = np.zeros(0) if host_stats is None else np.asarray(host_stats, dtype=np.float64).reshape(-1)
        host = np.ascontiguousarray(np.concatenate([self.counts, extra]))
        comm.allreduce(host, 'sum')
        counts = host[:len(self.net.params)]
        for dt, rows in self.layout.items():
            for i, off, n, shape in rows:
                p = self.net.params[i]
                p.der = sums[dt][off:off + n].reshape(shape, order='F') if counts[i] > 0 else None
        return host[len(self.net.params):]


def _flat_values(net):
    xp = backend.get_array_module(next(p.value for p in net.params if p.value is not None))
    groups = {}
    for p in net.params:
        if p.value is not None:
            groups.setdefault(np.dtype(p.value.dtype), []).append(p)
    return xp, groups


def broadcast_params(net, comm, root=0):
    """Copy rank ``root``'s param values to every rank (one broadcast per dtype)."""
    if comm.size == 1 or not net.params:
        return
    xp, groups = _flat_values(net)
    for dt, ps in groups.items():
        vec = xp.concatenate([p.value.reshape(-1, order='F') for p in ps])
        comm.broadcast(vec, root)
        off = 0
        for p in ps:
            n = int(p.value.size)
            p.value = xp.asfortranarray(vec[off:off + n].reshape(p.value.shape, order='F'))
            off += n


def params_checksum(net):
    """A 63-bit checksum of every param's bytes (host copies), in param order."""
    import zlib
    h1, h2 = 0, 1
    for p in net.params:
        if p.value is None:
            continue
        b = np.asfortranarray(backend.to_host(p.value)).tobytes(order='F')
        h1 = zlib.crc32(b, h1)
        h2 = zlib.adler32(b, h2)
    return (h1 << 31) ^ h2
