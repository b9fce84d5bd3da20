"""ResNet18's convolutions alone on the CPU: pydagnn (implicit GEMM where it applies),
pydagnn's im2col + OpenBLAS path (``PYDAGNN_CONV_GEMM=blas``) and PyTorch's
``F.conv2d`` (the CPU reference venv, in a subprocess), alternated per round.

  python benchmarks/bench_conv.py --torch-python /tmp/torchvenv/bin/python
  python benchmarks/bench_conv.py --rounds 5 --iters 5 --out conv.jsonl
  python benchmarks/bench_conv.py --layers s2,s5 --batch 8 --rounds 1 --no-torch   # quick

Each layer (the 3x3 and 1x1 convolutions of ResNet18-GAP at 64x64 input, batch
``--batch``; ``count`` is how often the net has it) is timed forward and backward (dx, dW;
no bias), the median of ``--iters`` calls after one warm-up. Per round the three
implementations run one after the other, so a change of load hits all three. Also
times the generated GEMM kernel alone on one convolution's implicit GEMM, on one thread
and on all worker threads at once (its peak on this machine) against numpy's OpenBLAS on
the same product. Prints JSON lines:

  {"kind": "round", "round", "impl", "layer", "forward_ms", "backward_ms"}
  {"kind": "layer", "layer", "shape", "count", per impl the medians over rounds and
   "gflops" (2 * MACs / time, forward and backward), "ratio_vs_torch" (torch time / pydagnn)}
  {"kind": "total", per impl the count-weighted sums of forward and backward ms,
   "ratio_vs_torch", "ratio_vs_blas"}
  {"kind": "gemm_peak", "gflops_1_thread", "gflops_all_threads", "threads",
   "openblas_gflops_1_thread"}
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/jsonl.py
from jsonl import emit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

#: (name, input size, Cin, Cout, filter, stride, how many in ResNet18-GAP)
LAYERS = [('stem', 64, 3, 16, 3, 1, 1), ('s2', 64, 16, 16, 3, 1, 4), ('s3a', 64, 16, 32, 3, 2, 1),
          ('s3', 32, 32, 32, 3, 1, 3), ('s3ad', 64, 16, 32, 1, 2, 1), ('s4a', 32, 32, 64, 3, 2, 1),
          ('s4', 16, 64, 64, 3, 1, 3), ('s4ad', 32, 32, 64, 1, 2, 1), ('s5a', 16, 64, 128, 3, 2, 1),
          ('s5', 8, 128, 128, 3, 1, 3), ('s5ad', 16, 64, 128, 1, 2, 1)]

TORCH_WORKER = r'''
import json, sys, time, torch
import torch.nn.functional as F
layers, batch, iters, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
out = {}
for name, H, ci, co, k, s, _ in layers:
    x = torch.randn(batch, ci, H, H, requires_grad=True)
    w = torch.randn(co, ci, k, k, requires_grad=True)
    y = F.conv2d(x, w, None, s, (k - 1) // 2); dy = torch.randn_like(y); y.backward(dy)
    tf, tb = [], []
    for _ in range(iters):
        t0 = time.perf_counter(); y = F.conv2d(x, w, None, s, (k - 1) // 2); tf.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); y.backward(dy); tb.append(time.perf_counter() - t0)
    tf.sort(); tb.sort()
    out[name] = [tf[len(tf) // 2] * 1e3, tb[len(tb) // 2] * 1e3]
print(json.dumps(out))
'''


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--iters', type=int, default=5)
    ap.add_argument('--layers', default=None, help='comma list of layer names (default: all)')
    ap.add_argument('--torch-python', default='/tmp/torchvenv/bin/python')
    ap.add_argument('--no-torch', action='store_true', help='time pydagnn only')
    ap.add_argument('--out', default=None)
    args = ap.parse_args(argv)
    names = [l[0] for l in LAYERS]
    args.layers = names if args.layers is None else args.layers.split(',')
    bad = [n for n in args.layers if n not in names]
    if bad:
        ap.error(f'--layers: unknown {bad}; known: {names}')
    return args


def _median_ms(fn, iters):
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _pydagnn_round(layers, batch, iters, impl):
    """{name: (forward ms, backward ms)} of pydagnn's conv, ``impl`` 'pydagnn' or 'blas'."""
    import numpy as np
    from pydagnn.layers.conv import conv_backward, conv_forward
    old = os.environ.get('PYDAGNN_CONV_GEMM')
    os.environ['PYDAGNN_CONV_GEMM'] = 'blas' if impl == 'blas' else ''
    try:
        rng = np.random.default_rng(0)
        out = {}
        for name, H, ci, co, k, s, _ in layers:
            x = np.asfortranarray(rng.standard_normal((H, H, ci, batch), dtype=np.float32))
            w = np.asfortranarray(rng.standard_normal((k, k, ci, co), dtype=np.float32))
            p = (k - 1) // 2
            dy = np.asfortranarray(rng.standard_normal(conv_forward(x, w, None, p, s).shape,
                                                       dtype=np.float32))
            out[name] = (_median_ms(lambda: conv_forward(x, w, None, p, s), iters),
                         _median_ms(lambda: conv_backward(x, w, None, dy, p, s), iters))
        return out
    finally:
        if old is None:
            os.environ.pop('PYDAGNN_CONV_GEMM', None)
        else:
            os.environ['PYDAGNN_CONV_GEMM'] = old


