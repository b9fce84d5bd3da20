"""``python -m pydagnn.classify``: the top-5 classes of images under a MatConvNet model.

    python -m pydagnn.classify --model net-epoch-60.mat cat.jpg dog.png   # needs the image extra
    python -m pydagnn.classify --model net-epoch-60.mat --imdb imdb.mat --index 1 5 9

The library is :mod:`pydagnn.deployment`; ``pydagnn.classify(net, images)`` is its
:func:`~pydagnn.deployment.classify` (this module is callable for that: importing it as
``pydagnn.classify`` must not hide the function of the same name).
"""
import os
import sys
import types

import numpy as np

from .cli import ArgumentParser, UsageError, add_debug_flag, run_main
from .deployment import classify as _classify_images, read_image

__all__ = ['main', 'make_parser']


def make_parser():
    p = ArgumentParser(prog='python -m pydagnn.classify',
                       description='The top-k classes of images under a MatConvNet model.')
    p.add_argument('--model', required=True, help='a MatConvNet model or checkpoint (.mat)')
    p.add_argument('images', nargs='*', metavar='IMAGE',
                   help='image files (read with Pillow: the image extra)')
    p.add_argument('--imdb', help='an imdb.mat: classify its images (--index) and use its class names')
    p.add_argument('--index', type=int, nargs='+', default=[],
                   help='1-based image indexes into the imdb (as MATLAB indexes images.data)')
    p.add_argument('--topk', type=int, default=5, help='classes to print per image (default 5)')
    p.add_argument('--batch-size', type=int, default=64, help='images per evaluation (default 64)')
    p.add_argument('--output', help="the prediction var (default: the deployed net's prediction)")
    add_debug_flag(p)
    return p


def _check(a):
    """The checks that need no file read, each naming its flag or file."""
    if not os.path.isfile(a.model):
        raise UsageError(f'--model {a.model}: no such file')
    if a.imdb and not os.path.isfile(a.imdb):
        raise UsageError(f'--imdb {a.imdb}: no such file')
    if a.index and not a.imdb:
        raise UsageError('--index needs --imdb')
    if not a.images and not a.index:
        raise UsageError('nothing to classify: give image files, or --imdb with --index')
    for flag, value in (('--topk', a.topk), ('--batch-size', a.batch_size)):
        if value < 1:
            raise UsageError(f'{flag} {value}: must be at least 1')
    for f in a.images:
        if not os.path.isfile(f):
            raise UsageError(f'{f}: no such image file')


def _inputs(a):
    """(labels for the printout, images, true labels or None, the imdb or None)."""
    imdb = None
    items, images, truth = [], [], []
    if a.imdb:
        from .io.imdb import load_imdb
        imdb = load_imdb(a.imdb)
        n = imdb.images.data.shape[3]
        bad = [i for i in a.index if not 1 <= i <= n]
        if bad:
            raise UsageError(f'--index {bad[0]}: the imdb holds images 1..{n}')
        data = imdb.images.data[:, :, :, [i - 1 for i in a.index]]
        labels = np.asarray(imdb.images.labels).reshape(-1)
        for j, i in enumerate(a.index):
            items.append(f'imdb image {i}')
            images.append(np.asarray(data[..., j]))
            truth.append(int(labels[i - 1]))
    for f in a.images:
        try:
            images.append(read_image(f))
        except ImportError as e:
            raise UsageError(str(e)) from None
        items.append(f)
        truth.append(None)
    return items, images, truth, imdb


def run(argv=None):
    """Classify and print; raises the errors :func:`pydagnn.cli.run_main` reports."""
    import warnings
    a = make_parser().parse_args(argv)
    _check(a)
    from .io.matconvnet import load_matconvnet
    items, images, truth, imdb = _inputs(a)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')     # loadobj-style leniencies: the net still runs
        net = load_matconvnet(a.model)
    r = _classify_images(net, images, topk=a.topk, imdb=imdb, output=a.output,
                         batch_size=a.batch_size)
    for n, item in enumerate(items):
        true = f' (label {truth[n]})' if truth[n] is not None else ''
        print(f'{item}{true}:')
        for j in range(r.top.shape[1]):
            name = f'  {r.names[n][j]}' if r.names is not None else ''
            print(f'  {j + 1}. class {int(r.top[n, j]):4d}  score {r.top_scores[n, j]:9.4f}{name}')
    return 0


def main(argv=None):
    """The command: its exit status (2 after a user's mistake, with one ``error:`` line)."""
    return run_main(run, argv)


class _CallableModule(types.ModuleType):
    """``pydagnn.classify(net, images, ...)`` works whether ``pydagnn.classify`` is this
    module (once imported) or the function."""

    def __call__(self, *args, **kwargs):
        return _classify_images(*args, **kwargs)


if __name__ == '__main__':
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
