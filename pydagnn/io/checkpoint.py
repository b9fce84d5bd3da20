"""Checkpoints: ``exp_dir/net-epoch-N.mat`` as ``cnn_train_dag`` writes and reads them.

A checkpoint holds ``net`` (the struct ``dagnn.DagNN.loadobj`` accepts), ``state``
(``momentum``: a 1 x P cell array in param order; ``stats``: the last epoch's;
``executionOrder``: the layer order the run used) and ``stats`` (per split, a 1 x E struct
array of the epochs' statistics). It is written atomically through
:mod:`pydagnn.io.matfile` (temporary file beside it, renamed), so a crash leaves the old
file or the whole new one; :func:`resume_last` skips a checkpoint that cannot be read.
"""
import errno
import math
import os
import re
import warnings

import numpy as np

from .. import backend
from .matconvnet import load_matconvnet, save_matconvnet
from .matfile import MatCell, read_mat, to_python

__all__ = ['CheckpointError', 'CheckpointWriteError', 'checkpoint_path', 'checkpoint_epochs', 'find_last_checkpoint',
           'save_checkpoint', 'load_checkpoint', 'resume_last', 'adopt_order']

_CKPT_RE = re.compile(r'^net-epoch-(\d+)\.mat$')


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, corrupt or incomplete)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the message names the
    file and the previous checkpoint, which is untouched. ``errno`` is the OS error's."""

    def __init__(self, message, errno_=None):
        super().__init__(message)
        self.errno = errno_


def checkpoint_path(exp_dir, epoch):
    return os.path.join(exp_dir, f'net-epoch-{int(epoch)}.mat')


def checkpoint_epochs(exp_dir):
    """The N of every ``exp_dir/net-epoch-N.mat``, ascending (files are not opened)."""
    if not os.path.isdir(exp_dir):
        return []
    eps = []
    for name in os.listdir(exp_dir):
        m = _CKPT_RE.match(name)
        if m:
            eps.append(int(m.group(1)))
    return sorted(eps)


def find_last_checkpoint(exp_dir):
    """The highest N of the files ``exp_dir/net-epoch-N.mat`` (0 when none); the file
    is not opened (see :func:`load_checkpoint`)."""
    eps = checkpoint_epochs(exp_dir)
    return eps[-1] if eps else 0


def _stats_records(recs):
    """Per-epoch dicts with the same fields in the same order (missing -> NaN), as a
    MATLAB struct array needs them."""
    names = []
    for r in recs:
        for k in r:
            if k not in names:
                names.append(k)
    return [{n: float(r.get(n, math.nan)) for n in names} for r in recs]


def _stats_to_mat(stats):
    """{'train': [dict per epoch], 'val': [...]} -> the MATLAB form (a struct of 1 x E
    struct arrays) that :func:`pydagnn.io.matfile.to_matlab` writes."""
    return {split: _stats_records(stats.get(split, [])) for split in ('train', 'val')}


def _records(v):
    """A struct (array) read back with ``to_python`` -> list of dicts of floats."""
    if v is None:
        return []
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise CheckpointError(f'expected a struct array, got {type(v).__name__}')
    out = []
    for rec in v:
        if not isinstance(rec, dict):
            raise CheckpointError(f'expected a struct array, got an element of type {type(rec).__name__}')
        r = {}
        for k, x in rec.items():
            a = np.asarray(x, dtype=np.float64).reshape(-1) if x is not None else np.zeros(0)
            r[k] = float(a[0]) if a.size else math.nan
        out.append(r)
    return out


def _stats_from_mat(v):
    if not isinstance(v, dict):
        raise CheckpointError(f'the variable stats is not a struct (got {type(v).__name__})')
    return {split: _records(v.get(split)) for split in ('train', 'val')}


def _state_to_mat(net, state, save_momentum, last_stats):
    """``state`` as MatConvNet saves it: ``momentum`` a 1 x P cell array in param order
    (0 for a param never updated; ``[]`` when not saved), ``stats`` the last epoch's."""
    moms = (state or {}).get('momentum') or {}
    if save_momentum:
        # a MatCell, not a list: a list of plain zeros (no param updated yet) would be
        # written as a 1 x P double array
        cell = MatCell([np.asarray(backend.to_host(moms[p.name])) if moms.get(p.name) is not None
                        else 0.0 for p in net.params], (1, len(net.params)))
    else:
        cell = None
    out = {'momentum': cell,
           # not in MatConvNet's state: the order the layers ran in, so that a resumed run
           # sums derivatives in the same order (a GM net's order is not the loader's default)
           'executionOrder': np.asarray(net.execution_order, dtype=np.float64).reshape(1, -1) + 1}
    if last_stats is not None:
        out['stats'] = {k: _stats_records([v])[0] for k, v in last_stats.items()}
    return out


