"""The README's commands and code run as written, so that the user's guide cannot drift.

Every fenced ``bash`` and ``python`` block of README.md runs, in order, in one scratch folder
(``examples/`` linked in, ``python`` the interpreter running the tests), each bash line a
command that must exit 0, each python block a script. A block preceded by an HTML comment
``<!-- not run: why -->`` is not run: the install and test commands CI runs itself, and the
few that need a GPU, the real data or several processes. The test also checks that those are
few and that each says why.
"""
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')

#: ```lang ... ``` blocks with the line before them (a "not run" marker or not)
_BLOCK = re.compile(r'(?:^(<!--[^\n]*-->)\n)?^```(\w*)\n(.*?)^```\s*$', re.M | re.S)
_NOT_RUN = re.compile(r'<!--\s*not run:\s*(\S.*?)\s*-->')


def readme_blocks(text):
    """``[(lang, code, why_not_run or None)]`` for every fenced block of ``text``."""
    out = []
    for m in _BLOCK.finditer(text):
        marker, lang, code = m.group(1), m.group(2), m.group(3)
        why = None
        if marker:
            nr = _NOT_RUN.match(marker)
            why = nr.group(1) if nr else None
        out.append((lang, code, why))
    return out


def test_blocks_are_parsed_and_marked():
    blocks = readme_blocks(open(README, encoding='utf-8').read())
    langs = {lang for lang, _, _ in blocks}
    assert {'bash', 'python'} <= langs
    skipped = [(code, why) for lang, code, why in blocks if why and lang in ('bash', 'python')]
    run = [code for lang, code, why in blocks if not why and lang in ('bash', 'python')]
    assert len(run) >= 6, 'the README should show runnable commands'
    assert len(skipped) <= 7, f'too many README blocks are not run: {skipped}'
    for code, why in skipped:
        assert len(why) > 8, f'say why a block is not run: {code!r}'
    # the two main commands are the ones CI runs itself
    assert any('pip install -e' in c and 'examples/cnn_imagenet64.py' in c for c, _ in skipped)
    assert any(c.strip() == 'python -m pytest' for c, _ in skipped)


def _env(tmp):
    env = dict(os.environ)
    env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
    env['PYDAGNN_CACHE'] = os.path.join(tmp, 'cache')
    env.pop('PYTHONPATH', None)
    return env


def test_readme_runs(tmp_path):
    """Every bash and python block not marked "not run", in order, in one folder; prints
    the time of each command (``pytest -s``)."""
    blocks = readme_blocks(open(README, encoding='utf-8').read())
    work = str(tmp_path)
    os.symlink(os.path.join(ROOT, 'examples'), os.path.join(work, 'examples'))
    env = _env(work)
    times = []
    for lang, code, why in blocks:
        if why or lang not in ('bash', 'python'):
            continue
        if lang == 'bash':
            commands = [line for line in code.splitlines() if line.strip() and not line.startswith('#')]
        else:
            commands = [code]
        for cmd in commands:
            argv = ['bash', '-euo', 'pipefail', '-c', cmd] if lang == 'bash' else [sys.executable, '-c', cmd]
            t0 = time.perf_counter()
            r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            took = time.perf_counter() - t0
            shown = cmd if lang == 'bash' else 'python block (step 5)'
            assert r.returncode == 0, f'README command failed: {shown}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
            assert 'Traceback' not in r.stderr, f'{shown}\n{r.stderr[-3000:]}'
            times.append((took, shown))
    print('\nREADME commands, seconds:')
    for took, shown in times:
        print(f'  {took:6.1f}  {shown}')
    # what the steps promise: checkpoints and plots, the resumed epochs
    for epoch in (1, 2, 3):   # trained, resumed, resumed with a schedule
        assert os.path.exists(os.path.join(work, 'data', 'synth', f'net-epoch-{epoch}.mat'))
    assert os.path.exists(os.path.join(work, 'data', 'py', 'net-epoch-1.mat'))
    if _have_matplotlib():
        assert os.path.exists(os.path.join(work, 'data', 'synth', 'net-train.png'))


def _have_matplotlib():
    import importlib.util
    return importlib.util.find_spec('matplotlib') is not None


#: the Python names of the README's MatConvNet table
TABLE_NAMES = ['pydagnn.DagNN', 'pydagnn.models.build', 'pydagnn.io.imdb.load_imdb',
               'pydagnn.train.cnn_train_dag', 'pydagnn.layers.conv.conv_forward', 'pydagnn.data.get_batch',
               'pydagnn.load_matconvnet', 'pydagnn.save_matconvnet']


def test_table_names_after_plain_import():
    """The MatConvNet table's Python names resolve after ``import pydagnn`` alone (a fresh
    interpreter, so nothing else imported their modules first), and each is in the README."""
    text = open(README, encoding='utf-8').read()
    for name in TABLE_NAMES:
        assert name in text, name
    code = 'import pydagnn\nprint(all(callable(o) for o in [' + ', '.join(TABLE_NAMES) + ']))'
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == 'True', r.stderr
