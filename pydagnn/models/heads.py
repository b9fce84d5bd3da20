"""The heads on top of the trunk: the gated mixture (gating module, component modules,
fusion; ``cnn_init_resnet_GM.m`` / ``cnn_init_WRN_GM.m``), the baselines' GAP or
iSQRT-COV (``cnn_init_resnet_baseline.m``), and the classifier + losses they share."""


def add_classifier(b, num_classes):
    """``prediction`` (1x1 conv with bias, MatConvNet's default options) and the three
    losses: ``loss`` -> ``objective`` (softmaxlog), ``top1error`` (classerror),
    ``top5error`` (topkerror, topK 5)."""
    b.conv_layer('prediction', b.var, 'prediction', ['prediction_f', 'prediction_b'],
                 size=[1, 1, b.depth, num_classes], has_bias=True, opts=('cuDNN',))
    b.add('loss', 'dagnn.Loss', ['prediction', 'label'], 'objective',
          loss='softmaxlog', ignoreAverage=False, opts=[])
    b.add('top1error', 'dagnn.Loss', ['prediction', 'label'], 'top1error',
          loss='classerror', ignoreAverage=False, opts=[])
    b.add('top5error', 'dagnn.Loss', ['prediction', 'label'], 'top5error',
          loss='topkerror', ignoreAverage=False, opts=['topK', 5])


def add_baseline_head(b, order, pool_size=8):
    """ResNet18-GAP (order 1: ``GAP``) or ResNet18-SR-SOP (order 2: ``cov_pool``,
    ``cov_trace_norm``, ``Cov_Sqrtm``, ``Cov_ScaleTr``) straight after the trunk."""
    if order == 2:
        b.isqrt_cov('')
    else:
        b.gap('GAP', pool_size)


def add_gm_head(b, *, order, gating_widths, cm_widths, cm_num, topk, loss_w, dropout_rate,
                pool_size=8):
    """The gated mixture after the trunk (cursor at its last var, e.g. ``conv5_2``).

    Gating module: 1x1 conv-BN-ReLU layers ``gating<j>`` of ``gating_widths``, then
    iSQRT-COV (``gating_cov_pool`` ...``gating_Cov_ScaleTr``) or ``gating_GAP``; ``H_x``
    (params ``gating_w``, ``gating_noise_w``), ``gating`` (top-k of ``cm_num``) and
    ``Balance_loss`` (precious, weight ``loss_w``). Component modules ``CM_<i>_``: 1x1
    conv-ReLU layers without BN (``CM_<i>_a``, ``_b``, ... of ``cm_widths``) on the trunk
    output, then iSQRT-COV or ``CM_<i>_GAP``. ``Fusion_out`` (CM_out) on ``gating`` and
    the CM outputs, ``fusion_bn`` and, when ``dropout_rate`` is not None, ``dropout``.
    Routing and the execution order are set afterwards (``finalize_gm``)."""
    trunk_var, trunk_depth = b.var, b.depth

    for j, w in enumerate(gating_widths, start=1):
        b.conv(f'gating{j}', 1, w, relu=True)
    if order == 2:
        b.isqrt_cov('gating_')
    else:
        b.gap('gating_GAP', pool_size)
    d_gate = b.depth

    b.add('H_x', 'dagnn.H_x', b.var, 'H_x', ['gating_w', 'gating_noise_w'],
          size=[d_gate, cm_num], CM_num=cm_num, topk=topk, f_size=[1, 1], dim_in=d_gate)
    b.add('gating', 'dagnn.gating', 'H_x', 'gating', size=[d_gate, cm_num], CM_num=cm_num, topk=topk)
    b.add('Balance_loss', 'dagnn.Balance_loss', 'gating', 'Balance_loss',
          loss_weight=loss_w, CM_num=cm_num)
    b.net.get_var('Balance_loss').precious = True  # its backward adds its own derivative

    cm_outputs = []
    for i in range(1, cm_num + 1):
        b.var, b.depth = trunk_var, trunk_depth
        prefix = f'CM_{i}_'
        for c, w in enumerate(cm_widths):
            b.conv(prefix + chr(ord('a') + c), 1, w, relu=True, bn=False)
        if order == 2:
            b.isqrt_cov(prefix)
        else:
            b.gap(prefix + 'GAP', pool_size)
        cm_outputs.append(b.var)
    d_cm = b.depth

    b.add('Fusion_out', 'dagnn.CM_out', ['gating'] + cm_outputs, 'Fusion_out',
          CM_num=cm_num, hdim=d_cm, topk=topk)
    b.var = 'Fusion_out'
    b.add('fusion_bn', 'dagnn.BatchNorm', b.var, 'fusion_bn',
          ['fusion_bn_bn_w', 'fusion_bn_bn_b', 'fusion_bn_bn_m'], numChannels=d_cm)
    b.var = 'fusion_bn'
    if dropout_rate is not None:
        b.add('dropout', 'dagnn.DropOut', b.var, 'dropout', rate=dropout_rate, frozen=False)
        b.var = 'dropout'
