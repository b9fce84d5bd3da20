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

A mistake in the flags or the data (a missing file, labels above ``--num-classes``, images
the model cannot take, no training images, ``--gpus`` without a usable GPU) ends with one
``error: ...`` line and exit status 2, before the net is built (``--debug`` shows the
traceback); a run that stops before its first checkpoint leaves no experiment folder
behind. Ctrl-C says which checkpoint the same command resumes from.
"""
import os
import shutil
import sys
import time

import numpy as np

from pydagnn.cli import ArgumentParser, Interrupted, UsageError, add_debug_flag, check_gpus, run_main
from pydagnn.models import MODEL_TYPES

#: seconds a rank waits for the others (pydagnn.parallel.DEFAULT_TIMEOUT; a test keeps them
#: equal, so that --help need not import the communicators)
DEFAULT_COMM_TIMEOUT = 300.0

#: the generated imdb and the reduced model used when no --imdb is given
DEMO_IMDB = dict(num_train=3000, num_val=600, num_classes=20, size=32, noise=48.0, seed=0)
DEMO_MODEL = dict(section_len=1, cm_num=4, topk=2, gating_widths=(32, 16), cm_widths=(32, 16))
DEMO_TRAIN = dict(epochs=3, batch_size=64, lr=[0.1, 0.1, 0.02])


def cache_dir():
    return os.environ.get('PYDAGNN_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'pydagnn')


def load_imdb(path):
    """:func:`pydagnn.io.imdb.load_imdb`, imported when first called (``--help`` needs no
    file reader); a missing file is the ``--imdb`` flag's fault."""
    if not os.path.isfile(path):
        raise UsageError(f'--imdb {path}: no such file')
    from pydagnn.io.imdb import load_imdb as load
    return load(path)


def cnn_train_dag(*args, **kwargs):
    """:func:`pydagnn.train.cnn_train_dag`, imported when first called."""
    from pydagnn.train import cnn_train_dag as train
    return train(*args, **kwargs)


def run_errors():
    """The failures of a run reported as one ``error:`` line with exit status 1 (the
    flags and data were fine; the run could not go on): a non-finite step, a folder held by
    another run or not writable, a checkpoint that could not be written."""
    from pydagnn.finite import NonFiniteError
    from pydagnn.io.checkpoint import CheckpointWriteError
    from pydagnn.runlock import ExpDirError, RunLockError
    return (NonFiniteError, RunLockError, ExpDirError, CheckpointWriteError)


def demo_imdb_path(num_train=None, num_val=None):
    """Generate (once) the small learnable imdb of the demo; returns its path."""
    from pydagnn.io.imdb import synth_imdb
    from pydagnn.io.tmpfiles import clean_stale
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


def make_parser():
    """The argparse parser of the command (every flag with a help line)."""
    p = ArgumentParser(prog='examples/cnn_imagenet64.py', description=__doc__.split('\n\n')[0])
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
    p.add_argument('--comm-timeout', type=float, default=DEFAULT_COMM_TIMEOUT,
                   help=f'seconds a rank waits for the others before ending the job '
                        f'(default {DEFAULT_COMM_TIMEOUT:g})')
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
    add_debug_flag(p)
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def check_args(args):
    """The flag checks that need no file: each failure names its flag and value."""
    if args.demo_size and args.imdb is not None:
        raise UsageError('--demo-size applies only without --imdb (it sizes the generated imdb)')
    at_least = [('--batch-size', args.batch_size, 1), ('--epochs', args.epochs, 1),
                ('--num-sub-batches', args.num_sub_batches, 1), ('--num-classes', args.num_classes, 1),
                ('--section-len', args.section_len, 1), ('--topk', args.topk, 1),
                ('--cm-num', args.cm_num, 1)]
    at_least += [('--demo-size', v, 1) for v in (args.demo_size or ())]
    for flag, value, low in at_least:
        if value is not None and value < low:
            raise UsageError(f'{flag} {value}: must be at least {low}')
    if args.lr is not None and any(not v > 0 for v in args.lr):
        raise UsageError(f"--lr {' '.join(f'{v:g}' for v in args.lr)}: learning rates must be positive")
    if args.topk is not None and args.cm_num is not None and args.topk > args.cm_num:
        raise UsageError(f'--topk {args.topk}: must not exceed --cm-num {args.cm_num}')
    if args.batch_size is not None and args.num_sub_batches > args.batch_size:
        raise UsageError(f'--num-sub-batches {args.num_sub_batches}: more than --batch-size '
                         f'{args.batch_size}')


