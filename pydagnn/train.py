"""Training: the port of GM-SOP's ``cnn_train_GM_dag.m`` (MatConvNet's ``cnn_train_dag``).

    net, stats = cnn_train_dag(net, imdb, get_batch, exp_dir='exp', batch_size=256,
                               num_epochs=60, learning_rate=[0.1] * 40 + [0.01] * 20)

Per epoch ``e`` (1-based): the random generators are seeded from ``e + random_seed``:
the train and val orders, and for every sub-batch ``g`` of batch ``b`` the flips and
``net.rng`` (dropout, the H_x noise, gating ties), keyed by ``(seed, phase, b, g)`` rather
than drawn in sequence, so a run resumed from a checkpoint continues exactly as the
uninterrupted run and N data-parallel ranks give the bits of one process (see
:mod:`pydagnn.gradsync` and docs/parallel.md); the learning rate is ``learning_rate[min(e, len) - 1]``. Training
runs in batches of ``batch_size`` (the last one smaller), each optionally split into
``num_sub_batches`` interleaved sub-batches whose derivatives are summed, in 'normal'
mode with ``der_outputs`` ({'objective': 1}); then :func:`accumulate_gradients` applies
MatConvNet's SGD update. Validation runs forward only in 'test' mode. Each batch prints a
progress line as the original (average and current speed in images/s, then every
statistic)::

    train: epoch 01:   3/ 40: 412.3 (430.1) Hz BalanceLoss: 12.300 objective: 6.905 top1error: 0.998 top5error: 0.990

The statistics are the running ``average`` of every ``dagnn.Loss`` block, named by its
output var (per image: the loss outputs are sums over the batch and the average divides
by the images seen), and the statistics the blocks declare (``Layer.train_stats``; for GM
nets ``BalanceLoss``, from the ``Balance_loss`` block), each the mean of its value over the
evaluations of the epoch (the original records the value of the last batch only). After each epoch the net, the SGD state and the statistics are saved to
``exp_dir/net-epoch-<e>.mat`` (MATLAB v7, written to a temporary file and renamed), and
the statistics are plotted to ``exp_dir/net-train.pdf`` and ``.png``.

Differences from the original, on purpose:
  * a parameter whose derivative was not computed in a step (a component module that no
    image of the batch selected) is not updated in that step; the original applies its
    stale derivative from the previous batch again (its derivatives are only cleared at
    the end of an epoch). Its momentum is kept, not decayed.
  * ``BalanceLoss`` is the mean over the epoch, not the last batch's value.
  * a checkpoint that cannot be read (half written by a crash of another program, or
    corrupt) is reported and the one before it is used; the original stops with an
    error asking to delete the file.
  * faults stop the run early and say where (issue 13): the experiment folder is
    checked writable and locked for the run before the first batch
    (:mod:`pydagnn.runlock`: a second run fails at once naming the other process), our
    stale temporary files of killed writers in it are removed; each training step is
    checked finite (objective and every param derivative, :mod:`pydagnn.finite`) and a
    non-finite one raises :class:`~pydagnn.finite.NonFiniteError` naming the epoch, the
    batch and the first non-finite layer, the update not applied and no checkpoint
    written; a checkpoint that cannot be written (disk full) raises
    :class:`~pydagnn.io.checkpoint.CheckpointWriteError` naming the file, the previous
    checkpoint untouched.
"""
import contextlib
import math
import os
import time

import numpy as np

from . import backend, finite
from .data import get_batch as default_get_batch, imdb_field, make_loader
from .runlock import open_exp_dir
from .gradsync import GradBuffer, broadcast_params, params_checksum
from .parallel import DEFAULT_TIMEOUT, make_comm
from .stepstats import global_stats, local_vector, loss_blocks, stat_names
from .io.checkpoint import (CheckpointError, adopt_order, checkpoint_path, find_last_checkpoint,  # noqa: F401
                            load_checkpoint, resume_last, save_checkpoint)

