"""The residual trunks of the GM-SOP models and the helper that adds layers the way the
original builders do (``examples/GM/cnn_init_resnet_GM.m``, ``cnn_init_WRN_GM.m``,
``cnn_init_resnet_baseline.m``).

The helper keeps the original's ``lastAdded`` cursor (the var the next layer reads and
its channel count) and its naming: ``<name>_conv`` (params ``<name>_f`` [, ``<name>_b``]),
``<name>_bn`` (params ``<name>_bn_w``, ``_bn_b``, ``_bn_m``), ``<name>_relu``. Block
properties are given in the form MatConvNet stores them after construction (``pad`` as
4 numbers, ``stride`` and ``dilate`` as 2), so a built net saves exactly what the
original saves.
"""
from ..layer import block_class

#: ``opts.cudnnWorkspaceLimit`` of the original builders (1024*1024*1204 bytes)
CUDNN_WORKSPACE_LIMIT = 1024 * 1024 * 1204


def _pair(v):
    return [int(v), int(v)]


class NetBuilder:
    """Adds layers to ``net`` the way the original builders' nested helpers do."""

    def __init__(self, net, var='input', depth=3):
        # the block types are looked up by name: the layer library registers them (imported
        # here, not at module level, so that `import pydagnn.models` stays free of numba)
        from .. import layers  # noqa: F401
        self.net = net
        self.var = var        # lastAdded.var
        self.depth = depth    # lastAdded.depth

    # -- plain layers ------------------------------------------------------------
    def add(self, name, type_name, inputs, outputs, params=(), **props):
        block = block_class(type_name)(**props)
        return self.net.add_layer(name, block, inputs, outputs, params)

    def conv_layer(self, name, inputs, outputs, params, size, stride=1, pad=0, has_bias=True,
                   opts=('cuDNN',)):
        """A ``dagnn.Conv`` with the stored property forms of MatConvNet."""
        return self.add(name, 'dagnn.Conv', inputs, outputs, params,
                        size=[int(s) for s in size], hasBias=bool(has_bias), opts=list(opts),
                        pad=[int(pad)] * 4, stride=_pair(stride), dilate=[1, 1])

    def relu(self, name, inputs, outputs):
        return self.add(name, 'dagnn.ReLU', inputs, outputs)

    # -- the original's Conv / Conv_nobn helpers ---------------------------------------
    def conv(self, name, ksize, depth, relu=True, downsample=False, bias=False, bn=True):
        """``Conv(name, ksize, depth, ...)`` (bn=True) or ``Conv_nobn`` (bn=False):
        conv [+ BN] [+ ReLU] on ``self.var``; moves the cursor."""
        stride = 2 if downsample else 1
        params = [name + '_f', name + '_b'] if bias else [name + '_f']
        self.conv_layer(name + '_conv', self.var, name + '_conv', params,
                        size=[ksize, ksize, self.depth, depth], stride=stride, pad=(ksize - 1) // 2,
                        has_bias=bias, opts=('cudnnworkspacelimit', CUDNN_WORKSPACE_LIMIT))
        self.var = name + '_conv'
        if bn:
            self.add(name + '_bn', 'dagnn.BatchNorm', self.var, name + '_bn',
                     [name + '_bn_w', name + '_bn_b', name + '_bn_m'], numChannels=int(depth))
            self.var = name + '_bn'
        self.depth = depth
        if relu:
            self.relu(name + '_relu', self.var, name + '_relu')
            self.var = name + '_relu'

    # -- second-order / first-order pooling -------------------------------------------
    def isqrt_cov(self, prefix):
        """iSQRT-COV on ``self.var``: ``<prefix>cov_pool``, ``<prefix>cov_trace_norm``
        (+ ``_tr``), ``<prefix>Cov_Sqrtm`` (+ ``_Y``, ``_Z``; coef 1, iterNum 3),
        ``<prefix>Cov_ScaleTr``; output ``1 x 1 x d(d+1)/2 x N``."""
        n1 = prefix + 'cov_pool'
        self.add(n1, 'dagnn.OBJ_ConvNet_COV_Pool', self.var, n1)
        n2 = prefix + 'cov_trace_norm'
        tr = n2 + '_tr'
        self.add(n2, 'dagnn.OBJ_ConvNet_Cov_TraceNorm', n1, [n2, tr])
        n3 = prefix + 'Cov_Sqrtm'
        self.add(n3, 'dagnn.OBJ_ConvNet_Cov_Sqrtm', n2, [n3, n3 + '_Y', n3 + '_Z'], coef=1, iterNum=3)
        n4 = prefix + 'Cov_ScaleTr'
        self.add(n4, 'dagnn.OBJ_ConvNet_COV_ScaleTr', [n3, tr], n4)
        self.var = n4
        self.depth = self.depth * (self.depth + 1) // 2

    def gap(self, name, pool_size):
        """Global average pooling as the original writes it: ``dagnn.Pooling`` 'avg' with
        a fixed ``pool_size`` window (8x8 on the 64x64 models)."""
        self.add(name, 'dagnn.Pooling', self.var, name, method='avg', poolSize=_pair(pool_size),
                 pad=[0, 0, 0, 0], stride=[1, 1], dilate=[1, 1], opts=['cuDNN'])
        self.var = name


def add_trunk(b, section_len, order, width=1, adapt_all=False):
    """The residual trunk (``conv1`` .. ``conv5_<section_len>``) on var ``input``.

    ResNet-18 (width 1, adapters on stages 3..5) or WRN-36-2 (width 2, ``adapt_all``:
    an adapter on the first block of every stage). Stage ``s`` (2..5) has
    ``section_len`` basic blocks of depth ``2^(s+2) * width``; the first block of stages
    3 and 4 has stride 2, and of stage 5 only when ``order`` is 1 (GAP). The last var is
    ``conv5_<section_len>``."""
    b.conv('conv1', 3, 16, relu=True, bias=True, downsample=False)
    for s in range(2, 6):
        depth = 2 ** (s + 2) * width
        down = s in (3, 4) or (s == 5 and order == 1)
        for l in range(1, section_len + 1):
            name = f'conv{s}_{l}'
            section_var, section_depth = b.var, b.depth
            if l == 1 and (adapt_all or s > 2):
                b.conv(name + '_adapt_conv', 1, depth, downsample=down, relu=False)
            sum_var = b.var
            b.var, b.depth = section_var, section_depth
            b.conv(name + 'a', 3, depth, downsample=down and l == 1)
            b.conv(name + 'b', 3, depth, relu=False)
            b.add(name + '_sum', 'dagnn.Sum', [sum_var, b.var], name + '_sum')
            b.relu(name + '_relu', name + '_sum', name)
            b.var = name
    return b.var
