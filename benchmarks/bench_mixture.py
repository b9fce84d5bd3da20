"""The mixture alone: K routed component chains + CM_out, looped against batched.

  python benchmarks/bench_mixture.py                       # N=32, k=8, K=16, 8x8x256 input
  python benchmarks/bench_mixture.py --rounds 7 --iters 3 --out mixture.jsonl

A DagNN of just the mixture, as GM-SOP builds it: inputs ``x`` (``8 x 8 x C x N``) and
the gate ``gating`` (a top-k selection of K components per image, random weights); per
component ``CM_<i>_``: 1x1 conv C -> 256, ReLU, 1x1 conv 256 -> 128, ReLU,
covariance pooling, trace norm, Newton-Schulz (3 iterations), ScaleTr; ``Fusion_out``
(CM_out). The batched path is the net's fused group
(:func:`pydagnn.models.gm.set_batched_mixture` on), the looped path the layers one by
one (off). Each round times both, alternately: ``forward`` (eval without derivatives)
and ``forward_backward`` (eval with ``der_outputs = {'Fusion_out': dz}``), the median
of ``--iters`` calls after one warm-up. Prints JSON lines:

  {"kind": "round", "round", "path", "forward_s", "forward_backward_s", "forward_cpu_s",
   "forward_backward_cpu_s" (process CPU seconds, all threads), "load_avg"}
  {"kind": "mixture", "N", "k", "K", "C", medians over rounds per path,
   "speedup_forward", "speedup_forward_backward" (looped / batched wall time),
   "cpu_ratio_forward_backward" (looped / batched CPU time), "load_avg_start",
   "load_avg_end"}
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/jsonl.py
from jsonl import emit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--N', type=int, default=32)
    ap.add_argument('--k', type=int, default=8)
    ap.add_argument('--K', type=int, default=16)
    ap.add_argument('--C', type=int, default=256)
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--iters', type=int, default=3)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default=None)
    return ap.parse_args(argv)


def mixture_net(K, C, dtype):
    """The DagNN of K component chains on var ``x`` routed by var ``gating``, fused by
    ``Fusion_out``; the batched group set (see :func:`set_batched_mixture`)."""
    import pydagnn.layers  # noqa: F401  (registers the MatConvNet block types)
    from pydagnn import DagNN
    from pydagnn.layer import block_class
    from pydagnn.models.gm import set_batched_mixture
    net = DagNN()
    ys = []
    for i in range(1, K + 1):
        p = f'CM_{i}_'
        net.add_layer(p + 'a_conv', block_class('dagnn.Conv')(size=[1, 1, C, 256], hasBias=False),
                      'x', p + 'a_conv', [p + 'a_f'])
        net.add_layer(p + 'a_relu', block_class('dagnn.ReLU')(), p + 'a_conv', p + 'a_relu')
        net.add_layer(p + 'b_conv', block_class('dagnn.Conv')(size=[1, 1, 256, 128], hasBias=False),
                      p + 'a_relu', p + 'b_conv', [p + 'b_f'])
        net.add_layer(p + 'b_relu', block_class('dagnn.ReLU')(), p + 'b_conv', p + 'b_relu')
        net.add_layer(p + 'cov_pool', block_class('dagnn.OBJ_ConvNet_COV_Pool')(), p + 'b_relu', p + 'cov_pool')
        net.add_layer(p + 'cov_trace_norm', block_class('dagnn.OBJ_ConvNet_Cov_TraceNorm')(), p + 'cov_pool',
                      [p + 'cov_trace_norm', p + 'cov_trace_norm_tr'])
        net.add_layer(p + 'Cov_Sqrtm', block_class('dagnn.OBJ_ConvNet_Cov_Sqrtm')(coef=1, iterNum=3),
                      p + 'cov_trace_norm', [p + 'Cov_Sqrtm', p + 'Cov_Sqrtm_Y', p + 'Cov_Sqrtm_Z'])
        net.add_layer(p + 'Cov_ScaleTr', block_class('dagnn.OBJ_ConvNet_COV_ScaleTr')(),
                      [p + 'Cov_Sqrtm', p + 'cov_trace_norm_tr'], p + 'Cov_ScaleTr')
        net.set_route(p + 'a_conv', 'gating', i)
        ys.append(p + 'Cov_ScaleTr')
    net.add_layer('Fusion_out', block_class('dagnn.CM_out')(CM_num=K, topk=8, hdim=128 * 129 // 2),
                  ['gating'] + ys, 'Fusion_out')
    net.init_params(dtype=dtype)
    assert set_batched_mixture(net, True), 'the mixture net was not fused'
    return net


def random_gate(rng, K, N, k, dtype):
    """A top-k gate value: k distinct components per image, softmax-like weights."""
    import numpy as np
    from pydagnn.routing import GateValue
    mask = np.zeros((K, N), bool)
    for n in range(N):
        mask[rng.choice(K, k, replace=False), n] = True
    w = np.where(mask, rng.random((K, N)) + 0.1, 0).astype(dtype)
    sfm = w / w.sum(axis=0, keepdims=True)
    return GateValue((sfm, mask.astype(dtype)), counts=mask.sum(axis=1))


def _median_s(fn, iters):
    """(median wall seconds, median process CPU seconds) of ``iters`` calls after one
    warm-up. CPU seconds (all threads) are what a loaded shared machine distorts least."""
    fn()
    ts, cs = [], []
    for _ in range(iters):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts), statistics.median(cs)


def main(argv=None):
    import numpy as np
    from pydagnn.models.gm import set_batched_mixture
    args = _parse(sys.argv[1:] if argv is None else argv)
    rng = np.random.default_rng(args.seed)
    net = mixture_net(args.K, args.C, np.float32)
    x = np.asfortranarray(np.maximum(rng.standard_normal((8, 8, args.C, args.N)), 0).astype(np.float32))
    dz = np.asfortranarray(rng.standard_normal((1, 1, 128 * 129 // 2, args.N)).astype(np.float32))

    def feed():   # a new gate value per call: its route index is computed each step, as in training
        return {'x': x, 'gating': random_gate(np.random.default_rng(args.seed + 1), args.K, args.N, args.k,
                                              np.float32)}
    load_start = [round(v, 2) for v in os.getloadavg()]
    keys = ('forward_s', 'forward_backward_s', 'forward_cpu_s', 'forward_backward_cpu_s')
    res = {p: {k: [] for k in keys} for p in ('looped', 'batched')}
    for r in range(args.rounds):
        for path in ('looped', 'batched'):
            set_batched_mixture(net, path == 'batched')
            f, fc = _median_s(lambda: net.eval(feed()), args.iters)
            fb, fbc = _median_s(lambda: net.eval(feed(), {'Fusion_out': dz}), args.iters)
            rec = {'kind': 'round', 'round': r, 'path': path}
            for k, v in zip(keys, (f, fb, fc, fbc)):
                res[path][k].append(v)
                rec[k] = round(v, 4)
            rec['load_avg'] = [round(v, 2) for v in os.getloadavg()]
            emit(rec, args.out)
    med = {p: {k: round(statistics.median(v), 4) for k, v in d.items()} for p, d in res.items()}
    emit({'kind': 'mixture', 'N': args.N, 'k': args.k, 'K': args.K, 'C': args.C, 'rounds': args.rounds,
           'looped': med['looped'], 'batched': med['batched'],
           'speedup_forward': round(med['looped']['forward_s'] / med['batched']['forward_s'], 2),
           'speedup_forward_backward': round(med['looped']['forward_backward_s']
                                             / med['batched']['forward_backward_s'], 2),
           'cpu_ratio_forward_backward': round(med['looped']['forward_backward_cpu_s']
                                               / med['batched']['forward_backward_cpu_s'], 2),
           'load_avg_start': load_start, 'load_avg_end': [round(v, 2) for v in os.getloadavg()]}, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
