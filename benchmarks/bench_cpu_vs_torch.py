"""pydagnn against the plain-PyTorch reference on the CPU, alternated in one run.

  python benchmarks/bench_cpu_vs_torch.py                       # GM-SOP and GAP, 3 rounds
  python benchmarks/bench_cpu_vs_torch.py --models ResNet18-GM-SOP --rounds 5 \\
      --torch-python /tmp/torchvenv/bin/python --out before.jsonl
  python benchmarks/bench_cpu_vs_torch.py --contention 2         # under 2 busy processes
  python benchmarks/bench_cpu_vs_torch.py --rss                  # peak RSS at batch 32

Each round times, per model, first pydagnn (in this process: the net is built once
with ``pydagnn.models.build``; ``--iters`` timed steps after ``--warmup``), then the
reference (``../shared/baselines/bench_torch.py --device cpu --modes train`` in a
subprocess of ``--torch-python``, same batch, warm-up and iterations), so that a change
of load on a shared machine hits both. pydagnn is timed twice per step kind:

* ``fwd_bwd``: ``net.eval({'input', 'label'}, {'objective': 1})`` in 'normal' mode;
* ``train``: the same plus the SGD step (``pydagnn.train.accumulate_gradients``,
  momentum 0.9, weight decay 1e-4, the model's first-epoch learning rate): what the
  reference's ``train`` mode times.

Every timing starts from the params as built, with no momentum, as the reference starts
each round from a fresh model (a net trained on over the rounds diverges on one random
batch, and its NaN steps run faster than real ones).

The reference reports the median over its iterations; pydagnn's figure is the median
over its iterations too. Prints JSON lines:

  {"kind": "round", "round", "model", "mixture", "contention", "pydagnn_train_images_per_s",
   "pydagnn_fwd_bwd_images_per_s", "torch_train_images_per_s", "load_avg"}
  {"kind": "summary", "model", "mixture", "contention", "rounds", "batch", the medians over
   rounds of the three figures, "ratio_train" (pydagnn / torch, train step),
   "load_avg_start", "load_avg_end", "uptime"}
  {"kind": "split", ..., "mixture", "contention"} per model: pydagnn's per-layer clocks
   grouped by block type (the executor's plan entries: a fused group counts as its own
   type), over all timed fwd_bwd steps of all rounds.

``--mixture looped,batched`` also times, in the same rounds, each GM model with its
mixture run layer by layer (``set_batched_mixture(net, False)``, the path before the
batched mixture) besides the default batched one: records get ``"mixture": "looped"`` /
``"batched"``.

``--contention N`` runs each round with N extra busy processes (a pure-Python loop each,
so one core each: ``--contention 2`` on a 2-core machine is "a second process loading both
cores"), started before the round and killed after it, so that both pydagnn and the
reference are timed under the same load; every record then carries ``"contention": N``.
They ignore Ctrl-C (this process kills them on any exit) and quit by themselves when this
process dies without cleaning up.

``--rss`` times nothing: per model it measures the peak RSS of a training run at
``--batch`` (default 32), each in a FRESH process started by this one, both measured the
same way (the child prints its own ``VmHWM`` from /proc/self/status after the run):

* pydagnn: this script with the internal ``--rss-child pydagnn-train``: build the model,
  ``--warmup`` + ``--iters`` training steps (``PydagnnModel.step(True)``);
* the reference: this script under ``--torch-python`` with ``--rss-child torch-train``,
  which runs ``bench_torch.py --device cpu --modes train`` (same batch, warm-up,
  iterations, threads) through ``runpy`` in that process;
* and, once, a process that only imports each framework (numpy, the layer library with
  numba, the builders and the trainer; torch), the floor each framework's figure stands on.

Prints, per model (and mixture path):

  {"kind": "rss", "model", "mixture", "batch", "warmup", "iters", "pydagnn_peak_rss_mb",
   "torch_peak_rss_mb", "ratio" (pydagnn / torch), "pydagnn_import_rss_mb",
   "torch_import_rss_mb", "pydagnn_ru_maxrss_mb", "torch_ru_maxrss_mb",
   "parent_peak_rss_mb"}

``*_ru_maxrss_mb`` is the child's ``ru_maxrss`` from ``os.wait4``, a cross-check only: on
Linux a child spawned by a process inherits that process's peak (vfork + exec keep it), so
it is max(the child's peak, ``parent_peak_rss_mb``), an upper bound; the ``*_peak_rss_mb``
figures are the children's own VmHWM (``ru_maxrss`` where /proc is absent).

The machine's load (``os.getloadavg`` per round, ``uptime`` at the end) is part of the
result: on a shared machine, compare the ratio, not the absolute figures.
"""
import argparse
import json
import os
import runpy
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/jsonl.py
from jsonl import emit  # noqa: E402
from rss import peak_rss_mb, ru_maxrss_mb  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

