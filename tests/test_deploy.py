"""The deploy path: pydagnn.deploy, pydagnn.classify, MATLAB's imresize, the
python -m pydagnn.classify command line."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pydagnn
from pydagnn import DagNN
from pydagnn.deployment import class_names, deploy, imresize, normalize_images, prediction_var
from pydagnn.layers.conv import Conv
from pydagnn.layers.loss import Loss
from pydagnn.layers.pool import Pooling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_classifier(classes=True):
    """input 4x4x3 -> 1x1 conv (identity) -> average pool 4x4 -> prediction (3 classes),
    with MatConvNet's loss and error layers; the score of class c is the mean of
    channel c less meta.normalization.averageImage[c]."""
    net = DagNN()
    net.add_layer('conv', Conv(size=[1, 1, 3, 3]), ['input'], ['x1'], ['conv_f', 'conv_b'])
    net.add_layer('pool', Pooling(poolSize=[4, 4], method='avg'), ['x1'], ['prediction'], [])
    net.add_layer('loss', Loss(loss='softmaxlog'), ['prediction', 'label'], ['objective'], [])
    net.add_layer('top1err', Loss(loss='classerror'), ['prediction', 'label'], ['top1err'], [])
    net.get_param('conv_f').value = np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)
    net.get_param('conv_b').value = np.zeros(3, np.float32)
    net.meta = {'normalization': {'imageSize': np.array([[4.0, 4.0, 3.0]]),
                                  'averageImage': np.array([[10.0], [20.0], [30.0]])}}
    if classes:
        net.meta['classes'] = {'name': ['n01', 'n02', 'n03'], 'description': ['cat', 'dog', 'owl']}
    return net


def images_with_means(means, size=4):
    """H x W x 3 x N uint8 images whose channel means are ``means[n]``."""
    x = np.zeros((size, size, 3, len(means)), np.uint8)
    for n, m in enumerate(means):
        x[..., n] = np.asarray(m, np.uint8)
    return x


def test_deploy_removes_losses_and_needs_no_label():
    net = tiny_classifier()
    assert deploy(net) is net
    assert [l.name for l in net.layers] == ['conv', 'pool']
    assert net.mode == 'test' and net.get_inputs() == ['input']
    assert net.get_var('prediction').precious and not net.has_var('label')
    net.conserve_memory = True
    net.eval({'input': np.ones((4, 4, 3, 2), np.float32)})
    assert net.get_var('prediction').value.shape[:3] == (1, 1, 3)   # kept: precious
    deploy(net)                                   # again: nothing changes
    assert [l.name for l in net.layers] == ['conv', 'pool']
    assert prediction_var(net) == 'prediction'


def test_deploy_gm_net_evaluates_without_label():
    from pydagnn.models import build
    net = build('ResNet18-GM-SOP', num_classes=10, image_size=32)
    types = {l.block.type_name for l in net.layers}
    assert {'dagnn.Loss', 'dagnn.Balance_loss'} <= types
    pydagnn.deploy(net)
    assert not any(l.block.is_loss for l in net.layers)
    assert net.get_inputs() == ['input'] and prediction_var(net) == 'prediction'
    with np.errstate(all='ignore'):            # untrained BN moments: values are not the point
        net.eval({'input': np.zeros((32, 32, 3, 2), np.float32)})
    assert net.get_var('prediction').value.shape == (1, 1, 10, 2)


def test_deploy_keeps_a_net_without_losses():
    net = DagNN()
    net.add_layer('conv', Conv(size=[3, 3, 1, 1], pad=1), ['input'], ['out'], ['f', 'b'])
    net.init_params()
    deploy(net)
    assert net.get_var('out').precious and prediction_var(net) == 'out'


def test_classify_scores_top_and_names():
    net = tiny_classifier()
    x = images_with_means([(10, 25, 30), (50, 20, 30), (10, 20, 33)])
    r = pydagnn.classify(net, x, topk=2)
    np.testing.assert_allclose(r.scores, [[0, 5, 0], [40, 0, 0], [0, 0, 3]], atol=1e-5)
    assert r.top[:, 0].tolist() == [2, 1, 3]            # 1-based, as MatConvNet labels
    assert r.top.shape == (3, 2) and r.top_scores.shape == (3, 2)
    assert [row[0] for row in r.names] == ['dog', 'cat', 'owl']   # description first


def test_classify_resizes_and_takes_one_image_or_a_list():
    net = tiny_classifier()
    big = np.zeros((9, 7, 3), np.uint8)
    big[...] = (10, 20, 90)                              # constant: survives any resize
    r = pydagnn.classify(net, big, topk=1)
    assert r.top.tolist() == [[3]] and abs(r.scores[0, 2] - 60) < 1e-4
    r = pydagnn.classify(net, [big, images_with_means([(70, 20, 30)])[..., 0]], topk=1)
    assert r.top[:, 0].tolist() == [3, 1]


def test_classify_names_from_imdb_and_none():
    net = tiny_classifier(classes=False)
    x = images_with_means([(10, 25, 30)])
    assert pydagnn.classify(net, x).names is None
    imdb = {'meta': {'classes': ['kit fox', 'tabby', 'barn owl']}}
    assert pydagnn.classify(net, x, imdb=imdb).names[0][0] == 'tabby'


def test_class_names_formats():
    assert class_names({'classes': {'name': np.array(['a', 'b'], dtype=object)}}) == ['a', 'b']
    assert class_names({'classes': ['x', 'y']}) == ['x', 'y']
    assert class_names({}) is None and class_names(None) is None


def test_normalize_images_average_image_and_errors():
    norm = {'imageSize': [2, 2, 3], 'averageImage': np.full((4, 4, 3), 5.0)}
    x = normalize_images(np.full((2, 2, 3, 1), 7, np.uint8), norm)
    assert x.dtype == np.float32 and x.shape == (2, 2, 3, 1) and np.all(x == 2)
    with pytest.raises(ValueError, match='different sizes'):
        normalize_images([np.zeros((2, 2, 3)), np.zeros((3, 3, 3))], {})
    with pytest.raises(ValueError, match='channels'):
        normalize_images(np.zeros((2, 2, 3, 1)), {'averageImage': np.zeros((2, 2, 2))})


def test_imresize_is_matlabs():
    # MATLAB: imresize([1 2 3 4], [1 2]) = [1.625 3.375] (antialiased triangle),
    #         imresize([1 2], [1 4]) = [1 1.25 1.75 2]
    np.testing.assert_allclose(imresize(np.array([[1.0, 2, 3, 4]]), (1, 2)), [[1.625, 3.375]])
    np.testing.assert_allclose(imresize(np.array([[1.0, 2]]), (1, 4)), [[1, 1.25, 1.75, 2]])
    img = np.random.default_rng(0).random((6, 5, 3))
    np.testing.assert_allclose(imresize(img, (6, 5)), img, atol=1e-6)    # same size: itself
    assert imresize(img, (3, 8)).shape == (3, 8, 3)


# ---------------------------------------------------------------------------- the command line
def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'pydagnn.classify', *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / 'net-epoch-1.mat'
    pydagnn.save_matconvnet(tiny_classifier(), path)
    return path


def test_cli_imdb_index(tmp_path, model_file):
    from pydagnn.io.imdb import save_imdb
    data = images_with_means([(10, 25, 30), (50, 20, 30)])
    save_imdb(tmp_path / 'imdb.mat', data, np.array([2, 1]), np.array([2, 2]))
    r = _cli('--model', model_file, '--imdb', tmp_path / 'imdb.mat', '--index', 2, 1, '--topk', 3)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == 'imdb image 2 (label 1):' and 'class    1' in lines[1] and 'cat' in lines[1]
    assert lines[4] == 'imdb image 1 (label 2):' and 'dog' in lines[5]
    assert len(lines) == 8


def test_cli_image_files(tmp_path, model_file):
    PIL = pytest.importorskip('PIL.Image')
    PIL.fromarray(np.full((8, 8, 3), (10, 20, 90), np.uint8)).save(tmp_path / 'owl.png')
    r = _cli('--model', model_file, tmp_path / 'owl.png', '--topk', 1)
    assert r.returncode == 0, r.stderr
    assert 'owl.png:' in r.stdout and 'owl' in r.stdout.splitlines()[1]


@pytest.mark.parametrize('args, message', [
    (['--model', 'nope.mat', 'x.png'], 'nope.mat: no such file'),
    (['--model', '{m}'], 'nothing to classify'),
    (['--model', '{m}', '--index', '1'], '--index needs --imdb'),
    (['--model', '{m}', 'missing.png'], 'missing.png: no such image file'),
])
def test_cli_user_errors(model_file, args, message):
    r = _cli(*[a.format(m=model_file) for a in args])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]          # one line
    assert r.stderr.startswith('error: ') and message in r.stderr


# ---------------------------------------------------------------------------- class names end to end
MAP_CLSLOC = ('n02119789 1 kit_fox\nn02100735 2 English_setter\nn02110185 3 Siberian_husky\n'
              'n02096294 4 Australian_terrier\nn02102040 5 English_springer\n')
NAMES = ['kit fox', 'English setter', 'Siberian husky', 'Australian terrier', 'English springer']


def test_read_class_list_and_its_errors(tmp_path):
    from pydagnn.io.imdb import read_class_list
    f = tmp_path / 'map_clsloc.txt'
    f.write_text('n02110185 3 Siberian_husky\n\nn02119789 1 kit_fox\nn02100735 2 English_setter\n')
    c = read_class_list(f)
    assert c == {'name': ['n02119789', 'n02100735', 'n02110185'],
                 'description': ['kit fox', 'English setter', 'Siberian husky']}
    for bad, msg in (('n01 x fox\n', 'line 1'), ('n01 1 a\nn02 1 b\n', 'listed twice'),
                     ('n01 1 a\nn03 3 c\n', 'label 2 is missing'), ('\n', 'no classes')):
        f.write_text(bad)
        with pytest.raises(ValueError, match=msg):
            read_class_list(f)


def test_converter_and_trainer_carry_class_names(tmp_path):
    from pydagnn.imdb import main as imdb_main
    from pydagnn.io.imdb import load_imdb, save_imdb
    rng = np.random.default_rng(0)
    src = tmp_path / 'src.mat'
    save_imdb(src, rng.integers(0, 256, (16, 16, 3, 15), dtype=np.uint8), np.tile([1, 2, 3, 4, 5], 3),
              np.r_[np.ones(10), 2 * np.ones(5)], meta={'rgbMean': np.array([120.0, 110.0, 100.0])})
    (tmp_path / 'map_clsloc.txt').write_text(MAP_CLSLOC)
    out = tmp_path / 'imdb.mat'
    assert imdb_main(['convert', '--src', str(src), '--out', str(out),
                      '--classes', str(tmp_path / 'map_clsloc.txt')]) == 0
    with load_imdb(out) as imdb:
        assert list(imdb.meta.classes.description) == NAMES
    assert imdb_main(['convert', '--src', str(src), '--out', str(tmp_path / 'x.mat'),
                      '--classes', str(tmp_path / 'none.txt')]) == 2
    exp = tmp_path / 'exp'
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'examples', 'cnn_imagenet64.py'),
                        '--model-type', 'ResNet18-GAP', '--imdb', str(out), '--exp-dir', str(exp),
                        '--epochs', '1', '--batch-size', '6', '--section-len', '1', '--no-plot',
                        '--no-prefetch'], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    net = pydagnn.load_matconvnet(exp / 'net-epoch-1.mat')
    assert class_names(net.meta) == NAMES
