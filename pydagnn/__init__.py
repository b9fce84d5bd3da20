"""pydagnn: a MatConvNet-compatible DagNN engine in Python.

    import pydagnn
    net = pydagnn.load_matconvnet('net-epoch-10.mat')
    net.eval({'input': x, 'label': y}, {'objective': 1})
"""
from .layer import Layer, register, REGISTRY, BlockContext  # noqa: F401
from .dagnn import DagNN, EvalError  # noqa: F401
from . import layers  # noqa: F401  (registers every block type)

__version__ = '0.1.0'


def __getattr__(name):
    # Lazy so that importing the engine never pulls in the file readers.
    if name in ('load_matconvnet', 'save_matconvnet'):
        from .io import matconvnet
        return getattr(matconvnet, name)
    raise AttributeError(f'module pydagnn has no attribute {name!r}')
