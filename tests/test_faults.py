"""Faults in training and evaluation (issue 13, items 5-9): each test sets up the fault
the issue describes on a tiny net and checks the run stops early, says where, and loses
nothing."""
import errno
import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pydagnn import backend
from pydagnn import data as pdata
from pydagnn import finite, runlock
from pydagnn.executor import EvalError
from pydagnn.finite import NonFiniteError
from pydagnn.io import tmpfiles
from pydagnn.io.checkpoint import CheckpointWriteError, load_checkpoint
from pydagnn.io.matfile import tmp_beside
from pydagnn.models import build
from pydagnn.runlock import ExpDirError, RunLockError
from pydagnn.train import cnn_train_dag

from test_train import tiny_imdb, tiny_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMDB_FAKE = os.path.join(ROOT, '..', 'shared', 'data', 'imdb_fake.mat')
GM_SIZE = 16


def small_gm(seed=0):
    """ResNet18-GM-SOP reduced: one block per stage, 4 CMs keeping 2, narrow convs (72 params)."""
    return build('ResNet18-GM-SOP', num_classes=5, image_size=GM_SIZE, section_len=1, cm_num=4,
                 topk=2, gating_widths=(8, 4), cm_widths=(8, 4), seed=seed)


def gm_imdb(n=8, n_val=0, seed=0):
    rng = np.random.default_rng(seed)
    total = n + n_val
    data = rng.integers(0, 255, size=(GM_SIZE, GM_SIZE, 3, total)).astype(np.uint8)
    return {'images': {'data': np.asfortranarray(data),
                       'labels': rng.integers(1, 6, size=total).astype(np.float32),
                       'set': np.r_[np.ones(n), 2 * np.ones(n_val)]},
            'meta': {'rgbMean': np.full(3, 127.0), 'sets': ['train', 'val', 'test']}}


def params_of(net):
    return {p.name: np.array(p.value) for p in net.params}


def quiet(lines):
    return lines.append


