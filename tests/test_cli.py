"""The commands a user runs end a mistake with one ``error: ...`` line and exit status 2
(pydagnn.cli.run_main): the exact messages, the exit codes, --debug, Ctrl-C, no empty
experiment folder after a failed first run, a help line for every flag."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from pydagnn.cli import Interrupted, RunError, UsageError, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, 'examples', 'cnn_imagenet64.py')


def _example():
    spec = importlib.util.spec_from_file_location('cnn_imagenet64_cli', EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def ex():
    return _example()


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A 16x16 synthetic imdb (10 classes), one without training images, one of 12x12
    images, a file that is no MAT-file, and a small model for 16x16 images."""
    from pydagnn.io.imdb import save_imdb, synth_imdb
    from pydagnn.models import build
    from pydagnn.io.matconvnet import save_matconvnet
    d = tmp_path_factory.mktemp('cli')
    out = {'imdb': str(d / 'synth.mat'), 'noval': str(d / 'noval.mat'), 'odd': str(d / 'odd.mat'),
           'text': str(d / 'notes.mat'), 'model': str(d / 'net.mat'), 'dir': d}
    synth_imdb(out['imdb'], num_train=20, num_val=6, num_classes=10, size=16, seed=1)
    data = np.zeros((16, 16, 3, 4), np.uint8)
    save_imdb(out['noval'], data, [1, 2, 1, 2], [2, 2, 2, 2], {'rgbMean': [0, 0, 0]})
    save_imdb(out['odd'], np.zeros((12, 12, 3, 4), np.uint8), [1, 2, 1, 2], [1, 1, 2, 2],
              {'rgbMean': [0, 0, 0]})
    with open(out['text'], 'w') as fh:
        fh.write('not a MAT-file\n')
    net = build('ResNet18-GAP', section_len=1, num_classes=5, image_size=16)
    for p in net.params:           # BN moments as after training (sigma 1, not 0)
        if p.name.endswith('_m'):
            p.value[:, 1] = 1
    save_matconvnet(net, out['model'], version='7')
    return out


def _run(capsys, main, argv):
    rc = run_main(main, argv)
    cap = capsys.readouterr()
    return rc, cap.err.strip()


# ------------------------------------------------------------------- the helper itself
def test_run_main_statuses(capsys):
    def ok(argv):
        return None

    def usage(argv):
        raise UsageError('--flag 3: must be at least 4')

    def missing(argv):
        open(os.path.join('/nonexistent', 'x.mat'))

    def bug(argv):
        raise ZeroDivisionError('a real bug')

    def stop(argv):
        raise KeyboardInterrupt

    def disk_full(argv):
        raise RunError('out.mat: No space left on device (ENOSPC); nothing was written')

    class Held(RuntimeError):
        pass

    def held(argv):
        raise Held('experiment folder x is in use by another run')

    def stop_here(argv):
        raise Interrupted('the same command resumes after epoch 3')

    assert run_main(ok, []) == 0
    assert _run(capsys, usage, []) == (2, 'error: --flag 3: must be at least 4')
    assert _run(capsys, missing, []) == (2, 'error: /nonexistent/x.mat: No such file or directory')
    assert _run(capsys, stop, []) == (130, 'interrupted: stopped by Ctrl-C')
    # a failure of the run itself (not of the input) is one line too, exit 1
    assert _run(capsys, disk_full, []) == (1, 'error: out.mat: No space left on device (ENOSPC); '
                                              'nothing was written')
    assert run_main(lambda argv: None, [], run_errors=(Held,)) == 0
    rc = run_main(held, [], run_errors=(Held,))
    assert (rc, capsys.readouterr().err.strip()) == (1, 'error: experiment folder x is in use by another run')
    assert _run(capsys, stop_here, []) == (130, 'interrupted: the same command resumes after epoch 3')
    with pytest.raises(ZeroDivisionError):        # a bug keeps its traceback
        run_main(bug, [])
    with pytest.raises(UsageError):               # so does every error with --debug
        run_main(usage, ['--debug'])
    seen = []
    run_main(lambda argv: seen.append(argv), ['a', '--debug', 'b'])
    assert seen == [['a', 'b']]