def check_imdb(imdb, path, num_classes):
    """What the imdb must hold for this training, checked before the net is built: square
    colour images whose side is a multiple of 8, training images (``images.set == 1``),
    whole labels in 0..num_classes (0 = ignored). Returns ``(image_size, sets)``."""
    shape = tuple(int(v) for v in imdb.images.data.shape)
    if len(shape) != 4 or shape[0] != shape[1] or shape[2] != 3 or shape[0] % 8:
        raise UsageError(f'{path}: images.data is {"x".join(map(str, shape))}; the models take '
                         'S x S x 3 x N images with S a multiple of 8 (e.g. 64x64x3)')
    sets = np.asarray(imdb.images.set).reshape(-1)
    if not (sets == 1).any():
        raise UsageError(f'{path}: no training images (images.set has no 1; found sets '
                         f'{sorted(set(int(v) for v in np.unique(sets)))})')
    labels = np.asarray(imdb.images.labels).reshape(-1)
    used = labels[(sets == 1) | (sets == 2)]
    if used.size and (used.min() < 0 or np.any(used != np.round(used))):
        raise UsageError(f'{path}: images.labels must be whole numbers 1..C (0 = ignored)')
    if used.size and used.max() > num_classes:
        raise UsageError(f'{path}: labels go up to {int(used.max())}, above --num-classes {num_classes}')
    return shape[0], sets


def train_opts(net, args, demo):
    """The trainer's options: the model's ``meta.trainOpts``, the demo's, then the flags."""
    from pydagnn.train import train_opts_kwargs
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
    if opts['num_sub_batches'] > opts['batch_size']:
        raise UsageError(f"--num-sub-batches {args.num_sub_batches}: more than the batch size "
                         f"{opts['batch_size']}")
    return opts


def build_net(args, demo, num_classes, image_size, rgb_mean):
    """The model of ``--model-type`` with the demo's reductions and the flags' sizes."""
    from pydagnn.models import build
    gm = 'GM' in args.model_type
    model = dict(DEMO_MODEL) if demo else {}
    if not gm:
        model = {k: v for k, v in model.items() if k == 'section_len'}
    for key, val in (('section_len', args.section_len), ('topk', args.topk), ('cm_num', args.cm_num)):
        if val is not None:
            model[key] = val
    if gm:
        model['loss_w'] = args.loss_w
        if model.get('topk', 8) > model.get('cm_num', 16):
            raise UsageError(f"--topk {model.get('topk', 8)}: must not exceed --cm-num "
                             f"{model.get('cm_num', 16)}")
    return build(args.model_type, num_classes=num_classes, average_image=rgb_mean,
                 image_size=image_size, seed=args.seed, **model)


def carry_classes(net, imdb):
    """The imdb's ``meta.classes`` into ``net.meta.classes`` (as cnn_imagenet does), so
    that ``pydagnn.classify`` names the classes of the trained model."""
    classes = getattr(imdb.meta, 'classes', None)
    if classes is not None:
        net.meta['classes'] = dict(classes) if hasattr(classes, 'keys') else classes


def resume_note(exp_dir):
    """Where the same command resumes from, for the Ctrl-C line."""
    from pydagnn.train import find_last_checkpoint
    last = find_last_checkpoint(exp_dir) if os.path.isdir(exp_dir) else 0
    if last:
        return (f'the same command resumes after epoch {last} '
                f'({os.path.join(exp_dir, f"net-epoch-{last}.mat")})')
    return f'no checkpoint in {exp_dir} yet: the same command starts from epoch 1'


def _missing_top(path):
    """The topmost folder of ``path`` that does not exist yet (None when it exists)."""
    path = os.path.abspath(path)
    top = None
    while not os.path.exists(path):
        top, path = path, os.path.dirname(path)
    return top


def _remove_if_unused(top, exp_dir):
    """After a failed run: remove the folders this run created when no checkpoint is in them."""
    from pydagnn.train import find_last_checkpoint
    if top is not None and os.path.isdir(top) and not (
            os.path.isdir(exp_dir) and find_last_checkpoint(exp_dir)):
        shutil.rmtree(top, ignore_errors=True)


def print_results(stats, num_classes, seconds):
    print('cnn_imagenet64: error curve (top-1 error; objective per image)')
    print('  epoch  train_top1  val_top1  train_obj  val_obj  train_s')
    for e, (tr, va) in enumerate(zip(stats['train'], stats['val']), start=1):
        print(f"  {e:5d}  {tr.get('top1error', float('nan')):10.3f}  {va.get('top1error', float('nan')):8.3f}"
              f"  {tr.get('objective', float('nan')):9.3f}  {va.get('objective', float('nan')):7.3f}"
              f"  {tr.get('time', float('nan')):7.1f}")
    print(f'cnn_imagenet64: chance top-1 error {1 - 1 / num_classes:.3f}; done in {seconds:.1f} s',
          flush=True)


