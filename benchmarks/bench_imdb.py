"""imdb.mat at ImageNet64 scale: write N synthetic 64x64x3 images with the streaming writer,
then, in a fresh process, time ``load_imdb`` (and its peak RSS) and random 256-image batch
reads: cold (the file's pages evicted with posix_fadvise first, so the disk is read) and
warm (the same batch read just before, so the page cache serves it).
Prints JSON lines.

    python benchmarks/bench_imdb.py                          # N = 20000 in a temp dir
    python benchmarks/bench_imdb.py --n 1281167 --path /big/disk/imdb_bench.mat   # ~16 GB

The file is deleted afterwards unless --keep; --reuse measures an existing file.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/rss.py
from rss import peak_rss_mb, ru_maxrss_mb  # noqa: E402




def _evict(path):
    if not hasattr(os, 'posix_fadvise'):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def write(path, n, layout, chunk=2048, seed=0):
    from pydagnn.io.imdb import ImdbWriter
    rng = np.random.default_rng(seed)
    block = np.frombuffer(rng.bytes(64 * 64 * 3 * chunk), np.uint8).reshape(64, 64, 3, chunk).copy()
    labels = rng.integers(1, 1001, n).astype(np.float64)
    t = time.perf_counter()
    ntrain = n - n // 25
    with ImdbWriter(path, n, image_size=(64, 64), layout=layout) as w:
        for a in range(0, n, chunk):
            k = min(chunk, n - a)
            imgs = block[:, :, :, :k]
            imgs[0, 0, 0, :] = np.arange(a, a + k) % 251          # a mark per image
            w.append(imgs, labels[a:a + k], np.where(np.arange(a, a + k) < ntrain, 1, 2))
        w.meta['rgbMean'] = np.array([[122.0], [116.0], [104.0]])
        w.meta['rgbCovariance'] = np.eye(3)
    dt = time.perf_counter() - t
    gb = os.path.getsize(path) / 1e9
    return {'bench': 'imdb_write', 'n': n, 'layout': layout, 'seconds': round(dt, 2),
            'file_gb': round(gb, 3), 'mb_per_s': round(gb * 1e3 / dt, 1)}


def measure(path, batch, reps, seed=1):
    rss0 = peak_rss_mb()
    from pydagnn.io.imdb import load_imdb
    rss_import = peak_rss_mb()
    t = time.perf_counter()
    imdb = load_imdb(path)
    load_s = time.perf_counter() - t
    rss_load = peak_rss_mb()
    data = imdb.images.data
    n = data.shape[3]
    rng = np.random.default_rng(seed)
    batches = [rng.choice(n, batch, replace=False) for _ in range(reps)]
    for idx in batches[:3]:                     # check the marks
        x = data[:, :, :, idx]
        assert x.shape == (64, 64, 3, batch) and x.flags.f_contiguous
        assert np.array_equal(x[0, 0, 0, :], idx % 251)
    cold = []                                   # the file's pages evicted first: disk reads
    for idx in batches[:max(5, reps // 5)]:
        if not _evict(path):
            break
        t = time.perf_counter()
        data[:, :, :, idx]
        cold.append(time.perf_counter() - t)
    warm = []                                   # the same images read just before: page cache
    for idx in batches:
        data[:, :, :, idx]
        t = time.perf_counter()
        data[:, :, :, idx]
        warm.append(time.perf_counter() - t)
    seq = []
    for i in range(min(reps, max(1, n // batch))):
        a = int(rng.integers(0, max(1, n - batch)))
        data[:, :, :, a:a + batch]
        t = time.perf_counter()
        data[:, :, :, a:a + batch]
        seq.append(time.perf_counter() - t)
    out = {'bench': 'imdb_load', 'n': n, 'storage': type(data._source).__name__.strip('_'),
           'load_s': round(load_s, 4), 'rss_mb_before_import': round(rss0, 1),
           'rss_mb_after_import': round(rss_import, 1), 'rss_mb_after_load': round(rss_load, 1),
           'batch': batch, 'reps': reps,
           'warm_random_batch_ms_median': round(1e3 * float(np.median(warm)), 2),
           'warm_random_batch_ms_p90': round(1e3 * float(np.percentile(warm, 90)), 2),
           'warm_seq_batch_ms_median': round(1e3 * float(np.median(seq)), 2)}
    if cold:
        out['cold_random_batch_ms_median'] = round(1e3 * float(np.median(cold)), 2)
        out['cold_reps'] = len(cold)
    out['peak_rss_mb'] = round(peak_rss_mb(), 1)
    out['ru_maxrss_mb'] = round(ru_maxrss_mb(), 1)
    imdb.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=20000)
    ap.add_argument('--path', default=None, help='file to write (default: a temp dir)')
    ap.add_argument('--layout', choices=('contiguous', 'chunked'), default='contiguous')
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--reps', type=int, default=50)
    ap.add_argument('--keep', action='store_true', help='keep the file')
    ap.add_argument('--reuse', action='store_true', help='measure an existing file, do not write')
    ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.path, args.batch, args.reps)), flush=True)
        return
    tmpdir = None
    path = args.path
    if path is None:
        tmpdir = tempfile.mkdtemp(prefix='bench_imdb_')
        path = os.path.join(tmpdir, 'imdb_bench.mat')
    try:
        if not args.reuse:
            print(json.dumps(write(path, args.n, args.layout)), flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), '--child', '--path', path,
               '--batch', str(args.batch), '--reps', str(args.reps)]
        subprocess.run(cmd, check=True)
    finally:
        if not args.keep and not args.reuse:
            try:
                os.unlink(path)
            except OSError:
                pass
            if tmpdir:
                os.rmdir(tmpdir)


if __name__ == '__main__':
    main()