# ------------------------------------------------------------------- examples/cnn_imagenet64.py
def test_train_errors(ex, files, capsys, tmp_path):
    imdb, exp = files['imdb'], str(tmp_path / 'exp')
    cases = [
        (['--imdb', 'missing.mat'], 'error: --imdb missing.mat: no such file'),
        (['--imdb', imdb, '--batch-size', '0'], 'error: --batch-size 0: must be at least 1'),
        (['--imdb', imdb, '--epochs', '-1'], 'error: --epochs -1: must be at least 1'),
        (['--imdb', imdb, '--lr', '0.1', '-0.01'], 'error: --lr 0.1 -0.01: learning rates must be positive'),
        (['--imdb', imdb, '--topk', '5', '--cm-num', '4'], 'error: --topk 5: must not exceed --cm-num 4'),
        (['--imdb', imdb, '--cm-num', '4'], 'error: --topk 8: must not exceed --cm-num 4'),
        (['--imdb', imdb, '--demo-size', '10', '5'],
         'error: --demo-size applies only without --imdb (it sizes the generated imdb)'),
        (['--imdb', imdb, '--num-classes', '5'], f'error: {imdb}: labels go up to 10, above --num-classes 5'),
        (['--imdb', files['noval']],
         f"error: {files['noval']}: no training images (images.set has no 1; found sets [2])"),
        (['--imdb', files['odd']],
         f"error: {files['odd']}: images.data is 12x12x3x4; the models take S x S x 3 x N images "
         'with S a multiple of 8 (e.g. 64x64x3)'),
    ]
    for argv, msg in cases:
        assert _run(capsys, ex.main, argv + ['--exp-dir', exp]) == (2, msg), argv
        assert not os.path.exists(exp)
    rc, err = _run(capsys, ex.main, ['--imdb', files['text'], '--exp-dir', exp])
    assert rc == 2 and err.startswith(f"error: {files['text']}: ") and '\n' not in err


def test_train_gpus_without_a_gpu(ex, files, capsys):
    from pydagnn import backend
    if backend.gpu_available():
        pytest.skip('a CUDA device is present')
    assert _run(capsys, ex.main, ['--imdb', files['imdb'], '--gpus', '0']) == (
        2, "error: --gpus 0: no CUDA device is usable here (CuPy with a CUDA device is needed: "
           "pip install -e '.[cuda12]'; leave out --gpus to run on the CPU)")


def _train_argv(files, exp):
    return ['--imdb', files['imdb'], '--exp-dir', exp, '--section-len', '1', '--cm-num', '2',
            '--topk', '1', '--batch-size', '10', '--epochs', '1', '--no-plot', '--no-prefetch']


def test_failed_first_run_leaves_no_folder(ex, files, capsys, tmp_path, monkeypatch):
    import pydagnn.train as ptrain
    exp = str(tmp_path / 'runs' / 'exp')

    def fails(net, imdb, get_batch, exp_dir, **kw):
        os.makedirs(exp_dir, exist_ok=True)
        raise ValueError('eval: something the user can fix')

    monkeypatch.setattr(ptrain, 'cnn_train_dag', fails)
    assert _run(capsys, ex.main, _train_argv(files, exp)) == (2, 'error: eval: something the user can fix')
    assert not os.path.exists(tmp_path / 'runs')

    def interrupted(net, imdb, get_batch, exp_dir, **kw):
        os.makedirs(exp_dir, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(ptrain, 'cnn_train_dag', interrupted)
    assert _run(capsys, ex.main, _train_argv(files, exp)) == (
        130, f'interrupted: no checkpoint in {exp} yet: the same command starts from epoch 1')
    assert not os.path.exists(tmp_path / 'runs')


def test_ctrl_c_after_a_checkpoint_names_it(ex, files, capsys, tmp_path, monkeypatch):
    """A real run: one epoch is saved, then Ctrl-C in the next keeps the folder and says
    where the same command resumes."""
    import pydagnn.data as pdata
    exp = str(tmp_path / 'exp')
    assert run_main(ex.main, _train_argv(files, exp)) == 0
    assert os.path.exists(os.path.join(exp, 'net-epoch-1.mat'))
    capsys.readouterr()

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pdata, 'get_batch', interrupt)
    argv = _train_argv(files, exp)
    argv[argv.index('--epochs') + 1] = '2'
    assert _run(capsys, ex.main, argv) == (
        130, f"interrupted: the same command resumes after epoch 1 ({os.path.join(exp, 'net-epoch-1.mat')})")
    assert os.path.exists(os.path.join(exp, 'net-epoch-1.mat'))


def test_train_header_prints_the_schedule_compactly(ex, files, capsys, tmp_path):
    from pydagnn.train import format_schedule
    assert format_schedule(np.r_[[0.1] * 40, [0.01] * 10, [0.001] * 5, [1e-4] * 5]) == \
        '0.1 x 40, 0.01 x 10, 0.001 x 5, 0.0001 x 5'
    assert format_schedule(0.75 * np.r_[[0.1] * 50, [0.01] * 15]) == '0.075 x 50, 0.0075 x 15'
    assert format_schedule([0.1, 0.02], 4) == '0.1 x 1, 0.02 x 3'   # the last rate repeats
    argv = _train_argv(files, str(tmp_path / 'exp')) + ['--lr', '0.1', '0.1', '0.01']
    argv[argv.index('--epochs') + 1] = '1'
    ex.main(argv)
    header = capsys.readouterr().out.splitlines()[0]
    assert header.endswith(f"1 epochs, batch 10, lr 0.1 x 1; exp dir {tmp_path / 'exp'}"), header


