"""The block base class and the registry of MatConvNet type names.

A *block* is the computation of one DagNN layer (MatConvNet's ``dagnn.Layer``
subclasses). It holds only the properties a ``.mat`` file stores (``size``, ``pad``,
``stride``, ...) under their MatConvNet names, and maps input arrays to output arrays.
The engine (:mod:`pydagnn.dagnn`) does all bookkeeping: values, derivatives, memory,
routing. Blocks are reentrant: whatever backward needs is either an input, a param,
or one of the block's own forward outputs (passed back in ``outputs``).

Array convention: feature maps are 4-D arrays shaped ``H x W x C x N`` (MatConvNet
order; Fortran-contiguous is the fast layout, ``x.T`` is then a C-contiguous
``N x C x W x H`` view). Dtype is preserved (float32 in practice, float64 in
derivative checks).
"""
import copy

import numpy as np

from . import backend

#: MatConvNet class name ('dagnn.Conv') -> block class
REGISTRY = {}


def register(*type_names):
    """Class decorator: make a block loadable under one or more MatConvNet type names."""
    def deco(cls):
        cls.type_name = type_names[0]
        for t in type_names:
            REGISTRY[t] = cls
        return cls
    return deco


def block_class(type_name):
    """The block class for a MatConvNet type name; KeyError naming it when unknown."""
    try:
        return REGISTRY[type_name]
    except KeyError:
        raise KeyError(f"unknown layer type {type_name!r} (known: {', '.join(sorted(REGISTRY))})") from None


# ---------------------------------------------------------------------------- param shapes
#: the roles a param can have in the loader's eyes (see :func:`shape_by_role`)
PARAM_ROLES = ('filter', 'vector', 'moments', 'matrix', 'asis')


def shape_by_role(value, role):
    """A param value in the MatConvNet shape of its role; ValueError (no prefix: the caller
    names the param) when it cannot have it.

    * 'filter': 4-D ``FH x FW x Cin x Cout`` (trailing singletons appended);
    * 'vector': 1-D (any shape with at most one non-singleton dimension);
    * 'moments': ``C x 2`` (batch-norm moments);
    * 'matrix': 2-D;
    * 'asis': unchanged.

    Arrays of 2 or more dimensions come back Fortran-contiguous."""
    if role == 'filter':
        if value.ndim > 4:
            raise ValueError(f'a filter must have at most 4 dims, got shape {value.shape}')
        value = value.reshape(value.shape + (1,) * (4 - value.ndim), order='F')
    elif role == 'vector':
        if sum(1 for s in value.shape if s != 1) > 1:
            raise ValueError(f'expected a vector, got shape {value.shape}')
        value = value.reshape(-1, order='F')
    elif role == 'moments':
        if value.ndim != 2 or value.shape[1] != 2:
            raise ValueError(f'BatchNorm moments must be C x 2, got shape {value.shape}')
    elif role == 'matrix':
        if value.ndim != 2:
            raise ValueError(f'expected a 2-D matrix, got shape {value.shape}')
    elif role != 'asis':
        raise ValueError(f'unknown param role {role!r} (known: {", ".join(PARAM_ROLES)})')
    return np.asfortranarray(value) if value.ndim > 1 else value


def property_ints(v):
    """A stored numeric property (``size``, ``numChannels``) as a list of ints, leniently:
    None or a non-numeric value gives [], non-finite entries are dropped."""
    if v is None:
        return []
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return []
    return [int(x) for x in a if np.isfinite(x)]


def check_filter_params(values, names, size, out_axis):
    """The checks of a filter bank block (``[filters]`` or ``[filters, biases]``): the
    filters' shape against the block's ``size`` (when it is set) and the number of biases
    against the filters' output channels (axis ``out_axis`` of the filters: 3 for
    ``dagnn.Conv``, 2 for ``dagnn.ConvTranspose``). ValueError naming the param."""
    size = (property_ints(size) + [1, 1, 1, 1])[:4]
    f = values[0] if values else None
    if f is not None and any(size):
        if tuple(f.shape) != tuple(size):
            raise ValueError(f'param {names[0]!r} has shape {tuple(f.shape)} but the block\'s size '
                             f'is {size}')
    if len(values) > 1 and values[1] is not None and f is not None and values[1].size:
        cout = f.shape[out_axis]
        if values[1].size != cout:
            raise ValueError(f'param {names[1]!r} has {values[1].size} elements but the filter has '
                             f'{cout} output channels')


