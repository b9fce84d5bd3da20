"""The benchmark scripts' pure parts, cheaply: benchmarks/bench_cpu_vs_torch.py's busy
processes (``--contention``) and its fresh-process peak-RSS children (``--rss``). No
timing is asserted (performance lives in the JSON lines, never in tests); the torch part
skips where the CPU PyTorch reference venv is absent."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_PYTHON = '/tmp/torchvenv/bin/python'


@pytest.fixture(scope='module')
def bench():
    sys.path.insert(0, str(ROOT / 'benchmarks'))   # its `from jsonl import emit`
    try:
        spec = importlib.util.spec_from_file_location('bench_cpu_vs_torch',
                                                      ROOT / 'benchmarks' / 'bench_cpu_vs_torch.py')
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / 'benchmarks'))
    return mod


def _running(pid):
    """True while ``pid`` exists and is not a zombie (an orphan that a container's init
    does not reap stays one)."""
    try:
        with open(f'/proc/{pid}/stat') as fh:
            return fh.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def _wait_gone(pids, timeout=5.0):
    end = time.monotonic() + timeout
    while any(_running(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return [p for p in pids if _running(p)]


def test_contention_starts_and_stops_n_processes(bench):
    with bench.Contention(2) as c:
        pids = c.pids
        assert len(pids) == 2 and len(set(pids)) == 2
        assert all(_running(p) for p in pids)
    assert c.pids == []
    assert _wait_gone(pids) == []
    with bench.Contention(0) as c:
        assert c.pids == []


def test_contention_stops_on_error(bench):
    with pytest.raises(ZeroDivisionError):
        with bench.Contention(2) as c:
            pids = c.pids
            1 / 0
    assert _wait_gone(pids) == []


def test_busy_process_quits_when_its_parent_dies_uncleaned(bench):
    code = ('import os, sys; sys.path.insert(0, sys.argv[1]); import bench_cpu_vs_torch as b; '
            'c = b.Contention(1).start(); print(c.pids[0], flush=True); os._exit(0)')
    out = subprocess.run([sys.executable, '-c', code, str(ROOT / 'benchmarks')], capture_output=True,
                         text=True, check=True, timeout=20).stdout
    assert _wait_gone([int(out.split()[0])]) == []


def test_parse_rejects_contention_with_rss_and_negative(bench, capsys):
    for argv in (['--rss', '--contention', '2'], ['--contention', '-1']):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2
    assert '--contention' in capsys.readouterr().err


def test_rss_child_pydagnn_reports_a_positive_peak(bench):
    args = bench.parse_args(['--models', 'ResNet18-GAP', '--batch', '2', '--iters', '1', '--warmup', '0'])
    peak, ru, rec, _ = bench.child_peak(bench.rss_child_cmd(args, 'pydagnn-train', 'ResNet18-GAP',
                                                            'batched'))
    assert rec['child'] == 'pydagnn-train' and rec['model'] == 'ResNet18-GAP' and rec['mixture'] is None
    assert peak > 0 and ru > 0
    imp, _, _, _ = bench.child_peak(bench.rss_child_cmd(args, 'pydagnn-import'))
    assert 0 < imp < peak


def test_rss_child_torch_reports_a_positive_peak(bench):
    args = bench.parse_args(['--models', 'ResNet18-GAP', '--batch', '2', '--iters', '1', '--warmup', '0',
                         '--threads', '1'])
    if not os.path.exists(TORCH_PYTHON):
        pytest.skip(f'no CPU PyTorch reference venv at {TORCH_PYTHON}')
    if not os.path.exists(args.torch_bench):
        pytest.skip(f'no reference benchmark at {args.torch_bench} (../shared absent)')
    peak, ru, rec, lines = bench.child_peak(bench.rss_child_cmd(args, 'torch-train', 'ResNet18-GAP'))
    assert rec['child'] == 'torch-train' and peak > 0 and ru > 0
    assert bench.torch_train_record(lines, 'ResNet18-GAP')['batch'] == 2


def test_bench_conv_runs_and_reports(tmp_path):
    """benchmarks/bench_conv.py in a tiny form (two layers, batch 2, pydagnn's two paths):
    the JSON lines it promises, with positive times; and a bad --layers is one error."""
    out = tmp_path / 'conv.jsonl'
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'bench_conv.py'), '--layers', 's3,s5ad',
           '--batch', '2', '--rounds', '1', '--iters', '1', '--no-torch', '--out', str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    import json
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    kinds = [r['kind'] for r in recs]
    assert kinds.count('round') == 4 and kinds.count('layer') == 2 and 'total' in kinds
    for r in recs:
        if r['kind'] == 'layer':
            for impl in ('pydagnn', 'blas'):
                assert r[impl]['forward_ms'] > 0 and r[impl]['backward_gflops'] > 0
    peak = [r for r in recs if r['kind'] == 'gemm_peak']
    assert not peak or peak[0]['gflops_1_thread'] > 0
    bad = subprocess.run(cmd[:2] + ['--layers', 's9'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and 'error:' in bad.stderr and 's9' in bad.stderr


def test_every_timing_starts_from_the_built_params(bench):
    """Rounds must not train on: each timing restores the params and drops the momentum
    (the reference starts each round from a fresh model), at the reference's rate."""
    import numpy as np
    p = bench.PydagnnModel('ResNet18-GAP', 2, 0)
    assert p.learning_rate == pytest.approx(0.075)
    before = [None if q.value is None else q.value.copy() for q in p.net.params]
    p.time(True, 0, 2)
    assert p.state['momentum']
    moved = [not np.array_equal(q.value, v) for q, v in zip(p.net.params, before) if v is not None]
    assert any(moved)
    p.reset()
    assert p.state == {}
    for q, v in zip(p.net.params, before):
        if v is not None:
            np.testing.assert_array_equal(q.value, v)
