"""Train a GM-SOP model on downsampled ImageNet (64x64): the port of ``cnn_imagenet64.m``.

    # the original setting: ResNet18-GM-SOP on an imdb.mat, its learning-rate schedule
    python examples/cnn_imagenet64.py --imdb /data/imagenet64/imdb.mat --gpus 0

    # no --imdb: a small learnable imdb (3000 train / 600 val 32x32 images, 20 classes)
    # is generated (cached under $PYDAGNN_CACHE or ~/.cache/pydagnn) and a reduced GM-SOP
    # (one block per stage, 4 component modules keeping 2, narrow gating/CM convs) trains
    # 3 epochs: about 45 s on 2 idle cores of a recent CPU
    python examples/cnn_imagenet64.py

    # the original's 10-image example file
    python examples/cnn_imagenet64.py --imdb ../shared/data/imdb_fake.mat --epochs 1

    # data parallel (pip install -e '.[dist]'): 4 GPUs, one rank each (rank r uses gpus[r]);
    # 2 CPU ranks; --gpus 0 1 alone starts its ranks through the venv's mpiexec
    .venv/bin/mpiexec -n 4 python -m mpi4py examples/cnn_imagenet64.py --gpus 0 1 2 3 --imdb imdb.mat
    .venv/bin/mpiexec -n 2 python -m mpi4py examples/cnn_imagenet64.py

Checkpoints ``net-epoch-N.mat``, ``net-train.pdf``/``.png`` go to ``--exp-dir``
(default ``data/<model folder name>``, as the original's ``expDir/net.meta.opt``); running
the same command again resumes after the last complete checkpoint (``--no-continue``
starts over). Evaluate a checkpoint with ``python -m pydagnn.evaluate``.
"""
import argparse
import os
import sys
import time

import numpy as np

from pydagnn.data import get_batch
from pydagnn.finite import NonFiniteError
from pydagnn.io.checkpoint import CheckpointWriteError
from pydagnn.io.imdb import load_imdb, synth_imdb
from pydagnn.io.tmpfiles import clean_stale
from pydagnn.models import MODEL_TYPES, build
from pydagnn.launch import LaunchError, env_rank, relaunch_under_mpi, under_launcher
from pydagnn.parallel import DEFAULT_TIMEOUT, CommError, make_comm
from pydagnn.runlock import ExpDirError, RunLockError
from pydagnn.train import cnn_train_dag, train_opts_kwargs

#: the generated imdb and the reduced model used when no --imdb is given
DEMO_IMDB = dict(num_train=3000, num_val=600, num_classes=20, size=32, noise=48.0, seed=0)
DEMO_MODEL = dict(section_len=1, cm_num=4, topk=2, gating_widths=(32, 16), cm_widths=(32, 16))
DEMO_TRAIN = dict(epochs=3, batch_size=64, lr=[0.1, 0.1, 0.02])


