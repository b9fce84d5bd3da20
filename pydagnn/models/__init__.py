"""Model builders: the six model types of ``examples/GM/cnn_imagenet64.m``.

    from pydagnn.models import build, MODEL_TYPES
    net = build('ResNet18-GM-SOP')                    # as cnn_init_resnet_GM builds it
    small = build('ResNet18-GM-SOP', section_len=1, cm_num=4, topk=2, num_classes=10,
                  gating_widths=(16, 8), cm_widths=(16, 8))

Layer, var and param names, block properties, learning rates, weight decays, ``meta``
and (for GM nets) routing and execution order are those of the original builders
(``cnn_init_resnet_GM.m``, ``cnn_init_WRN_GM.m``, ``cnn_init_resnet_baseline.m``).
"""
import numpy as np

from ..dagnn import DagNN
from .fuse import set_fused_bn_relu
from .gm import finalize_gm, gm_execution_order, set_routes  # noqa: F401
from .heads import add_baseline_head, add_classifier, add_gm_head
from .resnet import NetBuilder, add_trunk

__all__ = ['build', 'MODEL_TYPES', 'model_defaults', 'finalize_gm']

#: model type -> the settings of cnn_imagenet64.m and of its builder
_MODELS = {
    'ResNet18-GAP': dict(
        family='resnet', gm=False, order=1, section_len=2,
        lr=0.75 * np.r_[[0.1] * 50, [0.01] * 15, [0.001] * 10], batch_size=256),
    'ResNet18-SR-SOP': dict(
        family='resnet', gm=False, order=2, section_len=2,
        lr=1.5 * np.r_[[0.1] * 40, [0.01] * 10, [0.001] * 5, [1e-4] * 5], batch_size=256),
    'ResNet18-GM-GAP': dict(
        family='resnet', gm=True, order=1, section_len=2, gating_widths=(256, 128), cm_widths=(512,),
        dropout=0.2, lr=0.75 * np.r_[[0.1] * 50, [0.01] * 15, [0.001] * 10], batch_size=256),
    'ResNet18-GM-SOP': dict(
        family='resnet', gm=True, order=2, section_len=2, gating_widths=(256, 128),
        cm_widths=(256, 128), dropout=0.2,
        lr=1 * np.r_[[0.1] * 40, [0.01] * 10, [0.001] * 5, [1e-4] * 5], batch_size=256),
    'WRN-36-2-GM-GAP': dict(
        family='wrn', gm=True, order=1, section_len=4, gating_widths=(512,), cm_widths=(512,),
        dropout=0.2, lr=1 * np.r_[[0.1] * 20, [0.01] * 10, [0.001] * 10], batch_size=150),
    'WRN-36-2-GM-SOP': dict(
        family='wrn', gm=True, order=2, section_len=4, gating_widths=(512, 128), cm_widths=(512, 128),
        dropout=0.4, lr=0.9 * np.r_[[0.1] * 20, [0.01] * 10, [0.001] * 5, [1e-4] * 5], batch_size=150),
}

#: the model types ``build`` accepts, in cnn_imagenet64.m's order of mention
MODEL_TYPES = ('ResNet18-GAP', 'ResNet18-SR-SOP', 'ResNet18-GM-GAP', 'ResNet18-GM-SOP',
               'WRN-36-2-GM-GAP', 'WRN-36-2-GM-SOP')


def model_defaults(model_type):
    """The original's settings for ``model_type`` (a copy): order, section_len, widths,
    dropout rate, learning-rate schedule, batch size."""
    if model_type not in _MODELS:
        raise ValueError(f'unknown model type {model_type!r}; known: {", ".join(MODEL_TYPES)}')
    d = dict(_MODELS[model_type])
    d['lr'] = np.array(d['lr'], dtype=np.float64)
    return d


def _num2str(x):
    """MATLAB's ``num2str`` of a scalar: integers plainly, else 5 significant digits."""
    x = float(x)
    if x == int(x):
        return str(int(x))
    return f'{x:.5g}'


def _widths(v, what):
    w = tuple(int(a) for a in np.atleast_1d(v))
    if not w or any(a <= 0 for a in w):
        raise ValueError(f'build: {what} must be one or more positive widths, got {v!r}')
    return w