# ------------------------------------------------------------------- python -m pydagnn.evaluate
def test_evaluate_errors(files, capsys):
    from pydagnn import evaluate as pev
    m, imdb = files['model'], files['imdb']
    cases = [
        (['--model', m, '--imdb', imdb, '--batch-size', '0'], 'error: --batch-size 0: must be at least 1'),
        (['--model', 'nope.mat', '--imdb', imdb], 'error: --model nope.mat: no such file'),
        (['--model', m, '--imdb', 'nope.mat'], 'error: --imdb nope.mat: no such file'),
        (['--model', m, '--imdb', imdb], f'error: {imdb}: labels of the val images go up to 6 but {m} scores 5 classes'),
    ]
    for argv, msg in cases:
        assert _run(capsys, pev.main, argv) == (2, msg), argv
    rc, err = _run(capsys, pev.main, ['--model', m, '--imdb', files['odd'], '--set', 'val'])
    assert (rc, err) == (2, f"error: {files['odd']}: images of 12x12x3 do not fit {m} (its meta says 16x16x3)")
    rc, err = _run(capsys, pev.main, ['--model', files['text'], '--imdb', imdb])
    assert rc == 2 and err.startswith(f"error: {files['text']}: ") and '\n' not in err


def test_evaluate_progress_has_a_rate_and_an_eta(files, capsys):
    from pydagnn import evaluate as pev
    from pydagnn.io.imdb import load_imdb
    from pydagnn.io.matconvnet import load_matconvnet
    lines = []
    with load_imdb(files['noval']) as imdb:
        pev.evaluate(load_matconvnet(files['model']), imdb, 'val', batch_size=1, log=lines.append,
                     log_interval=3600)
    assert len(lines) == 2     # 4 batches: the first and the last line, none between
    assert lines[0].startswith('evaluate:    1/   4: ') and ' Hz ' in lines[0] and ' ETA ' in lines[0]
    assert lines[1].startswith('evaluate:    4/   4: ') and lines[1].endswith(' ETA 0s')
    with pytest.raises(ValueError, match='batch_size must be at least 1'):
        with load_imdb(files['noval']) as imdb:
            pev.evaluate(load_matconvnet(files['model']), imdb, 'val', batch_size=0)


# ------------------------------------------------------------------- python -m pydagnn.imdb
def test_imdb_errors_and_info(files, capsys, tmp_path):
    from pydagnn.imdb import main
    out = str(tmp_path / 'o.mat')
    # main runs run_main itself: its return value is the exit status
    assert main(['convert', '--src', '/missing', '--out', out]) == 2
    assert capsys.readouterr().err.strip() == 'error: --src /missing: the folder does not exist'
    assert main(['synth', '--out', '/missing/s.mat']) == 2
    assert capsys.readouterr().err.strip() == 'error: --out /missing/s.mat: the folder /missing does not exist'
    assert main(['synth', '--out', out, '--num-classes', '0']) == 2
    assert capsys.readouterr().err.strip() == 'error: --num-classes 0: must be at least 1'
    assert main(['info', 'nope.mat']) == 2
    assert capsys.readouterr().err.strip() == 'error: nope.mat: no such imdb file'
    from pydagnn.io.imdb import imdb_info, save_imdb
    save_imdb(out, np.zeros((8, 8, 3, 3), np.uint8), [2, 7, 2], [1, 1, 2], {'rgbMean': [0, 0, 0]})
    info = imdb_info(out)
    assert info['num_classes'] == 7 and info['distinct_labels'] == 2  # as the trainer counts


def test_convert_shows_progress(files, capsys, tmp_path):
    from pydagnn.imdb import main
    assert main(['convert', '--src', files['imdb'], '--out', str(tmp_path / 'r.mat'), '--chunk', '8']) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('convert: 26/26 images (100.0%), ') and 'images/s' in err[-1]


def test_progress_line():
    from pydagnn.progress import Progress, format_duration
    t = [0.0]
    lines = []

    class Sink:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass

    bar = Progress('convert', total=1000, unit='images', stream=Sink(), interval=5, clock=lambda: t[0])
    t[0] = 2.0
    bar.update(100)                 # under the interval: nothing printed
    assert bar.lines == 0
    t[0] = 10.0
    bar.update(400)
    assert bar.line() == 'convert: 500/1000 images (50.0%), 50 images/s, ETA 10s'
    assert bar.lines == 1
    assert [format_duration(s) for s in (47, 167, 3720, float('inf'))] == ['47s', '2m47s', '1h02m', '?']


