"""CPU parallelism for the layer kernels: split a batch of images over worker threads,
each running numba kernels (compiled ``nogil``) and *single-threaded* BLAS calls.

Why not numba ``prange`` + OpenBLAS's own threads: a convolution alternates a copy
kernel (im2col) with a GEMM per chunk of images. With two thread pools (numba's and
OpenBLAS's) every alternation is a hand-off between pools, and every multi-threaded GEMM
synchronises its threads several times. On a small machine (2 cores) that costs a lot
as soon as anything else runs: a descheduled thread stalls the barrier for a scheduler
tick (4 ms), which turned 10 ms convolutions into 300 ms ones in our measurements. Here
each worker streams through its own images with no barrier until the end of the call.

``parallel_for(fn, n)`` runs ``fn(start, stop, part)`` on a split of ``range(n)`` into
:data:`PARTS_PER_WORKER` parts per thread, which the threads (the calling one among them)
take in turn; the results come back in part order, so sums over them do not depend on
which thread ran what. During the call numpy's OpenBLAS runs one thread per call
(set through its ``openblas_set_num_threads`` and restored afterwards), so the workers do
not oversubscribe the cores. Where that control is not available (another BLAS), or for
one part, or when a parallel region is already running in another thread, the whole
range runs in the calling thread with BLAS's own threading.

**Outside the regions, too, OpenBLAS runs one thread** (set when this module is first
imported; ``$PYDAGNN_BLAS_THREADS`` picks another count). A multi-threaded GEMM in the
main thread (a prediction layer, the gating's H_x) leaves OpenBLAS's workers spinning
for a while after it returns, and on a 2-core machine they then take a core from this
module's workers: measured on ResNet18-GAP at batch 32, the 3x3 conv backward passes that
follow the prediction GEMM took 22-35 ms instead of 10 ms. Big GEMMs of the layers go
through :func:`matmul`, which splits them over the workers instead.

Number of workers: ``$PYDAGNN_NUM_THREADS``, else the CPUs this process may run on.
"""
import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pydagnn.layers.kernels import memory_cpu as _memory

# numba's OpenMP workers (used by other layers' parallel kernels) must sleep rather than
# spin between parallel regions, or they fight the BLAS threads for the cores; libgomp
# reads this when numba starts its pool. An explicit user setting wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

#: parts per worker thread of a parallel region, taken in turn by the threads (more
#: parts balance the load when other processes take some of the cores; each part costs
#: a call, and for convolutions a work buffer). ``$PYDAGNN_PARTS_PER_WORKER`` overrides.
PARTS_PER_WORKER = int(os.environ.get('PYDAGNN_PARTS_PER_WORKER', '2') or 2)

_state = {'pool': None, 'blas': None}
_region = threading.Lock()


def num_workers():
    """Worker threads for a parallel region."""
    env = os.environ.get('PYDAGNN_NUM_THREADS')
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover (not Linux)
        return max(1, os.cpu_count() or 1)


