"""What a user does after ``load_matconvnet``: deploy a net and classify images.

    net = pydagnn.load_matconvnet('net-epoch-60.mat')
    pydagnn.deploy(net)                      # no loss layers, test mode
    r = pydagnn.classify(net, images)        # images: H x W x 3 x N, 0..255
    r.top[0], r.names[0]                     # the top-5 classes of the first image

:func:`deploy` is MatConvNet's ``cnn_imagenet_deploy`` minus its batch-norm merging:
it removes every loss and error layer (``Layer.is_loss``: dagnn.Loss and its
subclasses, Balance_loss), sets ``mode = 'test'`` and marks the prediction precious.
:func:`classify` prepares images as the model's ``meta.normalization`` says (image size,
average image) and reads the top-k classes and, where the model or the imdb carries
``meta.classes``, their names. The command line is ``python -m pydagnn.classify``.
"""
from dataclasses import dataclass

import numpy as np


__all__ = ['deploy', 'classify', 'Classification', 'prediction_var', 'normalize_images',
           'imresize', 'read_image', 'class_names']


# ---------------------------------------------------------------------------- deploy
def deploy(net):
    """Make ``net`` (in place) a predictor: remove its loss and error layers, set test
    mode, mark the prediction precious. Returns ``net`` (MatConvNet habit:
    ``net = cnn_imagenet_deploy(net)``). Calling it again changes nothing.

    The prediction is the var the removed losses read first (``prediction`` in the
    GM-SOP nets); a net without losses (a denoiser) keeps its outputs as predictions.
    Vars that only losses read (``label``) disappear, so ``net.eval({'input': x})``
    needs nothing else.
    """
    losses = [l for l in net.layers if l.block.is_loss]
    produced_by_loss = {v for l in losses for v in l.outputs}
    preds = []
    for l in losses:
        if l.inputs and l.inputs[0] not in produced_by_loss and l.inputs[0] not in preds:
            preds.append(l.inputs[0])
    if losses:
        net.remove_layer([l.name for l in losses])
    if not preds:   # no losses (a denoiser): its precious outputs, else all its outputs
        outs = net.get_outputs()
        preds = [v for v in outs if net.get_var(v).precious] or outs
    net.mode = 'test'
    for name in preds:
        if net.has_var(name):
            net.get_var(name).precious = True
    return net


def prediction_var(net, output=None):
    """The name of the var :func:`classify` reads: ``output`` when given, else the one
    precious output of a deployed net (``prediction`` when there are several)."""
    if output is not None:
        if not net.has_var(output):
            raise ValueError(f'the net has no var {output!r}')
        return output
    outs = net.get_outputs()
    cands = [v for v in outs if net.get_var(v).precious] or outs
    if len(cands) == 1:
        return cands[0]
    if 'prediction' in cands:
        return 'prediction'
    raise ValueError(f'the net has several outputs ({", ".join(cands)}): say which one is the '
                     f'prediction (output=...)')


# ---------------------------------------------------------------------------- images
def imresize(img, size):
    """MATLAB's ``imresize(img, size, 'bilinear')``: a triangle kernel, widened by the
    scale when shrinking (MATLAB's antialiasing), symmetric padding at the borders.
    ``img``: H x W [x C] (float or integer); returns float32 ``size[0] x size[1] [x C]``."""
    img = np.asarray(img, dtype=np.float32)
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f'imresize: the target size must be positive, got {tuple(size)}')
    mh = _resize_matrix(img.shape[0], out_h)
    mw = _resize_matrix(img.shape[1], out_w)
    flat = img.reshape(img.shape[0], img.shape[1], -1)
    out = np.einsum('ij,jkc,lk->ilc', mh, flat, mw, optimize=True)
    return out.reshape((out_h, out_w) + img.shape[2:]).astype(np.float32, copy=False)


def _resize_matrix(n_in, n_out):
    """The ``n_out x n_in`` interpolation matrix of one axis (MATLAB's ``contributions``)."""
    scale = n_out / n_in
    k = min(scale, 1.0)                      # kernel scale: < 1 widens it (antialiasing)
    width = 2.0 / k
    x = np.arange(1, n_out + 1) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(x - width / 2)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]         # 1-based source positions
    w = k * np.maximum(0.0, 1 - np.abs(k * (x[:, None] - idx)))
    w /= w.sum(axis=1, keepdims=True)
    mirror = np.r_[np.arange(n_in), np.arange(n_in)[::-1]]  # symmetric padding
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n_in)]
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), taps), src.ravel()), w.ravel())
    return m


