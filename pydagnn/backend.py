"""The one place that knows about NumPy versus CuPy.

Every array function in pydagnn is written against ``xp = get_array_module(x)``.
CuPy is imported lazily, so ``import pydagnn`` never needs it.
"""
import numpy as np

_cupy = None
_cupy_checked = False


def cupy_or_none():
    """Return the ``cupy`` module when it imports and sees a CUDA device, else None."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                _cupy = cupy
        except Exception:  # no cupy, no driver, no device: all mean "CPU only"
            _cupy = None
    return _cupy


def gpu_available():
    return cupy_or_none() is not None


def is_gpu_array(x):
    cp = _cupy
    return cp is not None and isinstance(x, cp.ndarray)


def get_array_module(*arrays):
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if is_gpu_array(a):
            return _cupy
    return np


def to_device(x, device):
    """Move an array (or a tuple/list of arrays, None kept) to 'cpu' or 'gpu'."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if device == 'cpu':
        return to_host(x)
    if device == 'gpu':
        cp = cupy_or_none()
        if cp is None:
            raise RuntimeError("move('gpu'): cupy with a CUDA device is not available")
        if isinstance(x, np.ndarray):
            return cp.asarray(x)
        return x
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'gpu'")


def to_host(x):
    """A NumPy copy of a CuPy array; NumPy arrays and scalars pass through."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(to_host(v) for v in x)
    if is_gpu_array(x):
        return x.get()
    return x