class BlockContext:
    """What a block may read from its net: ``mode``, ``rng``, ``conserve_memory``.

    Used when a block runs outside a graph (tests, gradient checks).
    """

    def __init__(self, mode='normal', rng=None, conserve_memory=True):
        self.mode = mode
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.conserve_memory = conserve_memory
        self.batch_reducer = None


class Layer:
    """Base class of all blocks.

    Subclasses set ``properties`` (MatConvNet property name -> default value) and
    implement ``forward`` and ``backward``. Optional hooks: ``get_output_sizes``,
    ``init_params``, ``param_defaults``, ``reset``, ``move``.

    Everything the engine (:mod:`pydagnn.dagnn`, :mod:`pydagnn.executor`), the loader
    and the trainer read from a block is declared here, with its default; a block
    overrides a class attribute (or makes it a property, as ``ReLU`` does for
    ``backward_needs_inputs``) to change it. Nothing is probed with ``getattr``.

    Engine (scheduling and memory):
      * ``always_backward``: run backward even when no output received a derivative
        (the GM ``Balance_loss``, whose gradient enters on its own).
      * ``backward_needs_inputs`` / ``backward_needs_outputs``: whether backward reads
        the input / output values; when False, ``conserve_memory`` may free them after
        their last forward consumer (MatConvNet's ReLU short circuit, generalised).
      * ``accepts_missing_inputs``: run forward with ``None`` for an input whose producer
        was skipped (a routed component that no image selected; ``CM_out``), instead of
        skipping this layer too.
      * :meth:`move`: called by ``DagNN.move(device)``.
      * ``batch_independent``: forward (and backward) on a batch equals the block run on
        each image alone, the results joined along the batch axis (no statistics across
        images, no random draws, no state). Such a block may run once on a stack of
        several routed components' images: the batched mixture
        (:mod:`pydagnn.layers.mixture`) runs its param-free stages that way, and its
        param stages per component on that component's block of the stack.
      * ``state_outputs``: the number of trailing forward outputs that are the block's
        private state for backward (not vars: the executor keeps them for the backward
        of the same eval and passes them after the declared outputs). 0 for every
        MatConvNet block; the batched mixture keeps its stacked intermediates so.

    Trainer (:func:`pydagnn.train.cnn_train_dag`) and loader hooks -- how a model family
    (GM-SOP) takes part without the engine, trainer or loader knowing its layer names:
      * ``trainer_reads``: positions of the outputs the trainer reads after ``eval``;
        their vars are made precious so ``conserve_memory`` keeps them (``gating``: the
        gate, ``Balance_loss``: its value).
      * :meth:`train_stats`: the statistics this layer adds to the training log, from its
        output values after each ``eval`` (``Balance_loss`` -> ``BalanceLoss``); the
        trainer averages each over the epoch's evaluations.
      * ``net_finalizer``: ``'module:function'`` called once with the net by the loader
        (:func:`pydagnn.load_matconvnet`) when a layer of this type is present, e.g.
        ``'pydagnn.models.gm:finalize_gm'`` (routes and the original's execution order);
        a string, so that the layer library never imports the model builders.

    Loader (params as stored, so that the loader knows no layer types):
      * ``param_roles``: the role of each param position for :meth:`shape_param`
        (see :func:`shape_by_role`; positions past the end are 'asis').
      * :meth:`shape_param` and :meth:`check_param_shapes`.
    """
    type_name = 'dagnn.Layer'
    properties = {}
    #: the net the block is attached to (set by ``DagNN.add_layer``); ``mode`` and ``rng`` come from it
    net = None
    #: run backward even when no output received a derivative
    always_backward = False
    #: backward reads ``inputs`` (False: the engine may free them after forward)
    backward_needs_inputs = True
    #: backward reads ``outputs`` (False: the engine may free them after forward)
    backward_needs_outputs = True
    #: forward gets ``None`` for an input whose producer was skipped, instead of being skipped
    accepts_missing_inputs = False
    #: the block on a batch = the block on each image alone, joined along the batch axis
    batch_independent = False
    #: trailing forward outputs that are private state for backward (kept by the executor)
    state_outputs = 0
    #: positions of the outputs the trainer reads after eval (their vars become precious)
    trainer_reads = ()
    #: ``'module:function'`` the loader calls with the net when a layer of this type is present
    net_finalizer = None
    #: role of each param position for shape_param (filter, vector, moments, matrix; asis past the end)
    param_roles = ()
    #: an objective or an error measure, not part of the prediction (``pydagnn.deploy`` drops it,
    #: as MatConvNet's cnn_imagenet_deploy drops every dagnn.Loss)
    is_loss = False

    def __init__(self, **props):
        self.net = None
        for name, default in self.properties.items():
            setattr(self, name, copy.deepcopy(default))
        self.load(props)

    # -- context -----------------------------------------------------------
    @property
    def ctx(self):
        if self.net is None:
            self.net = BlockContext()
        return self.net

    @property
    def mode(self):
        return self.ctx.mode

    @property
    def rng(self):
        return self.ctx.rng

    @property
    def batch_synced(self):
        """True when batch statistics are summed over data-parallel ranks (``--sync-bn``)."""
        return self.ctx.batch_reducer is not None

    def batch_sum(self, a):
        """``a`` summed over the ranks of a data-parallel step when the net has a
        ``batch_reducer`` (sync mode: BN moments, Balance_loss's w_sum), else ``a``."""
        reducer = self.ctx.batch_reducer
        return a if reducer is None else reducer(a)

    # -- computation -------------------------------------------------------
    def forward(self, inputs, params):
        """inputs, params: lists of arrays -> list of output values."""
        raise NotImplementedError(f'{type(self).__name__}.forward')

    def backward(self, inputs, params, der_outputs, outputs):
        """Derivatives of the projected objective.

        der_outputs: one entry per output, ``None`` where no derivative arrived.
        outputs: the values this block's forward returned (for blocks that keep
        what backward needs as outputs).
        Returns ``(der_inputs, der_params)``, lists aligned with inputs and params;
        an entry may be ``None`` (no derivative).
        """
        raise NotImplementedError(f'{type(self).__name__}.backward')

    def get_output_sizes(self, input_sizes):
        """input_sizes: list of 4-tuples (H, W, C, N) -> list of 4-tuples (None if unknown)."""
        return [None]

    def init_params(self, rng, dtype=np.float32):
        """Initial param values (MatConvNet's initParams), one array per param."""
        return []

    def param_defaults(self):
        """Per-param dicts of engine settings (train_method, learning_rate, weight_decay)
        applied when the block is added to a net; MatConvNet's attach() equivalents."""
        return []

    def reset(self):
        """Forget transient state (MatConvNet's reset())."""

    # -- engine and trainer hooks --------------------------------------------
    def move(self, device):
        """Follow ``DagNN.move(device)`` ('cpu' | 'gpu'): by default every NumPy / CuPy
        array among the block's plain (transient, not stored) attributes moves (a
        dropout mask, fixed H_x noise); stored properties (``size``, ``pad``, ...) stay
        on the host. Override for state this does not cover."""
        for name, val in list(vars(self).items()):
            if name == 'net' or name in self.properties:
                continue
            if isinstance(val, np.ndarray) or backend.is_gpu_array(val):
                setattr(self, name, backend.to_device(val, device))

    def train_stats(self, outputs):
        """``{statistic name: value}`` this layer adds to the training log after an eval
        (``outputs``: its output values; a value may be a device array or a tuple, the
        trainer reads its first element). Default: none."""
        return {}
    # -- params as stored ----------------------------------------------------
    def shape_param(self, k, value):
        """The value of param position ``k`` as read from a file, in this block's MatConvNet
        shape for it (by :attr:`param_roles`; default: unchanged, Fortran-contiguous).
        ValueError saying why when it cannot have that shape (the loader prefixes the field)."""
        roles = self.param_roles
        return shape_by_role(value, roles[k] if k < len(roles) else 'asis')

    def check_param_shapes(self, values, names):
        """Raise ValueError when the param ``values`` (None where unset; ``names`` the param
        names, for the message) disagree with this block's properties. Default: no check."""

    # -- persistence -------------------------------------------------------
    def save(self):
        """Dict of the stored properties, as MatConvNet's saveobj writes them."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self.properties}

    def load(self, props):
        """Set stored properties from a dict; an unknown name is an error."""
        for name, value in dict(props).items():
            if name not in self.properties:
                raise ValueError(f"{type(self).__name__} ({self.type_name}) has no property {name!r}; "
                                 f"known: {', '.join(self.properties)}")
            setattr(self, name, value)

    def __repr__(self):
        props = ', '.join(f'{k}={getattr(self, k)!r}' for k in self.properties)
        return f'{type(self).__name__}({props})'