def _torch_round(args, layers):
    from pydagnn.layers.kernels.threads_cpu import num_workers
    arg = json.dumps([layers, args.batch, args.iters, num_workers()])
    res = subprocess.run([args.torch_python, '-c', TORCH_WORKER, arg], capture_output=True,
                         text=True, check=True)
    return {k: tuple(v) for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def _macs(layer, batch):
    name, H, ci, co, k, s, _ = layer
    ho = (H + 2 * ((k - 1) // 2) - k) // s + 1
    return batch * ho * ho * co * ci * k * k


def gemm_peak(rounds=200):
    """GFLOP/s of the generated kernel on one implicit GEMM (16x16x64 -> 64, 4 images
    stacked), on one thread and on every worker thread at once; OpenBLAS on the same
    product (as an explicit matrix) on one thread."""
    import numpy as np
    from pydagnn.layers import conv as cv
    from pydagnn.layers import conv_implicit as ci
    from pydagnn.layers.kernels import gemm_cpu
    from pydagnn.layers.kernels.threads_cpu import num_workers
    x = np.asfortranarray(np.random.default_rng(0).random((16, 16, 64, 4), dtype=np.float32))
    w = np.asfortranarray(np.random.default_rng(1).random((3, 3, 64, 64), dtype=np.float32))
    g = cv._Geom(x, w, None, 1, 1, 1, 'bench')
    im = ci.Implicit(g, 4)
    kern = gemm_cpu.kernel_for(64, im.ncols, np.float32, mode='btab')
    if kern is None:
        return None
    wp = ci.row_blocks(kern, g.wmat())

    def call():
        buf = im.phase_buffer()
        ypad = np.empty((64, g.Wo * im.Hph), np.float32)
        return kern.prepare(wp, im.source(buf, g.x.T, 0), ypad[:, :im.ncols], a_panels=True,
                            b_offsets=im.boff)
    flop = 2 * 64 * g.K * im.ncols

    def rate(n):
        calls = [call() for _ in range(n)]
        for c in calls:
            c()
        ts = [0.0] * n

        def run(i):
            t0 = time.perf_counter()
            for _ in range(rounds):
                calls[i]()
            ts[i] = time.perf_counter() - t0
        th = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in th:
            t.start()
        for t in th:
            t.join()
        return n * flop * rounds / (time.perf_counter() - t0) / 1e9
    a = np.random.default_rng(2).random((64, g.K), dtype=np.float32)
    b = np.random.default_rng(3).random((g.K, im.ncols), dtype=np.float32)
    c = np.empty((64, im.ncols), np.float32)
    blas = flop / (_median_ms(lambda: np.matmul(a, b, out=c), 50) / 1e3) / 1e9
    n = num_workers()
    return {'kind': 'gemm_peak', 'gflops_1_thread': round(rate(1), 1),
            'gflops_all_threads': round(rate(n), 1), 'threads': n,
            'openblas_gflops_1_thread': round(blas, 1), 'kernel': repr(kern)}


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    layers = [l for l in LAYERS if l[0] in args.layers]
    impls = ['pydagnn', 'blas'] + ([] if args.no_torch else ['torch'])
    res = {i: {l[0]: [] for l in layers} for i in impls}
    load_start = [round(v, 2) for v in os.getloadavg()]
    for r in range(args.rounds):
        for impl in impls:
            times = _torch_round(args, layers) if impl == 'torch' else \
                _pydagnn_round(layers, args.batch, args.iters, impl)
            for name, (f, b) in times.items():
                res[impl][name].append((f, b))
                emit({'kind': 'round', 'round': r, 'impl': impl, 'layer': name,
                      'forward_ms': round(f, 3), 'backward_ms': round(b, 3)}, args.out)
    totals = {i: [0.0, 0.0] for i in impls}
    for layer in layers:
        name, count = layer[0], layer[6]
        rec = {'kind': 'layer', 'layer': name, 'shape': list(layer[1:6]), 'count': count}
        macs = _macs(layer, args.batch)
        for impl in impls:
            f = statistics.median(t[0] for t in res[impl][name])
            b = statistics.median(t[1] for t in res[impl][name])
            totals[impl][0] += count * f
            totals[impl][1] += count * b
            rec[impl] = {'forward_ms': round(f, 3), 'backward_ms': round(b, 3),
                         'forward_gflops': round(2 * macs / f / 1e6, 1),
                         'backward_gflops': round(4 * macs / b / 1e6, 1)}
        if 'torch' in impls:
            rec['ratio_vs_torch'] = round(sum(rec['torch'][k] for k in ('forward_ms', 'backward_ms'))
                                          / sum(rec['pydagnn'][k] for k in ('forward_ms', 'backward_ms')), 3)
        emit(rec, args.out)
    total = {'kind': 'total', 'batch': args.batch, 'rounds': args.rounds, 'layers': args.layers,
             'load_avg_start': load_start, 'load_avg_end': [round(v, 2) for v in os.getloadavg()]}
    for impl in impls:
        total[impl] = {'forward_ms': round(totals[impl][0], 2), 'backward_ms': round(totals[impl][1], 2)}
    total['ratio_vs_blas'] = round(sum(totals['blas']) / sum(totals['pydagnn']), 3)
    if 'torch' in impls:
        total['ratio_vs_torch'] = round(sum(totals['torch']) / sum(totals['pydagnn']), 3)
    emit(total, args.out)
    peak = gemm_peak()
    if peak:
        emit(peak, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
