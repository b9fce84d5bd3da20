"""The layer library, installed as ``pydagnn.layers``.

Each module holds the plain array functions of one op family (``conv_forward``,
``conv_backward``, ...) and the blocks that wrap them. Importing this package imports
every module, so every block registers its MatConvNet type name
(see :func:`pydagnn.layer.register`).
"""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if _m.name != 'kernels':
        importlib.import_module(f'{__name__}.{_m.name}')
del _m