# ------------------------------------------------------------------- python -m pydagnn.parity
def test_parity_without_fixtures(capsys, tmp_path):
    from pydagnn import parity
    how = ("the fixtures come with the project's shared folder: give --fixtures DIR or set "
           'PYDAGNN_SHARED=/path/to/shared (holding fixtures/)')
    assert _run(capsys, parity.main, ['--fixtures', str(tmp_path / 'none')]) == (
        2, f"error: --fixtures {tmp_path / 'none'}: no such folder; {how}")
    assert _run(capsys, parity.main, ['--fixtures', str(tmp_path)]) == (
        2, f'error: --fixtures {tmp_path}: holds no fx_*.mat fixtures; {how}')


# ------------------------------------------------------------------- as the user runs them
def test_commands_in_a_shell(files, tmp_path):
    """The real processes: one stderr line, exit status 2, no traceback; --help works."""
    env = dict(os.environ, PYDAGNN_SHARED=str(tmp_path / 'no-shared'))
    runs = [
        ([EXAMPLE, '--imdb', 'missing.mat'], 'error: --imdb missing.mat: no such file'),
        (['-m', 'pydagnn.evaluate', '--model', 'm.mat', '--imdb', 'i.mat'], 'error: --model m.mat: no such file'),
        (['-m', 'pydagnn.imdb', 'convert', '--src', '/missing', '--out', 'o.mat'],
         'error: --src /missing: the folder does not exist'),
        (['-m', 'pydagnn.parity'], f"error: --fixtures {tmp_path / 'no-shared' / 'fixtures'}: no such folder; "),
    ]
    for argv, msg in runs:
        r = subprocess.run([sys.executable] + argv, capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=120)
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr.count('\n') == 1 and r.stderr.startswith(msg), (argv, r.stderr)
    refused = [  # argparse's own refusals: one line too, without the usage text
        ([EXAMPLE, '--batch-size', 'x'],
         "error: argument --batch-size: invalid int value: 'x' (see examples/cnn_imagenet64.py --help)\n"),
        (['-m', 'pydagnn.evaluate', '--imdb', 'i.mat'],
         'error: the following arguments are required: --model (see python -m pydagnn.evaluate --help)\n'),
        (['-m', 'pydagnn.imdb'], 'error: the following arguments are required: {convert,synth,info} '
                                 '(see python -m pydagnn.imdb --help)\n'),
        (['-m', 'pydagnn.imdb', 'info'], 'error: the following arguments are required: path '
                                         '(see python -m pydagnn.imdb info --help)\n'),
    ]
    for argv, err in refused:
        r = subprocess.run([sys.executable] + argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert (r.returncode, r.stderr) == (2, err), argv
    r = subprocess.run([sys.executable, EXAMPLE, '--imdb', 'missing.mat', '--debug'], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and 'Traceback' in r.stderr and 'UsageError' in r.stderr


def _parsers():
    from pydagnn import evaluate, imdb_cli, parity
    import argparse
    import importlib
    classify = importlib.import_module('pydagnn.classify')   # the module (pydagnn.classify is also the function)
    top = imdb_cli.make_parser()
    subs = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)][0]
    found = {'examples/cnn_imagenet64.py': _example().make_parser(), 'evaluate': evaluate.make_parser(),
             'parity': parity.make_parser(), 'classify': classify.make_parser()}
    found.update({f'imdb {name}': p for name, p in subs.choices.items()})
    return found


def test_every_flag_has_a_help_line():
    for cmd, p in _parsers().items():
        for action in p._actions:
            if action.option_strings or action.dest not in ('help',):
                assert action.help, f'{cmd}: {action.option_strings or action.dest} has no help line'


def test_help_loads_no_numba(tmp_path):
    """``--help`` answers before the layer library (numba) is imported, so it comes at once."""
    runs = [('path', EXAMPLE, []), ('module', 'pydagnn.evaluate', []), ('module', 'pydagnn.imdb', ['convert']),
            ('module', 'pydagnn.parity', []), ('module', 'pydagnn.classify', [])]
    for kind, target, sub in runs:
        code = ('import runpy, sys\n'
                f'sys.argv = ["cmd"] + {sub!r} + ["--help"]\n'
                'try:\n'
                f'    runpy.run_{kind}({target!r}, run_name="__main__")\n'
                'except SystemExit:\n'
                '    pass\n'
                'print("numba loaded" if "numba" in sys.modules else "no numba", file=sys.stderr)\n')
        r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0 and 'usage:' in r.stdout, (target, r.stderr)
        assert r.stderr.strip().splitlines()[-1] == 'no numba', (target, r.stderr)
