"""Byte-level fuzzing of every public loader (issue 13): small valid files (models v7 and
v7.3, imdbs v7 and v7.3, checkpoints v7 and v7.3) are mutated (bit flips, random bytes,
runs of 0x00/0xFF, cuts, splices, duplicated spans) and loaded; each case must load or fail
with the loader's clean error (MatFileError; CheckpointError for checkpoints), within a
per-case time limit, in a child with an address-space limit.

CI runs a light form (a few dozen cases per loader). ``PYDAGNN_FULL=1`` runs
``PYDAGNN_FUZZ_SECONDS`` (default 180) seconds per loader; the counts, the slowest case and
the peak memory are printed. As a script: ``python tests/test_fuzz_loaders.py LOADER SEED
SECONDS CASES`` prints one JSON report.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

LOADERS = ('model7', 'model73', 'imdb7', 'imdb73', 'checkpoint7', 'checkpoint73')
CASE_LIMIT_S = 10          # one case: load plus a read of two images
MEM_LIMIT = 2 << 30        # RLIMIT_AS of the fuzzing child


def _net():
    from pydagnn import DagNN
    from pydagnn.layers.bnorm import BatchNorm
    from pydagnn.layers.conv import Conv
    from pydagnn.layers.loss import Loss
    net = DagNN()
    net.add_layer('conv1', Conv(size=[3, 3, 3, 4], pad=1), ['input'], ['x1'], ['conv1_f', 'conv1_b'])
    net.add_layer('bn1', BatchNorm(numChannels=4), ['x1'], ['prediction'], ['bn1_g', 'bn1_b', 'bn1_m'])
    net.add_layer('loss', Loss(loss='softmaxlog'), ['prediction', 'label'], ['objective'])
    net.init_params()
    net.meta = {'classes': {'name': ['a', 'b', 'c', 'd']}, 'inputs': [{'name': 'input', 'size': [8.0, 8.0, 3.0, 1.0]}]}
    return net


def make_source(loader, folder):
    """The valid file ``loader`` fuzzes, written into ``folder``."""
    from pydagnn.io.checkpoint import save_checkpoint
    from pydagnn.io.imdb import save_imdb
    from pydagnn.io.matconvnet import save_matconvnet
    from pydagnn.io.matfile import read_mat, write_mat
    p = os.path.join(folder, f'src_{loader}.mat')
    if loader.startswith('model'):
        save_matconvnet(_net(), p, version='7.3' if loader == 'model73' else '7', compress=False)
    elif loader.startswith('imdb'):
        rng = np.random.default_rng(0)
        data = np.asfortranarray(rng.integers(0, 256, (4, 4, 3, 4), dtype=np.uint8))
        save_imdb(p, data, np.array([1.0, 2, 3, 4]), np.array([1.0, 1, 1, 2]),
                  {'sets': ['train', 'val', 'test'], 'rgbMean': np.ones((3, 1))},
                  version='7.3' if loader == 'imdb73' else '7')
    else:
        v7 = os.path.join(folder, 'ckpt7.mat')
        save_checkpoint(v7, _net(), {'momentum': {}}, {'train': [{'objective': 1.0, 'num': 4.0}], 'val': []})
        if loader == 'checkpoint7':
            return v7
        write_mat(p, read_mat(v7), version='7.3')
    return p


def mutate(blob, rng):
    """One random mutation of ``blob`` (bytes) -> bytes."""
    b = bytearray(blob)
    kind = int(rng.integers(0, 6))
    n = len(b)
    if kind == 0:                                    # bit flips
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(0, n))
            b[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:                                  # random bytes
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(0, n))] = int(rng.integers(0, 256))
    elif kind == 2:                                  # a run of 0x00 or 0xFF (sizes, addresses)
        pos = int(rng.integers(0, n))
        k = int(rng.integers(1, 9))
        b[pos:pos + k] = bytes([0xFF if rng.integers(0, 2) else 0]) * len(b[pos:pos + k])
    elif kind == 3:                                  # cut short
        b = b[:int(rng.integers(1, n))]
    elif kind == 4:                                  # splice out a span
        a, c = sorted(int(x) for x in rng.integers(0, n, 2))
        b = b[:a] + b[c:]
    else:                                            # duplicate a span elsewhere
        a, c = sorted(int(x) for x in rng.integers(0, n, 2))
        c = min(c, a + 4096)
        pos = int(rng.integers(0, n))
        b[pos:pos + (c - a)] = blob[a:c]
    return bytes(b)


def _v5_elements(blob):
    """Top-level v5 data elements of ``blob``: a list of (start, end, type)."""
    out, pos = [], 128
    while pos + 8 <= len(blob):
        mtype, n = int.from_bytes(blob[pos:pos + 4], 'little'), int.from_bytes(blob[pos + 4:pos + 8], 'little')
        end = pos + 8 + n + (0 if mtype == 15 else -n % 8)
        out.append((pos, min(end, len(blob)), mtype))
        pos = end
    return out


def mutate_inside(blob, rng):
    """For a compressed v7 file: mutate the inflated bytes of one variable and deflate
    them again, so that the parser (not zlib) meets the damage."""
    import zlib
    comp = [e for e in _v5_elements(blob) if e[2] == 15]
    if not comp:
        return mutate(blob, rng)
    a, b, _ = comp[int(rng.integers(0, len(comp)))]
    inner = zlib.decompress(blob[a + 8:b])
    bad = mutate(inner, rng)
    packed = zlib.compress(bad)
    return blob[:a] + (15).to_bytes(4, 'little') + len(packed).to_bytes(4, 'little') + packed + blob[b:]


def _load(loader, path):
    if loader.startswith('model'):
        from pydagnn.io.matconvnet import load_matconvnet
        load_matconvnet(path)
    elif loader.startswith('imdb'):
        from pydagnn.io.imdb import load_imdb
        with load_imdb(path) as imdb:
            imdb.images.data[:, :, :, [0, imdb.images.data.shape[3] - 1]]
    else:
        from pydagnn.io.checkpoint import load_checkpoint
        load_checkpoint(path)


class _CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _CaseTimeout()


def fuzz(loader, seed, seconds, cases):
    """Fuzz ``loader`` for ``seconds`` or ``cases`` cases (whichever ends first): a report."""
    import resource
    import signal
    import warnings
    from pydagnn.io.checkpoint import CheckpointError
    from pydagnn.io.errors import MatFileError
    warnings.simplefilter('ignore')
    signal.signal(signal.SIGALRM, _alarm)
    rng = np.random.default_rng(seed)
    report = {'loader': loader, 'seed': seed, 'ok': 0, 'clean_error': 0, 'bad': [], 'slowest_s': 0.0}
    with tempfile.TemporaryDirectory() as d:
        blob = open(make_source(loader, d), 'rb').read()
        path = os.path.join(d, 'case.mat')
        t_end = time.perf_counter() + seconds
        clean = (MatFileError, CheckpointError) if loader.startswith('checkpoint') else (MatFileError,)
        while time.perf_counter() < t_end and report['ok'] + report['clean_error'] + len(report['bad']) < cases:
            inside = blob[126:128] == b'IM' and rng.integers(0, 4) > 0   # mostly past zlib
            with open(path, 'wb') as fh:
                fh.write(mutate_inside(blob, rng) if inside else mutate(blob, rng))
            t0 = time.perf_counter()
            signal.alarm(CASE_LIMIT_S)
            try:
                _load(loader, path)
                report['ok'] += 1
            except clean:
                report['clean_error'] += 1
            except _CaseTimeout:
                report['bad'].append(f'over {CASE_LIMIT_S} s')
                os.replace(path, os.path.join(tempfile.gettempdir(), f'fuzz_slow_{loader}_{seed}.mat'))
            except BaseException as e:                  # noqa: BLE001 (what the fuzz looks for)
                report['bad'].append(f'{type(e).__name__}: {e}'[:300])
            finally:
                signal.alarm(0)
            report['slowest_s'] = max(report['slowest_s'], time.perf_counter() - t0)
    report['cases'] = report['ok'] + report['clean_error'] + len(report['bad'])
    report['seconds'] = round(seconds - max(t_end - time.perf_counter(), 0), 1)
    report['slowest_s'] = round(report['slowest_s'], 3)
    try:    # this process's own peak (ru_maxrss would carry the parent's across exec)
        hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]
        report['maxrss_mb'] = round(int(hwm.split()[1]) / 1024, 1)
    except (OSError, IndexError):
        report['maxrss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


def run_child(loader, seed, seconds, cases):
    """:func:`fuzz` in a child under RLIMIT_AS, with a whole-run timeout."""
    code = ('import resource, sys, json; resource.setrlimit(resource.RLIMIT_AS, (%d, %d)); '
            'sys.path.insert(0, %r); import test_fuzz_loaders as t; '
            'print(json.dumps(t.fuzz(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))))'
            % (MEM_LIMIT, MEM_LIMIT, os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, '-c', code, loader, str(seed), str(seconds), str(cases)],
                       capture_output=True, text=True, timeout=seconds + 120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize('loader', LOADERS)
def test_fuzz_loader(loader):
    full = os.environ.get('PYDAGNN_FULL') == '1'
    seconds = float(os.environ.get('PYDAGNN_FUZZ_SECONDS', 180)) if full else 60.0
    cases = 10 ** 9 if full else 40
    rep = run_child(loader, 20261202 + LOADERS.index(loader), seconds, cases)
    print(json.dumps(rep))
    assert not rep['bad'], rep
    assert rep['cases'] >= (40 if not full else 1) and rep['clean_error'] > 0, rep


if __name__ == '__main__':
    print(json.dumps(fuzz(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))))
