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
    if cp is None:
        # a CuPy array made before anything asked for the GPU: look cupy up now
        if _cupy_checked or not type(x).__module__.startswith('cupy'):
            return False
        cp = cupy_or_none()
        if cp is None:
            return False
    return isinstance(x, cp.ndarray)


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


# ---------------------------------------------------------------------------- GPU helpers
# Everything below imports cupy lazily and is a no-op (or a clear error) without it.

_tf32 = None   # None: not set by pydagnn (CuPy's own default: env CUPY_TF32, off)


def require_gpu(what='this operation'):
    """The ``cupy`` module, or a RuntimeError saying why the GPU cannot be used."""
    cp = cupy_or_none()
    if cp is None:
        try:
            import cupy  # noqa: F401
            why = 'cupy imports but sees no CUDA device'
        except Exception as e:  # ImportError or a broken CUDA install
            why = f'cupy is not usable here ({type(e).__name__}: {e})'
        raise RuntimeError(f"{what} needs a GPU: {why}. Install pydagnn[cuda12] or pydagnn[cuda13] "
                           f"(cupy-cuda12x / cupy-cuda13x) on a machine with an NVIDIA GPU.")
    return cp


def set_tf32(enabled=True):
    """Let float32 GEMMs (cuBLAS) use TF32 tensor cores (about 3e-4 relative error
    instead of 1e-7). Off unless asked for (or ``CUPY_TF32=1`` in the environment
    before the first GEMM). Sets CuPy's compute type for float32 (``cupy.matmul`` /
    ``cupy.dot`` on 2-D operands) and the cuBLAS math mode of the current device's
    handle (batched products). Returns the previous setting (None = never set)."""
    global _tf32
    cp = require_gpu('set_tf32')
    from cupy._core import _routines_linalg as _rl
    from cupy_backends.cuda.libs import cublas
    prev = _tf32
    _rl.set_compute_type(np.float32, getattr(_rl, 'COMPUTE_TYPE_TF32', 7) if enabled
                        else getattr(_rl, 'COMPUTE_TYPE_DEFAULT', 1))
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setMathMode(handle, 3 if enabled else 0)   # CUBLAS_TF32_TENSOR_OP_MATH / DEFAULT_MATH
    _tf32 = bool(enabled)
    return prev


def tf32_enabled():
    """True when TF32 is on for float32 GEMMs (by :func:`set_tf32` or ``CUPY_TF32``)."""
    if _tf32 is not None:
        return _tf32
    import os
    return int(os.environ.get('CUPY_TF32', '0') or 0) > 0


def synchronize():
    """Wait for the current GPU device (no-op without one)."""
    cp = _cupy
    if cp is not None:
        cp.cuda.Device().synchronize()


def memory_stats():
    """GPU memory in bytes: ``{'pool_used', 'pool_total', 'device_used', 'device_total'}``
    (the CuPy default pool's bytes in use and held, the device's used and total memory);
    an empty dict without a GPU. ``pool_total`` only grows until the pool is freed, so
    after a run it is the high-water mark of what the pool held."""
    cp = _cupy
    if cp is None:
        return {}
    pool = cp.get_default_memory_pool()
    free, total = cp.cuda.runtime.memGetInfo()
    return {'pool_used': int(pool.used_bytes()), 'pool_total': int(pool.total_bytes()),
            'device_used': int(total - free), 'device_total': int(total)}


def free_gpu_memory():
    """Return the cached blocks of CuPy's memory pools to the device."""
    cp = _cupy
    if cp is not None:
        cp.get_default_memory_pool().free_all_blocks()
        cp.get_default_pinned_memory_pool().free_all_blocks()


class PeakMemory:
    """Context manager tracking the high-water mark of the bytes in use in CuPy's
    default pool (a ``cupy.cuda.MemoryHook`` sampling after every allocation), e.g.

        with PeakMemory() as pm:
            net.eval(...)
        pm.peak   # bytes

    It costs a Python call per allocation: use it on an untimed step. Without a GPU
    ``peak`` stays 0."""

    def __init__(self):
        self.peak = 0
        self._hook = None

    def __enter__(self):
        cp = _cupy
        if cp is None:
            return self
        pool = cp.get_default_memory_pool()
        outer = self
        self.peak = int(pool.used_bytes())

        from cupy.cuda import memory_hook

        class _Hook(memory_hook.MemoryHook):
            name = 'pydagnn_peak'

            def malloc_postprocess(self, **kwargs):
                u = pool.used_bytes()
                if u > outer.peak:
                    outer.peak = int(u)

        self._hook = _Hook()
        self._hook.__enter__()
        return self

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.__exit__(*exc)
            self._hook = None
        return False