def build(model_type, *, topk=8, cm_num=16, loss_w=100, order=None, section_len=None,
          dropout=None, average_image=(0, 0, 0), num_classes=1000, gating_widths=None,
          cm_widths=None, seed=0, dtype=np.float32, image_size=64):
    """Build ``model_type`` (one of :data:`MODEL_TYPES`) as the original builder does.

    topk, cm_num, loss_w: the gated mixture (GM models): keep ``topk`` of ``cm_num``
        component modules; Balance_loss weight.
    order: 1 (GAP) or 2 (iSQRT-COV); default from the model type (``-GAP`` / ``-SOP``).
    section_len: basic blocks per stage (default 2 for ResNet18, 4 for WRN-36-2).
    dropout: None/True = the model's dropout layer (rate 0.2; 0.4 for WRN-36-2-GM-SOP),
        False = no dropout layer (the original's ``'dropout', false``), a number = that
        rate. Baselines have no dropout layer (only None/False accepted).
    average_image: ``meta.normalization.averageImage`` (the imdb's ``rgbMean``).
    num_classes: outputs of ``prediction`` (1000).
    gating_widths, cm_widths: the 1x1 conv widths of the gating module and of each
        component module (defaults: ResNet18 (256, 128) and (256, 128) [SOP] / (512,)
        [GAP]; WRN-36-2 (512, 128) and (512, 128) [SOP], (512,) and (512,) [GAP]).
    seed: ``init_params`` draws from ``np.random.default_rng(seed)``; the net's own
        generator (dropout masks, H_x noise, gating ties) from ``default_rng([seed, 1])``.
    dtype: param dtype (float32).
    image_size: input height = width (64); sets ``meta`` sizes and the GAP window
        (``image_size / 8``: 8x8 on 64x64 images, as the original's fixed 8x8).

    Returns a :class:`~pydagnn.dagnn.DagNN` with initialised params, ``meta`` as the
    original's, and for GM nets the routes on ``CM_<i>_a_conv`` and the original's
    execution order (``ExecutionOrder_GM``).
    """
    d = model_defaults(model_type)
    order = d['order'] if order is None else int(order)
    if order not in (1, 2):
        raise ValueError(f'build: order must be 1 (GAP) or 2 (SOP), got {order!r}')
    section_len = d['section_len'] if section_len is None else int(section_len)
    if section_len < 1:
        raise ValueError(f'build: section_len must be >= 1, got {section_len}')
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f'build: num_classes must be >= 1, got {num_classes}')
    image_size = int(image_size)
    if image_size % 8 or image_size < 8:
        raise ValueError(f'build: image_size must be a positive multiple of 8, got {image_size}')
    avg = np.asarray(average_image, dtype=np.float64)
    if avg.size not in (1, 3) and avg.shape != (image_size, image_size, 3):
        raise ValueError(f'build: average_image must have 3 values (or be an image), got shape {avg.shape}')
    pool = image_size // 8

    net = DagNN()
    net.rng = np.random.default_rng([int(seed), 1])
    b = NetBuilder(net)
    wrn = d['family'] == 'wrn'
    add_trunk(b, section_len, order, width=2 if wrn else 1, adapt_all=wrn)

    if d['gm']:
        topk, cm_num = int(topk), int(cm_num)
        if not 1 <= topk <= cm_num:
            raise ValueError(f'build: need 1 <= topk <= cm_num, got topk {topk}, cm_num {cm_num}')
        if dropout is None or dropout is True:
            rate = d['dropout']
        elif dropout is False:
            rate = None
        else:
            rate = float(dropout)
            if not 0 <= rate < 1:
                raise ValueError(f'build: dropout rate must be in [0, 1), got {rate}')
        gw = _widths(d['gating_widths'] if gating_widths is None else gating_widths, 'gating_widths')
        cw = _widths(d['cm_widths'] if cm_widths is None else cm_widths, 'cm_widths')
        add_gm_head(b, order=order, gating_widths=gw, cm_widths=cw, cm_num=cm_num, topk=topk,
                    loss_w=loss_w, dropout_rate=rate, pool_size=pool)
    else:
        if dropout not in (None, False):
            raise ValueError(f'build: {model_type} has no dropout layer (dropout={dropout!r})')
        if gating_widths is not None or cm_widths is not None:
            raise ValueError(f'build: {model_type} has no gating or component modules')
        add_baseline_head(b, order, pool_size=pool)
    add_classifier(b, num_classes)

    lr = d['lr']
    if d['gm']:
        folder = f'{model_type}-{topk}'
        if cm_num != topk:
            folder += f'from{cm_num}'
        folder += f'{"-dr0.4" if wrn else ""}-LR_{_num2str(lr[0])}_w_{_num2str(loss_w)}'
    else:
        folder = f'{model_type}-LR_{_num2str(lr[0])}'
    image = [image_size, image_size, 3]
    net.meta = {
        'normalization': {'imageSize': image, 'averageImage': avg},
        'inputSize': ['input', image + [32]],
        'trainOpts': {'learningRate': lr, 'numEpochs': len(lr), 'momentum': 0.9,
                      'batchSize': d['batch_size'], 'numSubBatches': 1, 'weightDecay': 0.0001},
        'opt': folder,
    }

    net.init_params(np.random.default_rng(seed), dtype=dtype)
    if d['gm']:
        finalize_gm(net)
        # ExecutionOrder_GM: the WRN builder passes its sectionLen, the ResNet builder uses
        # the default 2. Split at conv5_<section_len>_relu: the same order wherever the
        # original's works (the layers between conv5_2 and conv5_<L> form a chain), and
        # defined for section_len 1, where the original's call fails.
        net.set_execution_order(gm_execution_order(net, section_len))
    # the first-layer trick (the ImageNet std is about 60) and the BN moments' rate
    p = net.get_param('conv1_f')
    p.value = (p.value / 60).astype(p.value.dtype, copy=False)
    p.learning_rate = p.learning_rate / 60 ** 2
    for l in net.layers:
        if l.type == 'dagnn.BatchNorm':
            net.get_param(l.params[2]).learning_rate = 0.3
    set_fused_bn_relu(net)
    return net