__all__ = ['cnn_train_dag', 'accumulate_gradients', 'find_last_checkpoint', 'load_checkpoint',
           'save_checkpoint', 'checkpoint_path', 'train_opts_kwargs', 'extract_stats',
           'format_progress', 'format_schedule', 'CheckpointError', 'use_gpu']

# ---------------------------------------------------------------------------- update rule
def accumulate_gradients(net, state, *, learning_rate, batch_size, momentum=0.9, weight_decay=1e-4,
                         nesterov=False):
    """Apply MatConvNet's ``accumulateGradients`` to the derivatives the last
    ``net.eval`` left in ``net.params[i].der``.

    For each param ``p`` with a derivative (params whose ``der`` is None were not
    reached in this step and are skipped, momentum untouched):

    * 'gradient': ``g = der / batch_size + weight_decay * p.weight_decay * value``;
      ``mom = momentum * mom - g``; ``value += learning_rate * p.learning_rate * delta``
      with ``delta = mom``, or ``delta = momentum * mom - g`` when ``nesterov``.
    * 'average' (BN moments): ``value = (1 - p.learning_rate) * value +
      (p.learning_rate / batch_size / p.fanout) * der`` (the global learning rate does
      not enter).

    ``state``: a dict; the momentum is kept in ``state['momentum'][param name]``
    (missing = zeros). Scalars are applied in the param's dtype; the arrays stay on their
    device (NumPy or CuPy). Returns ``state``.
    """
    moms = state.setdefault('momentum', {})
    if moms is None:
        moms = state['momentum'] = {}
    batch_size = float(batch_size)
    for p in net.params:
        der = p.der
        if der is None or p.value is None:
            continue
        value = p.value
        if der.shape != value.shape:
            if der.size != value.size:
                raise ValueError(f'accumulate_gradients: param {p.name!r} has shape {value.shape}, '
                                 f'its derivative {der.shape}')
            der = der.reshape(value.shape)
        dt = value.dtype.type
        if p.train_method == 'average':
            lr_p = float(p.learning_rate)
            fanout = max(int(p.fanout), 1)
            p.value = (dt(1.0 - lr_p) * value + dt(lr_p / batch_size / fanout) * der).astype(value.dtype, copy=False)
        elif p.train_method == 'gradient':
            decay = float(weight_decay) * float(p.weight_decay)
            lr = float(learning_rate) * float(p.learning_rate)
            m = moms.get(p.name)
            if m is not None and backend.is_gpu_array(m) != backend.is_gpu_array(value):
                m = backend.to_device(m, 'gpu' if backend.is_gpu_array(value) else 'cpu')
            from .layers.sgd import sgd_momentum_update
            m, p.value = sgd_momentum_update(der, value, m, 1.0 / batch_size, decay, momentum, lr,
                                             nesterov, name=p.name)
            moms[p.name] = m
        else:
            raise ValueError(f"unknown training method {p.train_method!r} for parameter {p.name!r} "
                             "(expected 'gradient' or 'average')")
    return state


# ---------------------------------------------------------------------------- statistics
def _loss_class():
    from .layer import REGISTRY
    return REGISTRY.get('dagnn.Loss')


def _scalar(v):
    """A Python float from a number or a one-element NumPy/CuPy array."""
    v = backend.to_host(v)
    if isinstance(v, tuple):
        v = v[0]
    a = np.asarray(v, dtype=np.float64)
    return float(a.reshape(-1)[0]) if a.size else math.nan


def extract_stats(net, stats=None):
    """The original's ``extractStats``: ``stats[output var] = block.average`` for every
    ``dagnn.Loss`` layer. Returns the dict (updated in place when given)."""
    stats = {} if stats is None else stats
    cls = _loss_class()
    for l in net.layers:
        b = l.block
        if (cls is not None and isinstance(b, cls)) or getattr(b, 'type_name', None) == 'dagnn.Loss':
            stats[l.outputs[0]] = _scalar(getattr(b, 'average', math.nan))
    return stats


