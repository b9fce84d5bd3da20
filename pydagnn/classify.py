"""``python -m pydagnn.classify``: the top-5 classes of images under a MatConvNet model.

    python -m pydagnn.classify --model net-epoch-60.mat cat.jpg dog.png   # needs the image extra
    python -m pydagnn.classify --model net-epoch-60.mat --imdb imdb.mat --index 1 5 9

The library is :mod:`pydagnn.deployment`; ``pydagnn.classify(net, images)`` is its
:func:`~pydagnn.deployment.classify` (this module is callable for that: importing it as
``pydagnn.classify`` must not hide the function of the same name).
"""
import argparse
import os
import sys
import types
import warnings

import numpy as np

from .deployment import classify as _classify_images, read_image

__all__ = ['main']


def _parser():
    p = argparse.ArgumentParser(prog='python -m pydagnn.classify',
                                description='The top-k classes of images under a MatConvNet model.')
    p.add_argument('--model', required=True, help='a MatConvNet model or checkpoint (.mat)')
    p.add_argument('images', nargs='*', metavar='IMAGE', help='image files (needs Pillow: the image extra)')
    p.add_argument('--imdb', help='an imdb.mat: classify its images (--index) and use its class names')
    p.add_argument('--index', type=int, nargs='+', default=[],
                   help='1-based image indexes into the imdb (as MATLAB indexes images.data)')
    p.add_argument('--topk', type=int, default=5, help='classes to print per image (default 5)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--output', help='the prediction var (default: the deployed net\'s prediction)')
    return p


def _check(p, a):
    if not os.path.isfile(a.model):
        p.error(f'--model {a.model}: no such file')
    if a.imdb and not os.path.isfile(a.imdb):
        p.error(f'--imdb {a.imdb}: no such file')
    if a.index and not a.imdb:
        p.error('--index needs --imdb')
    if not a.images and not a.index:
        p.error('nothing to classify: give image files, or --imdb with --index')
    if a.topk < 1 or a.batch_size < 1:
        p.error('--topk and --batch-size must be positive')
    for f in a.images:
        if not os.path.isfile(f):
            p.error(f'{f}: no such image file')


def _inputs(p, a):
    """(labels for the printout, images, true labels or None, the imdb or None)."""
    imdb = None
    items, images, truth = [], [], []
    if a.imdb:
        from .io.imdb import load_imdb
        imdb = load_imdb(a.imdb)
        n = imdb.images.data.shape[3]
        bad = [i for i in a.index if not 1 <= i <= n]
        if bad:
            p.error(f'--index {bad[0]}: the imdb holds images 1..{n}')
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
            p.error(str(e))
        except ValueError as e:
            p.error(str(e))
        items.append(f)
        truth.append(None)
    return items, images, truth, imdb


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    _check(p, a)
    from .io.errors import MatFileError
    from .io.matconvnet import load_matconvnet
    items, images, truth, imdb = _inputs(p, a)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            net = load_matconvnet(a.model)
    except (MatFileError, OSError) as e:
        p.error(str(e))
    try:
        r = _classify_images(net, images, topk=a.topk, imdb=imdb, output=a.output,
                             batch_size=a.batch_size)
    except ValueError as e:
        p.error(str(e))
    for n, item in enumerate(items):
        true = f' (label {truth[n]})' if truth[n] is not None else ''
        print(f'{item}{true}:')
        for j in range(r.top.shape[1]):
            name = f'  {r.names[n][j]}' if r.names is not None else ''
            print(f'  {j + 1}. class {int(r.top[n, j]):4d}  score {r.top_scores[n, j]:9.4f}{name}')
    return 0


class _CallableModule(types.ModuleType):
    """``pydagnn.classify(net, images, ...)`` works whether ``pydagnn.classify`` is this
    module (once imported) or the function."""

    def __call__(self, *args, **kwargs):
        return _classify_images(*args, **kwargs)


if __name__ == '__main__':
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
