"""The progress statistics of an epoch, summed over the ranks of a data-parallel run.

Each rank keeps its own running values (the ``dagnn.Loss`` blocks' ``average`` over
``numAveraged`` images, the blocks' ``train_stats`` sums and counts); after every batch
they are laid out in one float64 vector (:func:`local_vector`), summed over the ranks
(by the communicator, beside the gradient mask), and read back as the epoch's global
statistics (:func:`global_stats`): ``num`` images, each loss's average per image, each
block statistic's mean over the evaluations of all ranks.
"""
import json
import math

import numpy as np

from . import backend

__all__ = ['loss_blocks', 'stat_names', 'local_vector', 'global_stats']


def loss_blocks(net):
    """``[(output var name, block)]`` of every ``dagnn.Loss`` layer, in layer order."""
    from .layer import REGISTRY
    cls = REGISTRY.get('dagnn.Loss')
    return [(l.outputs[0], l.block) for l in net.layers if cls is not None and isinstance(l.block, cls)]


def stat_names(comm, block_stats):
    """The sorted union over the ranks of the block statistics seen so far (a rank that
    had no images yet knows none of them)."""
    local = sorted(block_stats)
    if comm.size == 1:
        return local
    names = set()
    for blob in comm.allgather_bytes(json.dumps(local).encode()):
        names.update(json.loads(blob.decode()))
    return sorted(names)


def _host_float(v):
    a = np.asarray(backend.to_host(v), dtype=np.float64).reshape(-1)
    return float(a[0]) if a.size else 0.0


def local_vector(losses, block_stats, names, num):
    """``[num, (average * count, count) per loss, (sum, count) per name]``, float64."""
    out = [float(num)]
    for _, b in losses:
        n = float(b.numAveraged)
        out += [_host_float(b.average) * n if n else 0.0, n]
    for name in names:
        total, count = block_stats.get(name, (0.0, 0))
        out += [float(total), float(count)]
    return np.asarray(out, dtype=np.float64)


def global_stats(vec, losses, names):
    """The dict of statistics from a summed :func:`local_vector` (``num`` included)."""
    vec = np.asarray(vec, dtype=np.float64).reshape(-1)
    stats = {'num': int(round(vec[0]))}
    k = 1
    for name, _ in losses:
        total, n = vec[k], vec[k + 1]
        stats[name] = total / n if n else 0.0
        k += 2
    for name in names:
        total, n = vec[k], vec[k + 1]
        stats[name] = total / n if n else math.nan
        k += 2
    return stats
