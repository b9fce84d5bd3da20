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


class BlockContext:
    """What a block may read from its net: ``mode``, ``rng``, ``conserve_memory``.

    Used when a block runs outside a graph (tests, gradient checks).
    """

    def __init__(self, mode='normal', rng=None, conserve_memory=True):
        self.mode = mode
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.conserve_memory = conserve_memory


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
    #: positions of the outputs the trainer reads after eval (their vars become precious)
    trainer_reads = ()
    #: ``'module:function'`` the loader calls with the net when a layer of this type is present
    net_finalizer = None

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
