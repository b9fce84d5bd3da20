"""A tiny training job for the data-parallel tests (tests/test_parallel.py).

Run by the tests as ``<venv>/bin/mpiexec -n 2 <python> -m mpi4py tests/mpi_worker.py ...``
(or in-process through :func:`train` with ``comm='single'`` for the reference run). Each
rank writes ``<out>/rank<r>.npz``: the final params (``p:<name>``), the momentum
(``m:<name>``), the imdb indexes its ``get_batch`` was given (``seen``), how many
checkpoints it wrote (``saves``) and the last epoch's statistics (``s:<name>``).
"""
import argparse
import os
import sys
import time

import numpy as np

from pydagnn import DagNN
from pydagnn import train as ptrain
from pydagnn.data import get_batch as default_get_batch
from pydagnn.layers.bnorm import BatchNorm
from pydagnn.layers.conv import Conv
from pydagnn.layers.dropout import DropOut
from pydagnn.layers.loss import Loss
from pydagnn.layers.relu import ReLU
from pydagnn.models import build

SIZE = 6
CLASSES = 3
GM_CLASSES = 6  # top5error needs at least 5


def bn_net(dtype=np.float64, seed=0, dropout=True):
    """conv 3x3 + BN + ReLU (+ dropout) + conv to CLASSES scores, softmaxlog / classerror."""
    net = DagNN(seed=seed)
    net.add_layer('conv1', Conv(size=[3, 3, 3, 4], pad=1), 'input', 'x1', ['conv1_f', 'conv1_b'])
    net.add_layer('bn1', BatchNorm(numChannels=4), 'x1', 'x1n', ['bn1_g', 'bn1_b', 'bn1_m'])
    net.add_layer('relu1', ReLU(), 'x1n', 'x2')
    net.add_layer('drop1', DropOut(rate=0.3 if dropout else 0.0), 'x2', 'x2d')
    net.add_layer('pred', Conv(size=[SIZE, SIZE, 4, CLASSES]), 'x2d', 'prediction', ['pred_f', 'pred_b'])
    net.add_layer('loss', Loss(loss='softmaxlog'), ['prediction', 'label'], 'objective')
    net.add_layer('top1err', Loss(loss='classerror'), ['prediction', 'label'], 'top1error')
    net.init_params(np.random.default_rng(seed), dtype=dtype)
    return net


def gm_net(dtype=np.float64, seed=0):
    """A reduced GM-SOP (one block per stage, 4 CMs keeping 2, narrow convs): routing,
    H_x noise, dropout and Balance_loss."""
    return build('ResNet18-GM-SOP', seed=seed, section_len=1, cm_num=4, topk=2, num_classes=GM_CLASSES,
                 gating_widths=(6, 4), cm_widths=(6, 4), image_size=16, dtype=dtype)


def imdb(n=25, n_val=7, size=SIZE, seed=0, classes=CLASSES):
    """Learnable: class c brightens channel (c - 1) % 3 (plus noise)."""
    rng = np.random.default_rng(seed)
    total = n + n_val
    labels = rng.integers(1, classes + 1, size=total)
    data = rng.integers(0, 120, size=(size, size, 3, total)).astype(np.uint8)
    for i, c in enumerate(labels):
        data[:, :, (c - 1) % 3, i] += 100
    sets = np.r_[np.ones(n), 2 * np.ones(n_val)]
    mean = data.reshape(-1, 3, total).mean(axis=(0, 2))
    return {'images': {'data': np.asfortranarray(data), 'labels': labels.astype(np.float32), 'set': sets},
            'meta': {'rgbMean': mean, 'sets': ['train', 'val', 'test']}}


def train(kind='bn', subs=1, epochs=2, batch=8, exp='exp', comm='auto', timeout=20.0, fault=None,
          fault_rank=1, fault_batch=2, n=25, lr=0.05, sync_bn=False):
    """Train; returns (net, record) where record holds what each rank reports."""
    net = {'bn': bn_net, 'bn-plain': lambda: bn_net(dropout=False), 'gm': gm_net}[kind]()
    data = imdb(n=n, size=16, classes=GM_CLASSES) if kind == 'gm' else imdb(n=n)
    seen = []
    saves = []
    calls = [0]

    def get_batch(imdb_, idx, mode, rng):
        calls[0] += 1
        if fault and rank_of(comm_obj) == fault_rank and calls[0] == fault_batch:
            if fault == 'raise':
                raise RuntimeError('injected fault')
            if fault == 'exit':      # a clean exit in the middle of the run: the others must not wait for ever
                sys.exit(0)
            if fault == 'kill':      # the process dies without a word
                os._exit(3)
            if fault == 'hang':
                time.sleep(600)
        if mode == 'train':
            seen.extend(int(i) for i in idx)
        if kind != 'bn-plain':
            return default_get_batch(imdb_, idx, mode=mode, rng=rng)
        # bn-plain: no flips (they are keyed by sub-batch), float64 images (a float32 input
        # makes the layers compute in float32)
        out = default_get_batch(imdb_, idx, mode='test', rng=rng)
        return {'input': np.asfortranarray(out['input'], dtype=np.float64), 'label': out['label']}

    from pydagnn.parallel import make_comm
    comm_obj = make_comm(comm, timeout=timeout)
    real_save = ptrain.save_checkpoint

    def save(*a, **k):
        saves.append(a[0])
        return real_save(*a, **k)

    ptrain.save_checkpoint = save
    try:
        net, stats = ptrain.cnn_train_dag(net, data, get_batch, exp_dir=exp, batch_size=batch,
                                          num_sub_batches=subs, num_epochs=epochs, learning_rate=lr,
                                          plot_statistics=False, prefetch=False, comm=comm_obj, sync_bn=sync_bn,
                                          log=lambda line: None)
    finally:
        ptrain.save_checkpoint = real_save
    rec = {'seen': np.asarray(seen, dtype=np.int64), 'saves': np.int64(len(saves))}
    for p in net.params:
        rec['p:' + p.name] = np.asarray(p.value)
    return net, rec, stats, comm_obj


def rank_of(comm):
    return comm.rank


def main(argv=None):
    a = argparse.ArgumentParser()
    a.add_argument('--kind', default='bn')
    a.add_argument('--subs', type=int, default=1)
    a.add_argument('--epochs', type=int, default=2)
    a.add_argument('--batch', type=int, default=8)
    a.add_argument('--n', type=int, default=25)
    a.add_argument('--lr', type=float, default=0.05)
    a.add_argument('--exp', required=True)
    a.add_argument('--out', required=True)
    a.add_argument('--timeout', type=float, default=20.0)
    a.add_argument('--fault')
    a.add_argument('--sync-bn', action='store_true')
    a.add_argument('--fault-batch', type=int, default=2)
    args = a.parse_args(argv)
    net, rec, stats, comm = train(args.kind, args.subs, args.epochs, args.batch, args.exp, 'auto',
                                  args.timeout, args.fault, 1, args.fault_batch, args.n, args.lr,
                                  args.sync_bn)
    for split in ('train', 'val'):
        for k, v in (stats[split][-1] if stats[split] else {}).items():
            rec[f's:{split}:{k}'] = np.float64(v)
    rec['world'] = np.int64(comm.size)
    np.savez(os.path.join(args.out, f'rank{comm.rank}.npz'), **rec)


if __name__ == '__main__':
    main(sys.argv[1:])
