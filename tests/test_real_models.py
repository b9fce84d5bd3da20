"""Real public MatConvNet models (benchmarks/real_models.py) when PYDAGNN_REAL_MODELS
names a folder holding them (see that script's docstring); skipped otherwise. The files
are never part of this repository."""
import importlib.util
import os
import pathlib

import pytest

FOLDER = os.environ.get('PYDAGNN_REAL_MODELS')
ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not FOLDER, reason='PYDAGNN_REAL_MODELS is not set')


@pytest.fixture(scope='module')
def real():
    spec = importlib.util.spec_from_file_location('real_models', ROOT / 'benchmarks' / 'real_models.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_model_found_loads_strictly(real):
    import pydagnn
    found = 0
    for label, names, rule, published, source in real.MODELS:
        path = real.find(FOLDER, names)
        if path is None:
            continue
        net = real.load(path)               # strict=True, no warning allowed
        assert not any(l.block.is_loss for l in net.layers), label
        assert net.get_inputs() and pydagnn.deployment.prediction_var(net)
        found += 1
    if not found:
        pytest.skip(f'{FOLDER} holds none of the models of benchmarks/real_models.py')


def test_dncnn_s_reaches_its_published_set12_psnr(real):
    rows = [r for r in real.run(FOLDER, ['Set12'], only=['DnCNN-S']) if 'psnr' in r]
    if not rows:
        pytest.skip('DnCNN-S sigma 25 or testsets/Set12 not in the folder')
    r = rows[0]
    assert r['images'] == 12
    # seeded NumPy noise instead of MATLAB's randn('seed', 0): within 0.1 dB of 30.44
    assert abs(r['psnr'] - r['published']) < 0.1, r
