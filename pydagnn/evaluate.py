"""Evaluate a trained net on an imdb: top-1 / top-5 error and speed.

    python -m pydagnn.evaluate --model data/exp/net-epoch-60.mat --imdb imdb.mat \\
        [--set val] [--gpus 0] [--batch-size 256]

The net runs in 'test' mode (no dropout, no gating noise, BN with its stored moments) on
the images of the chosen set (``images.set``: train 1, val 2, test 3), in imdb order,
without flips, minus ``meta.rgbMean``. The errors are computed from the scores that feed
the net's first ``dagnn.Loss`` layer (``prediction`` in the GM-SOP models), so they do not
depend on which loss layers the net has.
"""
import json
import os
import sys
import time

import numpy as np

from . import backend
from .cli import ArgumentParser, UsageError, add_debug_flag, check_gpus, run_main
from .data import get_batch, make_loader
from .progress import format_duration

__all__ = ['evaluate', 'topk_errors', 'check_fit', 'main']

_SETS = {'train': 1, 'val': 2, 'test': 3}


def topk_errors(scores, labels, ks=(1, 5)):
    """Numbers of images whose label is not among the k highest scores, for each k.
    scores: 1 x 1 x C x N (or C x N); labels 1-based (0 = ignored: never an error).
    Ties rank by class index, as MatConvNet's sort."""
    xp = backend.get_array_module(scores)
    s = scores.reshape(-1, scores.shape[-1])  # C x N
    lab = xp.asarray(labels).reshape(-1).astype(np.int64)
    valid = lab > 0
    idx = xp.clip(lab - 1, 0, s.shape[0] - 1)
    own = s[idx, xp.arange(s.shape[1])]
    # rank of the true class: how many classes score higher, or equal with a lower index
    higher = (s > own[None, :]).sum(axis=0)
    ties = ((s == own[None, :]) & (xp.arange(s.shape[0])[:, None] < idx[None, :])).sum(axis=0)
    rank = higher + ties
    return [int(backend.to_host(((rank >= k) & valid).sum())) for k in ks]


def _score_var(net):
    from .layer import REGISTRY
    cls = REGISTRY.get('dagnn.Loss')
    for li in net.execution_order:
        l = net.layers[li]
        if (cls is not None and isinstance(l.block, cls)) or l.type == 'dagnn.Loss':
            return l.inputs[0]
    outs = [v for v in net.get_outputs()]
    if len(outs) == 1:
        return outs[0]
    raise ValueError(f'evaluate: the net has no dagnn.Loss layer and {len(outs)} outputs ({outs}); '
                     'cannot tell which var holds the class scores')


def evaluate(net, imdb, subset='val', batch_size=256, gpus=(), prefetch=True, log=print,
             log_interval=1.0):
    """Run ``net`` in 'test' mode over a set of ``imdb`` (a set name or 0-based indexes).
    ``log`` gets a progress line (speed, running errors, ETA) after the first and the last
    batch and at most every ``log_interval`` seconds between (a fast GPU does many batches
    a second). Returns ``{'num': images, 'top1error': ..., 'top5error': ..., 'images_per_s': ...,
    'seconds': ...}``."""
    if isinstance(subset, str):
        if subset not in _SETS:
            raise ValueError(f"evaluate: unknown set {subset!r} (use {', '.join(_SETS)})")
        sets = np.asarray(imdb.images.set).reshape(-1)
        idx = np.nonzero(sets == _SETS[subset])[0]
    else:
        idx = np.asarray(subset, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError(f'evaluate: the imdb has no images in set {subset!r}')
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f'evaluate: batch_size must be at least 1, got {batch_size}')
    score = _score_var(net)
    net.get_var(score).precious = True
    net.mode = 'test'
    if gpus:
        from .train import use_gpu
        use_gpu(list(gpus)[0])
        net.move('gpu')
    inputs = set(net.get_inputs())
    jobs = [(idx[t:t + batch_size],) for t in range(0, idx.size, batch_size)]

    def fetch(b):
        return get_batch(imdb, b, mode='test')

    err1 = err5 = n = 0
    t0 = last_line = time.perf_counter()
    loader = make_loader(jobs, fetch, prefetch=prefetch)
    try:
        for k, batch in enumerate(loader):
            feed = {name: v for name, v in batch.items() if name in inputs}
            net.eval(feed)
            s = net.get_var(score).value
            s = s[0] if isinstance(s, tuple) else s
            e1, e5 = topk_errors(s, batch['label'])
            err1 += e1
            err5 += e5
            n += batch['label'].size
            now = time.perf_counter()
            dt = now - t0
            due = k == 0 or k == len(jobs) - 1 or now - last_line >= log_interval
            if log is not None and due:
                last_line = now
                eta = (idx.size - n) / (n / dt) if dt > 0 else None
                log(f'evaluate: {k + 1:4d}/{len(jobs):4d}: {n / dt:.1f} Hz top1error: {err1 / n:.4f} '
                    f'top5error: {err5 / n:.4f} ETA {format_duration(eta)}')
    finally:
        loader.close()
    dt = time.perf_counter() - t0
    net.reset()
    return {'num': n, 'top1error': err1 / n, 'top5error': err5 / n, 'images_per_s': n / dt, 'seconds': dt,
            'data_wait_s': loader.wait_time}


