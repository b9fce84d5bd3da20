"""Whole-model training throughput: forward + backward of a built model on random data.

  python benchmarks/bench_train.py --device cpu --model ResNet18-GM-SOP --batch 32
  python benchmarks/bench_train.py --model ResNet18-GAP --batch 64 --iters 10 --warmup 2 --threads 2

Times ``net.eval({'input', 'label'}, {'objective': 1})`` in 'normal' mode (what one SGD
step computes, without the update), then a forward-only pass in 'test' mode, and prints
JSON lines:

  {"kind": "train", "model", "device", "batch", "threads", "iters", "warmup",
   "images_per_s" (batch / median seconds of the timed iterations), "step_s_median",
   "step_s_all", "cpu_s_median" (process CPU seconds per step, all threads),
   "images_per_cpu_s" (batch / cpu_s_median: throughput per core-second, which other
   processes on a shared machine distort far less than wall-clock time),
   "forward_test_images_per_s", "peak_rss_mb", "params", "blas_threads",
   "load_avg"}
  {"kind": "split", "cm_share" (time in layers named CM_* and Fusion_out over the time
   in all layers), "gm_share" (CM_*, Fusion_out, gating*, H_x, gating, Balance_loss),
   "layer_total_s_per_iter", "wall_s_per_iter", "by_type_s_per_iter"}
  {"kind": "top_layers", "layers": [[name, type, forward_ms, backward_ms, share], ...]}

Layer times are sums over the timed iterations of ``layer.forward_time +
layer.backward_time`` (the engine's per-layer clocks; zeroed before each iteration so a
skipped CM counts 0), reported per iteration. For the test-mode pass the BN moments are
set to mean 0 / sigma 1 (a fresh net's moments are 0, which makes test mode divide by 0).

Devices: ``cpu`` here; ``--device gpu`` is handed over to ``bench_train_gpu.py``
(CuPy: CUDA-event timing, the SGD update inside the step, device memory, synchronised
per-layer clocks; extra options ``--tf32``, ``--profile-iters``, ``--no-update``).
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

_THREAD_VARS = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMBA_NUM_THREADS')
_BLAS_VARS = ('OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu', choices=sorted(DEVICES))
    ap.add_argument('--model', default='ResNet18-GM-SOP')
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--iters', type=int, default=5, help='timed iterations (default 5)')
    ap.add_argument('--warmup', type=int, default=2, help='untimed iterations first (default 2)')
    ap.add_argument('--threads', type=int, default=None,
                    help='BLAS / numba threads (default: the libraries\' own default)')
    ap.add_argument('--blas-threads', type=int, default=None,
                    help='BLAS threads only (OPENBLAS_NUM_THREADS, MKL_NUM_THREADS), overriding '
                         '--threads for BLAS: e.g. --threads 2 --blas-threads 1')
    ap.add_argument('--num-classes', type=int, default=1000)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--no-test-pass', action='store_true', help='skip the forward-only test-mode timing')
    return ap.parse_args(argv)


class CpuDevice:
    name = 'cpu'

    def prepare(self, net):
        return net

    def array(self, x):
        return x

    def sync(self):
        pass


class GpuDevice:
    """The GPU (CuPy) device: the whole GPU run lives in bench_train_gpu.py (CUDA-event
    timing, SGD update in the step, device memory, synchronised per-layer clocks);
    ``main`` hands ``--device gpu`` over to it."""
    name = 'gpu'

    def prepare(self, net):
        net.move('gpu')
        return net

    def array(self, x):
        import cupy
        return cupy.asarray(x)

    def sync(self):
        from pydagnn import backend
        backend.synchronize()


DEVICES = {'cpu': CpuDevice, 'gpu': GpuDevice}


def _gpu_requested(argv):
    for i, a in enumerate(argv):
        if a == '--device=gpu' or (a == '--device' and i + 1 < len(argv) and argv[i + 1] == 'gpu'):
            return True
    return False


def _peak_rss_mb():
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024 if sys.platform != 'darwin' else kb / 2 ** 20, 1)


def _threads_in_use():
    try:
        import numba
        return numba.get_num_threads()
    except Exception:  # pragma: no cover
        return None


def _blas_threads():
    try:
        import threadpoolctl
        return [p['num_threads'] for p in threadpoolctl.threadpool_info() if p.get('user_api') == 'blas'] or None
    except Exception:
        return os.environ.get('OPENBLAS_NUM_THREADS')


def _load():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _zero_clocks(net):
    for l in net.layers:
        l.forward_time = 0.0
        l.backward_time = 0.0


def unit_bn_moments(net):
    """Set every BN layer's moments to mean 0 / sigma 1, on the moments' device (a fresh
    net's moments are 0, which makes test mode divide by 0)."""
    from pydagnn.backend import get_array_module
    for l in net.layers:
        if l.type == 'dagnn.BatchNorm':
            m = net.get_param(l.params[2])
            v = get_array_module(m.value).zeros_like(m.value)
            v[:, 1] = 1
            m.value = v


def layer_records(net, fwd, bwd, n, tags, timing):
    """The 'split' and 'top_layers' JSON records of per-layer clocks summed over ``n``
    iterations (``fwd`` / ``bwd``: layer name -> seconds). ``tags`` go after 'kind' in
    both; ``timing`` (wall-clock figures) after the layer total in 'split'."""
    total = sum(fwd.values()) + sum(bwd.values())
    is_cm = lambda name: name.startswith('CM_') or name == 'Fusion_out'  # noqa: E731
    is_gm = lambda name: is_cm(name) or name.startswith('gating') or name in ('H_x', 'Balance_loss')  # noqa: E731
    cm = sum(fwd[k] + bwd[k] for k in fwd if is_cm(k))
    gm = sum(fwd[k] + bwd[k] for k in fwd if is_gm(k))
    split = {'kind': 'split', **tags, 'cm_share': round(cm / total, 4) if total else None,
             'gm_share': round(gm / total, 4) if total else None,
             'layer_total_s_per_iter': round(total / n, 4), **timing}
    # time by layer type, and the trunk / GM split
    by_type = {}
    for l in net.layers:
        by_type[l.type] = by_type.get(l.type, 0.0) + fwd[l.name] + bwd[l.name]
    split['by_type_s_per_iter'] = {k.replace('dagnn.', ''): round(v / n, 4)
                                   for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}
    types = {l.name: l.type.replace('dagnn.', '') for l in net.layers}
    top = sorted(fwd, key=lambda k: -(fwd[k] + bwd[k]))[:10]
    top_layers = {'kind': 'top_layers', **tags,
                  'layers': [[k, types[k], round(1e3 * fwd[k] / n, 2), round(1e3 * bwd[k] / n, 2),
                              round((fwd[k] + bwd[k]) / total, 4) if total else None] for k in top]}
    return split, top_layers


def run(args):
    import numpy as np
    from pydagnn.models import build

    dev = DEVICES[args.device]()
    net = dev.prepare(build(args.model, num_classes=args.num_classes, seed=args.seed))
    rng = np.random.default_rng(args.seed + 1)
    size = int(net.meta['normalization']['imageSize'][0])
    x = dev.array(np.asfortranarray((rng.standard_normal((size, size, 3, args.batch)) * 50).astype(np.float32)))
    label = dev.array(rng.integers(1, args.num_classes + 1, size=args.batch).astype(np.float32))
    feed = {'input': x, 'label': label}

    net.mode = 'normal'
    for _ in range(args.warmup):
        net.eval(feed, {'objective': 1})
    dev.sync()
    steps, cpu = [], []
    fwd = {l.name: 0.0 for l in net.layers}
    bwd = dict(fwd)
    for _ in range(args.iters):
        _zero_clocks(net)
        c0, t0 = time.process_time(), time.perf_counter()
        net.eval(feed, {'objective': 1})
        dev.sync()
        steps.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        for l in net.layers:
            fwd[l.name] += l.forward_time
            bwd[l.name] += l.backward_time
    med = float(np.median(steps))
    rec = {'kind': 'train', 'model': args.model, 'device': dev.name, 'batch': args.batch,
           'threads': _threads_in_use(), 'blas_threads': _blas_threads(), 'iters': args.iters, 'warmup': args.warmup,
           'images_per_s': round(args.batch / med, 2), 'step_s_median': round(med, 4),
           'step_s_all': [round(s, 4) for s in steps],
           'cpu_s_median': round(float(np.median(cpu)), 4),
           'images_per_cpu_s': round(args.batch / float(np.median(cpu)), 2),
           'params': net.num_params()}

    if not args.no_test_pass:
        unit_bn_moments(net)
        net.mode = 'test'
        net.eval(feed)
        dev.sync()
        ts = []
        for _ in range(max(1, args.iters)):
            t0 = time.perf_counter()
            net.eval(feed)
            dev.sync()
            ts.append(time.perf_counter() - t0)
        rec['forward_test_images_per_s'] = round(args.batch / float(np.median(ts)), 2)
        net.mode = 'normal'
    rec['peak_rss_mb'] = _peak_rss_mb()
    rec['load_avg'] = _load()   # other processes on the machine skew every number
    print(json.dumps(rec), flush=True)

    for r in layer_records(net, fwd, bwd, args.iters, {'model': args.model},
                           {'wall_s_per_iter': round(med, 4)}):
        print(json.dumps(r), flush=True)
    return rec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if _gpu_requested(argv):
        import bench_train_gpu   # benchmarks/ is on sys.path (this script's folder)
        return bench_train_gpu.main(argv)
    args = _parse(argv)
    if args.threads:
        for v in _THREAD_VARS:  # before numpy / numba are imported
            os.environ[v] = str(args.threads)
    if args.blas_threads:
        for v in _BLAS_VARS:
            os.environ[v] = str(args.blas_threads)
    run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