def _find_blas():
    """(get, set) of numpy's OpenBLAS thread count, or False when not found."""
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), 'numpy.libs')
    names = [('scipy_openblas_get_num_threads64_', 'scipy_openblas_set_num_threads64_'),
             ('scipy_openblas_get_num_threads', 'scipy_openblas_set_num_threads'),
             ('openblas_get_num_threads64_', 'openblas_set_num_threads64_'),
             ('openblas_get_num_threads', 'openblas_set_num_threads')]
    for path in sorted(glob.glob(os.path.join(libdir, '*openblas*'))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for g, s in names:
            if hasattr(lib, g) and hasattr(lib, s):
                get, set_ = getattr(lib, g), getattr(lib, s)
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                return get, set_
    return False


def blas_control():
    if _state['blas'] is None:
        try:
            _state['blas'] = _find_blas()
        except Exception:  # pragma: no cover - any failure means "no control"
            _state['blas'] = False
    return _state['blas']


def _blas_threads_outside_regions():
    """Set OpenBLAS's thread count for calls outside the parallel regions (see the module
    docstring): ``$PYDAGNN_BLAS_THREADS``, else 1."""
    env = os.environ.get('PYDAGNN_BLAS_THREADS')
    n = 1
    if env:
        try:
            n = max(1, int(env))
        except ValueError:
            raise ValueError(f'PYDAGNN_BLAS_THREADS must be a whole number of threads, got {env!r}') from None
    blas = blas_control()
    if blas:
        blas[1](n)


def _pool(n):
    """The worker threads (created on first use; again after a fork, whose child has none)."""
    p, size, pid = _state['pool'] or (None, 0, None)
    if p is None or size < n or pid != os.getpid():
        if p is not None and pid == os.getpid():
            p.shutdown(wait=True)
        p = ThreadPoolExecutor(max_workers=n, thread_name_prefix='pydagnn-cpu')
        _state['pool'] = (p, n, os.getpid())
    return p


def split(n, parts):
    """Contiguous, balanced bounds [(start, stop), ...] of range(n) in ``parts`` parts."""
    q, r = divmod(n, parts)
    out, a = [], 0
    for i in range(parts):
        b = a + q + (1 if i < r else 0)
        out.append((a, b))
        a = b
    return out


def parallel_for(fn, n, uses_blas=True, workers=None, parts_per_worker=None):
    """Run ``fn(start, stop, part)`` over a split of ``range(n)``; returns the results in
    part order. ``uses_blas``: fn calls BLAS (then it needs the thread-count control).
    ``parts_per_worker``: the split's parts per thread (default :data:`PARTS_PER_WORKER`).
    See the module docstring for the threading rules."""
    t = min(num_workers() if workers is None else workers, n)
    blas = blas_control() if uses_blas else None
    if t <= 1 or blas is False or not _region.acquire(blocking=False):
        return [fn(0, n, 0)]
    try:
        if blas:
            get, set_ = blas
            prev = get()
            set_(1)
        try:
            bounds = split(n, min(n, t * (parts_per_worker or PARTS_PER_WORKER)))
            results = [None] * len(bounds)
            taken = iter(range(len(bounds)))
            lock = threading.Lock()

            def work():
                # each thread takes the next part until none is left: a thread that gets
                # less of its core (another process on it) takes fewer parts
                while True:
                    with lock:
                        i = next(taken, None)
                    if i is None:
                        return
                    results[i] = fn(bounds[i][0], bounds[i][1], i)
            futs = [_pool(t - 1).submit(work) for _ in range(t - 1)]
            try:
                work()
            finally:
                done = [f.exception() for f in futs]   # wait for all: they share buffers
            for e in done:
                if e is not None:
                    raise e
            return results
        finally:
            if blas:
                set_(prev)
    finally:
        _region.release()


#: :func:`matmul` splits a product over the workers from this many multiply-adds
MATMUL_SPLIT_MIN = 1 << 22


def matmul(a, b, out):
    """``np.matmul(a, b, out=out)`` for 2-D arrays, split over the worker threads, each
    part a single-threaded GEMM; small products run in the calling thread.

    Where the register-blocked kernels are built (:mod:`.gemm_cpu`), they run it, on
    ``b`` itself when its rows are contiguous, else on the transposed product (``b.T``
    then is, as for a prediction layer's filters): for the thin products of these
    layers (a batch of 32 rows against a 8256 x 1000 filter bank) OpenBLAS packs the
    whole of ``b`` in every call and ran 4x slower (measured, 2-core AVX-512 machine:
    forward 9.7 ms against 2.3 ms). The split is along the longer side of ``out``, so
    each worker reads its own part of the big operand."""
    m, k = a.shape
    n = b.shape[1]
    if m * n * k < MATMUL_SPLIT_MIN:
        return np.matmul(a, b, out=out)
    if _kernel_matmul(a, b, out):
        return out
    if m >= 2 * num_workers():
        parallel_for(lambda s, e, _: np.matmul(a[s:e], b, out=out[s:e]), m)
    else:
        parallel_for(lambda s, e, _: np.matmul(a, b[:, s:e], out=out[:, s:e]), n)
    return out


def _unit_columns(x):
    return x.shape[1] <= 1 or x.strides[1] == x.itemsize


def _kernel_matmul(a, b, out):
    """``out = a @ b`` by the GEMM kernels on the workers; False (nothing done) where
    they do not apply (dtypes, kernels off or unbuilt).

    The kernels want the right operand and the output with contiguous rows: the product
    runs as given or transposed (``out.T = b.T @ a.T``), whichever copies fewer
    elements to get there (the copies are O(size), the product O(m n k))."""
    from pydagnn.layers.kernels import gemm_cpu
    dt = out.dtype
    if a.dtype != dt or b.dtype != dt:
        return False
    if _copies(b, out) > _copies(a.T, out.T):
        a, b, out = b.T, a.T, out.T
    kern = gemm_cpu.kernel_for(out.shape[0], out.shape[1], dt)
    if kern is None:
        return False
    rhs = b if _unit_columns(b) else np.ascontiguousarray(b)
    res = out if _unit_columns(out) else np.empty(out.shape, dtype=dt)
    _kernel_split(kern, a, rhs, res)
    if res is not out:
        out[...] = res
    return True


def _copies(rhs, res):
    """Elements copied to give the right operand and the result contiguous rows."""
    return (0 if _unit_columns(rhs) else rhs.size) + (0 if _unit_columns(res) else res.size)


def _kernel_split(kern, a, b, out):
    """``out = a @ b`` on kernel ``kern`` (b and out with unit column stride), split
    over the workers along out's longer side in whole kernel tiles."""
    M, N = out.shape
    if N >= M:
        tiles = -(-N // kern.nr)
        cut = lambda s, e: (slice(None), slice(s * kern.nr, min(N, e * kern.nr)))  # noqa: E731
    else:
        tiles = -(-M // kern.mr)
        cut = lambda s, e: (slice(s * kern.mr, min(M, e * kern.mr)), slice(None))  # noqa: E731

    def part(s, e, _):
        rows, cols = cut(s, e)
        kern.prepare(a[rows], b[:, cols], out[rows, cols])()
    parallel_for(part, tiles, uses_blas=False)


_blas_threads_outside_regions()
_memory.keep_freed_memory()
