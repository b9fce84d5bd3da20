"""numba kernels (CPU) for the iSQRT-COV chain (:mod:`pydagnn.layers.cov`): the
elementwise steps of the Newton-Schulz iteration and its derivative, fused so that a
step is one pass over its matrices instead of numpy's two to four temporaries, and the
upper-triangle (un)packing of the vectorised output.

The elementwise kernels take ``(n, d, d)`` stacks, fastest C-contiguous (the layer's
matrices are column-major, so it passes their transposes: an elementwise step does not
care, and the diagonal is the same). Each element is computed with exactly the
operations, in the order, of the numpy expression it replaces, so results do not change
by a bit: the constants come in as scalars of the arrays' dtype (``k``:
``np.array([0, 0.5, 1.5, 3], dtype)``), so float32 stays float32 arithmetic as in numpy.
"""
from numba import njit

__all__ = ['half_3i_minus', 'add_diag', 'grad_last', 'sub_half', 'add_into',
           'triu_gather', 'triu_scatter']


@njit(nogil=True, cache=True)
def half_3i_minus(m, out, k):
    """``out = (3I - m) * 0.5``."""
    n, d, _ = m.shape
    for s in range(n):
        for i in range(d):
            for j in range(d):
                out[s, i, j] = ((k[3] if i == j else k[0]) - m[s, i, j]) * k[1]


@njit(nogil=True, cache=True)
def add_diag(m, v):
    """``m = m + v I`` in place (v a scalar of m's dtype)."""
    n, d, _ = m.shape
    for s in range(n):
        for i in range(d):
            m[s, i, i] = m[s, i, i] + v


@njit(nogil=True, cache=True)
def grad_last(g, s1, s2, out, k):
    """``out = 1.5 * g - 0.5 * (s1 + s2)`` (the last Newton-Schulz step's dY)."""
    n, d, _ = g.shape
    for s in range(n):
        for i in range(d):
            for j in range(d):
                out[s, i, j] = k[2] * g[s, i, j] - k[1] * (s1[s, i, j] + s2[s, i, j])


@njit(nogil=True, cache=True)
def sub_half(a, b, out, k):
    """``out = a - 0.5 * b`` (out may be a)."""
    n, d, _ = a.shape
    for s in range(n):
        for i in range(d):
            for j in range(d):
                out[s, i, j] = a[s, i, j] - k[1] * b[s, i, j]


@njit(nogil=True, cache=True)
def add_into(a, b):
    """``a = a + b`` in place."""
    n, d, _ = a.shape
    for s in range(n):
        for i in range(d):
            for j in range(d):
                a[s, i, j] = a[s, i, j] + b[s, i, j]


@njit(nogil=True, cache=True)
def triu_gather(m, vec):
    """``vec[l, s]`` = the l-th upper-triangle element (row <= column, column by column:
    MATLAB's ``Y(triu(true(d)))``) of matrix ``m[s]``; vec ``(d(d+1)/2, n)``."""
    n, d, _ = m.shape
    for s in range(n):
        l = 0
        for j in range(d):
            for i in range(j + 1):
                vec[l, s] = m[s, i, j]
                l += 1


@njit(nogil=True, cache=True)
def triu_scatter(vec, m):
    """The inverse of :func:`triu_gather` into ``m``, the lower triangle set to 0."""
    n, d, _ = m.shape
    for s in range(n):
        l = 0
        for j in range(d):
            for i in range(j + 1):
                m[s, i, j] = vec[l, s]
                l += 1
            for i in range(j + 1, d):
                m[s, i, j] = 0
