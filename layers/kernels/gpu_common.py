"""Shared plumbing of the CuPy (GPU) kernels: compiling a CUDA source once per dtype and
launching it with a grid-stride loop.

Kernel sources are plain CUDA C written with three macros, so that the *same* text also
compiles as C++ for the CPU (``-DPD_CPU``), where ``tests/test_gpu_kernels_cpu.py`` runs
it through ctypes against the numba kernels, on machines without a GPU:

* ``PD_KERNEL``: ``extern "C" __global__`` (CUDA) or ``extern "C"`` (CPU);
* ``PD_DEVICE``: a helper function called by kernels, ``__device__ __forceinline__``
  (CUDA) or ``static inline`` (CPU);
* ``PD_LOOP(i, n)``: a grid-stride loop over ``0 <= i < n`` (``long long i``), a plain
  loop on the CPU.

The element type is the macro ``T`` (``float`` or ``double``), defined in front of the
source; one compiled module per (source, dtype) is cached.

Importing this module does not import cupy; the first kernel call does.
"""
import numpy as np

PRELUDE = r'''
#ifdef PD_CPU
#define PD_KERNEL extern "C"
#define PD_DEVICE static inline
#define PD_LOOP(i, n) for (long long i = 0; i < (long long)(n); ++i)
#else
#define PD_KERNEL extern "C" __global__
#define PD_DEVICE __device__ __forceinline__
#define PD_LOOP(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; \
                           i < (long long)(n); i += (long long)blockDim.x * gridDim.x)
#endif
'''

_CTYPES = {np.dtype(np.float32): 'float', np.dtype(np.float64): 'double'}

#: threads per block of the elementwise-style kernels
BLOCK = 256
#: cap on the number of blocks (the grid-stride loop covers the rest)
MAX_BLOCKS = 65535

_cache = {}


def ctype(dtype):
    """'float' or 'double' for a float32 / float64 dtype; ValueError otherwise."""
    try:
        return _CTYPES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f'GPU kernels support float32 and float64, got {np.dtype(dtype)}') from None


def source(src, dtype):
    """The full source of a kernel file for ``dtype``: ``#define T ...`` + prelude + src."""
    return f'#define T {ctype(dtype)}\n' + PRELUDE + src


def get_kernel(src, name, dtype):
    """A ``cupy.RawKernel`` for function ``name`` of ``src`` with ``T`` = ``dtype`` (cached)."""
    key = (id(src), name, np.dtype(dtype).str)
    k = _cache.get(key)
    if k is None:
        import cupy
        k = cupy.RawKernel(source(src, dtype), name, options=('-std=c++14',))
        _cache[key] = k
    return k


def launch(kernel, n, args):
    """Run ``kernel`` over ``n`` work items (grid-stride). ``args``: arrays and numpy
    scalars, matching the C signature exactly (np.int32 for int, np.int64 for long long)."""
    n = int(n)
    if n <= 0:
        return
    blocks = min(MAX_BLOCKS, (n + BLOCK - 1) // BLOCK)
    kernel((blocks,), (BLOCK,), tuple(args))


def i32(v):
    return np.int32(int(v))


def i64(v):
    return np.int64(int(v))
