"""Learning check: the reduced GM-SOP of ``examples/cnn_imagenet64.py`` (no --imdb) on the
generated imdb gets well below chance error. Light form (CI, 2 CPU cores, a few minutes):
1000 train / 200 val images of 20 classes, 2 epochs (about 15 s on 2 idle cores of a recent
CPU). ``PYDAGNN_FULL=1``: the example's own default run (3000 / 600 images, 3 epochs, about
45 s there)."""
import importlib.util
import os
import time

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), '..', 'examples', 'cnn_imagenet64.py')


def _example():
    spec = importlib.util.spec_from_file_location('cnn_imagenet64_example', EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_reduced_gm_sop_learns(tmp_path, monkeypatch):
    full = os.environ.get('PYDAGNN_FULL') == '1'
    monkeypatch.setenv('PYDAGNN_CACHE', str(tmp_path / 'cache'))
    ex = _example()
    argv = ['--exp-dir', str(tmp_path / 'exp')]
    if not full:
        argv += ['--demo-size', '1000', '200', '--epochs', '2', '--lr', '0.1', '0.05', '--batch-size', '32']
    t0 = time.perf_counter()
    net, stats = ex.main(argv)
    took = time.perf_counter() - t0
    chance = 1 - 1 / ex.DEMO_IMDB['num_classes']
    train = [r['top1error'] for r in stats['train']]
    val = [r['top1error'] for r in stats['val']]
    print(f'\nerror curve (top-1; chance {chance:.2f}), {took:.0f} s:')
    for e, (a, b) in enumerate(zip(train, val), start=1):
        print(f'  epoch {e}: train {a:.3f}  val {b:.3f}')
    assert len(val) == (3 if full else 2)
    assert val[-1] < 0.5 * chance, val
    assert train[-1] < train[0] < chance, train
    assert os.path.exists(tmp_path / 'exp' / f'net-epoch-{len(val)}.mat')
    if importlib.util.find_spec('matplotlib') is not None:
        assert os.path.exists(tmp_path / 'exp' / 'net-train.pdf')
