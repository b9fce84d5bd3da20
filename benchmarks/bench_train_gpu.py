"""Training throughput of a built model on the GPU (CuPy): the ``--device gpu`` path of
``bench_train.py`` (which hands its arguments over here), also runnable alone:

  python benchmarks/bench_train_gpu.py --model ResNet18-GM-SOP --batch 256
  python benchmarks/bench_train.py --device gpu --model WRN-36-2-GM-SOP --batch 150

A training step is ``net.eval({'input', 'label'}, {'objective': 1})`` in 'normal' mode
plus :func:`pydagnn.train.accumulate_gradients` (SGD with momentum, on the device).
Timing: CUDA events around each step (the host waits for the step's end event before
the next step starts), the median of ``--iters`` timed steps after ``--warmup`` steps
(the first steps compile CuPy's kernels and fill its memory pool). Then:

* memory: one more step under :class:`pydagnn.backend.PeakMemory` (the high-water mark
  of the bytes in use in CuPy's pool during a step, params and momentum included), and
  the pool's total (held) bytes at the end;
* a profiled pass (``--profile-iters`` steps with ``net.sync_timing``: the device is
  synchronised around every layer, so the engine's per-layer clocks hold each layer's
  GPU time) for the per-layer split;
* forward-only throughput in 'test' mode (BN moments set to mean 0 / sigma 1).

The gating weights are perturbed by 1% from their all-equal init (as in
torch_baseline.py), so that the top-k selection is not one big tie.

Prints JSON lines like bench_train.py's (``kind`` train / split / top_layers), with
``device`` 'gpu', ``framework`` 'pydagnn', the card's name and the memory figures in MiB.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# the reporting shared with the CPU benchmark
from bench_train import _zero_clocks, layer_records, unit_bn_moments  # noqa: E402


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='gpu', choices=['gpu'])
    ap.add_argument('--model', default='ResNet18-GM-SOP')
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--iters', type=int, default=5, help='timed steps (default 5)')
    ap.add_argument('--warmup', type=int, default=2, help='untimed steps first (default 2)')
    ap.add_argument('--profile-iters', type=int, default=1,
                    help='steps of the per-layer profiled pass (0: skip; default 1)')
    ap.add_argument('--threads', type=int, default=None, help='ignored on the GPU (CPU option)')
    ap.add_argument('--num-classes', type=int, default=1000)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--tf32', action='store_true', help='TF32 GEMMs (default: strict float32)')
    ap.add_argument('--no-update', action='store_true', help='time eval only (no SGD update)')
    ap.add_argument('--no-test-pass', action='store_true', help='skip the forward-only test-mode timing')
    return ap.parse_args(argv)


def _mib(b):
    return round(b / 2 ** 20, 1)


def run(args):
    import numpy as np
    from pydagnn import backend
    from pydagnn.models import build
    from pydagnn.train import accumulate_gradients

    cp = backend.require_gpu('bench_train --device gpu')
    if args.tf32:
        backend.set_tf32(True)
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)['name']
    name = name.decode() if isinstance(name, bytes) else str(name)

    net = build(args.model, num_classes=args.num_classes, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    # the gating weights' init (ones / D) makes every score tie, and tied selections are
    # re-drawn at random on the host; perturb them by 1% so the device's top-k runs
    # (torch_baseline.py does the same)
    for pname in ('gating_w', 'gating_noise_w'):
        if pname in net._param_map:
            p = net.get_param(pname)
            p.value = np.asfortranarray((p.value * (1 + 0.01 * rng.standard_normal(p.value.shape)))
                                        .astype(p.value.dtype))
    net.move('gpu')
    size = int(net.meta['normalization']['imageSize'][0])
    x = cp.asarray(np.asfortranarray((rng.standard_normal((size, size, 3, args.batch)) * 50).astype(np.float32)))
    label = cp.asarray(rng.integers(1, args.num_classes + 1, size=args.batch).astype(np.float32))
    feed = {'input': x, 'label': label}
    state = {}
    lr = float(net.meta['trainOpts']['learningRate'][0])

    def step():
        net.eval(feed, {'objective': 1})
        if not args.no_update:
            accumulate_gradients(net, state, learning_rate=lr, batch_size=args.batch,
                                 momentum=0.9, weight_decay=1e-4)

    net.mode = 'normal'
    t_compile = time.perf_counter()
    for _ in range(args.warmup):
        step()
    dev.synchronize()
    t_compile = time.perf_counter() - t_compile

    start, end = cp.cuda.Event(), cp.cuda.Event()
    steps, walls = [], []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        end.synchronize()
        walls.append(time.perf_counter() - t0)
        steps.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    med = float(np.median(steps))
    rec = {'kind': 'train', 'framework': 'pydagnn', 'model': args.model, 'device': 'gpu', 'card': name,
           'batch': args.batch, 'iters': args.iters, 'warmup': args.warmup, 'tf32': bool(args.tf32),
           'update': not args.no_update,
           'images_per_s': round(args.batch / med, 2), 'step_s_median': round(med, 4),
           'step_s_all': [round(s, 4) for s in steps], 'wall_s_median': round(float(np.median(walls)), 4),
           'warmup_s': round(t_compile, 2), 'params': net.num_params()}

    # memory: the high-water mark of a step (params and momentum already allocated)
    with backend.PeakMemory() as pm:
        step()
        dev.synchronize()
    st = backend.memory_stats()
    rec.update(peak_mem_mb=_mib(pm.peak), pool_total_mb=_mib(st['pool_total']),
               device_used_mb=_mib(st['device_used']))
    print(json.dumps(rec), flush=True)

    # per-layer split: synchronised clocks
    fwd = {l.name: 0.0 for l in net.layers}
    bwd = dict(fwd)
    n = max(0, args.profile_iters)
    if n:
        net.sync_timing = True
        t0 = time.perf_counter()
        for _ in range(n):
            _zero_clocks(net)
            step()
            for l in net.layers:
                fwd[l.name] += l.forward_time
                bwd[l.name] += l.backward_time
        prof_wall = (time.perf_counter() - t0) / n
        net.sync_timing = False
        layer_s = (sum(fwd.values()) + sum(bwd.values())) / n
        tags = {'framework': 'pydagnn', 'model': args.model, 'device': 'gpu'}
        timing = {'profiled_wall_s_per_iter': round(prof_wall, 4),
                  'update_s_per_iter': round(max(0.0, prof_wall - layer_s), 4),
                  'wall_s_per_iter': round(med, 4)}
        for r in layer_records(net, fwd, bwd, n, tags, timing):
            print(json.dumps(r), flush=True)

    if not args.no_test_pass:
        unit_bn_moments(net)
        net.mode = 'test'
        net.eval(feed)
        dev.synchronize()
        ts = []
        for _ in range(max(1, args.iters)):
            start.record()
            net.eval(feed)
            end.record()
            end.synchronize()
            ts.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
        print(json.dumps({'kind': 'test', 'framework': 'pydagnn', 'model': args.model, 'device': 'gpu',
                          'batch': args.batch,
                          'forward_test_images_per_s': round(args.batch / float(np.median(ts)), 2)}),
              flush=True)
        net.mode = 'normal'
    return rec


def main(argv=None):
    args = parse(argv)
    run(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
