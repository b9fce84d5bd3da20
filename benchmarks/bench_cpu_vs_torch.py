"""pydagnn against the plain-PyTorch reference on the CPU, alternated in one run.

  python benchmarks/bench_cpu_vs_torch.py                       # GM-SOP and GAP, 3 rounds
  python benchmarks/bench_cpu_vs_torch.py --models ResNet18-GM-SOP --rounds 5 \\
      --torch-python /tmp/torchvenv/bin/python --out before.jsonl

Each round times, per model, first pydagnn (in this process: the net is built once
with ``pydagnn.models.build``; ``--iters`` timed steps after ``--warmup``), then the
reference (``../shared/baselines/bench_torch.py --device cpu --modes train`` in a
subprocess of ``--torch-python``, same batch, warm-up and iterations), so that a change
of load on a shared machine hits both. pydagnn is timed twice per step kind:

* ``fwd_bwd``: ``net.eval({'input', 'label'}, {'objective': 1})`` in 'normal' mode;
* ``train``: the same plus the SGD step (``pydagnn.train.accumulate_gradients``,
  momentum 0.9, weight decay 1e-4): what the reference's ``train`` mode times.

The reference reports the median over its iterations; pydagnn's figure is the median
over its iterations too. Prints JSON lines:

  {"kind": "round", "round", "model", "pydagnn_train_images_per_s",
   "pydagnn_fwd_bwd_images_per_s", "torch_train_images_per_s", "load_avg"}
  {"kind": "summary", "model", "rounds", the medians over rounds of the three figures,
   "ratio_train" (pydagnn / torch, train step), "load_avg_start", "load_avg_end",
   "uptime"}
  {"kind": "split", ...} per model: pydagnn's per-layer clocks grouped by block type
   (the executor's plan entries: a fused group counts as its own type), over all timed fwd_bwd steps of all rounds.

``--mixture looped,batched`` also times, in the same rounds, each GM model with its
mixture run layer by layer (``set_batched_mixture(net, False)``, the path before the
batched mixture) besides the default batched one: records get ``"mixture": "looped"`` /
``"batched"``.

The machine's load (``os.getloadavg`` per round, ``uptime`` at the end) is part of the
result: on a shared machine, compare the ratio, not the absolute figures.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/jsonl.py
from jsonl import emit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

DEFAULT_TORCH_BENCH = os.path.join(ROOT, '..', 'shared', 'baselines', 'bench_torch.py')


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--models', default='ResNet18-GM-SOP,ResNet18-GAP')
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--iters', type=int, default=3, help='timed steps per round and kind (default 3)')
    ap.add_argument('--warmup', type=int, default=1)
    ap.add_argument('--threads', type=int, default=2, help='torch threads (pydagnn: its libraries\' default)')
    ap.add_argument('--torch-python', default='/tmp/torchvenv/bin/python')
    ap.add_argument('--torch-bench', default=DEFAULT_TORCH_BENCH)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', default=None, help='also append the JSON lines to this file')
    ap.add_argument('--mixture', default='batched', help='comma list of batched,looped (GM models)')
    return ap.parse_args(argv)


def _load():
    return [round(v, 2) for v in os.getloadavg()]


def _uptime():
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:  # pragma: no cover
        return None


def _entries(net):
    """What the executor ran (its plan: layers, fused groups in place of their members)."""
    return net.executor.plan or net.layers


class PydagnnModel:
    """One built net, random data of the reference's shape, and the SGD state."""

    def __init__(self, model, batch, seed, mixture='batched'):
        import numpy as np
        from pydagnn.models import build
        from pydagnn.models.gm import fuse_mixture, set_batched_mixture
        self.net = build(model, num_classes=1000, seed=seed)
        self.mixture = mixture if fuse_mixture(self.net) is not None else None   # None: no mixture
        set_batched_mixture(self.net, mixture == 'batched')
        self.batch = batch
        rng = np.random.default_rng(seed + 1)
        size = int(self.net.meta['normalization']['imageSize'][0])
        x = np.asfortranarray((rng.standard_normal((size, size, 3, batch)) * 60).astype(np.float32))
        label = rng.integers(1, 1001, size=batch).astype(np.float32)
        self.feed = {'input': x, 'label': label}
        self.state = {}
        self.fwd, self.bwd = {}, {}
        self.steps = 0

    def step(self, update):
        from pydagnn.train import accumulate_gradients
        self.net.mode = 'normal'
        self.net.eval(self.feed, {'objective': 1})
        if update:
            accumulate_gradients(self.net, self.state, learning_rate=0.1, batch_size=self.batch)

    def _record_clocks(self):
        for e in _entries(self.net):
            self.fwd[e.name] = self.fwd.get(e.name, 0.0) + e.forward_time
            self.bwd[e.name] = self.bwd.get(e.name, 0.0) + e.backward_time
        self.steps += 1

    def time(self, update, warmup, iters):
        """Median seconds of ``iters`` steps after ``warmup`` (per-layer clocks recorded
        for the fwd_bwd kind)."""
        for _ in range(warmup):
            self.step(update)
        ts = []
        for _ in range(iters):
            for e in _entries(self.net):
                e.forward_time = e.backward_time = 0.0
            t0 = time.perf_counter()
            self.step(update)
            ts.append(time.perf_counter() - t0)
            if not update:
                self._record_clocks()
        return statistics.median(ts)

    def split(self, model):
        """Per-type seconds per step (bench_train's 'split' record, over the plan's entries)."""
        entries = _entries(self.net)
        types = {e.name: e.type for e in entries}
        total = sum(self.fwd.values()) + sum(self.bwd.values())
        by_type = {}
        for name, t in types.items():
            by_type[t] = by_type.get(t, 0.0) + self.fwd.get(name, 0.0) + self.bwd.get(name, 0.0)
        n = max(1, self.steps)
        is_cm = lambda name: name.startswith('CM_') or name == 'Fusion_out'  # noqa: E731
        cm = sum(self.fwd.get(k, 0.0) + self.bwd.get(k, 0.0) for k in types if is_cm(k))
        rec = {'kind': 'split', 'model': model, 'steps': self.steps,
               'layer_total_s_per_step': round(total / n, 4),
               'mixture_s_per_step': round(cm / n, 4),   # the CM branches + Fusion_out, or the fused block
               'by_type_s_per_step': {k.replace('dagnn.', ''): round(v / n, 4)
                                      for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}}
        return rec


