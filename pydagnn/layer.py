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
    ``init_params``, ``param_defaults``, ``reset``.

    Class attributes the engine reads:
      * ``always_backward``: run backward even when no output received a
        derivative (the GM ``Balance_loss``, whose gradient enters on its own).
    """
    type_name = 'dagnn.Layer'
    properties = {}
    always_backward = False

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
