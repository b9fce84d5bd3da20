"""Data-parallel training over 2 MPI ranks (pydagnn.parallel, pydagnn.gradsync, the trainer).

Each test launches ``mpiexec -n 2 python -m mpi4py tests/mpi_worker.py`` with the mpiexec
beside this Python (the venv's, from the ``dist`` extra; never one found on PATH, which
may belong to another MPI) under a subprocess timeout, and compares what the ranks wrote
with a 1-process run of the same job in this process.
"""
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip('mpi4py', reason="needs mpi4py (pip install -e '.[dist]')")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mpi_worker as worker  # noqa: E402

from pydagnn import train as ptrain  # noqa: E402
from pydagnn.gradsync import tree_sum  # noqa: E402
from pydagnn.parallel import SingleComm, launched_world_size  # noqa: E402

MPIEXEC = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
WORKER = os.path.join(HERE, 'mpi_worker.py')
GM = dict(kind='gm', batch=10, n=30, lr=0.01)   # no 1-image BN batch in the small GM net
BN = dict(kind='bn', batch=8, n=25, lr=0.05)    # 25 = 3 x 8 + 1: the last batch has one image


def ranks(tmp, job, subs, epochs=2, exp=None, fault=None, timeout=20.0, limit=120, sync_bn=False, n=2):
    """Run ``job`` on ``n`` ranks; returns (CompletedProcess, [rank 0 record, ...])."""
    assert os.path.exists(MPIEXEC), f'no mpiexec beside {sys.executable}: pip install -e ".[dist]"'
    out = tmp / f'out-{time.monotonic_ns()}'
    out.mkdir()
    exp = exp or tmp / 'exp-mpi'
    cmd = [MPIEXEC, '-n', str(n), sys.executable, '-m', 'mpi4py', WORKER, '--kind', job['kind'],
           '--subs', str(subs), '--epochs', str(epochs), '--batch', str(job['batch']), '--n', str(job['n']),
           '--lr', str(job['lr']), '--exp', str(exp), '--out', str(out), '--timeout', str(timeout)]
    if fault:
        cmd += ['--fault', fault]
    if sync_bn:
        cmd += ['--sync-bn']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    recs = [dict(np.load(out / f'rank{r}.npz')) for r in range(n) if (out / f'rank{r}.npz').exists()]
    return proc, recs


def single(tmp, job, subs, epochs=2, exp=None):
    net, rec, stats, _ = worker.train(job['kind'], subs, epochs, job['batch'], str(exp or tmp / 'exp-1'),
                                      comm='single', n=job['n'], lr=job['lr'])
    for split in ('train', 'val'):
        for k, v in stats[split][-1].items():
            rec[f's:{split}:{k}'] = np.float64(v)
    return rec


def assert_same_params(a, b):
    keys = [k for k in a if k.startswith('p:')]
    assert keys and keys == [k for k in b if k.startswith('p:')]
    for k in keys:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize('job,subs', [(BN, 1), (BN, 2), (GM, 1), (GM, 2)],
                         ids=['bn-2x1', 'bn-2x2', 'gm-2x1', 'gm-2x2'])
def test_two_ranks_equal_one_process_bit_for_bit(tmp_path, job, subs):
    """2 ranks x S sub-batches == 1 process x 2S, over 2 epochs of SGD with momentum
    (the BN job's last batch has one image: rank 1 gets none); the replicas are equal,
    rank 0 alone wrote the checkpoints."""
    proc, recs = ranks(tmp_path, job, subs)
    assert proc.returncode == 0, proc.stderr
    assert len(recs) == 2 and all(int(r['world']) == 2 for r in recs)
    ref = single(tmp_path, job, 2 * subs)
    assert_same_params(recs[0], ref)
    assert_same_params(recs[1], recs[0])
    assert [int(r['saves']) for r in recs] == [2, 0]
    assert sorted(os.listdir(tmp_path / 'exp-mpi')) == ['net-epoch-1.mat', 'net-epoch-2.mat']
    # the statistics are global: every image of the epoch, once; the losses' running
    # averages are float32 sums, so they agree to float32 rounding
    assert recs[0]['s:train:num'] == ref['s:train:num'] == job['n']
    assert recs[0]['s:val:num'] == ref['s:val:num']
    for k in ('s:train:objective', 's:train:top1error', 's:val:objective', 's:val:top1error'):
        np.testing.assert_allclose(recs[0][k], ref[k], rtol=1e-6, err_msg=k)
    if job['kind'] == 'gm':
        np.testing.assert_allclose(recs[0]['s:train:BalanceLoss'], ref['s:train:BalanceLoss'], rtol=1e-12)


