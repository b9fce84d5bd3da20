"""Real public MatConvNet models: load each with ``strict=True`` and compute the figure its
authors publish, by their own evaluation rules.

    python benchmarks/real_models.py DIR [--sets Set12 BSD68] [--limit N] [--json out.jsonl]

DIR holds the downloaded model files (never part of this repository) under either their
name in the source repository or that path with ``/`` turned into ``_`` (what
``git show`` of the repository path saved), and the test images as
``DIR/testsets/<set>/*.png`` (cszn/DnCNN ships ``testsets/Set12`` and ``testsets/BSD68``).

Families (the published numbers are the authors'; the repositories are on GitHub):

* cszn/DnCNN -- denoisers. ``model/specifics/sigma=25.mat`` (DnCNN-S, SimpleNN, v7.3),
  ``model/GD_Gray_Blind.mat`` (DnCNN-B), ``model/DnCNN3.mat`` (DnCNN-3), and the DagNN
  checkpoint ``TrainingCodes/DnCNN_TrainingCodes_DagNN_v1.1/utilities/DnCNN-epoch-50.mat``
  (MATLAB-written v7.3 with Sum blocks stored as ``MATLAB_empty``). Rules of
  ``Demo_test_DnCNN.m`` / ``Demo_Test_DnCNN_DAG.m``: the clean image ``im2double``, noise
  ``sigma/255 * randn`` (no clipping), the SimpleNN nets predict the residual
  (``output = input - net(input)``), the DagNN one the clean image; PSNR of
  ``im2uint8(output)`` against the 8-bit original, no border cut (``Cal_PSNRSSIM(..., 0, 0)``).
  MATLAB's ``randn('seed', 0)`` stream cannot be reproduced, so the noise here is seeded
  NumPy noise: expect the published figure within a few hundredths of a dB.
* phoenix104104/LapSRN -- super-resolution with ConvTranspose and the repository's own
  ``dagnn.vllab_dag_loss``: ``pretrained_models/MSLapSRN_D5R2.mat`` loads strictly and its
  three branches (2x, 4x, 8x) run on a test image's gray levels; the repository publishes
  no PSNR and its evaluation first rebuilds a single-scale net, so no figure is computed.

Prints one JSON line per model and set (``model``, ``set``, ``images``, ``psnr``,
``published`` or null, ``seconds``).
"""
import argparse
import glob
import json
import os
import sys
import time
import warnings

import numpy as np

import pydagnn

#: (label, file names (repository path first), rule, {set: published PSNR}, source)
MODELS = [
    ('DnCNN-S sigma 25', ['model/specifics/sigma=25.mat', 'model_specifics_sigma_25.mat'], 'residual',
     {'Set12': 30.44, 'BSD68': 29.23}, 'cszn/DnCNN (Set12: paper Table 2; BSD68: README)'),
    ('DnCNN-B (blind)', ['model/GD_Gray_Blind.mat', 'model_GD_Gray_Blind.mat'], 'residual',
     {'BSD68': 29.16}, 'cszn/DnCNN README'),
    ('DnCNN-3', ['model/DnCNN3.mat', 'model_DnCNN3.mat'], 'residual',
     {'BSD68': 29.02}, 'cszn/DnCNN README'),
    ('DnCNN DagNN epoch 50', ['TrainingCodes/DnCNN_TrainingCodes_DagNN_v1.1/utilities/DnCNN-epoch-50.mat',
                              'TrainingCodes_DnCNN_TrainingCodes_DagNN_v1.1_utilities_DnCNN-epoch-50.mat'],
     'clean', {}, 'cszn/DnCNN TrainingCodes (no published figure)'),
    ('MS-LapSRN D5R2', ['pretrained_models/MSLapSRN_D5R2.mat', 'pretrained_models_MSLapSRN_D5R2.mat'],
     'runs', {}, 'phoenix104104/LapSRN (no figure in the repository; its evaluation builds a '
                 'single-scale copy with init_MSLapSRN_model: not reproduced here)'),
]
SIGMA = 25


def find(folder, names):
    """The first of ``names`` present in ``folder`` (a repository path or its flat name)."""
    for n in names:
        for cand in (os.path.join(folder, n), os.path.join(folder, os.path.basename(n))):
            if os.path.isfile(cand) and os.path.getsize(cand) > 0:
                return cand
    return None


