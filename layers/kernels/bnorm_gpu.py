"""Batch normalization kernels on the GPU (CuPy): the per-plane reductions (sum, squared
deviations, dy times the deviations) and the elementwise passes (normalize, input
derivative, scale), as ``ReductionKernel`` / ``ElementwiseKernel`` sources. The algorithm
that launches them is the GPU path of :mod:`pydagnn.layers.bnorm`; this module imports no
layer, and cupy only when :func:`kernels` is first called.
"""
import functools

__all__ = ['kernels']


@functools.lru_cache(maxsize=None)
def kernels():
    """The CuPy reduction and elementwise kernels of batch normalization, by name (built on
    first use)."""
    import cupy as cp
    return {
        'sum': cp.ReductionKernel('T x', 'T y', 'x', 'a + b', 'y = a', '0', 'pd_bn_plane_sum'),
        'sqdev': cp.ReductionKernel('T x, T m', 'T y', '(x - m) * (x - m)', 'a + b', 'y = a', '0',
                                    'pd_bn_plane_sqdev'),
        'dotdev': cp.ReductionKernel('T d, T x, T m', 'T y', 'd * (x - m)', 'a + b', 'y = a', '0',
                                     'pd_bn_plane_dotdev'),
        'norm': cp.ElementwiseKernel('T x, T m, T s, T b', 'T y', 'y = (x - m) * s + b',
                                     'pd_bn_normalize'),
        'dx': cp.ElementwiseKernel('T d, T x, T m, T g1, T g2, T mz', 'T dx',
                                   'dx = g1 * (d - mz) - g2 * (x - m)', 'pd_bn_dx'),
        'scale': cp.ElementwiseKernel('T d, T s', 'T dx', 'dx = d * s', 'pd_bn_scale'),
    }