def files_in(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    assert not tmpfiles.pid_alive(p.pid)
    return p.pid


# ---------------------------------------------------------------------------- item 5
def test_nan_pixel_makes_the_objective_finite_but_the_derivatives_not():
    """The issue's symptom, and why the check covers the derivatives: one NaN pixel, BN
    spreads it over the batch, the gating's top-k selects no CM (NaN >= q is False), every
    prediction is 0 and the objective finite; 59 of the 72 param derivatives are NaN."""
    net = small_gm()
    imdb = gm_imdb(4)
    batch = pdata.get_batch(imdb, np.arange(4), mode='train', rng=np.random.default_rng(0))
    batch['input'][3, 4, 1, 2] = np.nan
    net.mode = 'normal'
    net.conserve_memory = False
    net.eval(batch, {'objective': 1.0})
    assert np.all(net.get_var('prediction').value == 0)
    assert np.isfinite(net.get_var('objective').value).all()
    bad = [p.name for p in net.params if p.der is not None and not np.isfinite(p.der).all()]
    assert len(net.params) == 72 and len(bad) == 59
    assert finite.step_flag(net, {'objective': 1.0}) > 0


def test_one_nan_pixel_stops_gm_training_before_the_update(tmp_path):
    """A NaN pixel in the 2nd batch of epoch 1: NonFiniteError naming epoch 1, batch 2,
    the input, and the first layer whose output went non-finite; params as after batch 1;
    no checkpoint nor temp file written."""
    net = small_gm()
    imdb = gm_imdb(8)
    before_bad = {}
    calls = []

    def get_batch(imdb_, idx, mode, rng):
        b = pdata.get_batch(imdb_, idx, mode=mode, rng=rng)
        calls.append(list(idx))
        if len(calls) == 2:   # the 2nd batch: its 3rd image gets one NaN pixel
            before_bad.update(params_of(net))
            b['input'][3, 4, 1, 2] = np.nan
        return b

    lines = []
    exp = tmp_path / 'exp'
    with pytest.raises(NonFiniteError) as ei:
        cnn_train_dag(net, imdb, get_batch, exp_dir=str(exp), batch_size=4, num_epochs=1,
                      learning_rate=0.01, prefetch=False, plot_statistics=False, log=quiet(lines))
    e = ei.value
    msg = str(e)
    assert (e.epoch, e.batch) == (1, 2)
    assert (e.layer, e.layer_type, e.var) == ('conv1_conv', 'dagnn.Conv', net.layers[0].outputs[0])
    assert 'epoch 1, batch 2' in msg and "input var 'input'" in msg
    assert f'image(s) 3 of the sub-batch (imdb image(s) {calls[1][2] + 1}, 1-based)' in msg
    assert "'conv1_conv' (dagnn.Conv)" in msg and 'not applied' in msg
    after = params_of(net)
    assert before_bad and after.keys() == before_bad.keys()
    for k in after:
        np.testing.assert_array_equal(after[k], before_bad[k], err_msg=k)
        assert np.isfinite(after[k]).all(), k
    assert files_in(exp) == []          # no checkpoint, no temp file, the lock released


def test_step_flag_counts_nonfinite_objective_and_derivatives():
    net = tiny_net()
    imdb = tiny_imdb(4, 0)
    batch = pdata.get_batch(imdb, np.arange(4), mode='train', rng=np.random.default_rng(0))
    finite.keep_objectives(net, {'objective': 1})
    net.eval(batch, {'objective': 1})
    assert finite.step_flag(net, {'objective': 1}) == 0
    net.params[0].der[0, 0, 0, 0] = np.inf
    net.params[1].der[0] = np.nan
    assert finite.step_flag(net, {'objective': 1}) == 2
    net.get_var('objective').value = np.full((1, 1, 1, 1), np.inf, np.float32)
    assert finite.step_flag(net, {'objective': 1}) == 3


# ---------------------------------------------------------------------------- item 6
HOLD = """
import sys, time
from pydagnn.runlock import open_exp_dir
lock = open_exp_dir(sys.argv[1])
print('locked', flush=True)
time.sleep(60)
"""


def _holder(folder):
    p = subprocess.Popen([sys.executable, '-c', HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'locked'
    return p


def test_second_run_in_the_folder_fails_at_once_naming_folder_and_process(tmp_path):
    exp = tmp_path / 'exp'
    holder = _holder(exp)
    try:
        t0 = time.perf_counter()
        lines = []
        with pytest.raises(RunLockError) as ei:
            cnn_train_dag(tiny_net(), tiny_imdb(8, 0), exp_dir=str(exp), batch_size=4, num_epochs=1,
                          learning_rate=0.01, plot_statistics=False, log=quiet(lines))
        assert time.perf_counter() - t0 < 5
        msg = str(ei.value)
        assert str(exp) in msg and f'pid {holder.pid}' in msg and 'host ' in msg
        assert not any(l.startswith('train:') for l in lines)
        assert 'net-epoch-1.mat' not in files_in(exp)
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock file stays, is reported as stale and taken over
    assert runlock.LOCK_NAME in files_in(exp)
    lines = []
    cnn_train_dag(tiny_net(), tiny_imdb(8, 0), exp_dir=str(exp), batch_size=4, num_epochs=1,
                  learning_rate=0.01, plot_statistics=False, log=quiet(lines))
    stale = [l for l in lines if 'stale lock' in l]
    assert len(stale) == 1 and f'pid {holder.pid}' in stale[0]
    assert files_in(exp) == ['net-epoch-1.mat']      # released on exit: the lock file is gone


def test_file_system_without_locks_runs_unlocked_with_one_line(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(runlock.fcntl, 'flock', no_locks)
    lines = []
    with runlock.open_exp_dir(str(tmp_path / 'exp'), lines.append) as lock:
        assert not lock.locked
    assert len(lines) == 1 and 'running unlocked' in lines[0]
    assert files_in(tmp_path / 'exp') == []


def test_lock_is_released_when_the_run_fails(tmp_path):
    exp = tmp_path / 'exp'
    with pytest.raises(ValueError):
        cnn_train_dag(tiny_net(), tiny_imdb(8, 0), lambda *a, **k: {'input': 'bad'}, exp_dir=str(exp),
                      batch_size=4, num_epochs=1, prefetch=False, plot_statistics=False, log=quiet([]))
    with runlock.open_exp_dir(str(exp)):   # free again
        pass


# ---------------------------------------------------------------------------- item 7
def _stale_setup(folder):
    """Our temp file of a dead writer (to go), and files that must stay: a live writer's,
    one from another host, a user's file with a similar name, an old-style temp file."""
    os.makedirs(folder, exist_ok=True)
    pid = dead_pid()
    host = tmpfiles.host_name()
    dead = os.path.join(folder, f'.net-epoch-3.mat~{pid}@{host}~0123456789ab.pydagnn-tmp')
    keep = [os.path.join(folder, n) for n in (
        f'.net-epoch-4.mat~{os.getpid()}@{host}~0123456789ab.pydagnn-tmp',     # live writer (us)
        f'.net-epoch-4.mat~{pid}@other-host~0123456789ab.pydagnn-tmp',         # another machine
        f'.net-epoch-4.mat~{pid}@{host}~0123456789ab.pydagnn-tmp.keep',        # a user's file
        f'net-epoch-4.mat~{pid}@{host}~0123456789ab.pydagnn-tmp',              # no leading dot
        '.net-epoch-4.mat.abc123_x.tmp',                                        # an old pydagnn's
        'notes.pydagnn-tmp')]
    for p in [dead] + keep:
        with open(p, 'wb') as fh:
            fh.write(b'x' * 1000)
    return dead, keep


def test_trainer_start_removes_only_our_stale_temp_files(tmp_path):
    exp = str(tmp_path / 'exp')
    dead, keep = _stale_setup(exp)
    lines = []
    cnn_train_dag(tiny_net(), tiny_imdb(8, 0), exp_dir=exp, batch_size=4, num_epochs=1, learning_rate=0.01,
                  plot_statistics=False, log=quiet(lines))
    assert not os.path.exists(dead)
    assert all(os.path.exists(p) for p in keep)
    assert any('removed 1 stale temporary file' in l and os.path.basename(dead) in l for l in lines)
    assert any('1 temporary file(s) of an older pydagnn' in l and '.net-epoch-4.mat.abc123_x.tmp' in l
               for l in lines)


def test_writer_temp_names_carry_our_pid(tmp_path):
    tmp = tmp_beside(str(tmp_path / 'net-epoch-1.mat'))
    try:
        assert tmpfiles.parse_tmp_name(os.path.basename(tmp)) == ('net-epoch-1.mat', os.getpid(),
                                                                   tmpfiles.host_name())
        assert tmpfiles.clean_stale(str(tmp_path)) == []     # a live writer's file stays
        assert os.path.exists(tmp)
    finally:
        os.unlink(tmp)


def test_killed_writer_temp_file_is_removed_by_the_next_imdb_synth(tmp_path):
    """A writer killed mid-write leaves its temp file; `imdb synth` into that folder removes it."""
    out = tmp_path / 'synth.mat'
    code = ('import sys, time; from pydagnn.io.matfile import tmp_beside; '
            f'print(tmp_beside({str(out)!r}), flush=True); time.sleep(60)')
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    left = p.stdout.readline().strip()
    p.kill()
    p.wait()
    assert os.path.exists(left)
    _, keep = _stale_setup(str(tmp_path))
    r = subprocess.run([sys.executable, '-m', 'pydagnn.imdb', 'synth', '--out', str(out), '--num-train', '4',
                        '--num-val', '2', '--num-classes', '2', '--size', '8'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(left) and os.path.exists(out)
    assert all(os.path.exists(k) for k in keep)
    assert 'stale temporary file' in r.stderr


# ---------------------------------------------------------------------------- item 8
def _unwritable(monkeypatch, folder):
    """Make creating files in ``folder`` fail as on a read-only mount (EROFS), for root too."""
    real_open = os.open
    folder = os.path.abspath(folder)

    def fake_open(path, flags, *a, **k):
        if flags & os.O_CREAT and os.path.abspath(os.fspath(path)).startswith(folder + os.sep):
            raise OSError(errno.EROFS, 'Read-only file system', os.fspath(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, 'open', fake_open)


def test_unwritable_experiment_folder_fails_before_training(tmp_path, monkeypatch):
    exp = tmp_path / 'exp'
    exp.mkdir()
    _unwritable(monkeypatch, str(exp))
    lines = []
    with pytest.raises(ExpDirError) as ei:
        cnn_train_dag(tiny_net(), tiny_imdb(8, 0), exp_dir=str(exp), batch_size=4, num_epochs=1,
                      learning_rate=0.01, plot_statistics=False, log=quiet(lines))
    assert str(exp) in str(ei.value) and 'not writable' in str(ei.value)
    assert not any(l.startswith('train:') for l in lines)      # failed before the first batch


@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0, reason='root ignores file permissions')
def test_read_only_experiment_folder_fails_before_training(tmp_path):
    exp = tmp_path / 'exp'
    exp.mkdir()
    exp.chmod(0o555)
    try:
        with pytest.raises(ExpDirError, match='not writable'):
            cnn_train_dag(tiny_net(), tiny_imdb(8, 0), exp_dir=str(exp), batch_size=4, num_epochs=1,
                          learning_rate=0.01, plot_statistics=False, log=quiet([]))
    finally:
        exp.chmod(0o755)


def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import scipy.io
    exp = str(tmp_path / 'exp')
    imdb = tiny_imdb(8, 0)
    opts = dict(exp_dir=exp, batch_size=4, learning_rate=0.01, plot_statistics=False, log=quiet([]))
    cnn_train_dag(tiny_net(), imdb, num_epochs=1, **opts)
    first = os.path.join(exp, 'net-epoch-1.mat')
    saved = open(first, 'rb').read()
    real = scipy.io.savemat

    def full_disk(fh, *a, **k):
        fh.write(b'\0' * 4096)        # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(scipy.io, 'savemat', full_disk)
    with pytest.raises(CheckpointWriteError) as ei:
        cnn_train_dag(tiny_net(), imdb, num_epochs=2, **opts)
    msg = str(ei.value)
    assert os.path.join(exp, 'net-epoch-2.mat') in msg and 'disk is full' in msg
    assert f'previous checkpoint {first} is intact' in msg and ei.value.errno == errno.ENOSPC
    monkeypatch.setattr(scipy.io, 'savemat', real)
    assert open(first, 'rb').read() == saved
    assert files_in(exp) == ['net-epoch-1.mat']      # no temp file, no lock left
    load_checkpoint(first)


def _example():
    spec = importlib.util.spec_from_file_location('cnn_imagenet64_example',
                                                  os.path.join(ROOT, 'examples', 'cnn_imagenet64.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not os.path.exists(IMDB_FAKE), reason='needs ../shared/data/imdb_fake.mat')
def test_command_unwritable_exp_dir_is_one_error_line_and_exit_1(tmp_path, monkeypatch, capsys):
    ex = _example()
    exp = tmp_path / 'exp'
    exp.mkdir()
    _unwritable(monkeypatch, str(exp))
    code = ex.cli(['--imdb', IMDB_FAKE, '--exp-dir', str(exp), '--epochs', '1', '--section-len', '1',
                   '--cm-num', '4', '--topk', '2', '--no-plot'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith('error: experiment folder ') and str(exp) in err[0]


@pytest.mark.parametrize('error', [
    CheckpointWriteError('cannot write checkpoint x/net-epoch-2.mat: the disk is full (ENOSPC); '
                         'the previous checkpoint x/net-epoch-1.mat is intact', errno.ENOSPC),
    NonFiniteError('cnn_train_dag: epoch 1, batch 2: the step is not finite'),
    RunLockError('experiment folder x is in use by another run (pid 1 on host h)'),
    ExpDirError('experiment folder x is not writable')], ids=lambda e: type(e).__name__)
def test_command_run_failure_is_one_error_line_and_exit_1(error, monkeypatch, capsys):
    ex = _example()

    def train(*a, **k):
        raise error
    monkeypatch.setattr(ex, 'cnn_train_dag', train)
    monkeypatch.setattr(ex, 'load_imdb', lambda path: _FakeImdb())
    assert ex.cli(['--imdb', 'fake.mat', '--section-len', '1', '--cm-num', '4', '--topk', '2']) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: {error}']


class _FakeImdb:
    class images:
        data = np.zeros((16, 16, 3, 2), np.float32)
        labels = np.array([1.0, 2.0])
        set = np.array([1.0, 2.0])

    class meta:
        rgbMean = np.zeros(3)

    def close(self):
        pass


# ---------------------------------------------------------------------------- item 9
@pytest.mark.parametrize('case', ['float16', 'empty', 'list'])
def test_eval_rejects_bad_inputs_naming_the_var(case):
    net = small_gm()
    x = np.zeros((GM_SIZE, GM_SIZE, 3, 2), np.float32)
    label = np.ones(2, np.float32)
    want = {'float16': ["input 'input'", 'dtype float16'],
            'empty': ["input 'input'", f'{GM_SIZE}x{GM_SIZE}x3x0', 'empty'],
            'list': ["input 'input'", 'is a list']}[case]
    if case == 'float16':
        x = x.astype(np.float16)
    elif case == 'empty':
        x, label = x[..., :0], label[:0]
    else:
        x = x.tolist()
    net.mode = 'test'
    with pytest.raises(EvalError) as ei:
        net.eval({'input': x, 'label': label})
    for w in want:
        assert w in str(ei.value)


def test_imdb_synth_disk_full_is_one_error_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from pydagnn import imdb_cli
    from pydagnn.io.matfile import AppendArray
    real = AppendArray.append

    def full_disk(self, block):
        real(self, block[..., :1])
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(AppendArray, 'append', full_disk)
    out = tmp_path / 'synth.mat'
    code = imdb_cli.main(['synth', '--out', str(out), '--num-train', '4', '--num-val', '2',
                          '--num-classes', '2', '--size', '8'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0] == f'error: {out}: No space left on device (ENOSPC); nothing was written'
    assert files_in(tmp_path) == []     # not published, no temp file left


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason='needs cupy and a CUDA device')
def test_nonfinite_step_on_gpu(tmp_path):
    """The device count (one reduction per array into one vector, one read) and the
    stop on the GPU: same epoch, batch and layer as on the CPU."""
    import cupy
    a = cupy.ones((3, 4), cupy.float32)
    b = cupy.ones(5, cupy.float64)
    b[2] = cupy.inf
    c = cupy.full((2, 2), cupy.nan, cupy.float32)
    n = finite.count_nonfinite([a, b, c, cupy.arange(3)])
    assert isinstance(n, cupy.ndarray) and int(n) == 5
    calls = []

    def get_batch(imdb_, idx, mode, rng):
        b = pdata.get_batch(imdb_, idx, mode=mode, rng=rng)
        calls.append(1)
        if len(calls) == 2:
            b['input'][3, 4, 1, 2] = np.nan
        return b
    net = small_gm()
    with pytest.raises(NonFiniteError) as ei:
        cnn_train_dag(net, gm_imdb(8), get_batch, exp_dir=str(tmp_path / 'exp'), batch_size=4, num_epochs=1,
                      learning_rate=0.01, gpus=[0], prefetch=False, plot_statistics=False, log=quiet([]))
    assert (ei.value.epoch, ei.value.batch, ei.value.layer) == (1, 2, 'conv1_conv')
    assert all(np.isfinite(backend.to_host(p.value)).all() for p in net.params)


@pytest.mark.filterwarnings('ignore:invalid value:RuntimeWarning')
def test_nan_in_the_first_of_two_sub_batches_is_found(tmp_path):
    """The derivatives are summed over sub-batches: a NaN in the first one is caught at the
    step's end and the diagnosis evaluates each sub-batch to find it."""
    calls = []

    def get_batch(imdb_, idx, mode, rng):
        b = pdata.get_batch(imdb_, idx, mode=mode, rng=rng)
        calls.append(list(idx))
        if len(calls) == 1:
            b['input'][0, 0, 0, 0] = np.inf
        return b
    with pytest.raises(NonFiniteError) as ei:
        cnn_train_dag(tiny_net(), tiny_imdb(8, 0), get_batch, exp_dir=str(tmp_path / 'exp'), batch_size=4,
                      num_sub_batches=2, num_epochs=1, learning_rate=0.01, prefetch=False,
                      plot_statistics=False, log=quiet([]))
    assert (ei.value.epoch, ei.value.batch, ei.value.layer) == (1, 1, 'conv1')
    assert f'(imdb image(s) {calls[0][0] + 1}, 1-based)' in str(ei.value)
