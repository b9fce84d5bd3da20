"""Layer micro-benchmarks (CPU): convolution, pooling and numpy's own GEMM.

Prints one JSON line per case:
  {"op", "shape", "batch", "dtype", "forward_ms", "backward_ms", "forward_gflops",
   "backward_gflops", "repeat", "threads"}
Times are medians of ``--repeat`` timed runs after two warm-up runs. Convolution FLOPs
count one multiply-add as 2: forward ``2*Ho*Wo*Cout*FH*FW*Cin*N``, backward twice that
(dx and dw). Pooling lines report the windows' element reads as "FLOP" (1 per tap).

  python benchmarks/bench_layers.py                      # everything, batch 32
  python benchmarks/bench_layers.py --ops conv,gemm --batch 64 --repeat 5
  python benchmarks/bench_layers.py --ops conv3x3_16x16x128
Ops: gemm, conv (all conv cases), pool (all pooling cases), or case names (see --list).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# (name, H, W, Cin, Cout, FH, FW, pad, stride)
CONV_CASES = [
    ('conv3x3_64x64x16', 64, 64, 16, 16, 3, 3, 1, 1),
    ('conv3x3_32x32x32', 32, 32, 32, 32, 3, 3, 1, 1),
    ('conv3x3_16x16x64', 16, 16, 64, 64, 3, 3, 1, 1),
    ('conv3x3_16x16x128', 16, 16, 128, 128, 3, 3, 1, 1),
    ('conv3x3_s2_64x64x16to32', 64, 64, 16, 32, 3, 3, 1, 2),
    ('conv1x1_16x16x128to256', 16, 16, 128, 256, 1, 1, 0, 1),
    ('conv1x1_16x16x256to128', 16, 16, 256, 128, 1, 1, 0, 1),
    ('conv1x1_s2_64x64x16to32', 64, 64, 16, 32, 1, 1, 0, 2),
]
# (name, H, W, C, pool, method, pad, stride)
POOL_CASES = [
    ('maxpool3x3s2_64x64x16', 64, 64, 16, 3, 'max', 1, 2),
    ('avgpool3x3s2_64x64x16', 64, 64, 16, 3, 'avg', 1, 2),
    ('avgpool8x8_gap_8x8x128', 8, 8, 128, 8, 'avg', 0, 1),
    ('maxpool2x2s2_32x32x32', 32, 32, 32, 2, 'max', 0, 2),
]
DEFAULT_CONV = [c[0] for c in CONV_CASES[:4]]


def _median_ms(fn, repeat, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def _threads():
    try:
        import numba
        return numba.get_num_threads()
    except Exception:  # pragma: no cover
        return None


def bench_gemm(n, repeat, dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype=dtype)
    ms = _median_ms(lambda: np.matmul(a, b, out=c), repeat)
    return {'op': 'numpy_gemm', 'shape': [n, n, n], 'batch': 1, 'dtype': np.dtype(dtype).name,
            'forward_ms': round(ms, 3), 'backward_ms': None,
            'forward_gflops': round(2 * n ** 3 / ms / 1e6, 2), 'backward_gflops': None}


def bench_conv(case, batch, repeat, dtype):
    from pydagnn.layers.conv import conv_forward, conv_backward, conv_output_size
    name, H, W, Cin, Cout, FH, FW, pad, stride = case
    rng = np.random.default_rng(0)
    x = np.asfortranarray(rng.standard_normal((H, W, Cin, batch)).astype(dtype))
    w = np.asfortranarray((rng.standard_normal((FH, FW, Cin, Cout)) * 0.1).astype(dtype))
    b = rng.standard_normal(Cout).astype(dtype)
    Ho, Wo = conv_output_size(H, W, FH, FW, pad, stride)
    dy = np.asfortranarray(rng.standard_normal((Ho, Wo, Cout, batch)).astype(dtype))
    fwd = _median_ms(lambda: conv_forward(x, w, b, pad=pad, stride=stride), repeat)
    bwd = _median_ms(lambda: conv_backward(x, w, b, dy, pad=pad, stride=stride), repeat)
    flops = 2.0 * Ho * Wo * Cout * FH * FW * Cin * batch
    return {'op': name, 'shape': [H, W, Cin, Cout, FH, FW], 'pad': pad, 'stride': stride,
            'batch': batch, 'dtype': np.dtype(dtype).name,
            'forward_ms': round(fwd, 3), 'backward_ms': round(bwd, 3),
            'forward_gflops': round(flops / fwd / 1e6, 2),
            'backward_gflops': round(2 * flops / bwd / 1e6, 2)}


def bench_pool(case, batch, repeat, dtype):
    from pydagnn.layers.pool import pool_forward, pool_backward
    name, H, W, C, ps, method, pad, stride = case
    rng = np.random.default_rng(0)
    x = np.asfortranarray(rng.standard_normal((H, W, C, batch)).astype(dtype))
    y = pool_forward(x, ps, method, pad=pad, stride=stride)
    dy = np.asfortranarray(rng.standard_normal(y.shape).astype(dtype))
    fwd = _median_ms(lambda: pool_forward(x, ps, method, pad=pad, stride=stride), repeat)
    bwd = _median_ms(lambda: pool_backward(x, dy, ps, method, pad=pad, stride=stride), repeat)
    taps = float(y.size) * ps * ps
    return {'op': name, 'shape': [H, W, C], 'pool': ps, 'method': method, 'pad': pad,
            'stride': stride, 'batch': batch, 'dtype': np.dtype(dtype).name,
            'forward_ms': round(fwd, 3), 'backward_ms': round(bwd, 3),
            'forward_gflops': round(taps / fwd / 1e6, 3),
            'backward_gflops': round(taps / bwd / 1e6, 3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--repeat', type=int, default=7)
    ap.add_argument('--ops', default='gemm,conv,pool',
                    help='comma list of gemm, conv, conv_all, pool, or case names')
    ap.add_argument('--gemm-size', type=int, default=2048)
    ap.add_argument('--dtype', default='float32', choices=['float32', 'float64'])
    ap.add_argument('--list', action='store_true', help='list the case names and exit')
    args = ap.parse_args(argv)
    if args.list:
        for c in CONV_CASES + POOL_CASES:
            print(c[0])
        return 0
    dtype = np.dtype(args.dtype)
    ops = [o.strip() for o in args.ops.split(',') if o.strip()]
    conv_by, pool_by = {c[0]: c for c in CONV_CASES}, {c[0]: c for c in POOL_CASES}
    todo = []
    for o in ops:
        if o == 'gemm':
            todo.append(('gemm', None))
        elif o == 'conv':
            todo += [('conv', conv_by[n]) for n in DEFAULT_CONV]
        elif o == 'conv_all':
            todo += [('conv', c) for c in CONV_CASES]
        elif o == 'pool':
            todo += [('pool', c) for c in POOL_CASES]
        elif o in conv_by:
            todo.append(('conv', conv_by[o]))
        elif o in pool_by:
            todo.append(('pool', pool_by[o]))
        else:
            ap.error(f'unknown op {o!r} (see --list)')
    for kind, case in todo:
        if kind == 'gemm':
            rec = bench_gemm(args.gemm_size, args.repeat, dtype)
        elif kind == 'conv':
            rec = bench_conv(case, args.batch, args.repeat, dtype)
        else:
            rec = bench_pool(case, args.batch, args.repeat, dtype)
        rec['repeat'] = args.repeat
        rec['threads'] = _threads()
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