def format_progress(mode, epoch, batch_no, num_batches, average_speed, current_speed, stats):
    """The per-batch line of the original: ``'%s: epoch %02d: %3d/%3d:'``, then
    ``' %.1f (%.1f) Hz'`` (average, current speed in images/s), then ``' %s: %.3f'`` for
    every statistic but num and time, in MATLAB ``setdiff`` (sorted) order."""
    line = f'{mode}: epoch {epoch:02d}: {batch_no:3d}/{num_batches:3d}: {average_speed:.1f} ({current_speed:.1f}) Hz'
    for name in sorted(k for k in stats if k not in ('num', 'time')):
        line += f' {name}: {stats[name]:.3f}'
    return line


# ---------------------------------------------------------------------------- options
_TRAIN_OPTS = {'learningRate': 'learning_rate', 'numEpochs': 'num_epochs', 'momentum': 'momentum',
               'batchSize': 'batch_size', 'weightDecay': 'weight_decay', 'numSubBatches': 'num_sub_batches',
               'nesterovUpdate': 'nesterov', 'randomSeed': 'random_seed', 'gpus': 'gpus',
               'derOutputs': 'der_outputs', 'continue': 'continue_', 'prefetch': 'prefetch',
               'saveMomentum': 'save_momentum', 'plotStatistics': 'plot_statistics', 'expDir': 'exp_dir'}


def train_opts_kwargs(train_opts):
    """MatConvNet-named options (``net.meta['trainOpts']``: learningRate, numEpochs,
    batchSize, ...) -> keyword arguments of :func:`cnn_train_dag`. Unknown names are
    an error."""
    out = {}
    for k, v in dict(train_opts or {}).items():
        if k not in _TRAIN_OPTS:
            raise ValueError(f'train_opts_kwargs: unknown training option {k!r} (known: {", ".join(_TRAIN_OPTS)})')
        if isinstance(v, np.ndarray):
            v = v.reshape(-1).tolist()
            if k != 'learningRate' and len(v) == 1:
                v = v[0]
        if k in ('numEpochs', 'batchSize', 'numSubBatches', 'randomSeed'):
            v = int(v)
        out[_TRAIN_OPTS[k]] = v
    return out


def _lr_list(learning_rate):
    if np.ndim(learning_rate) == 0:
        return [float(learning_rate)]
    lrs = [float(v) for v in np.asarray(learning_rate, dtype=np.float64).reshape(-1)]
    if not lrs:
        raise ValueError('cnn_train_dag: learning_rate is empty')
    return lrs


def format_schedule(learning_rate, num_epochs=None):
    """The learning-rate schedule as the training header prints it: runs of equal rates,
    ``'0.1 x 40, 0.01 x 10, 0.001 x 5, 0.0001 x 5'``, for ``num_epochs`` epochs (default
    the list's length; a shorter list repeats its last rate, as the trainer does)."""
    lrs = _lr_list(learning_rate)
    n = len(lrs) if num_epochs is None else int(num_epochs)
    runs = []
    for e in range(1, n + 1):
        lr = lrs[min(e, len(lrs)) - 1]
        if runs and runs[-1][0] == lr:
            runs[-1][1] += 1
        else:
            runs.append([lr, 1])
    return ', '.join(f'{lr:g} x {k}' for lr, k in runs) or 'no epochs'


def _indices(x, default):
    if x is None:
        return default
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 1 and np.isnan(a[0]):
        return np.zeros(0, dtype=np.int64)
    return a.astype(np.int64)


def _gpu_list(gpus):
    if gpus is None:
        return []
    if isinstance(gpus, (int, np.integer)):
        return [int(gpus)]
    return [int(g) for g in gpus]


