"""Command line for imdb.mat files: convert, synth, info.

Run as ``python -m pydagnn.imdb`` (that module is only the entry point); the library is
:mod:`pydagnn.io.imdb`.

    python -m pydagnn.imdb convert --src DIR --out imdb.mat     # downsampled ImageNet batches
    python -m pydagnn.imdb convert --src old_imdb.mat --out imdb.mat   # repack any imdb.mat
    python -m pydagnn.imdb synth --out synth.mat [--num-train N --num-val M --num-classes C
                                                  --size 64 --seed S]
    python -m pydagnn.imdb info imdb.mat
"""
import errno
import json
import os
import sys
import time

from .cli import ArgumentParser, RunError, UsageError, add_debug_flag, run_main


def make_parser():
    """The argparse parser of the command (every flag with a help line)."""
    p = ArgumentParser(prog='python -m pydagnn.imdb', description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True, metavar='{convert,synth,info}',
                           help='what to do (each has its own --help)')

    c = sub.add_parser('convert',
                       help='downsampled-ImageNet batches (or an imdb.mat) -> imdb.mat (v7.3)')
    c.add_argument('--src', required=True, help='folder with train_data_batch_1..10 and val_data, '
                   'or an existing imdb.mat to repack')
    c.add_argument('--out', required=True, help='the imdb.mat to write')
    c.add_argument('--layout', choices=('contiguous', 'chunked'), default='contiguous',
                   help='storage of images.data (default: contiguous, fastest random reads)')
    c.add_argument('--chunk', type=int, default=4096, help='images per write (memory bound)')
    c.add_argument('--classes', help="a class list (ImageNet's map_clsloc.txt: WNID LABEL NAME per "
                   "line) stored as meta.classes.name / .description")
    c.add_argument('--quiet', action='store_true', help='no progress lines on stderr')

    s = sub.add_parser('synth', help='a small learnable synthetic imdb')
    s.add_argument('--out', required=True, help='the imdb.mat to write')
    s.add_argument('--num-train', type=int, default=1000, help='training images (set 1; default 1000)')
    s.add_argument('--num-val', type=int, default=200, help='validation images (set 2; default 200)')
    s.add_argument('--num-classes', type=int, default=10, help='classes, labels 1..C (default 10)')
    s.add_argument('--size', type=int, default=64, help='image height = width (default 64)')
    s.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    s.add_argument('--noise', type=float, default=24.0,
                   help='std of the added Gaussian noise (0..255 units)')
    s.add_argument('--version', choices=('7.3', '7'), default='7.3',
                   help='MATLAB file version (default 7.3)')
    s.add_argument('--layout', choices=('contiguous', 'chunked'), default='contiguous',
                   help='storage of images.data in a v7.3 file (default contiguous)')

    i = sub.add_parser('info', help='summarise an imdb.mat (JSON)')
    i.add_argument('path', help='the imdb.mat')
    for sp in (c, s, i):
        add_debug_flag(sp)
    return p


def _check(args):
    """The checks that need no file read: paths and counts, named by their flag."""
    if args.cmd == 'convert':
        if not os.path.exists(args.src):
            raise UsageError(f'--src {args.src}: the folder does not exist')
        if args.chunk < 1:
            raise UsageError(f'--chunk {args.chunk}: must be at least 1')
        if args.classes and not os.path.isfile(args.classes):
            raise UsageError(f'--classes {args.classes}: no such file')
    if args.cmd == 'synth':
        for flag, value, low in (('--num-train', args.num_train, 0), ('--num-val', args.num_val, 0),
                                 ('--num-classes', args.num_classes, 1), ('--size', args.size, 1)):
            if value < low:
                raise UsageError(f'{flag} {value}: must be at least {low}')
    out = getattr(args, 'out', None)
    if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UsageError(f'--out {out}: the folder {os.path.dirname(os.path.abspath(out))} '
                         'does not exist')


def _progress_callback(quiet):
    """A ``progress(done, total)`` for the converters printing a rate and an ETA."""
    if quiet:
        return None
    from .progress import Progress
    bar = []

    def progress(done, total):
        if not bar:
            bar.append(Progress('convert', total=total, unit='images'))
        bar[0].update(done - bar[0].count)
        if done >= total:
            bar[0].done()
    return progress


def main(argv=None):
    """The command: returns its exit status (0; 2 after a user's mistake, 1 when writing
    the output failed, e.g. a full disk; each with one ``error:`` line on stderr; see
    :mod:`pydagnn.cli`)."""
    return run_main(run, argv)


def _write_failed(e, target):
    """The one line for an OS error while writing ``target`` (the output is not published
    and its temp file is removed, so nothing half written is left)."""
    code = f' ({errno.errorcode[e.errno]})' if e.errno in errno.errorcode else ''
    return RunError(f'{target}: {e.strerror or e}{code}; nothing was written')


def _write(args):
    """The convert or synth subcommand (writes ``args.out``)."""
    from .io.imdb import convert_imagenet64, read_class_list, repack_imdb, synth_imdb
    if args.cmd == 'synth':
        synth_imdb(args.out, num_train=args.num_train, num_val=args.num_val,
                   num_classes=args.num_classes, size=args.size, seed=args.seed,
                   noise=args.noise, version=args.version, layout=args.layout)
        return
    try:
        classes = read_class_list(args.classes) if args.classes else None
    except ValueError as e:
        raise UsageError(f'--classes {e}') from None
    progress = _progress_callback(args.quiet)
    if os.path.isfile(args.src):
        repack_imdb(args.src, args.out, layout=args.layout, chunk=args.chunk, progress=progress,
                    classes=classes)
    else:
        log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
        convert_imagenet64(args.src, args.out, layout=args.layout, chunk=args.chunk, log=log,
                           progress=progress, classes=classes)


def run(argv=None):
    """Run one subcommand; prints its JSON summary on stdout, returns 0. Raises on errors."""
    args = make_parser().parse_args(argv)
    _check(args)
    from .io.imdb import imdb_info
    from .io.tmpfiles import clean_stale
    t0 = time.perf_counter()
    if args.cmd == 'info':
        print(json.dumps(imdb_info(args.path)))
        return 0
    # what killed writers left beside the output
    clean_stale(os.path.dirname(os.path.abspath(args.out)),
                log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        _write(args)
    except TypeError as e:       # a non-numeric labels or set field of a repacked imdb
        raise UsageError(str(e)) from None
    except FileNotFoundError:    # an input that is not there: the user's to fix (exit 2)
        raise
    except OSError as e:         # e.g. ENOSPC while writing: the run failed (exit 1)
        raise _write_failed(e, args.out) from None
    print(json.dumps(dict(imdb_info(args.out), seconds=round(time.perf_counter() - t0, 2))))
    return 0


if __name__ == '__main__':
    sys.exit(main())
