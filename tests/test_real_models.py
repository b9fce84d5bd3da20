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
        outs = net.get_outputs()
        assert net.get_inputs() and outs and all(net.get_var(o).precious for o in outs), label
        if len(outs) == 1:
            assert pydagnn.deployment.prediction_var(net) == outs[0]
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


def test_lapsrn_branches_upsample_2_4_8(real):
    rows = [r for r in real.run(FOLDER, ['Set12'], only=['LapSRN']) if 'outputs' in r]
    if not rows:
        pytest.skip('MSLapSRN_D5R2.mat not in the folder')
    h, w = rows[0]['input'][:2]
    assert sorted(v[:2] for v in rows[0]['outputs'].values()) == [[2 * h, 2 * w], [4 * h, 4 * w], [8 * h, 8 * w]]