def _batch_reducer(comm):
    """``Layer.batch_sum`` in sync mode: a small array summed over the ranks."""
    def reduce(a):
        xp = backend.get_array_module(a)
        flat = xp.array(a.reshape(-1), copy=True)
        return comm.allreduce(flat, 'sum').reshape(a.shape)
    return reduce


def _check_replicas(net, comm, epoch):
    """Stop the run when the replicas' params differ (a checksum per epoch)."""
    if comm.size == 1:
        return
    h = params_checksum(net)
    buf = np.array([h, -h], dtype=np.int64)
    comm.where = f'at the end of epoch {epoch} (replica checksum)'
    comm.allreduce(buf, 'max')
    if buf[0] != -buf[1]:
        raise RuntimeError(f'the replicas of the params differ after epoch {epoch} (checksum {h:#x} on '
                           f'rank {comm.rank}); the ranks did not apply the same updates')


def _call_get_batch(get_batch, imdb, idx, mode, seed):
    return get_batch(imdb, idx, mode=mode, rng=np.random.default_rng(seed))


# ---------------------------------------------------------------------------- the loop
def use_gpu(index):
    """Make CUDA device ``index`` (0-based, as CuPy counts) the current one."""
    cp = backend.cupy_or_none()
    if cp is None:
        raise RuntimeError(f'gpus={index}: cupy with a CUDA device is not available '
                           '(pip install cupy-cuda12x, or train on the CPU without --gpus)')
    n = cp.cuda.runtime.getDeviceCount()
    if not 0 <= int(index) < n:
        raise ValueError(f'gpus={index}: there are {n} CUDA devices (0..{n - 1})')
    cp.cuda.Device(int(index)).use()