def torch_round(args, model):
    """images/s of one reference run (its own median over ``--iters``)."""
    cmd = [args.torch_python, args.torch_bench, '--device', 'cpu', '--models', model, '--modes', 'train',
           '--batch', str(args.batch), '--warmup', str(args.warmup), '--iters', str(args.iters),
           '--threads', str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith('{'):
            rec = json.loads(line)
            if rec.get('model') == model and rec.get('mode') == 'train':
                return rec['images_per_s']
    raise RuntimeError(f'bench_torch printed no train record for {model}:\n{out}')


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    models = args.models.split(',')
    paths = args.mixture.split(',')
    nets = {}
    for m in models:
        for path in paths:
            p = PydagnnModel(m, args.batch, args.seed, path)
            if p.mixture is not None or path == paths[0]:   # a model without a mixture: once
                nets[m, p.mixture] = p
    load_start = _load()
    per = {key: {'pydagnn_train': [], 'pydagnn_fwd_bwd': [], 'torch_train': []} for key in nets}
    for r in range(args.rounds):
        for m in models:
            tt = None
            for key in [k for k in nets if k[0] == m]:
                p = nets[key]
                fb = p.time(False, args.warmup, args.iters)
                tr = p.time(True, args.warmup, args.iters)
                tt = torch_round(args, m) if tt is None else tt   # one reference run per model and round
                rec = {'kind': 'round', 'round': r, 'model': m, 'mixture': key[1],
                       'pydagnn_train_images_per_s': round(args.batch / tr, 2),
                       'pydagnn_fwd_bwd_images_per_s': round(args.batch / fb, 2),
                       'torch_train_images_per_s': round(tt, 2), 'load_avg': _load()}
                for k in per[key]:
                    per[key][k].append(rec[k + '_images_per_s'])
                emit(rec, args.out)
    for key, p in nets.items():
        med = {k + '_images_per_s': round(statistics.median(v), 2) for k, v in per[key].items()}
        emit({'kind': 'summary', 'model': key[0], 'mixture': key[1], 'rounds': args.rounds, 'batch': args.batch,
               **med,
               'ratio_train': round(med['pydagnn_train_images_per_s'] / med['torch_train_images_per_s'], 3),
               'load_avg_start': load_start, 'load_avg_end': _load(), 'uptime': _uptime()}, args.out)
        rec = p.split(key[0])
        rec['mixture'] = key[1]
        emit(rec, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
