"""Running a DagNN: MatConvNet's ``eval``, forward and backward.

:class:`Executor` runs the layers of a :class:`pydagnn.dagnn.DagNN` forward in its
``execution_order`` and, when derivatives are asked for, backward in reverse,
accumulating into ``vars[i].der`` and ``params[i].der``. It owns the policies of a
run: ``conserve_memory`` (which values are freed when), ``precious`` vars, the block
``mode``, per-layer timing and the routing of gated layers (:mod:`pydagnn.routing`).
The tables, their building and the order live in :mod:`pydagnn.dagnn`; ``DagNN.eval``
delegates here. What runs is the execution plan (:mod:`pydagnn.plan`): the layers in
order, with each applicable fused group (the batched mixture of a GM net) in place of
its member layers.

Differences from the original, on purpose (see SPEC.md, "known defects"):
  * every ``eval`` starts from clean values and derivatives, so results never depend
    on an earlier evaluation (the original concatenates stale CM values);
  * parameter derivatives not computed in an ``eval`` are ``None`` afterwards (unless
    ``accumulate_param_ders``), so a step never re-applies an old derivative;
  * derivatives do not depend on ``conserve_memory``.

Data parallelism: the param derivatives of a step are complete when
:meth:`Executor.backward` returns; :meth:`Executor.after_backward` is the one place
where an allreduce over ranks would run (see ``after_backward_hooks``).
"""
import time

import numpy as np

from . import backend, routing
from .plan import FusedGroup, execution_plan


class EvalError(ValueError):
    """A failure inside ``DagNN.eval``; the message names the layer, its type and shapes."""


def pairs(arg, what):
    """Accept {'name': value} or MatConvNet's flat ['name', value, ...]."""
    if arg is None:
        return {}
    if isinstance(arg, dict):
        return dict(arg)
    arg = list(arg)
    if len(arg) % 2:
        raise ValueError(f'{what}: a flat list must alternate names and values, got {len(arg)} items')
    out = {}
    for name, value in zip(arg[0::2], arg[1::2]):
        if not isinstance(name, str):
            raise ValueError(f'{what}: expected a var name at an even position, got {name!r}')
        out[name] = value
    return out


def first(v):
    """The array of a var value; the first element of a tuple-valued (cell) var."""
    return v[0] if isinstance(v, tuple) else v


def shape_str(v):
    """``'3x3x16x2 float32'`` for an array, recursively for a tuple value."""
    if v is None:
        return 'None'
    if isinstance(v, tuple):
        return '(' + ', '.join(shape_str(e) for e in v) + ')'
    shape = getattr(v, 'shape', None)
    if shape is None:
        return type(v).__name__
    return 'x'.join(str(s) for s in shape) + f' {getattr(v, "dtype", "")}'


#: the floating dtypes the layers compute in (float16 has no CPU kernels; see CONVENTIONS)
FLOAT_DTYPES = ('float32', 'float64')


def check_input(name, value):
    """Raise :class:`EvalError` naming var ``name`` unless ``value`` is a NumPy/CuPy
    array the layers take: float32 or float64 (integer and bool arrays pass, e.g.
    labels), with at least one element. A tuple value (a cell var) is checked per element."""
    if isinstance(value, tuple):
        for v in value:
            check_input(name, v)
        return
    if not (isinstance(value, np.ndarray) or backend.is_gpu_array(value)):
        raise EvalError(f'eval: input {name!r} is a {type(value).__name__}, not an array; give a '
                        f'NumPy or CuPy array (e.g. numpy.asarray(x, dtype=numpy.float32))')
    kind = value.dtype.kind
    if (kind == 'f' and value.dtype.name not in FLOAT_DTYPES) or kind not in 'fiub':
        raise EvalError(f'eval: input {name!r} has dtype {value.dtype} (shape {shape_str(value)}); '
                        f'the layers compute in {" or ".join(FLOAT_DTYPES)}: convert it with '
                        f'.astype(numpy.float32)')
    if value.size == 0:
        raise EvalError(f'eval: input {name!r} is empty (shape {shape_str(value)}): a batch needs '
                        f'at least one image')


def _noop():
    pass


