"""pydagnn: a MatConvNet-compatible DagNN engine in Python.

    import pydagnn
    net = pydagnn.load_matconvnet('net-epoch-10.mat')
    net.eval({'input': x, 'label': y}, {'objective': 1})
    pydagnn.deploy(net); pydagnn.classify(net, images, topk=5)
"""
from .layer import Layer, register, REGISTRY, BlockContext  # noqa: F401
from .dagnn import DagNN, EvalError  # noqa: F401

__version__ = '0.1.0'


#: submodules reachable as ``pydagnn.<name>`` after ``import pydagnn`` alone, imported on
#: first access so that importing the engine stays fast: the layer library (numba) too, so
#: that a command answers ``--help`` before numba loads. What looks blocks up by type name
#: (the model loader, the model builders) imports ``pydagnn.layers`` itself.
_SUBMODULES = ('io', 'models', 'train', 'data', 'evaluate', 'gradcheck', 'testing', 'parity',
               'parity_layers', 'plots', 'imdb', 'backend', 'routing', 'executor', 'dagnn', 'layer',
               'layers', 'cli', 'progress', 'deployment')


def __getattr__(name):
    # Lazy so that importing the engine never pulls in the file readers.
    if name in ('load_matconvnet', 'save_matconvnet'):
        from .io import matconvnet
        return getattr(matconvnet, name)
    if name in ('deploy', 'classify'):
        # the functions; ``python -m pydagnn.classify`` is the command line (that module,
        # once imported, takes this name and is callable as the function)
        from . import deployment
        return getattr(deployment, name)
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module pydagnn has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES)
                  | {'load_matconvnet', 'save_matconvnet', 'deploy', 'classify'})
