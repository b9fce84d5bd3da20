"""Command line for imdb.mat files: convert, synth, info.

Run as ``python -m pydagnn.imdb`` (that module is only the entry point); the library is
:mod:`pydagnn.io.imdb`.

    python -m pydagnn.imdb convert --src DIR --out imdb.mat     # downsampled ImageNet batches
    python -m pydagnn.imdb convert --src old_imdb.mat --out imdb.mat   # repack any imdb.mat
    python -m pydagnn.imdb synth --out synth.mat [--num-train N --num-val M --num-classes C
                                                  --size 64 --seed S]
    python -m pydagnn.imdb info imdb.mat
"""
import argparse
import errno
import json
import os
import sys
import time

from .io.errors import MatFileError
from .io.imdb import convert_imagenet64, imdb_info, repack_imdb, synth_imdb
from .io.tmpfiles import clean_stale


def _parser():
    p = argparse.ArgumentParser(prog='python -m pydagnn.imdb', description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)

    c = sub.add_parser('convert',
                       help='downsampled-ImageNet batches (or an imdb.mat) -> imdb.mat (v7.3)')
    c.add_argument('--src', required=True, help='folder with train_data_batch_1..10 and val_data, '
                   'or an existing imdb.mat to repack')
    c.add_argument('--out', required=True, help='the imdb.mat to write')
    c.add_argument('--layout', choices=('contiguous', 'chunked'), default='contiguous',
                   help='storage of images.data (default: contiguous, fastest random reads)')
    c.add_argument('--chunk', type=int, default=4096, help='images per write (memory bound)')

    s = sub.add_parser('synth', help='a small learnable synthetic imdb')
    s.add_argument('--out', required=True)
    s.add_argument('--num-train', type=int, default=1000)
    s.add_argument('--num-val', type=int, default=200)
    s.add_argument('--num-classes', type=int, default=10)
    s.add_argument('--size', type=int, default=64)
    s.add_argument('--seed', type=int, default=0)
    s.add_argument('--noise', type=float, default=24.0,
                   help='std of the added Gaussian noise (0..255 units)')
    s.add_argument('--version', choices=('7.3', '7'), default='7.3')
    s.add_argument('--layout', choices=('contiguous', 'chunked'), default='contiguous')

    i = sub.add_parser('info', help='summarise an imdb.mat (JSON)')
    i.add_argument('path')
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.cmd in ('convert', 'synth'):   # what killed writers left beside the output
        clean_stale(os.path.dirname(os.path.abspath(args.out)),
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        if args.cmd == 'convert':
            if os.path.isfile(args.src):
                repack_imdb(args.src, args.out, layout=args.layout, chunk=args.chunk)
            else:
                convert_imagenet64(args.src, args.out, layout=args.layout, chunk=args.chunk,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
            print(json.dumps(dict(imdb_info(args.out), seconds=round(time.perf_counter() - t0, 2))))
        elif args.cmd == 'synth':
            synth_imdb(args.out, num_train=args.num_train, num_val=args.num_val,
                       num_classes=args.num_classes, size=args.size, seed=args.seed,
                       noise=args.noise, version=args.version, layout=args.layout)
            print(json.dumps(dict(imdb_info(args.out), seconds=round(time.perf_counter() - t0, 2))))
        else:
            print(json.dumps(imdb_info(args.path)))
    except (MatFileError, FileNotFoundError, ValueError, TypeError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:   # e.g. ENOSPC: the output is not published, its temp file removed
        target = args.out if args.cmd != 'info' else args.path
        print(f'error: {target}: {e.strerror or e}' + (f' ({errno.errorcode[e.errno]})' if e.errno in
              errno.errorcode else '') + '; nothing was written', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
