"""The trainer's check that a step is finite, and the diagnosis when it is not.

A single NaN pixel spreads through batch normalisation to every image of the batch; the
gating's top-k (``H >= q_k``, False for NaN) then selects no component module, so
``Fusion_out`` is all zeros, every prediction 0 and the objective finite, while the
derivatives are NaN. So each step checks the objective *and* every param derivative:

    check = StepCheck(net, der_outputs, epoch, batch)
    net.eval(inputs, der_outputs); check.after_eval(indexes, inputs)   # per sub-batch
    check.before_update(state)   # the param derivatives; a snapshot by reference
    accumulate_gradients(...)    # queued behind the check, no stall
    check.done()                 # one host read; on failure undo the update and diagnose

:func:`count_nonfinite` reduces each array on its device into one slot of a small
vector (one reduction kernel per array, then one sum), the counts are added on the
device, and the host reads one number per step.
Only when it is not zero is the cause searched for: the step's sub-batches are evaluated
again with every value kept, and :class:`NonFiniteError` names the epoch, the batch, the
non-finite input var (with its images) and the first layer (in execution order) whose
output went non-finite, or, when the forward pass is finite, the first layer of the
backward pass whose derivative did.
"""
import numpy as np

from . import backend
from .executor import first

__all__ = ['NonFiniteError', 'keep_objectives', 'count_nonfinite', 'step_flag', 'Snapshot',
           'StepCheck', 'diagnose']


class NonFiniteError(RuntimeError):
    """A training step produced NaN or Inf; the update was not applied. Attributes:
    ``epoch``, ``batch`` (1-based), ``layer``, ``layer_type``, ``var`` (None when unknown)."""

    def __init__(self, message, epoch=None, batch=None, layer=None, layer_type=None, var=None):
        super().__init__(message)
        self.epoch, self.batch = epoch, batch
        self.layer, self.layer_type, self.var = layer, layer_type, var


def keep_objectives(net, der_outputs):
    """Mark the vars seeded with derivatives (the objective) precious, so their values
    survive ``conserve_memory`` for :func:`step_flag` (one scalar each)."""
    for name in der_outputs or {}:
        net.get_var(name).precious = True


def _float_arrays(values):
    for v in values:
        a = first(v)
        if a is not None and hasattr(a, 'dtype') and a.dtype.kind == 'f' and a.size:
            yield a


_GPU_KERNEL = []


def _nonfinite_count_gpu():
    """A CuPy reduction: the number of non-finite elements of an array (int64)."""
    if not _GPU_KERNEL:
        import cupy
        _GPU_KERNEL.append(cupy.ReductionKernel('T x', 'int64 y', 'isfinite(x) ? 0 : 1', 'a + b',
                                                'y = a', '0', 'pydagnn_nonfinite_count'))
    return _GPU_KERNEL[0]


def count_nonfinite(arrays):
    """The number of non-finite elements over ``arrays`` (all on one device): a host int
    for NumPy arrays, a 0-d device array for CuPy ones (nothing is read)."""
    arrays = list(_float_arrays(arrays))
    if not arrays:
        return 0
    if not backend.is_gpu_array(arrays[0]):
        return int(sum(a.size - int(np.count_nonzero(np.isfinite(a))) for a in arrays))
    import cupy
    k = _nonfinite_count_gpu()
    slots = cupy.empty(len(arrays), dtype=np.int64)
    for i, a in enumerate(arrays):
        k(a, out=slots[i])
    return slots.sum()


def step_flag(net, der_outputs, params=True):
    """The non-finite count over the values of the ``der_outputs`` vars (the objective)
    and, with ``params``, every param derivative of the last eval (see
    :func:`count_nonfinite`)."""
    values = [net.get_var(name).value for name in der_outputs or {}]
    if params:
        values += [p.der for p in net.params]
    return count_nonfinite(values)


class Snapshot:
    """The param values and momenta before an update, by reference: the SGD update
    returns new arrays, so restoring these undoes it exactly."""

    def __init__(self, net, state):
        self.net, self.state = net, state
        self.values = [p.value for p in net.params]
        self.moms = dict(state.get('momentum') or {})

    def restore(self):
        for p, v in zip(self.net.params, self.values):
            p.value = v
        self.state['momentum'] = dict(self.moms)