def cnn_train_dag(net, imdb, get_batch=None, *, exp_dir, batch_size=256, num_sub_batches=1, num_epochs=None,
                  learning_rate=0.001, weight_decay=1e-4, momentum=0.9, nesterov=False, der_outputs=None,
                  train=None, val=None, gpus=(), continue_=True, random_seed=0, prefetch=True,
                  save_momentum=True, plot_statistics=True, conserve_memory=True, log=None, comm='auto',
                  comm_timeout=DEFAULT_TIMEOUT, sync_bn=False):
    """Train ``net`` on ``imdb`` (see the module docstring). Returns ``(net, stats)``
    with ``stats = {'train': [dict per epoch], 'val': [...]}``; each dict holds ``num``
    (images), ``time`` (seconds, the original's measure that discounts the first
    batches) and every statistic.

    get_batch: ``get_batch(imdb, indexes, mode=..., rng=...)`` -> ``{'input': ...,
    'label': ...}`` (or a flat name/value list); default :func:`pydagnn.data.get_batch`.
    ``rng`` is a ``numpy.random.Generator`` seeded per batch from the epoch seed.
    train, val: 0-based imdb indexes (default: ``images.set == 1`` / ``== 2``; NaN or an
    empty list for none; with no training images nothing is trained or saved).
    learning_rate: a number or a per-epoch list. num_epochs: default the list's length.
    gpus: e.g. ``[0]`` to train on the GPU (``net.move('gpu')``, the SGD state on the GPU
    too); several, one per MPI rank (rank r uses ``gpus[r]``); the net is moved back to the
    CPU at the end.
    continue_: resume after the last complete checkpoint in ``exp_dir``; the returned net
    is then the one loaded from it. prefetch: prepare the next batch on a background
    thread. log: a function taking one line (default: print to stdout, flushed).
    comm: 'auto' | 'single' | 'mpi' | 'nccl' or a communicator (:mod:`pydagnn.parallel`);
    'auto' is data-parallel when started by ``mpiexec``/``srun`` with several ranks: rank
    ``r`` trains on ``gpus[r]`` (or the CPU), takes sub-batches ``g = s * N + r`` of each
    batch, the derivatives and statistics are summed over the ranks, rank 0 alone logs
    and writes. comm_timeout: seconds a rank waits for the others before ending the job.
    sync_bn: False ('local', the original's multi-GPU statistics: BN moments and the
    Balance_loss w_sum per rank and sub-batch) or True ('sync': both summed over the ranks
    for each sub-batch s, weighted by the images of each rank; a step where some rank has
    no images runs local, since that rank has nothing to evaluate).
    """
    gpus = _gpu_list(gpus)
    comm = make_comm(comm, gpus, comm_timeout)
    if log is None:
        def log(line):
            print(line, flush=True)
    if comm.rank != 0:
        def log(line):  # rank 0 prints the global progress
            pass
    lrs = _lr_list(learning_rate)
    if num_epochs is None:
        if np.ndim(learning_rate) == 0:
            raise ValueError('cnn_train_dag: give num_epochs (or a per-epoch learning_rate list)')
        num_epochs = len(lrs)
    num_epochs = int(num_epochs)
    batch_size = int(batch_size)
    num_sub_batches = int(num_sub_batches)
    if batch_size < 1 or num_sub_batches < 1:
        raise ValueError(f'cnn_train_dag: batch_size ({batch_size}) and num_sub_batches ({num_sub_batches}) '
                         'must be positive')
    der_outputs = {'objective': 1.0} if der_outputs is None else der_outputs
    get_batch = default_get_batch if get_batch is None else get_batch
    if len(gpus) > 1 and len(gpus) != comm.size:
        raise ValueError(f'cnn_train_dag: gpus={gpus} names {len(gpus)} GPUs, but this job has {comm.size} '
                         f'rank(s); start one process per GPU: '
                         f'mpiexec -n {len(gpus)} python -m mpi4py <script> (rank r uses gpus[r])')
    sets = np.asarray(imdb_field(imdb, 'images', 'set')).reshape(-1)
    train = _indices(train, np.nonzero(sets == 1)[0])
    val = _indices(val, np.nonzero(sets == 2)[0])
    evaluate_mode = train.size == 0
    if not evaluate_mode and not der_outputs:
        raise ValueError('cnn_train_dag: der_outputs must be given when training')
    # writable, locked for this run, our stale temp files removed (pydagnn.runlock); in a
    # data-parallel run rank 0, the only writer, holds the lock for the job
    with open_exp_dir(exp_dir, log) if comm.rank == 0 else contextlib.nullcontext():
        return _train(net, imdb, get_batch, exp_dir, lrs, num_epochs, train, val, evaluate_mode, gpus,
                      continue_, random_seed, save_momentum, plot_statistics, conserve_memory, log,
                      dict(batch_size=batch_size, num_sub_batches=num_sub_batches, der_outputs=der_outputs,
                           momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                           prefetch=prefetch, sync_bn=bool(sync_bn)), comm)