DEFAULT_TORCH_BENCH = os.path.join(ROOT, '..', 'shared', 'baselines', 'bench_torch.py')


def parse_args(argv):
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
    ap.add_argument('--contention', type=int, default=0,
                    help='extra busy processes (one core each) running during every round (default 0)')
    ap.add_argument('--rss', action='store_true',
                    help='measure peak RSS per model in fresh processes instead of timing')
    ap.add_argument('--rss-child', choices=RSS_CHILDREN, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.contention < 0:
        ap.error('--contention: expected a count >= 0, got %d' % args.contention)
    if args.rss and args.contention:
        ap.error('--contention applies to the timing rounds, not to --rss')
    return args


#: the internal --rss-child kinds: what the fresh process does before printing its peak RSS
RSS_CHILDREN = ('pydagnn-import', 'pydagnn-train', 'torch-import', 'torch-train')


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
        # The reference starts each round from a fresh model and trains warmup + iters
        # steps at its first-epoch rate; so does this: every timing restores the initial
        # params and momentum (without that, a few rounds of SGD on one random batch
        # diverge, and the NaN steps run faster than real ones).
        self.learning_rate = float(np.ravel(self.net.meta['trainOpts']['learningRate'])[0])
        self.initial = [None if p.value is None else p.value.copy() for p in self.net.params]

    def reset(self):
        """The params as built, no momentum."""
        for p, v in zip(self.net.params, self.initial):
            if v is not None:
                p.value[...] = v
        self.state = {}

    def step(self, update):
        from pydagnn.train import accumulate_gradients
        self.net.mode = 'normal'
        self.net.eval(self.feed, {'objective': 1})
        if update:
            accumulate_gradients(self.net, self.state, learning_rate=self.learning_rate,
                                 batch_size=self.batch)

    def _record_clocks(self):
        for e in _entries(self.net):
            self.fwd[e.name] = self.fwd.get(e.name, 0.0) + e.forward_time
            self.bwd[e.name] = self.bwd.get(e.name, 0.0) + e.backward_time
        self.steps += 1

    def time(self, update, warmup, iters):
        """Median seconds of ``iters`` steps after ``warmup`` (per-layer clocks recorded
        for the fwd_bwd kind)."""
        self.reset()
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


def _torch_bench_args(args, model):
    """bench_torch.py's arguments for one CPU train run of ``model``."""
    return ['--device', 'cpu', '--models', model, '--modes', 'train', '--batch', str(args.batch),
            '--warmup', str(args.warmup), '--iters', str(args.iters), '--threads', str(args.threads)]


def _json_lines(out):
    return [json.loads(line) for line in (s.strip() for s in out.splitlines()) if line.startswith('{')]


def torch_train_record(recs, model):
    """bench_torch's train record for ``model`` among its JSON lines ``recs`` (RuntimeError
    if it printed none, or an error record)."""
    for rec in recs:
        if rec.get('model') == model and rec.get('mode') == 'train':
            if 'error' in rec:
                raise RuntimeError(f'bench_torch failed on {model}: {rec["error"]}')
            return rec
    raise RuntimeError(f'bench_torch printed no train record for {model}: {recs}')


def torch_round(args, model):
    """images/s of one reference run (its own median over ``--iters``)."""
    cmd = [args.torch_python, args.torch_bench] + _torch_bench_args(args, model)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return torch_train_record(_json_lines(out), model)['images_per_s']


# ---------------------------------------------------------------- contention

#: a busy process: one core's worth of pure-Python loop. It ignores SIGINT (its parent
#: kills it), says 'ready' once running, and quits when its parent is gone (re-parented).
_SPIN = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent = os.getppid()
sys.stdout.write('ready\\n')
sys.stdout.flush()
sys.stdout.close()
while os.getppid() == parent:
    for _ in range(100000):
        pass
"""


class Contention:
    """``n`` busy processes while the ``with`` block runs (none for ``n == 0``)::

        with Contention(2):
            ...   # timed under load

    ``start`` returns once every process runs its loop; ``stop`` (also on any exception,
    Ctrl-C included, and by ``__exit__``) kills and reaps them all.
    """

    def __init__(self, n, python=sys.executable):
        self.n, self.python = n, python
        self.procs = []

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    def start(self):
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen([self.python, '-c', _SPIN], text=True,
                                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
            for p in self.procs:
                if p.stdout.readline() != 'ready\n':
                    raise RuntimeError(f'busy process {p.pid} did not start (exit {p.poll()})')
                p.stdout.close()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        procs, self.procs = self.procs, []
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
            if p.stdout and not p.stdout.closed:
                p.stdout.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def _terminate(signum, frame):
    """SIGTERM as an exit that runs the ``finally`` blocks (and so stops the busy processes)."""
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------- peak RSS

def rss_child(args):
    """The fresh process of ``--rss-child``: do ``args.rss_child``, then print one
    ``{"kind": "rss_child", "child", "peak_rss_mb", ...}`` line."""
    kind = args.rss_child
    rec = {'kind': 'rss_child', 'child': kind}
    if kind == 'pydagnn-import':
        import numpy  # noqa: F401
        import pydagnn.layers  # noqa: F401   (the layer library: numba and the kernels)
        import pydagnn.models  # noqa: F401
        import pydagnn.models.gm  # noqa: F401
        import pydagnn.train  # noqa: F401
    elif kind == 'pydagnn-train':
        (model,) = args.models.split(',')
        p = PydagnnModel(model, args.batch, args.seed, args.mixture.split(',')[0])
        for _ in range(args.warmup + args.iters):
            p.step(True)
        rec.update(model=model, mixture=p.mixture)
    elif kind == 'torch-import':
        import torch  # noqa: F401
    else:   # torch-train: bench_torch's main in this process
        (model,) = args.models.split(',')
        saved = sys.argv
        sys.argv = [args.torch_bench] + _torch_bench_args(args, model)
        try:
            runpy.run_path(args.torch_bench, run_name='__main__')
        finally:
            sys.argv = saved
        rec['model'] = model
    rec['peak_rss_mb'] = round(peak_rss_mb(), 1)
    emit(rec)
    return 0


def rss_child_cmd(args, kind, model=None, mixture=None):
    """The command line of a fresh ``--rss-child kind`` process (under ``--torch-python``
    for the torch kinds)."""
    python = args.torch_python if kind.startswith('torch') else sys.executable
    cmd = [python, os.path.abspath(__file__), '--rss-child', kind, '--batch', str(args.batch),
           '--warmup', str(args.warmup), '--iters', str(args.iters), '--threads', str(args.threads),
           '--seed', str(args.seed), '--torch-bench', args.torch_bench]
    if model is not None:
        cmd += ['--models', model]
    if mixture is not None:
        cmd += ['--mixture', mixture]
    return cmd


def measure_child(cmd):
    """Run ``cmd`` in a fresh child and reap it with ``os.wait4``: returns (its JSON lines,
    its ``ru_maxrss`` in MB). RuntimeError, with the end of its stderr, when it fails."""
    with tempfile.TemporaryFile('w+') as err:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                             text=True)
        try:
            out = p.stdout.read()
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            p.stdout.close()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            err.seek(0)
            raise RuntimeError(f'{" ".join(cmd)} exited {p.returncode}:\n{err.read()[-3000:]}')
    return _json_lines(out), ru_maxrss_mb(ru.ru_maxrss)


def child_peak(cmd):
    """Run the ``--rss-child`` command ``cmd`` (``rss_child_cmd``): (the child's own peak
    RSS in MB, wait4's ru_maxrss in MB, its rss_child record, all its JSON lines)."""
    lines, ru_mb = measure_child(cmd)
    recs = [r for r in lines if r.get('kind') == 'rss_child']
    if not recs:
        raise RuntimeError(f'{" ".join(cmd)} printed no rss_child record')
    return recs[-1]['peak_rss_mb'], round(ru_mb, 1), recs[-1], lines


def rss_main(args):
    """``--rss``: one record per model (and mixture path of a GM model)."""
    imp_py = child_peak(rss_child_cmd(args, 'pydagnn-import'))[0]
    imp_t = child_peak(rss_child_cmd(args, 'torch-import'))[0]
    for m in args.models.split(','):
        t_peak, t_ru, _, lines = child_peak(rss_child_cmd(args, 'torch-train', m))
        torch_train_record(lines, m)   # bench_torch ran it, without an error record
        paths = args.mixture.split(',')
        for path in paths:
            p_peak, p_ru, rec, _ = child_peak(rss_child_cmd(args, 'pydagnn-train', m, path))
            emit({'kind': 'rss', 'model': m, 'mixture': rec['mixture'], 'batch': args.batch,
                  'warmup': args.warmup, 'iters': args.iters,
                  'pydagnn_peak_rss_mb': p_peak, 'torch_peak_rss_mb': t_peak,
                  'ratio': round(p_peak / t_peak, 3),
                  'pydagnn_import_rss_mb': imp_py, 'torch_import_rss_mb': imp_t,
                  'pydagnn_ru_maxrss_mb': p_ru, 'torch_ru_maxrss_mb': t_ru,
                  'parent_peak_rss_mb': round(peak_rss_mb(), 1)}, args.out)
            if rec['mixture'] is None:   # no mixture: once
                break
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.rss_child:
        return rss_child(args)
    if args.rss:
        return rss_main(args)
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
    if args.contention:
        signal.signal(signal.SIGTERM, _terminate)
    for r in range(args.rounds):
        with Contention(args.contention):   # started before the round, killed after it
            for m in models:
                tt = None
                for key in [k for k in nets if k[0] == m]:
                    p = nets[key]
                    fb = p.time(False, args.warmup, args.iters)
                    tr = p.time(True, args.warmup, args.iters)
                    if tt is None:   # one reference run per model and round
                        tt = torch_round(args, m)
                    rec = {'kind': 'round', 'round': r, 'model': m, 'mixture': key[1],
                           'contention': args.contention,
                           'pydagnn_train_images_per_s': round(args.batch / tr, 2),
                           'pydagnn_fwd_bwd_images_per_s': round(args.batch / fb, 2),
                           'torch_train_images_per_s': round(tt, 2), 'load_avg': _load()}
                    for k in per[key]:
                        per[key][k].append(rec[k + '_images_per_s'])
                    emit(rec, args.out)
    for key, p in nets.items():
        med = {k + '_images_per_s': round(statistics.median(v), 2) for k, v in per[key].items()}
        emit({'kind': 'summary', 'model': key[0], 'mixture': key[1], 'contention': args.contention,
              'rounds': args.rounds, 'batch': args.batch, **med,
              'ratio_train': round(med['pydagnn_train_images_per_s']
                                   / med['torch_train_images_per_s'], 3),
              'load_avg_start': load_start, 'load_avg_end': _load(), 'uptime': _uptime()}, args.out)
        rec = p.split(key[0])
        rec['mixture'] = key[1]
        rec['contention'] = args.contention
        emit(rec, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
