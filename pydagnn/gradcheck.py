"""Numerical derivative checks, the idea of MatConvNet's ``xtest/nntest``.

Everything runs in float64 with central differences. For a block with outputs
``y_j`` and random projections ``p_j`` the scalar checked is
``L = sum_j <p_j, y_j>``; its analytical derivative with respect to every input and
param (from ``block.backward``) is compared with ``(L(x + h e) - L(x - h e)) / 2h``,
element by element for small arrays and along random directions for large ones.
"""
import numpy as np


def numerical_derivative(f, x, h=1e-6, max_elements=400, rng=None):
    """Central-difference derivative of the scalar ``f()`` with respect to array ``x``
    (perturbed in place and restored).

    Returns ``(indices, values)``: the flat indices checked and d f / d x at them.
    Arrays with more than ``max_elements`` entries are sampled at random indices.
    """
    flat = x.reshape(-1, order='A') if x.flags.forc else None
    if flat is None or not np.shares_memory(flat, x):
        raise ValueError('numerical_derivative needs a contiguous array to perturb in place')
    n = flat.size
    rng = rng if rng is not None else np.random.default_rng(0)
    idx = np.arange(n) if n <= max_elements else np.sort(rng.choice(n, max_elements, replace=False))
    vals = np.empty(len(idx))
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        vals[j] = (fp - fm) / (2 * h)
    return idx, vals


def directional_derivative(f, x, v, h=1e-6):
    """(f(x + h v) - f(x - h v)) / 2h, with ``x`` perturbed in place and restored."""
    old = x.copy()
    x += h * v
    fp = f()
    x[...] = old - h * v
    fm = f()
    x[...] = old
    return (fp - fm) / (2 * h)


def assert_close(name, analytical, numerical, rtol, atol):
    """Raise AssertionError naming ``name`` when the derivatives disagree."""
    a = np.asarray(analytical, dtype=np.float64).ravel()
    b = np.asarray(numerical, dtype=np.float64).ravel()
    err = np.abs(a - b)
    scale = max(np.abs(b).max(initial=0.0), np.abs(a).max(initial=0.0), 1e-300)
    bad = err > atol + rtol * scale
    if bad.any():
        i = int(np.argmax(err))
        raise AssertionError(
            f'derivative of {name}: {bad.sum()} of {a.size} entries differ; worst at {i}: '
            f'analytical {a[i]:.6g} vs numerical {b[i]:.6g} (|err| {err[i]:.3g}, scale {scale:.3g})')


def projected_objective(outputs, projections):
    """sum_j <p_j, y_j> over the outputs that have a projection."""
    total = 0.0
    for y, p in zip(outputs, projections):
        if p is not None:
            total += float(np.sum(np.asarray(y, dtype=np.float64) * p))
    return total


def check_block(block, inputs, params, der_outputs=None, wrt=None, h=1e-6, rtol=1e-6, atol=1e-8,
                max_elements=300, seed=0):
    """Check ``block.backward`` against central differences of ``block.forward``.

    inputs, params: lists of float64 arrays (copied). der_outputs: projections, one per
    output (``None`` = the output carries no derivative); default: random for output 1
    only. wrt: names like ``'in0'``, ``'par1'`` to check; default all inputs and params
    that backward returns a derivative for. Returns a dict name -> max abs error.
    """
    rng = np.random.default_rng(seed)
    inputs = [np.array(a, dtype=np.float64, order='F') if _is_float(a) else a for a in inputs]
    params = [np.array(a, dtype=np.float64, order='F') for a in params]
    outputs = block.forward(inputs, params)
    if der_outputs is None:
        der_outputs = [rng.standard_normal(np.shape(outputs[0]))] + [None] * (len(outputs) - 1)
    der_in, der_par = block.backward(inputs, params, der_outputs, outputs)

    def f():
        return projected_objective(block.forward(inputs, params), der_outputs)

    errors = {}
    targets = [(f'in{i}', x, d) for i, (x, d) in enumerate(zip(inputs, der_in))] + \
              [(f'par{i}', x, d) for i, (x, d) in enumerate(zip(params, der_par))]
    for name, x, d in targets:
        if (wrt is not None and name not in wrt) or d is None or not _is_float(x):
            continue
        if np.shape(d) != np.shape(x):
            raise AssertionError(f'{type(block).__name__} derivative {name} has shape {np.shape(d)}, '
                                 f'value has {np.shape(x)}')
        idx, num = numerical_derivative(f, x, h=h, max_elements=max_elements, rng=rng)
        ana = np.asarray(d, dtype=np.float64).reshape(-1, order='F' if x.flags.f_contiguous else 'C')[idx]
        assert_close(f'{type(block).__name__}.{name}', ana, num, rtol, atol)
        errors[name] = float(np.abs(ana - num).max(initial=0.0))
    return errors


def _is_float(a):
    return isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating)