def start_ranks(args, argv):
    """The communicator of this process (``single`` unless started by mpiexec/srun).
    ``--gpus`` naming several GPUs outside a launcher starts one rank per GPU through the
    venv's mpiexec (as MatConvNet's ``gpus`` option opened its pool) and exits with its
    status. A mistake ends the job with one ``error:`` line from rank 0 (:func:`job_error`)."""
    from pydagnn.launch import LaunchError, env_rank, relaunch_under_mpi, under_launcher
    from pydagnn.parallel import CommError, make_comm
    if len(args.gpus) > 1 and not under_launcher():
        try:
            raise SystemExit(relaunch_under_mpi(len(args.gpus), __file__, sys.argv[1:] if argv is None else argv))
        except LaunchError as e:
            raise UsageError(str(e)) from None
    try:
        comm = make_comm('auto', args.gpus, args.comm_timeout)
    except CommError as e:
        job_error(env_rank(), 2, e)
    if len(args.gpus) > 1 and comm.size != len(args.gpus):
        job_error(comm.rank, comm.size, f'--gpus names {len(args.gpus)} GPUs but this job has {comm.size} rank(s); start '
                             f'one rank per GPU: mpiexec -n {len(args.gpus)} python -m mpi4py {sys.argv[0]} ...')
    try:
        check_gpus(args.gpus)
    except UsageError as e:
        job_error(comm.rank, comm.size, e)
    return comm


def job_error(rank, size, message):
    """A mistake: a :class:`~pydagnn.cli.UsageError` in a single process; in a job of
    ``size`` ranks, the end of every rank: rank 0 prints the one ``error:`` line (the
    other ranks stay quiet, so the job prints it once) and all exit with status 2. Under
    ``python -m mpi4py`` a non-zero exit aborts the whole job at once, so the other ranks
    give rank 0 a moment to print before they go."""
    if size <= 1:
        raise UsageError(str(message))
    if rank == 0:
        print(f'error: {message}', file=sys.stderr, flush=True)
    else:
        time.sleep(1.0)
    raise SystemExit(2)


def main(argv=None):
    """Train as the module docstring says; returns ``(net, stats)``. Raises
    :class:`~pydagnn.cli.UsageError` for a mistake in the flags or the imdb."""
    args = parse_args(argv)
    check_args(args)
    comm = start_ranks(args, argv)
    from pydagnn.data import get_batch
    from pydagnn.train import format_schedule
    t_start = time.perf_counter()
    demo = args.imdb is None
    if demo and comm.rank == 0:
        demo_imdb_path(*(args.demo_size or ()))  # rank 0 generates the demo imdb, the others wait
    comm.barrier()
    imdb_path = demo_imdb_path(*(args.demo_size or ())) if demo else args.imdb
    if comm.rank != 0:  # rank 0 prints; the others stay quiet
        sys.stdout = open(os.devnull, 'w')
    imdb = load_imdb(imdb_path)
    try:
        labels = np.asarray(imdb.images.labels).reshape(-1)
        num_classes = args.num_classes or (int(labels.max()) if labels.size else 1000)
        image_size, sets = check_imdb(imdb, imdb_path, num_classes)
        net = build_net(args, demo, num_classes, image_size, imdb.meta.rgbMean)
        carry_classes(net, imdb)
        opts = train_opts(net, args, demo)
        exp_dir = args.exp_dir or os.path.join('data', ('demo-' if demo else '') + net.meta['opt'])
        print(f'cnn_imagenet64: {args.model_type} ({net.num_params() / 1e6:.2f}M params, {num_classes} '
              f'classes) on {imdb_path}: {int((sets == 1).sum())} train / {int((sets == 2).sum())} val '
              f'images of {image_size}x{image_size}; {opts["num_epochs"]} epochs, batch '
              f'{opts["batch_size"]}, lr {format_schedule(opts["learning_rate"], opts["num_epochs"])}; '
              f'exp dir {exp_dir}', flush=True)
        created = _missing_top(exp_dir)
        try:
            net, stats = cnn_train_dag(net, imdb, get_batch, exp_dir=exp_dir, gpus=args.gpus,
                                       continue_=not args.no_continue, random_seed=args.seed,
                                       prefetch=not args.no_prefetch,
                                       plot_statistics=not args.no_plot, comm=comm,
                                       sync_bn=args.sync_bn, **opts)
        except KeyboardInterrupt:
            _remove_if_unused(created, exp_dir)
            raise Interrupted(resume_note(exp_dir)) from None
        except BaseException:
            _remove_if_unused(created, exp_dir)
            raise
    finally:
        imdb.close()
    print_results(stats, num_classes, time.perf_counter() - t_start)
    return net, stats


def cli(argv=None):
    """:func:`main` as a command (see :mod:`pydagnn.cli`): 0 when done; 2 with one
    ``error: ...`` line for a mistake in the flags or the data; 1 with one line when the run
    fails in a way the user must act on (:func:`run_errors`); 130 after Ctrl-C."""
    return run_main(main, argv, run_errors=run_errors)


if __name__ == '__main__':
    sys.exit(cli())
