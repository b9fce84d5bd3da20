"""Data-parallel training cost: 1 rank against 2 ranks at one global batch (JSON lines).

  python benchmarks/bench_parallel.py                      # CPU: 1 and 2 MPI ranks, the demo GM-SOP
  python benchmarks/bench_parallel.py --ranks 1 2 4 --batch 64 --images 1024
  python benchmarks/bench_parallel.py --raw-params 10352776   # allreduce of ResNet18-GM-SOP's params
  python benchmarks/bench_parallel.py --gpus 0 --comm nccl    # NCCL path, world size 1 (GPU machine)

For each world size N it starts ``<venv>/bin/mpiexec -n N python -m mpi4py`` on itself
(``--worker``); each rank opens the same lazy v7.3 imdb (generated once under /tmp) and
trains one epoch of the reduced GM-SOP of the demo (``examples/cnn_imagenet64.py`` without
--imdb) through ``cnn_train_dag`` at the global batch ``--batch``, timing every allreduce.
Rank 0 prints::

  {"kind": "train", "ranks", "comm", "batch", "images", "steps", "images_per_s" (after
   the first 2 steps), "step_s_median", "allreduce_ms_per_step" (the gradient and the
   mask + statistics allreduces of a step, median: the ranks are already in step there,
   so this is the transfer), "wait_ms_per_step" (the step's first collective, the
   allgather of the statistics' names, where the faster rank waits for the slower), "allreduce_share" (of the median step),
   "bytes_per_step" (derivative bytes each rank sends into the allreduce),
   "peak_rss_mb_per_rank": [...], "load_avg"}

then the speed-up of each N over 1. ``--raw-params P`` times one in-place float32
allreduce of P values (median of 20) for each N instead:
``{"kind": "allreduce", "ranks", "params", "bytes", "ms_median", "gb_per_s"}``.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402


class TimedComm:
    """A communicator wrapper that adds up the seconds spent in allreduce."""

    def __init__(self, comm):
        self.inner = comm
        self.seconds = 0.0
        self.wait = 0.0   # in the first collective of a step: where a rank waits for the slower one

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def where(self):
        return self.inner.where

    @where.setter
    def where(self, value):
        self.inner.where = value

    def allreduce(self, buf, op='sum', exact=False):
        t0 = time.perf_counter()
        out = self.inner.allreduce(buf, op, exact)
        if backend_is_gpu(buf):
            import cupy
            cupy.cuda.get_current_stream().synchronize()
        self.seconds += time.perf_counter() - t0
        return out

    def allgather_bytes(self, data):
        t0 = time.perf_counter()
        out = self.inner.allgather_bytes(data)
        self.wait += time.perf_counter() - t0
        return out


def backend_is_gpu(buf):
    return type(buf).__module__.startswith('cupy')


def _imdb_path(images, size):
    from pydagnn.io.imdb import synth_imdb
    path = f'/tmp/pydagnn-bench-parallel-{images}-{size}.mat'
    if not os.path.exists(path):
        synth_imdb(path + '.part', num_train=images, num_val=0, num_classes=20, size=size, seed=0)
        os.replace(path + '.part', path)
    return path


def worker(args):
    from pydagnn.io.imdb import load_imdb
    from pydagnn.models import build
    from pydagnn.parallel import make_comm
    from pydagnn.train import cnn_train_dag
    from pydagnn.data import get_batch
    comm = TimedComm(make_comm(args.comm, args.gpus, 120.0))
    if args.raw_params:
        return raw_allreduce(comm, args.raw_params)
    imdb = load_imdb(args.imdb)
    net = build('ResNet18-GM-SOP', num_classes=20, image_size=args.size, seed=0, section_len=1, cm_num=4,
                topk=2, gating_widths=(32, 16), cm_widths=(32, 16), average_image=imdb.meta.rgbMean)
    steps = []
    marks = []
    waits = []

    def log(line):
        if line.startswith('train:') and ' Hz' in line:
            steps.append(time.perf_counter())
            marks.append(comm.seconds)
            waits.append(comm.wait)

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        cnn_train_dag(net, imdb, get_batch, exp_dir=d, batch_size=args.batch, num_epochs=1, learning_rate=0.01,
                      plot_statistics=False, continue_=False, comm=comm, gpus=args.gpus, log=log, prefetch=True)
    from pydagnn.gradsync import GradBuffer
    nbytes = GradBuffer(net).bytes_per_step
    rss = np.array([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    all_rss = np.zeros(comm.size)
    all_rss[comm.rank] = rss[0]
    comm.inner.allreduce(all_rss, 'sum')
    if comm.rank != 0:
        return
    t = np.diff(np.r_[t0, steps])
    a = np.diff(np.r_[0.0, marks])
    w = np.diff(np.r_[0.0, waits])
    skip = 2 if t.size > 4 else 0
    step = float(np.median(t[skip:]))
    ar = float(np.median(a[skip:]))
    n_img = int(imdb.images.data.shape[3])
    per_step = args.batch
    print(json.dumps({'kind': 'train', 'ranks': comm.size, 'comm': comm.inner.name, 'batch': args.batch,
                      'images': n_img, 'steps': int(t.size),
                      'images_per_s': round(per_step * (t.size - skip) / float(t[skip:].sum()), 2),
                      'step_s_median': round(step, 4), 'allreduce_ms_per_step': round(ar * 1e3, 3),
                      'wait_ms_per_step': round(float(np.median(w[skip:])) * 1e3, 3),
                      'allreduce_share': round(ar / step, 4), 'bytes_per_step': int(nbytes),
                      'peak_rss_mb_per_rank': [round(float(v), 1) for v in all_rss],
                      'load_avg': os.getloadavg()[0]}), flush=True)


def raw_allreduce(comm, params):
    xp = np
    if comm.name == 'nccl':
        import cupy as xp
    buf = xp.ones(int(params), dtype=np.float32)
    times = []
    for i in range(22):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce(buf, 'sum')
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()
        times.append(time.perf_counter() - t0)
    if comm.rank == 0:
        ms = float(np.median(times[2:])) * 1e3
        print(json.dumps({'kind': 'allreduce', 'ranks': comm.size, 'comm': comm.name, 'params': int(params),
                          'bytes': int(params) * 4, 'ms_median': round(ms, 3),
                          'gb_per_s': round(params * 4 / ms / 1e6, 3)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--ranks', type=int, nargs='+', default=[1, 2])
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--images', type=int, default=768)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--raw-params', type=int)
    p.add_argument('--comm', default='auto', help="auto | mpi | nccl (default auto)")
    p.add_argument('--gpus', type=int, nargs='*', default=[])
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--imdb', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from pydagnn.launch import launch_command
    imdb = None if args.raw_params else _imdb_path(args.images, args.size)
    results = {}
    for n in args.ranks:
        argv = ['--worker', '--batch', str(args.batch), '--size', str(args.size), '--comm',
                'mpi' if args.comm == 'auto' else args.comm]
        argv += ['--imdb', imdb] if imdb else ['--raw-params', str(args.raw_params)]
        if args.gpus:
            argv += ['--gpus', *map(str, args.gpus[:n])]
        out = subprocess.run(launch_command(n, __file__, argv), capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(f'bench_parallel: {n} ranks failed (exit {out.returncode})')
        for line in out.stdout.splitlines():
            if line.startswith('{'):
                print(line, flush=True)
                results[n] = json.loads(line)
    if 1 in results and not args.raw_params:
        base = results[1]['images_per_s']
        for n, r in results.items():
            if n != 1:
                print(json.dumps({'kind': 'speedup', 'ranks': n, 'over_1_rank': round(r['images_per_s'] / base, 3)}))


if __name__ == '__main__':
    main()
