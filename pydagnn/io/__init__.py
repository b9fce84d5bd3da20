"""File formats: MatConvNet model files (``.mat`` v7 and v7.3) and the MATLAB file layer.

The image-database and checkpoint modules are reachable as ``pydagnn.io.imdb`` and
``pydagnn.io.checkpoint`` after ``import pydagnn`` alone (imported on first access).
"""
from .errors import MatFileError  # noqa: F401
from .matconvnet import load_matconvnet, save_matconvnet, UnusableLayer, UnknownLayerTypeError  # noqa: F401

#: submodules imported on first attribute access (``pydagnn.io.imdb.load_imdb``)
_SUBMODULES = ('imdb', 'imdb_read', 'imdb_write', 'imdb_tools', 'checkpoint', 'matfile',
               'matconvnet', 'errors')


def __getattr__(name):
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