def _momentum_from_mat(net, state):
    """``state.momentum`` (a cell array in param order, read back with ``to_python``)
    -> {param name: array shaped and typed as the param}."""
    if not isinstance(state, dict):
        return {}
    cell = state.get('momentum')
    if cell is None or (isinstance(cell, np.ndarray) and cell.size == 0):
        return {}
    if isinstance(cell, np.ndarray) and cell.dtype == object:
        cell = list(cell.reshape(-1, order='F'))
    if not isinstance(cell, list):
        raise CheckpointError(f'state.momentum is not a cell array (got {type(cell).__name__})')
    if len(cell) != len(net.params):
        raise CheckpointError(f'state.momentum has {len(cell)} entries, the net has {len(net.params)} params')
    moms = {}
    for p, m in zip(net.params, cell):
        if p.value is None or m is None:
            continue
        m = np.asarray(m)
        if m.size == 1 and p.value.size != 1 and float(m.reshape(-1)[0]) == 0.0:
            continue  # never updated (MATLAB's initial 0)
        if m.size != p.value.size:
            raise CheckpointError(f'state.momentum for param {p.name!r} has shape {m.shape}, '
                                  f'the param {p.value.shape}')
        moms[p.name] = np.asarray(m.reshape(p.value.shape, order='F'), dtype=p.value.dtype)
    return moms


def save_checkpoint(path, net, state, stats, save_momentum=True, last_stats=None, previous=None):
    """Write ``net`` (its saveobj struct), ``state`` (``momentum`` as a 1 x P cell array
    in param order, and the last epoch's ``stats``) and ``stats`` to ``path`` (MATLAB v7).
    Each parameter and momentum is copied to the host once (``backend.to_host``) and the
    struct is built from those copies: the net is not moved (a GPU net stays on the GPU).
    ``save_matconvnet`` writes atomically (a temporary file beside ``path``, flushed and
    renamed): a crash leaves either the old file or the complete new one.

    An OS error while writing (``ENOSPC``: the disk is full) raises
    :class:`CheckpointWriteError` naming ``path`` and ``previous`` (the last checkpoint,
    which a failed write never touches); the temporary file is removed."""
    extra = {'state': _state_to_mat(net, state, save_momentum, last_stats), 'stats': _stats_to_mat(stats)}
    try:
        save_matconvnet(net, path, version='7', extra=extra)
    except OSError as e:
        raise CheckpointWriteError(_write_failure(path, previous, e), e.errno) from e


def _write_failure(path, previous, e):
    """The message of a failed checkpoint write: the file, why, what is kept."""
    why = 'the disk is full (ENOSPC)' if e.errno == errno.ENOSPC else (e.strerror or str(e))
    if e.errno == errno.EDQUOT:
        why = 'the disk quota is exceeded (EDQUOT)'
    kept = (f'the previous checkpoint {previous} is intact; free space and run again to resume from it'
            if previous and os.path.exists(previous) else 'no earlier checkpoint exists')
    return f'cannot write checkpoint {path}: {why}; {kept}'


def load_checkpoint(path, max_bytes=None):
    """``(net, state, stats)`` from a checkpoint; ``state['momentum']`` maps param names
    to arrays; ``state['execution_order']`` is the layer order the run used when the file
    records it (``state.executionOrder``, 1-based; the net is given that order). Raises
    :class:`CheckpointError` naming the file when it cannot be read or lacks ``net`` or
    ``stats`` (a partial save). ``max_bytes``: the most the file may decode into memory
    (default ``$PYDAGNN_MAX_ARRAY_BYTES`` or 8 GiB; docs/files.md)."""
    try:
        mat = read_mat(path, variable_names=['state', 'stats'], max_bytes=max_bytes)
        if 'stats' not in mat:
            raise CheckpointError(f"checkpoint {path} was only partially saved: it has no variable 'stats'")
        stats = _stats_from_mat(to_python(mat['stats'], 'stats'))
        net = load_matconvnet(path, max_bytes=max_bytes)
        st = to_python(mat['state'], 'state') if 'state' in mat else {}
        moms = _momentum_from_mat(net, st)
        state = {'momentum': moms}
        order = st.get('executionOrder') if isinstance(st, dict) else None
        if order is not None:
            try:
                net.set_execution_order([int(i) - 1 for i in np.asarray(order).reshape(-1)])
                state['execution_order'] = net.execution_order
            except (ValueError, KeyError, IndexError) as e:
                warnings.warn(f'{path}: state.executionOrder ignored ({e})', RuntimeWarning, stacklevel=2)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f'checkpoint {path} cannot be read ({type(e).__name__}: {e})') from e
    return net, state, stats


def adopt_order(net, model):
    """Give ``net`` the execution order of ``model`` (same layer names), if valid."""
    try:
        names = [model.layers[i].name for i in model.execution_order]
        if sorted(names) == sorted(l.name for l in net.layers):
            net.set_execution_order(names)
    except (ValueError, KeyError, AttributeError):
        pass



def resume_last(exp_dir, log):
    """(epoch, (net, state, stats)) of the newest readable checkpoint, or (0, None): an
    unreadable one is reported (``log`` and a RuntimeWarning) and the one before it tried."""
    for ep in reversed(checkpoint_epochs(exp_dir)):
        path = checkpoint_path(exp_dir, ep)
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as e:
            msg = f'cnn_train_dag: {e}; ignoring it and trying the previous checkpoint'
            log(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            continue
        log(f'cnn_train_dag: resuming by loading epoch {ep}')
        return ep, loaded
    return 0, None