def make_parser():
    """The argparse parser of the command (every flag with a help line)."""
    p = ArgumentParser(prog='python -m pydagnn.evaluate', description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help='a MatConvNet model or checkpoint (net-epoch-N.mat)')
    p.add_argument('--imdb', required=True, help='imdb.mat (v7 or v7.3)')
    p.add_argument('--set', default='val', choices=sorted(_SETS),
                   help='which images (images.set: train 1, val 2, test 3; default val)')
    p.add_argument('--gpus', type=int, nargs='*', default=[], help='e.g. --gpus 0 (one GPU)')
    p.add_argument('--batch-size', type=int, default=256, help='images per forward pass (default 256)')
    p.add_argument('--no-prefetch', action='store_true', help='read batches in the main thread')
    p.add_argument('--quiet', action='store_true', help='no per-batch lines')
    p.add_argument('--json', action='store_true', help='print the result as one JSON line')
    add_debug_flag(p)
    return p


def check_fit(net, imdb, subset, model='model', imdb_path='imdb'):
    """Raise :class:`~pydagnn.cli.UsageError` when ``imdb``'s images or labels cannot go
    through ``net``: image size and channels against the net's input (shapes only, from
    the blocks' ``get_output_sizes``), labels against the classes of the score var."""
    data_shape = tuple(int(v) for v in imdb.images.data.shape)
    if len(data_shape) != 4:
        raise UsageError(f'{imdb_path}: images.data is {data_shape}, expected H x W x C x N')
    inputs = net.input_sizes(1)
    name = 'input' if 'input' in inputs else next(iter(inputs))
    want = tuple(int(v) for v in inputs[name][:3])
    got = 'x'.join(map(str, data_shape[:3]))
    meta = net.meta if isinstance(net.meta, dict) else {}
    declared = any(k in meta for k in ('inputs', 'inputSize')) or 'imageSize' in (
        meta.get('normalization') if isinstance(meta.get('normalization'), dict) else {})
    # a size the model declares is the one it was trained on (the GAP window depends on it)
    if declared and want != data_shape[:3]:
        raise UsageError(f'{imdb_path}: images of {got} do not fit {model} (its meta says '
                         f'{"x".join(map(str, want))})')
    inputs[name] = data_shape[:3] + (1,)
    try:
        sizes = net.get_var_sizes(inputs)
    except (ValueError, KeyError) as e:
        raise UsageError(f'{imdb_path}: images of {got} do not fit {model}: {e}') from None
    score = sizes.get(_score_var(net))
    if score is not None and all(v is not None for v in score[:3]):
        classes = int(np.prod(score[:3]))
        labels = np.asarray(imdb.images.labels).reshape(-1)
        sets = np.asarray(imdb.images.set).reshape(-1)
        picked = labels[sets == _SETS[subset]] if isinstance(subset, str) else labels
        if picked.size and picked.max() > classes:
            which = f'the {subset} images' if isinstance(subset, str) else 'the images'
            raise UsageError(f'{imdb_path}: labels of {which} go up to {int(picked.max())} but '
                             f'{model} scores {classes} classes')


def main(argv=None):
    """The command (run through :func:`pydagnn.cli.run_main` as ``python -m
    pydagnn.evaluate``); returns the result dict of :func:`evaluate`."""
    args = make_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f'--batch-size {args.batch_size}: must be at least 1')
    for flag, path in (('--model', args.model), ('--imdb', args.imdb)):
        if not os.path.isfile(path):
            raise UsageError(f'{flag} {path}: no such file')
    if args.gpus:
        check_gpus(args.gpus)
    from .io.imdb import load_imdb
    from .io.matconvnet import load_matconvnet
    net = load_matconvnet(args.model)
    with load_imdb(args.imdb) as imdb:
        check_fit(net, imdb, args.set, model=args.model, imdb_path=args.imdb)
        res = evaluate(net, imdb, args.set, batch_size=args.batch_size, gpus=args.gpus,
                       prefetch=not args.no_prefetch, log=None if args.quiet else print)
    if args.json:
        print(json.dumps({'model': args.model, 'set': args.set, **res}))
    else:
        print(f"{args.model} on {args.set} ({res['num']} images): top-1 error {res['top1error']:.4f}, "
              f"top-5 error {res['top5error']:.4f}, {res['images_per_s']:.1f} images/s")
    return res


if __name__ == '__main__':
    sys.exit(run_main(main))