def read_image(path):
    """An image file as ``H x W x 3`` uint8 RGB (needs Pillow: the ``image`` extra)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading image files needs Pillow: pip install 'pydagnn[image]' "
                          "(or pass the images as arrays)") from None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'))
    except OSError as e:
        raise ValueError(f'{path}: not an image Pillow can read ({e})') from None


def _normalization(net):
    norm = (net.meta or {}).get('normalization') or {}
    if not isinstance(norm, dict):
        raise ValueError('meta.normalization is not a struct')
    return norm


def normalize_images(images, normalization):
    """Images as the network's input: float32 ``H x W x C x N``, resized to
    ``normalization['imageSize'][:2]`` (MATLAB's bilinear imresize; images already that
    size are left alone, as cnn_imagenet64's getBatch takes them) and less
    ``normalization['averageImage']`` (a per-channel mean, or an image resized likewise).

    images: ``H x W x C x N`` or ``H x W x C`` (one image) array, or a list of
    ``H x W x C`` arrays of any sizes; values in MatConvNet's 0..255 range.
    """
    size = normalization.get('imageSize')
    size = None if size is None or np.size(size) < 2 else [int(s) for s in np.ravel(size)[:2]]
    if isinstance(images, np.ndarray):
        if images.ndim == 2:
            images = images[:, :, None]
        images = [images] if images.ndim == 3 else [images[..., i] for i in range(images.shape[3])]
    batch = []
    for i, im in enumerate(images):
        im = np.asarray(im)
        if im.ndim == 2:
            im = im[:, :, None]
        if im.ndim != 3:
            raise ValueError(f'image {i + 1}: expected H x W x C, got shape {im.shape}')
        if size is not None and list(im.shape[:2]) != size:
            im = imresize(im, size)
        batch.append(np.asarray(im, dtype=np.float32))
    shapes = {b.shape for b in batch}
    if len(shapes) != 1:
        raise ValueError(f'images of different sizes {sorted(shapes)} and no meta.normalization.'
                         f'imageSize to bring them to one')
    x = np.stack(batch, axis=3)
    avg = normalization.get('averageImage')
    if avg is not None and np.size(avg):
        avg = np.asarray(avg, dtype=np.float32)
        if avg.size == x.shape[2]:
            avg = avg.reshape(1, 1, -1, 1)
        else:
            avg = avg.reshape(avg.shape[0], avg.shape[1], -1)
            if avg.shape[:2] != x.shape[:2]:
                avg = imresize(avg, x.shape[:2])
            if avg.shape[2] != x.shape[2]:
                raise ValueError(f'meta.normalization.averageImage has {avg.shape[2]} channels, '
                                 f'the images {x.shape[2]}')
            avg = avg[..., None]
        x = x - avg
    return np.asfortranarray(x)


# ---------------------------------------------------------------------------- classes
def class_names(meta):
    """Class names from a ``meta`` dict (a model's or an imdb's): ``meta.classes`` as
    MatConvNet stores it (``.description``, else ``.name``) or as a plain list; None
    when there are none."""
    if meta is None:
        return None
    classes = meta.get('classes') if hasattr(meta, 'get') else None
    if classes is None:
        return None
    if hasattr(classes, 'get'):
        for key in ('description', 'name'):
            names = _strings(classes.get(key))
            if names:
                return names
        return None
    return _strings(classes)


def _strings(v):
    if isinstance(v, str):
        return [v]
    if isinstance(v, np.ndarray) and v.dtype == object:
        v = list(v.ravel(order='F'))
    if isinstance(v, (list, tuple)) and v and all(isinstance(s, str) for s in v):
        return list(v)
    return None


# ---------------------------------------------------------------------------- classify
@dataclass
class Classification:
    """What :func:`classify` returns, one row per image.

    scores: ``N x C`` float32, the prediction (no softmax added); top: ``N x k`` 1-based
    class indices (MatConvNet's label convention), best first; top_scores: their scores;
    names: ``N`` lists of k class names, or None when neither the model nor the imdb
    names its classes.
    """
    scores: np.ndarray
    top: np.ndarray
    top_scores: np.ndarray
    names: list = None


def classify(net, images, topk=5, imdb=None, output=None, batch_size=64):
    """Classify ``images`` (see :func:`normalize_images`) with ``net``; returns a
    :class:`Classification`. The net is deployed first (in place; see :func:`deploy`).
    ``imdb``: an :class:`pydagnn.io.imdb.Imdb` (or its meta dict) whose ``meta.classes``
    names the classes when the model's meta does not. ``output``: the prediction var
    (default: see :func:`prediction_var`)."""
    deploy(net)
    inputs = net.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f'classify needs a net with one input, this one has {len(inputs)} '
                         f'({", ".join(inputs)})')
    pred = prediction_var(net, output)
    x = normalize_images(images, _normalization(net))
    scores = [_scores(net, inputs[0], pred, x[..., s:s + batch_size])
              for s in range(0, x.shape[3], batch_size)]
    scores = np.concatenate(scores, axis=0)
    k = max(1, min(int(topk), scores.shape[1]))
    top = np.argsort(-scores, axis=1, kind='stable')[:, :k]
    names = class_names(net.meta)
    if names is None and imdb is not None:
        names = class_names(imdb.get('meta') if 'meta' in imdb else imdb)
    if names is not None and len(names) < scores.shape[1]:
        names = None                     # a list that does not cover the classes names none
    return Classification(scores=scores, top=top + 1,
                          top_scores=np.take_along_axis(scores, top, axis=1),
                          names=None if names is None else [[names[j] for j in row] for row in top])


def _scores(net, input_name, pred, x):
    from . import backend
    if net.device == 'gpu':
        x = backend.to_device(x, 'gpu')
    net.eval({input_name: x})
    y = np.asarray(backend.to_device(net.get_var(pred).value, 'cpu'))
    y = y.reshape(y.shape + (1,) * (4 - y.ndim))
    if y.shape[0] * y.shape[1] != 1:
        raise ValueError(f'classify reads a 1 x 1 x C x N prediction; {pred!r} is '
                         f'{"x".join(map(str, y.shape))} (is this a classifier?)')
    return y.reshape(y.shape[2], y.shape[3]).T.astype(np.float32)