def _train(net, imdb, get_batch, exp_dir, lrs, num_epochs, train, val, evaluate_mode, gpus, continue_,
           random_seed, save_momentum, plot_statistics, conserve_memory, log, opts, comm):
    """The epochs of :func:`cnn_train_dag`, once the experiment folder is held."""
    der_outputs = opts['der_outputs']
    state = {'momentum': {}}
    stats = {'train': [], 'val': []}
    start = 0
    if continue_:
        start, loaded = resume_last(exp_dir, log)
        if start:
            model = net
            net, state, stats = loaded
            if 'execution_order' not in state:  # e.g. a checkpoint written by MATLAB
                adopt_order(net, model)
            stats = {k: list(v)[:start] for k, v in stats.items()}
    if isinstance(net.meta.get('trainOpts'), dict):
        net.meta['trainOpts']['learningRate'] = lrs if len(lrs) > 1 else lrs[0]
    for l in net.layers:  # what the blocks say the trainer reads after eval (Layer.trainer_reads)
        for k in l.block.trainer_reads:
            net.get_var(l.outputs[k]).precious = True
    finite.keep_objectives(net, der_outputs)   # the objective survives conserve_memory for the check
    net.conserve_memory = bool(conserve_memory)
    if gpus:
        use_gpu(gpus[comm.rank] if len(gpus) > 1 else gpus[0])
        net.move('gpu')
        state['momentum'] = {k: backend.to_device(v, 'gpu') for k, v in state['momentum'].items()}
    broadcast_params(net, comm)  # every replica starts from rank 0's values
    grads = GradBuffer(net)

    for epoch in range(start + 1, num_epochs + 1):
        seed = epoch + int(random_seed)
        rng = np.random.default_rng(seed)
        lr = lrs[min(epoch, len(lrs)) - 1]
        train_order = train[rng.permutation(train.size)]
        val_order = val[rng.permutation(val.size)]
        last = {}
        run = (net, state, imdb, get_batch)
        try:
            for split, order in (('train', train_order), ('val', val_order)):
                last[split] = _process_epoch(*run, split, order, epoch, lr, seed, opts, log, comm, grads)
            _check_replicas(net, comm, epoch)
            stats['train'].append(last['train'])
            stats['val'].append(last['val'])
            comm.where = f'after epoch {epoch} (rank 0 writing the checkpoint)'
            if not evaluate_mode and comm.rank == 0:
                t0 = time.perf_counter()
                path = checkpoint_path(exp_dir, epoch)
                save_checkpoint(path, net, state, stats, save_momentum=save_momentum, last_stats=last,
                                previous=checkpoint_path(exp_dir, epoch - 1) if epoch > 1 else None)
                log(f'cnn_train_dag: saved {path} ({time.perf_counter() - t0:.1f} s)')
        except BaseException as e:  # SystemExit too: a rank leaving mid-run must end the job now
            if comm.size == 1:
                raise
            import traceback
            comm.abort(f'pydagnn: rank {comm.rank} of {comm.size} failed {comm.where}: '
                       f'{type(e).__name__}: {e}\n{traceback.format_exc()}')
        comm.barrier()  # the others wait while rank 0 writes
        if plot_statistics and comm.rank == 0:
            from .plots import plot_stats
            try:
                plot_stats(stats, os.path.join(exp_dir, 'net-train'), log=log)
            except Exception as e:  # a figure must never stop training
                log(f'plots: could not draw net-train.pdf/.png ({type(e).__name__}: {e})')
    if gpus:  # as the original, hand the net back on the CPU
        net.move('cpu')
    return net, stats


def _batch_jobs(subset, batch_size, num_sub_batches, mode, seed, rank=0, world=1):
    """This rank's share of the epoch: a list of batches, each a list of sub-batch jobs
    ``(g, indexes, mode, flip seed)``.

    A batch ``subset[t:t + batch_size]`` is split as MatConvNet splits it over labs:
    ``W = world * num_sub_batches`` interleaved sub-batches, ``g = s * world + rank``
    taking ``subset[t + g : end : W]``; the flips of sub-batch g are keyed by
    ``(seed, 2, phase, batch, g)``, so they do not depend on ``world``."""
    batches = []
    phase = 0 if mode == 'train' else 1
    n = subset.size
    total = world * num_sub_batches
    for b, t in enumerate(range(0, n, batch_size)):
        end = min(t + batch_size, n)
        subs = []
        for s in range(num_sub_batches):
            g = s * world + rank
            subs.append((g, subset[t + g:end:total], mode, [seed, 2, phase, b, g]))
        batches.append(subs)
    return batches


def _collect_block_stats(net, block_stats):
    """Add every layer's ``train_stats`` (e.g. GM's ``BalanceLoss``) after an eval."""
    for l in net.layers:
        found = l.block.train_stats([v.value for v in map(net.get_var, l.outputs)])
        for name, value in found.items():
            acc = block_stats.setdefault(name, [0.0, 0])
            acc[0] += _scalar(value)
            acc[1] += 1


