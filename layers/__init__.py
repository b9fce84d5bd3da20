"""The layer library, installed as ``pydagnn.layers``.

Each module holds the plain array functions of one op family (``conv_forward``,
``conv_backward``, ...) and the blocks that wrap them. Importing this package imports
every module, so every block registers its MatConvNet type name
(see :func:`pydagnn.layer.register`).

The block classes are exported here too (``from pydagnn.layers import Conv``), except
where a class's name is a module's (the ``gating`` block stays
``pydagnn.layers.gating.gating``).
"""
import importlib
import pkgutil

from pydagnn.layer import REGISTRY as _REGISTRY

_modules = [m.name for m in pkgutil.iter_modules(__path__) if m.name != 'kernels']
for _name in _modules:
    importlib.import_module(f'{__name__}.{_name}')
for _cls in _REGISTRY.values():
    if _cls.__module__.startswith(__name__ + '.') and _cls.__name__ not in _modules:
        globals()[_cls.__name__] = _cls
del _name, _cls