def cache_dir():
    return os.environ.get('PYDAGNN_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'pydagnn')


def demo_imdb_path(num_train=None, num_val=None):
    """Generate (once) the small learnable imdb of the demo; returns its path."""
    d = dict(DEMO_IMDB)
    if num_train is not None:
        d.update(num_train=int(num_train), num_val=int(num_val))
    path = os.path.join(cache_dir(), f"synth-{d['num_train']}-{d['num_val']}-c{d['num_classes']}-"
                                     f"s{d['size']}-n{d['noise']:g}-seed{d['seed']}.mat")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        clean_stale(os.path.dirname(path), log=print)   # what a killed generation left
        t0 = time.perf_counter()
        synth_imdb(path, **d)
        print(f'cnn_imagenet64: generated {path} ({time.perf_counter() - t0:.1f} s)', flush=True)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model-type', default='ResNet18-GM-SOP', choices=MODEL_TYPES,
                   help='default ResNet18-GM-SOP')
    p.add_argument('--imdb', help='imdb.mat (MATLAB v7 or v7.3); default: a generated demo imdb and a '
                                  'reduced model')
    p.add_argument('--exp-dir', help='checkpoints and plots (default data/<model folder name>)')
    p.add_argument('--gpus', type=int, nargs='*', default=[],
                   help='e.g. --gpus 0 (one GPU); --gpus 0 1 2 3: one MPI rank per GPU (started through '
                        'the venv\'s mpiexec when not run under mpiexec/srun)')
    p.add_argument('--sync-bn', action='store_true',
                   help='data parallel: BN moments and the Balance_loss sums over all ranks (default: per rank)')
    p.add_argument('--comm-timeout', type=float, default=DEFAULT_TIMEOUT,
                   help=f'seconds a rank waits for the others before ending the job (default {DEFAULT_TIMEOUT:g})')
    p.add_argument('--batch-size', type=int, help="default the model's (256; WRN 150; demo 64)")
    p.add_argument('--epochs', type=int, help='default the length of the learning-rate schedule')
    p.add_argument('--lr', type=float, nargs='+',
                   help='learning rate: one value for every epoch, or one per epoch (overrides the schedule)')
    p.add_argument('--num-sub-batches', type=int, default=1,
                   help='split each batch in this many (derivatives summed; default 1)')
    p.add_argument('--seed', type=int, default=0, help='random seed of the training and of the init (default 0)')
    p.add_argument('--no-continue', action='store_true', help='start over even if checkpoints exist')
    p.add_argument('--num-classes', type=int, help="default the imdb's largest label (1000 if none)")
    p.add_argument('--section-len', type=int, help='basic blocks per stage (default 2; WRN 4; demo 1)')
    p.add_argument('--topk', type=int, help='component modules kept per image (default 8; demo 2)')
    p.add_argument('--cm-num', type=int, help='component modules (default 16; demo 4)')
    p.add_argument('--loss-w', type=float, default=100, help='Balance_loss weight (default 100)')
    p.add_argument('--demo-size', type=int, nargs=2, metavar=('TRAIN', 'VAL'),
                   help=f"images of the generated imdb when no --imdb is given (default "
                        f"{DEMO_IMDB['num_train']} {DEMO_IMDB['num_val']})")
    p.add_argument('--no-prefetch', action='store_true', help='read batches in the training thread')
    p.add_argument('--no-plot', action='store_true', help='do not draw net-train.pdf/.png')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if len(args.gpus) > 1 and not under_launcher():  # one process per GPU, as MatConvNet's pool
        try:
            raise SystemExit(relaunch_under_mpi(len(args.gpus), __file__, sys.argv[1:] if argv is None else argv))
        except LaunchError as e:
            print(f'error: {e}', file=sys.stderr)
            raise SystemExit(2)
    t_start = time.perf_counter()
    demo = args.imdb is None
    if args.demo_size and not demo:
        raise SystemExit('cnn_imagenet64: --demo-size applies only without --imdb')
    try:
        comm = make_comm('auto', args.gpus, args.comm_timeout)  # 'single' unless started by mpiexec/srun
    except CommError as e:
        if env_rank() == 0:  # one line, not one per rank
            print(f'error: {e}', file=sys.stderr)
        raise SystemExit(2)
    if len(args.gpus) > 1 and comm.size != len(args.gpus):
        if comm.rank == 0:
            print(f'error: --gpus names {len(args.gpus)} GPUs but this job has {comm.size} rank(s); start one '
                  f'rank per GPU: mpiexec -n {len(args.gpus)} python -m mpi4py {sys.argv[0]} ...', file=sys.stderr)
        raise SystemExit(2)
    if demo and comm.rank == 0:
        demo_imdb_path(*(args.demo_size or ()))  # rank 0 generates the demo imdb, the others wait
    comm.barrier()
    imdb_path = demo_imdb_path(*(args.demo_size or ())) if demo else args.imdb
    if comm.rank != 0:  # rank 0 prints; the others stay quiet
        sys.stdout = open(os.devnull, 'w')
    imdb = load_imdb(imdb_path)
    data = imdb.images.data
    image_size = int(data.shape[0])
    labels = np.asarray(imdb.images.labels).reshape(-1)
    num_classes = args.num_classes or (int(labels.max()) if labels.size else 1000)

    gm = 'GM' in args.model_type
    model = dict(DEMO_MODEL) if demo else {}
    if not gm:
        model = {k: v for k, v in model.items() if k == 'section_len'}
    for key, val in (('section_len', args.section_len), ('topk', args.topk), ('cm_num', args.cm_num)):
        if val is not None:
            model[key] = val
    if gm:
        model['loss_w'] = args.loss_w
    net = build(args.model_type, num_classes=num_classes, average_image=imdb.meta.rgbMean,
                image_size=image_size, seed=args.seed, **model)

    opts = train_opts_kwargs(net.meta['trainOpts'])
    if demo:
        opts.update(num_epochs=DEMO_TRAIN['epochs'], batch_size=DEMO_TRAIN['batch_size'],
                    learning_rate=DEMO_TRAIN['lr'])
    if args.lr is not None:
        opts['learning_rate'] = args.lr if len(args.lr) > 1 else args.lr[0]
        if len(args.lr) > 1 and args.epochs is None:
            opts['num_epochs'] = len(args.lr)
    if args.epochs is not None:
        opts['num_epochs'] = args.epochs
    if args.batch_size is not None:
        opts['batch_size'] = args.batch_size
    opts['num_sub_batches'] = args.num_sub_batches
    exp_dir = args.exp_dir or os.path.join('data', ('demo-' if demo else '') + net.meta['opt'])

    sets = np.asarray(imdb.images.set).reshape(-1)
    print(f'cnn_imagenet64: {args.model_type} ({net.num_params() / 1e6:.2f}M params, {num_classes} classes) on '
          f'{imdb_path}: {int((sets == 1).sum())} train / {int((sets == 2).sum())} val images of '
          f'{image_size}x{image_size}; {opts["num_epochs"]} epochs, batch {opts["batch_size"]}, '
          f'lr {opts["learning_rate"]}; exp dir {exp_dir}', flush=True)
    net, stats = cnn_train_dag(net, imdb, get_batch, exp_dir=exp_dir, gpus=args.gpus,
                               continue_=not args.no_continue, random_seed=args.seed,
                               prefetch=not args.no_prefetch, plot_statistics=not args.no_plot,
                               comm=comm, sync_bn=args.sync_bn, **opts)
    print('cnn_imagenet64: error curve (top-1 error; objective per image)')
    print('  epoch  train_top1  val_top1  train_obj  val_obj  train_s')
    for e, (tr, va) in enumerate(zip(stats['train'], stats['val']), start=1):
        print(f"  {e:5d}  {tr.get('top1error', float('nan')):10.3f}  {va.get('top1error', float('nan')):8.3f}"
              f"  {tr.get('objective', float('nan')):9.3f}  {va.get('objective', float('nan')):7.3f}"
              f"  {tr.get('time', float('nan')):7.1f}")
    print(f'cnn_imagenet64: chance top-1 error {1 - 1 / num_classes:.3f}; done in '
          f'{time.perf_counter() - t_start:.1f} s', flush=True)
    imdb.close()
    return net, stats


#: failures of a run that are reported as one ``error:`` line (exit status 1)
RUN_ERRORS = (NonFiniteError, RunLockError, ExpDirError, CheckpointWriteError)


def cli(argv=None):
    """:func:`main` as a command: 0 when done, 1 with one ``error: ...`` line on stderr
    when the run fails in a way the user must act on (:data:`RUN_ERRORS`)."""
    try:
        main(argv)
    except RUN_ERRORS as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(cli())