class StepCheck:
    """The finite check of one training step (a batch of one or more sub-batches)::

        check = StepCheck(net, der_outputs, epoch, batch)
        for each sub-batch: net.eval(inputs, der_outputs); check.after_eval(indexes, inputs)
        check.before_update(state)       # counts the summed param derivatives, snapshot
        accumulate_gradients(...)
        check.done()                     # one host read; NonFiniteError (update undone)

    Nothing is read from the device before :meth:`done`: the counts are device scalars
    (the objective of each sub-batch, the param derivatives once, as they are summed over
    the sub-batches), added on the device."""

    def __init__(self, net, der_outputs, epoch, batch):
        self.net, self.der_outputs = net, der_outputs
        self.epoch, self.batch = epoch, batch
        self.sub_batches = []   # (imdb indexes, inputs): what a failure is diagnosed on
        self.count = 0
        self.snapshot = None

    def after_eval(self, indexes, inputs):
        """Count the non-finite objective values of the sub-batch just evaluated."""
        self.sub_batches.append((indexes, inputs))
        self.count = self.count + step_flag(self.net, self.der_outputs, params=False)

    def before_update(self, state):
        """Count the non-finite param derivatives; remember the params to undo the update."""
        self.count = self.count + step_flag(self.net, (), params=True)
        self.snapshot = Snapshot(self.net, state)

    def done(self):
        """Read the count (one host read); when not 0 undo the update, find the cause
        (:func:`diagnose`) and raise :class:`NonFiniteError`."""
        count = int(backend.to_host(self.count)) if backend.is_gpu_array(self.count) else int(self.count)
        if count == 0:
            return
        if self.snapshot is not None:
            self.snapshot.restore()
        where, info = diagnose(self.net, self.sub_batches, self.der_outputs)
        raise NonFiniteError(f'cnn_train_dag: epoch {self.epoch}, batch {self.batch}: the step is not '
                             f'finite ({count} NaN/Inf values in the objective and the param '
                             f'derivatives); {where}. The update was not applied and no checkpoint '
                             'of this net written', epoch=self.epoch, batch=self.batch, **info)


def _bad(v):
    return any(count_nonfinite_host(a) for a in _float_arrays([v]))


def count_nonfinite_host(a):
    """Non-finite elements of one array, read to the host (diagnosis only)."""
    n = count_nonfinite([a])
    return int(backend.to_host(n)) if backend.is_gpu_array(n) else n


def _images_with_nonfinite(a, ids):
    """'images 3, 7 of the sub-batch (imdb images 18, 40, 1-based)' for an H x W x C x N array."""
    a = backend.to_host(a)
    if a.ndim != 4:
        return f'{a.size - int(np.count_nonzero(np.isfinite(a)))} values'
    per = (~np.isfinite(a)).reshape(-1, a.shape[3], order='F').any(axis=0)
    pos = np.nonzero(per)[0]
    text = 'image(s) ' + ', '.join(str(int(i) + 1) for i in pos[:10]) + ' of the sub-batch'
    if ids is not None and len(ids) == a.shape[3]:
        text += ' (imdb image(s) ' + ', '.join(str(int(ids[i]) + 1) for i in pos[:10]) + ', 1-based)'
    return text + (' ...' if pos.size > 10 else '')


def diagnose(net, sub_batches, der_outputs):
    """``(text, info)``: where the step went non-finite, found by evaluating each
    sub-batch again with every value kept (``conserve_memory`` off). ``info`` has
    ``layer``, ``layer_type`` and ``var`` (None where not found)."""
    saved = net.conserve_memory, net.accumulate_param_ders
    net.conserve_memory, net.accumulate_param_ders = False, False
    try:
        for ids, inputs in sub_batches:
            net.eval(inputs, der_outputs)
            found = _first_nonfinite(net, ids)
            if found is not None:
                return found
    finally:
        net.conserve_memory, net.accumulate_param_ders = saved
    return ('evaluating the batch again gave finite values (a non-deterministic fault?)',
            dict(layer=None, layer_type=None, var=None))


def _first_nonfinite(net, ids):
    order = net.execution_order
    prefix = ''
    for name in net.get_inputs():
        v = net.get_var(name).value
        if _bad(v):
            prefix = f'input var {name!r} holds NaN/Inf in {_images_with_nonfinite(first(v), ids)}; '
    for li in order:
        l = net.layers[li]
        for o in l.outputs:
            if _bad(net.get_var(o).value):
                return (f'{prefix}the first layer whose output went non-finite is {l.name!r} '
                        f'({l.type}), output var {o!r}', dict(layer=l.name, layer_type=l.type, var=o))
    for li in reversed(order):
        l = net.layers[li]
        for i in l.inputs:
            if _bad(net.get_var(i).der):
                return (f'{prefix}the forward pass is finite; the first layer whose derivative went '
                        f'non-finite (backward) is {l.name!r} ({l.type}), derivative of var {i!r}',
                        dict(layer=l.name, layer_type=l.type, var=i))
        for pi, pname in zip(l.param_indexes, l.params):
            if _bad(net.params[pi].der):
                return (f'{prefix}the forward pass is finite; the first layer whose derivative went '
                        f'non-finite (backward) is {l.name!r} ({l.type}), param {pname!r}',
                        dict(layer=l.name, layer_type=l.type, var=pname))
    return None