def read_gray(path):
    from pydagnn.deployment import read_image
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in ('L', 'I;16', 'I'):
            return np.asarray(im.convert('L'))
    rgb = read_image(path).astype(np.float64)
    # MATLAB's rgb2gray weights, rounded to uint8 as rgb2gray returns it
    return np.clip(np.floor(rgb @ [0.298936021293775, 0.587043074451121, 0.114020904255103] + 0.5),
                   0, 255).astype(np.uint8)


def im2uint8(x):
    """MATLAB's im2uint8 of a float image: clip to [0, 1], scale, round half away from zero."""
    return np.floor(np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def psnr(a, b):
    """``Cal_PSNRSSIM``'s PSNR of two uint8 images (no border cut)."""
    e = a.astype(np.float64) - b.astype(np.float64)
    return float(10 * np.log10(255 ** 2 / np.mean(e ** 2)))


def denoise_psnr(net, rule, label, rng):
    """PSNR of one image under DnCNN's rules (see the module docstring)."""
    clean = label.astype(np.float64) / 255
    noisy = (clean + SIGMA / 255 * rng.standard_normal(clean.shape)).astype(np.float32)
    x = np.asfortranarray(noisy.reshape(noisy.shape[0], noisy.shape[1], 1, 1))
    net.eval({net.get_inputs()[0]: x})
    y = np.asarray(net.get_var(pydagnn.deployment.prediction_var(net)).value)[:, :, 0, 0]
    out = noisy - y if rule == 'residual' else y
    return psnr(label, im2uint8(out))


def run_branches(net, label, path, folder, set_name, source):
    """Every input of a multi-branch net fed one test image (gray, 0..1); the outputs' sizes."""
    files = sorted(glob.glob(os.path.join(folder, 'testsets', set_name, '*.png')))[:1]
    img = read_gray(files[0])[:64, :64] if files else np.zeros((32, 32), np.uint8)
    x = np.asfortranarray((img / 255.0).astype(np.float32).reshape(img.shape + (1, 1)))
    t = time.perf_counter()
    net.eval({name: x for name in net.get_inputs()})
    sizes = {o: list(net.get_var(o).value.shape) for o in net.get_outputs()}
    return {'model': label, 'file': os.path.basename(path), 'input': list(x.shape), 'outputs': sizes,
            'psnr': None, 'published': None, 'seconds': round(time.perf_counter() - t, 1),
            'source': source}


def load(path):
    with warnings.catch_warnings():
        warnings.simplefilter('error')          # strict: nothing dropped, nothing guessed
        net = pydagnn.load_matconvnet(path, strict=True)
    pydagnn.deploy(net)
    net.conserve_memory = True
    return net


def run(folder, sets=('Set12',), limit=None, only=None, seed=0):
    """Rows (dicts) of every model found in ``folder`` on each of ``sets``."""
    rows = []
    for label, names, rule, published, source in MODELS:
        if only and not any(o.lower() in label.lower() for o in only):
            continue
        path = find(folder, names)
        if path is None:
            rows.append({'model': label, 'file': names[0], 'missing': True, 'source': source})
            continue
        net = load(path)
        if rule == 'runs':
            rows.append(run_branches(net, label, path, folder, sets[0], source))
            continue
        for s in sets:
            files = sorted(glob.glob(os.path.join(folder, 'testsets', s, '*.png')))[:limit]
            if not files:
                rows.append({'model': label, 'set': s, 'missing_images': os.path.join(folder, 'testsets', s)})
                continue
            rng = np.random.default_rng(seed)
            t = time.perf_counter()
            values = [denoise_psnr(net, rule, read_gray(f), rng) for f in files]
            rows.append({'model': label, 'file': os.path.basename(path), 'set': s, 'sigma': SIGMA,
                         'images': len(values), 'psnr': round(float(np.mean(values)), 3),
                         'published': published.get(s) if limit is None else None,
                         'seconds': round(time.perf_counter() - t, 1), 'source': source})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('folder', help='the downloaded model files (and testsets/<set>/*.png)')
    p.add_argument('--sets', nargs='+', default=['Set12'], help='test sets (default Set12)')
    p.add_argument('--limit', type=int, help='only the first N images of each set (no published figure then)')
    p.add_argument('--only', nargs='+', help='models whose label contains one of these words')
    p.add_argument('--json', help='also append the rows to this file')
    a = p.parse_args(argv)
    if not os.path.isdir(a.folder):
        p.error(f'{a.folder}: no such folder')
    rows = run(a.folder, a.sets, a.limit, a.only)
    for r in rows:
        print(json.dumps(r))
        if a.json:
            with open(a.json, 'a') as f:
                f.write(json.dumps(r) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