def test_four_ranks_equal_one_process_bit_for_bit(tmp_path):
    """4 ranks x 1 == 1 process x 4 (the last batch, 1 image, leaves 3 ranks without
    images); the pairwise allreduce that makes this hold for any data is checked by
    test_exact_allreduce_finishes_the_canonical_tree."""
    proc, recs = ranks(tmp_path, BN, 1, n=4, limit=180)
    assert proc.returncode == 0, proc.stderr
    assert len(recs) == 4
    ref = single(tmp_path, BN, 4)
    for rec in recs:
        assert_same_params(rec, ref)
    assert [int(r['saves']) for r in recs] == [2, 0, 0, 0]


PAIRWISE = """
import numpy as np
from pydagnn.parallel import MPIComm
c = MPIComm(timeout=20)
v = np.array([[1e16, 1.0, -1e16, 1.0][c.rank]] * 3)
exact = c.allreduce(v.copy(), 'sum', exact=True)
import sys
sys.stdout.write(f'<rank {c.rank} {float(exact[0])!r}>')  # one write: the launcher may interleave ranks' output
sys.stdout.flush()
"""


def test_exact_allreduce_finishes_the_canonical_tree():
    """4 ranks holding T(r, 4) = 1e16, 1, -1e16, 1: the tree adds (r0 + r2) + (r1 + r3) = 2
    on every rank; a reduction in rank order ((1e16 + 1) - 1e16 + 1) would give 1, and
    recursive doubling by neighbours 0."""
    proc = subprocess.run([MPIEXEC, '-n', '4', sys.executable, '-c', PAIRWISE], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = sorted(re.findall(r'<rank (\d+) (\S+)>', proc.stdout))
    assert got == [(str(r), '2.0') for r in range(4)], proc.stdout


def test_uneven_last_batch_leaves_a_rank_without_images():
    """What the BN job relies on: 25 images in batches of 8 over 2 ranks."""
    order = np.arange(25)
    for rank in (0, 1):
        batches = ptrain._batch_jobs(order, 8, 1, 'train', 1, rank, 2)
        sizes = [sum(idx.size for _, idx, _, _ in subs) for subs in batches]
        assert sizes == ([4, 4, 4, 1] if rank == 0 else [4, 4, 4, 0])


def test_get_batch_sees_only_its_own_indexes(tmp_path):
    """Rank r's get_batch was asked for exactly its sub-batches g = s*2 + r, nothing else."""
    proc, recs = ranks(tmp_path, BN, 2)
    assert proc.returncode == 0, proc.stderr
    train = np.arange(BN['n'])
    for r, rec in enumerate(recs):
        want = []
        for epoch in (1, 2):
            order = train[np.random.default_rng(epoch).permutation(train.size)]
            for subs in ptrain._batch_jobs(order, BN['batch'], 2, 'train', epoch, r, 2):
                for g, idx, _, _ in subs:
                    assert g % 2 == r
                    want.extend(idx.tolist())
        assert rec['seen'].tolist() == want
    for epoch_half in (slice(0, 13), slice(13, 25)):  # each epoch: the ranks' images are disjoint
        a, b = set(recs[0]['seen'][epoch_half]), set(recs[1]['seen'][epoch_half])
        assert not a & b


def test_resume_with_another_world_size(tmp_path):
    """A 2-rank run stopped after epoch 1, resumed on 2 ranks and on 1 process with 2
    sub-batches, ends with the uninterrupted run's bits."""
    ref = single(tmp_path, BN, 2, exp=tmp_path / 'ref')
    exp = tmp_path / 'exp-a'
    proc, _ = ranks(tmp_path, BN, 1, epochs=1, exp=exp)
    assert proc.returncode == 0, proc.stderr
    shutil.copytree(exp, tmp_path / 'exp-b')
    proc, recs = ranks(tmp_path, BN, 1, epochs=2, exp=exp)
    assert proc.returncode == 0, proc.stderr
    assert_same_params(recs[0], ref)
    assert [int(r['saves']) for r in recs] == [1, 0]
    resumed = single(tmp_path, BN, 2, exp=tmp_path / 'exp-b')
    assert_same_params(resumed, ref)


def test_sync_bn_equals_one_process_on_the_whole_batch(tmp_path):
    """--sync-bn: 2 ranks x 1 sub-batch == 1 process, 1 sub-batch of the whole batch, to
    1e-12 in float64 (no dropout nor flips: they are keyed by sub-batch), over 2 epochs; 27 =
    3 x 8 + 3 images: an uneven last batch, weighted by each rank's images."""
    job = dict(kind='bn-plain', batch=8, n=27, lr=0.05)
    proc, recs = ranks(tmp_path, job, 1, sync_bn=True)
    assert proc.returncode == 0, proc.stderr
    ref = single(tmp_path, job, 1)
    local = single(tmp_path, job, 2, exp=tmp_path / 'exp-local')  # what 'local' gives
    worst = 0.0
    for k in (k for k in ref if k.startswith('p:')):
        np.testing.assert_allclose(recs[0][k], ref[k], rtol=1e-12, atol=1e-13, err_msg=k)
        np.testing.assert_array_equal(recs[1][k], recs[0][k], err_msg=k)
        worst = max(worst, float(np.abs(local[k] - ref[k]).max()))
    assert worst > 1e-6  # the test can tell: per-rank statistics give other params


# ---------------------------------------------------------------------------- faults
@pytest.mark.parametrize('fault,message', [
    ('raise', 'rank 1 of 2 failed at train epoch 1 batch 2/4: RuntimeError: injected fault'),
    ('exit', 'rank 1 of 2 failed at train epoch 1 batch 2/4: SystemExit: 0'),
    ('hang', 'rank(s) 1 did not reach it'),
    ('kill', None)])
def test_a_failing_rank_ends_the_job(tmp_path, fault, message):
    """A rank that raises, exits, dies or hangs at batch 2 ends mpiexec non-zero within
    the comm timeout plus a few seconds, with a message naming rank and step. The timeout
    (6 s) leaves a healthy rank on a loaded 2-core machine time to reach each collective, so
    that only the faulty rank is ever the one reported."""
    t0 = time.monotonic()
    proc, _ = ranks(tmp_path, BN, 1, fault=fault, timeout=6.0, limit=90)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < 6.0 + 25.0, elapsed   # the 2-core CI machine starts Python slowly
    if message:
        assert message in proc.stderr, proc.stderr[-2000:]
    if fault == 'hang':
        assert 'at train epoch 1 batch 2/4' in proc.stderr


# ---------------------------------------------------------------------------- pieces
def test_tree_sum_is_the_canonical_order():
    rng = np.random.default_rng(0)
    d = {g: rng.standard_normal(5) * 10.0 ** rng.integers(-8, 8) for g in range(4)}
    whole = tree_sum({g: v.copy() for g, v in d.items()}, 0, 1, 4)
    np.testing.assert_array_equal(whole, (d[0] + d[2]) + (d[1] + d[3]))
    r0 = tree_sum({0: d[0].copy(), 2: d[2].copy()}, 0, 2, 4)
    r1 = tree_sum({1: d[1].copy(), 3: d[3].copy()}, 1, 2, 4)
    np.testing.assert_array_equal(whole, r0 + r1)
    assert tree_sum({}, 0, 1, 4) is None
    np.testing.assert_array_equal(tree_sum({1: d[1].copy()}, 0, 1, 4), d[1])


def test_single_comm_and_launcher_environment():
    c = SingleComm()
    buf = np.arange(3.0)
    assert c.allreduce(buf) is buf and c.size == 1 and c.rank == 0
    assert c.allgather_bytes(b'x') == [b'x']
    with pytest.raises(ValueError, match='op must be'):
        c.allreduce(buf, 'prod')
    assert launched_world_size({}) == 1
    assert launched_world_size({'PMI_SIZE': '4'}) == 4
    assert launched_world_size({'OMPI_COMM_WORLD_SIZE': '2'}) == 2
    assert launched_world_size({'SLURM_STEP_NUM_TASKS': '8', 'SLURM_PROCID': '3'}) == 8


def test_abort_waits_until_the_launcher_has_read_its_pipe():
    # MPIComm.abort calls this before MPI_Abort, which can make the launcher drop
    # what it has not read yet (the failing-rank message, lost in 5 of 60 loaded runs)
    from pydagnn.parallel import _unread_bytes, _wait_until_read
    r, w = os.pipe()
    with os.fdopen(w, 'wb', buffering=0) as writer, os.fdopen(r, 'rb', buffering=0) as reader:
        writer.write(b'rank 1 failed\n')
        assert _unread_bytes(writer) == 14
        t0 = time.monotonic()
        _wait_until_read([writer], limit_s=0.3, settle_s=0.0)   # nobody reads: gives up
        assert 0.3 <= time.monotonic() - t0 < 2.0
        threading.Timer(0.2, reader.read, (14,)).start()       # a reader comes later
        t0 = time.monotonic()
        _wait_until_read([writer], limit_s=5.0, settle_s=0.0)
        assert 0.2 <= time.monotonic() - t0 < 4.0 and _unread_bytes(writer) == 0
    with open(os.devnull, 'w') as f:                              # not a pipe: no wait
        t0 = time.monotonic()
        _wait_until_read([f], limit_s=5.0, settle_s=5.0)
        assert time.monotonic() - t0 < 1.0 and _unread_bytes(f) == 0


def test_gpus_need_one_rank_each(tmp_path):
    net = worker.bn_net()
    with pytest.raises(ValueError, match='mpiexec -n 2'):
        ptrain.cnn_train_dag(net, worker.imdb(), exp_dir=str(tmp_path), gpus=[0, 1], num_epochs=1,
                             comm=SingleComm(), log=lambda line: None)