class Executor:
    """Runs one net's ``eval``. State of the last eval, for inspection:

    * ``routes``: routed layer name -> the batch indices it ran on (None / empty when
      no image selected it);
    * ``route_indexes``: gate var name -> its :class:`pydagnn.routing.RouteIndex`;
    * ``plan``: the entries it ran (:func:`pydagnn.plan.execution_plan`: layers, and
      fused groups in place of their members), with their clocks.

    ``after_backward_hooks``: callables ``hook(net)`` run, in order, once the param
    derivatives of a backward are complete (and before the optimizer sees them): where
    a data-parallel allreduce of ``params[i].der`` belongs.
    """

    def __init__(self, net):
        self.net = net
        self.routes = {}
        self.route_indexes = {}
        self.after_backward_hooks = []
        self.plan = []
        self._state = {}
        self._skipped_vars = set()

    # ------------------------------------------------------------------ eval
    def eval(self, inputs, der_outputs=None):
        """See :meth:`pydagnn.dagnn.DagNN.eval`."""
        net = self.net
        net.execution_order                  # brings the tables up to date
        inputs = pairs(inputs, 'eval inputs')
        der_outputs = pairs(der_outputs, 'eval der_outputs') if der_outputs is not None else None
        net.computing_derivative = bool(der_outputs)
        self._check_names(inputs, der_outputs)
        for name, value in inputs.items():
            check_input(name, value)
        for v in net.vars:
            v.value = v.der = None
        if not net.accumulate_param_ders:
            for p in net.params:
                p.der = None
        for name, value in inputs.items():
            net.vars[net.var_index(name)].value = self._to_net_device(value)
        self.plan = execution_plan(net)
        skipped = self.forward(self.plan)
        if der_outputs:
            self.seed_derivatives(der_outputs)
            self.backward(self.plan, skipped)
            self.after_backward()
        self._state = {}

    def _to_net_device(self, x):
        if self.net.device == 'gpu' and isinstance(x, np.ndarray):
            return backend.to_device(x, 'gpu')
        return x

    def _check_names(self, inputs, der_outputs):
        net = self.net
        for name in inputs:
            if not net.has_var(name):
                raise KeyError(f'eval: input {name!r} is not a var of this net; '
                               f'its inputs are {net.get_inputs()}')
        for name in der_outputs or {}:
            if not net.has_var(name):
                raise KeyError(f'eval: der_outputs names {name!r}, which is not a var of this net; '
                               f'its outputs are {net.get_outputs()}')

    def _keep(self, plan):
        """Per var: keep its value after its last forward consumer."""
        net = self.net
        if not net.conserve_memory:
            return [True] * len(net.vars)
        if not net.computing_derivative:
            return [False] * len(net.vars)
        # with derivatives, conserve_memory still frees a var after its last forward
        # consumer when no backward reads it: no consumer's (the block says so with
        # ``backward_needs_inputs = False``) and not its producer's (the block says so
        # with ``backward_needs_outputs = False``). MatConvNet's ReLU short circuit,
        # generalised: conv -> BN -> ReLU keeps the conv output and the ReLU output only.
        keep = [False] * len(net.vars)
        for l in plan:
            if l.block.backward_needs_inputs:
                for i in l.input_indexes:
                    keep[i] = True
            if l.block.backward_needs_outputs:
                for i in l.output_indexes:
                    keep[i] = True
        return keep

    # ------------------------------------------------------------------ forward
    def forward(self, plan):
        """Run the entries of ``plan`` forward (layers; fused groups, see
        :mod:`pydagnn.plan`); returns the set of the skipped entries' positions."""
        net = self.net
        pending = [0] * len(net.vars)
        for layer in plan:
            for i in layer.input_indexes:
                pending[i] += 1
        keep = self._keep(plan)
        skipped = set()
        self._skipped_vars = set()
        self.routes = {}
        self.route_indexes = {}
        self._state = {}
        sync = self._timing_sync()
        for li, layer in enumerate(plan):
            ins = self._layer_inputs(layer, skipped)
            if ins is None:
                skipped.add(li)
                self._skipped_vars.update(layer.output_indexes)
                for o in layer.output_indexes:
                    net.vars[o].value = None
                continue
            pars = [net.params[i].value for i in layer.param_indexes]
            sync()
            t0 = time.perf_counter()
            outs = self._call(layer, 'forward', ins, pars)
            sync()
            layer.forward_time = time.perf_counter() - t0
            n_state = layer.block.state_outputs
            if not isinstance(outs, (list, tuple)) or len(outs) != len(layer.outputs) + n_state:
                raise EvalError(f'layer {layer.name!r} ({layer.type}) returned '
                                f'{len(outs) if isinstance(outs, (list, tuple)) else type(outs).__name__} '
                                f'outputs, it declares {len(layer.outputs)}: {layer.outputs}'
                                + (f' and {n_state} state' if n_state else ''))
            if n_state:
                # private state for this eval's backward (none kept without derivatives)
                if net.computing_derivative:
                    self._state[li] = list(outs[len(layer.outputs):])
                outs = outs[:len(layer.outputs)]
            if isinstance(layer, FusedGroup):
                self._record_member_routes(layer)
            for o, val in zip(layer.output_indexes, outs):
                net.vars[o].value = val
                # read by layers of the net, but none in the plan (a fused group's
                # member read it, as CM_out reads the CM outputs): its last use is over
                if pending[o] == 0 and net.vars[o].fanout and not keep[o] and not net.vars[o].precious:
                    net.vars[o].value = None
            for i in layer.input_indexes:
                pending[i] -= 1
                if pending[i] == 0 and not keep[i] and not net.vars[i].precious:
                    net.vars[i].value = None
        return skipped

    def _layer_inputs(self, layer, skipped):
        """The input values of a layer, routed if it has a route; None = skip the layer
        (a routed layer that no image selects, or one fed only by skipped layers)."""
        net = self.net
        ins = []
        missing = []
        for name, i in zip(layer.inputs, layer.input_indexes):
            val = net.vars[i].value
            if val is None:
                if self._skipped_var(i, skipped):
                    missing.append(name)
                else:
                    raise EvalError(self._no_value_message(layer, name, i))
            ins.append(val)
        if missing and not layer.block.accepts_missing_inputs:
            return None
        if layer.route is not None and ins:
            idx = self._route(layer.name, layer.route)
            self.routes[layer.name] = idx
            if idx is None or len(idx) == 0:
                return None
            ins[0] = routing.gather(ins[0], idx)
        return ins

    def _record_member_routes(self, group):
        """``routes`` of a fused group's routed members, as if they had run."""
        for name, route in group.routed:
            self.routes[name] = self._route(name, route)

    def _route(self, name, route):
        """The batch indices (in batch order) of the images the layer's gate selects for
        its component: a device array on the GPU. All components of one gate are
        resolved together, once per eval, by the gate value's
        :class:`~pydagnn.routing.RouteIndex` (one argsort of the mask on the device, the
        counts carried by the gate value or fetched in one transfer)."""
        gate_name, k = route
        index = self.route_indexes.get(gate_name)
        if index is None:
            gate = self.net.get_var(gate_name).value
            try:
                index = routing.route_index(gate)
            except ValueError:
                raise EvalError(f'layer {name!r} is routed by var {gate_name!r}, whose value is '
                                f'{shape_str(gate)}; expected the gating tuple (weights, mask, ...)') from None
            self.route_indexes[gate_name] = index
        i = int(k) - 1
        if not 0 <= i < len(index):
            raise EvalError(f'layer {name!r} is routed to component {k} of var {gate_name!r}, '
                            f'whose mask has {len(index)} rows')
        return index.indices(i)

    def _skipped_var(self, var_index, skipped):
        return var_index in self._skipped_vars

    def _no_value_message(self, layer, name, i):
        v = self.net.vars[i]
        if v.fanin == 0:
            return (f'layer {layer.name!r} ({layer.type}) needs var {name!r}, which no layer produces '
                    f'and eval was not given; give it in inputs (net inputs: {self.net.get_inputs()})')
        return (f'layer {layer.name!r} ({layer.type}) needs var {name!r}, which has no value at this '
                f'point (freed or not yet computed)')

    def _call(self, layer, method, *args):
        try:
            with np.errstate(over='ignore'):
                return getattr(layer.block, method)(*args)
        except EvalError:
            raise
        except Exception as e:
            ins = ', '.join(f'{n}: {shape_str(v)}' for n, v in zip(layer.inputs, args[0]))
            pars = ', '.join(f'{n}: {shape_str(v)}' for n, v in zip(layer.params, args[1]))
            raise EvalError(f'layer {layer.name!r} ({layer.type}) failed in {method}: {e} '
                            f'[inputs {ins}] [params {pars}]') from e

    def _timing_sync(self):
        if self.net.sync_timing and self.net.device == 'gpu':
            return backend.synchronize
        return _noop

    # ------------------------------------------------------------------ backward
    def seed_derivatives(self, der_outputs):
        """Set the derivatives of the named output vars (a host scalar fills the var's shape)."""
        for name, d in der_outputs.items():
            var = self.net.get_var(name)
            val = first(var.value)
            if val is None:
                raise EvalError(f'der_outputs names {name!r}, which has no value after forward')
            xp = backend.get_array_module(val)
            if not backend.is_gpu_array(d) and np.size(d) == 1:
                # a host scalar: fill on the device, no transfer
                d = xp.full(val.shape, np.asarray(d).reshape(()).item(), dtype=val.dtype)
            else:
                d = xp.asarray(d, dtype=val.dtype)
            if d.size == 1 and d.shape != val.shape:
                d = xp.broadcast_to(d.reshape(()), val.shape).copy()
            elif d.shape != val.shape:
                raise EvalError(f'der_outputs[{name!r}] has shape {d.shape}, the var has {val.shape}')
            var.der = d

    def backward(self, plan, skipped):
        """Run the entries of ``plan`` backward in reverse, accumulating derivatives."""
        net = self.net
        touched = set()
        sync = self._timing_sync()
        for li in range(len(plan) - 1, -1, -1):
            layer = plan[li]
            if li in skipped:
                continue
            ders = [net.vars[o].der for o in layer.output_indexes]
            if all(d is None for d in ders) and not layer.block.always_backward:
                continue
            ins = [net.vars[i].value for i in layer.input_indexes]
            idx = self.routes.get(layer.name) if layer.route is not None else None
            if idx is not None:
                full = ins[0]
                ins[0] = routing.gather(full, idx)
            pars = [net.params[i].value for i in layer.param_indexes]
            outs = [net.vars[o].value for o in layer.output_indexes]
            if layer.block.state_outputs:
                outs += self._state.pop(li, [None] * layer.block.state_outputs)
            sync()
            t0 = time.perf_counter()
            der_ins, der_pars = self._call(layer, 'backward', ins, pars, ders, outs)
            sync()
            layer.backward_time = time.perf_counter() - t0
            if idx is not None and der_ins and der_ins[0] is not None:
                der_ins = list(der_ins)
                der_ins[0] = routing.scatter(full, idx, der_ins[0])
            self._accumulate_inputs(layer, der_ins)
            self._accumulate_params(layer, der_pars, touched)
            if net.conserve_memory:
                for o in layer.output_indexes:
                    if not net.vars[o].precious:
                        net.vars[o].value = None
                        net.vars[o].der = None

    def after_backward(self):
        """The param derivatives of this eval are complete: run ``after_backward_hooks``
        (the place for a data-parallel allreduce of ``params[i].der``)."""
        for hook in self.after_backward_hooks:
            hook(self.net)

    def _accumulate_inputs(self, layer, der_ins):
        net = self.net
        for name, i, d in zip(layer.inputs, layer.input_indexes, der_ins or ()):
            if d is None:
                continue
            var = net.vars[i]
            val = first(var.value)
            if val is not None and hasattr(d, 'shape') and d.shape != val.shape:
                raise EvalError(f'layer {layer.name!r} ({layer.type}) returned a derivative of shape '
                                f'{d.shape} for var {name!r} of shape {val.shape}')
            var.der = d if var.der is None else _add_ders(var.der, d)

    def _accumulate_params(self, layer, der_pars, touched):
        net = self.net
        for i, d in zip(layer.param_indexes, der_pars or ()):
            if d is None:
                continue
            p = net.params[i]
            if p.value is not None and d.shape != p.value.shape:
                d = d.reshape(p.value.shape)
            if p.der is None or (i not in touched and not net.accumulate_param_ders):
                p.der = d
            else:
                p.der = p.der + d
            touched.add(i)


def _add_ders(a, b):
    """``a + b`` for two derivatives of a var: a new array (either may be shared: a Sum's
    derivatives are one object), on the worker threads for two same-layout CPU maps
    (``dagnn.Sum``'s kernel; numpy's ``+`` on one core took 8 ms per ResNet18 step)."""
    if (type(a) is np.ndarray and type(b) is np.ndarray and a.shape == b.shape
            and a.dtype == b.dtype and a.flags.f_contiguous and b.flags.f_contiguous):
        from pydagnn.layers.sum import sum_forward   # numba: not at import (CLI --help)
        return sum_forward([a, b])
    return a + b