def _process_epoch(net, state, imdb, get_batch, mode, subset, epoch, lr, seed, opts, log, comm, grads):
    """One pass over ``subset`` on this rank (its sub-batches only); every batch's
    derivatives and statistics are summed over the ranks before the update and the
    progress line. Returns the epoch's global statistics."""
    bs = opts['batch_size']
    num_subs = opts['num_sub_batches']
    total_subs = num_subs * comm.size
    phase = 0 if mode == 'train' else 1
    batches = _batch_jobs(subset, bs, num_subs, mode, seed, comm.rank, comm.size)
    jobs = [(imdb, idx, m, sd) for subs in batches for (_, idx, m, sd) in subs if idx.size]

    def fetch(imdb_, idx, m, sd):
        return _call_get_batch(get_batch, imdb_, idx, m, sd)

    losses = loss_blocks(net)
    stats = {'num': 0, 'time': 0.0}
    block_stats = {}   # name -> [sum, count] of the layers' train_stats (Layer.train_stats)
    num = 0
    adjust_time = 0.0
    n = subset.size
    num_batches = len(batches)
    net.reset()  # running loss averages start at zero (the original resets after each epoch)
    start = time.perf_counter()
    loader = make_loader(jobs, fetch, prefetch=opts['prefetch'])
    try:
        for b, subs in enumerate(batches):
            comm.where = f'at {mode} epoch {epoch} batch {b + 1}/{num_batches}'
            t = b * bs
            this_bs = min(bs, n - t)
            check = finite.StepCheck(net, opts['der_outputs'], epoch, b + 1)   # nothing read until done()
            if mode == 'train':
                grads.start()
            net.batch_reducer = _batch_reducer(comm) if (opts['sync_bn'] and mode == 'train' and comm.size > 1
                                                         and this_bs >= total_subs) else None
            for g, idx, _, _ in subs:
                num += idx.size
                if idx.size == 0:
                    continue
                inputs = next(loader)
                # draws keyed by (epoch, batch, global sub-batch): the same whatever the world size
                net.rng = np.random.default_rng([seed, 1, phase, b, g])
                net.accumulate_param_ders = False
                if mode == 'train':
                    net.mode = 'normal'
                    net.eval(inputs, opts['der_outputs'])
                    check.after_eval(idx, inputs)
                    grads.add(g)
                else:
                    net.mode = 'test'
                    net.eval(inputs)
                _collect_block_stats(net, block_stats)
            names = stat_names(comm, block_stats)
            vec = local_vector(losses, block_stats, names, num)
            if mode == 'train':
                vec = grads.reduce(comm, total_subs, vec)   # p.der: the global sums
                check.before_update(state)
                accumulate_gradients(net, state, learning_rate=lr, batch_size=this_bs, momentum=opts['momentum'],
                                     weight_decay=opts['weight_decay'], nesterov=opts['nesterov'])
                check.done()   # a non-finite step: the update undone, NonFiniteError naming the layer
            else:
                vec = comm.allreduce(vec, 'sum')
            now = time.perf_counter() - start + adjust_time
            batch_time = now - stats['time']
            stats.update(global_stats(vec, losses, names))
            stats['time'] = now
            current_speed = this_bs / batch_time if batch_time > 0 else math.inf
            average_speed = (t + this_bs) / now if now > 0 else math.inf
            if t == 3 * bs:  # the first three batches are outliers: count them at this one's speed
                adjust_time = 4 * batch_time - now
                stats['time'] = now + adjust_time
            log(format_progress(mode, epoch, b + 1, num_batches, average_speed, current_speed, stats))
    finally:
        loader.close()
        net.accumulate_param_ders = False
        net.batch_reducer = None
    total = time.perf_counter() - start
    if num_batches:
        share = 100.0 * loader.wait_time / total if total > 0 else 0.0
        log(f'{mode}: epoch {epoch:02d}: data wait {loader.wait_time:.2f} s of {total:.2f} s '
            f'({share:.1f}% of step time, prefetch {"on" if opts["prefetch"] else "off"})')
    net.reset()
    return stats
