"""Helpers for pydagnn's tests and for users who check their own ports:
locating ``../shared`` (the reference fixtures), loading fixtures, relative errors."""
import functools
import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))


def shared_dir():
    """``$PYDAGNN_SHARED``, else the ``shared`` folder beside the checkout."""
    return os.path.abspath(os.environ.get('PYDAGNN_SHARED') or os.path.join(_HERE, '..', '..', 'shared'))


def shared_path(*parts):
    """Path under the shared folder. In a pytest run: skips the test when the folder is
    absent, but fails under CI (``CI`` set), where it must be present."""
    p = os.path.join(shared_dir(), *parts)
    if not os.path.exists(p):
        import pytest
        if os.environ.get('CI'):
            pytest.fail(f'{p} is missing: CI must have ../shared beside the checkout')
        pytest.skip(f'{p} not found (../shared is not beside this checkout)')
    return p


@functools.lru_cache(maxsize=None)
def _loadmat(path):
    import scipy.io
    return scipy.io.loadmat(path)


def load_fixture(name):
    """``shared/fixtures/<name>`` read with scipy.io.loadmat (cached; do not mutate)."""
    return _loadmat(shared_path('fixtures', name))


def rel_err(a, b):
    """``||a - b|| / ||b||`` in float64, as a Python float (the absolute norm
    ``||a||`` when b is zero). ``a`` is reshaped (column-major) to ``b``'s shape when only
    the sizes agree; different sizes raise a ValueError. The one definition the tests
    and the parity reports (:mod:`pydagnn.parity`, :mod:`pydagnn.parity_layers`) use."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size != b.size:
        raise ValueError(f'size mismatch: {a.shape} vs {b.shape}')
    if a.shape != b.shape:
        a = a.reshape(b.shape, order='F')
    nb = np.linalg.norm(b.ravel())
    d = np.linalg.norm((a - b).ravel())
    return float(d / nb) if nb > 0 else float(d)
