"""DagNN: MatConvNet's directed-acyclic-graph network container, in Python.

The tables ``layers``, ``vars`` and ``params`` and their fields are MatConvNet's
(``dagnn.DagNN``), with Python names. ``eval`` runs the layers forward in
``execution_order`` and, when derivatives are asked for, backward in reverse,
accumulating into ``vars[i].der`` and ``params[i].der``.

Differences from the original, on purpose (see SPEC.md, "known defects"):
  * every ``eval`` starts from clean values and derivatives, so results never depend
    on an earlier evaluation (the original concatenates stale CM values);
  * parameter derivatives not computed in an ``eval`` are ``None`` afterwards (unless
    ``accumulate_param_ders``), so a step never re-applies an old derivative;
  * derivatives do not depend on ``conserve_memory``.
"""
import time

import numpy as np

from . import backend


class EvalError(ValueError):
    """A failure inside ``DagNN.eval``; the message names the layer, its type and shapes."""


class Var:
    """A variable of the graph (MatConvNet ``net.vars(i)``)."""
    __slots__ = ('name', 'value', 'der', 'fanin', 'fanout', 'precious')

    def __init__(self, name, precious=False):
        self.name = name
        self.value = None
        self.der = None
        self.fanin = 0
        self.fanout = 0
        self.precious = precious

    def __repr__(self):
        return f'Var({self.name!r}, value={_shape_str(self.value)}, der={_shape_str(self.der)})'


class Param:
    """A parameter (MatConvNet ``net.params(i)``); ``train_method`` is 'gradient' or 'average'."""
    __slots__ = ('name', 'value', 'der', 'fanout', 'train_method', 'learning_rate', 'weight_decay')

    def __init__(self, name):
        self.name = name
        self.value = None
        self.der = None
        self.fanout = 0
        self.train_method = 'gradient'
        self.learning_rate = 1.0
        self.weight_decay = 1.0

    def __repr__(self):
        return (f'Param({self.name!r}, value={_shape_str(self.value)}, method={self.train_method}, '
                f'lr={self.learning_rate}, wd={self.weight_decay})')


class LayerEntry:
    """A layer (MatConvNet ``net.layers(i)``): names of its vars and params, its block,
    optional ``route`` = (gate var name, 1-based component index), and the seconds its
    last forward/backward took."""
    __slots__ = ('name', 'inputs', 'outputs', 'params', 'block', 'route',
                 'input_indexes', 'output_indexes', 'param_indexes', 'forward_time', 'backward_time')

    def __init__(self, name, block, inputs, outputs, params):
        self.name = name
        self.block = block
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.params = list(params)
        self.route = None
        self.input_indexes = self.output_indexes = self.param_indexes = ()
        self.forward_time = 0.0
        self.backward_time = 0.0

    @property
    def type(self):
        return self.block.type_name

    def __repr__(self):
        return (f'Layer({self.name!r}, {self.block.type_name}, inputs={self.inputs}, outputs={self.outputs}, '
                f'params={self.params}' + (f', route={self.route}' if self.route else '') + ')')


def _names(x):
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return [str(n) for n in x]


def _shape_str(v):
    if v is None:
        return 'None'
    if isinstance(v, tuple):
        return '(' + ', '.join(_shape_str(e) for e in v) + ')'
    shape = getattr(v, 'shape', None)
    if shape is None:
        return type(v).__name__
    return 'x'.join(str(s) for s in shape) + f' {getattr(v, "dtype", "")}'


def _pairs(arg, what):
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


def _first(v):
    """The array of a var value; the first element of a tuple-valued (cell) var."""
    return v[0] if isinstance(v, tuple) else v


def _noop():
    pass


def _gather_images(x, idx):
    """Images ``idx`` (last axis) of an ``H x W x C x N`` map, Fortran-contiguous when x
    is: with Fortran order each image is a contiguous block, so this is a row gather of
    the C-order ``.T`` view (one kernel on the GPU)."""
    if x.ndim == 0:
        return x
    return x.T[idx].T


def _move_block_state(block, device):
    """Move the NumPy / CuPy arrays among a block's plain (transient, not stored)
    attributes to ``device``; stored properties (``size``, ``pad``, ...) stay on the host."""
    stored = getattr(block, 'properties', {})
    for name, val in list(vars(block).items()):
        if name == 'net' or name in stored:
            continue
        if isinstance(val, np.ndarray) or backend.is_gpu_array(val):
            setattr(block, name, backend.to_device(val, device))


class DagNN:
    """A MatConvNet DagNN.

    Attributes (MatConvNet names in brackets): ``layers``, ``vars``, ``params``, ``meta``
    (dict), ``mode`` ('normal' | 'test'), ``conserve_memory`` [conserveMemory],
    ``accumulate_param_ders`` [accumulateParamDers], ``rng`` (``numpy.random.Generator``
    used by stochastic blocks: dropout, H_x noise, gating ties), ``device`` ('cpu' | 'gpu').
    """

    def __init__(self, seed=0):
        self.layers = []
        self.vars = []
        self.params = []
        self.meta = {}
        self.mode = 'normal'
        self.conserve_memory = True
        self.accumulate_param_ders = False
        self.rng = np.random.default_rng(seed)
        self.device = 'cpu'
        self.computing_derivative = False
        self._order = None
        self._pending_order = None
        self._sizing = False
        self._routes = {}
        self._route_cache = {}
        #: on the GPU, synchronise the device around every layer call so that the
        #: per-layer ``forward_time`` / ``backward_time`` measure the layer's GPU work
        #: (for profiling; it serialises the host and the device, so leave it off
        #: when timing whole steps)
        self.sync_timing = False
        self._dirty = True
        self._var_map = {}
        self._param_map = {}
        self._layer_map = {}

    # ------------------------------------------------------------------ building
    def add_layer(self, name, block, inputs, outputs, params=()):
        """Add a layer computing ``block`` from vars ``inputs`` to vars ``outputs`` with
        params ``params`` (names; created on first mention). Returns the LayerEntry."""
        if name in self._layer_map:
            raise ValueError(f'a layer named {name!r} already exists')
        entry = LayerEntry(name, block, _names(inputs), _names(outputs), _names(params))
        if not entry.outputs:
            raise ValueError(f'layer {name!r} has no outputs')
        self.layers.append(entry)
        self._layer_map[name] = len(self.layers) - 1
        for v in entry.inputs + entry.outputs:
            self._ensure_var(v)
        defaults = list(block.param_defaults() or [])
        for k, p in enumerate(entry.params):
            if p not in self._param_map:
                self.params.append(Param(p))
                self._param_map[p] = len(self.params) - 1
                if k < len(defaults) and defaults[k]:
                    for key, val in defaults[k].items():
                        setattr(self.params[-1], key, val)
        block.net = self
        self._dirty = True
        return entry

    def _ensure_var(self, name):
        if name not in self._var_map:
            self.vars.append(Var(name))
            self._var_map[name] = len(self.vars) - 1

    def remove_layer(self, name):
        """Remove a layer and any var or param nothing else uses."""
        for n in _names(name):
            del self.layers[self.layer_index(n)]
        self._rebuild_maps(prune=True)

    def rename_layer(self, old, new):
        if new in self._layer_map and new != old:
            raise ValueError(f'a layer named {new!r} already exists')
        self.layers[self.layer_index(old)].name = new
        self._rebuild_maps()

    def rename_var(self, old, new):
        """Rename a var everywhere it is used (merging into an existing var is refused)."""
        if new in self._var_map and new != old:
            raise ValueError(f'a var named {new!r} already exists')
        self.vars[self.var_index(old)].name = new
        for l in self.layers:
            l.inputs = [new if v == old else v for v in l.inputs]
            l.outputs = [new if v == old else v for v in l.outputs]
            if l.route and l.route[0] == old:
                l.route = (new, l.route[1])
        self._rebuild_maps()

    def rename_param(self, old, new):
        if new in self._param_map and new != old:
            raise ValueError(f'a param named {new!r} already exists')
        self.params[self.param_index(old)].name = new
        for l in self.layers:
            l.params = [new if p == old else p for p in l.params]
        self._rebuild_maps()

    def set_layer_inputs(self, layer, inputs):
        self.get_layer(layer).inputs = _names(inputs)
        self._rebuild_maps(prune=True)

    def set_layer_outputs(self, layer, outputs):
        self.get_layer(layer).outputs = _names(outputs)
        self._rebuild_maps(prune=True)

    def set_layer_params(self, layer, params):
        self.get_layer(layer).params = _names(params)
        self._rebuild_maps(prune=True)

    def _rebuild_maps(self, prune=False):
        used_vars = {v for l in self.layers for v in l.inputs + l.outputs}
        used_pars = {p for l in self.layers for p in l.params}
        if prune:
            self.vars = [v for v in self.vars if v.name in used_vars]
            self.params = [p for p in self.params if p.name in used_pars]
        self._layer_map = {l.name: i for i, l in enumerate(self.layers)}
        self._var_map = {v.name: i for i, v in enumerate(self.vars)}
        self._param_map = {p.name: i for i, p in enumerate(self.params)}
        for l in self.layers:
            for v in l.inputs + l.outputs:
                self._ensure_var(v)
            for p in l.params:
                if p not in self._param_map:
                    self.params.append(Param(p))
                    self._param_map[p] = len(self.params) - 1
        if self._order is not None:
            keep = [self.layers[i].name for i in self._order if i < len(self.layers)]
            self._order = None
            self._dirty = True
            self._pending_order = keep
        self._dirty = True

    # ------------------------------------------------------------------ look-ups
    def layer_index(self, name):
        try:
            return self._layer_map[name]
        except KeyError:
            raise KeyError(f'no layer named {name!r}') from None

    def var_index(self, name):
        try:
            return self._var_map[name]
        except KeyError:
            raise KeyError(f'no var named {name!r}') from None

    def param_index(self, name):
        try:
            return self._param_map[name]
        except KeyError:
            raise KeyError(f'no param named {name!r}') from None

    def get_layer(self, name):
        return self.layers[self.layer_index(name)] if isinstance(name, str) else name

    def get_var(self, name):
        return self.vars[self.var_index(name)]

    def get_param(self, name):
        return self.params[self.param_index(name)]

    def get_inputs(self):
        """Names of vars no layer produces (what ``eval`` must be given)."""
        self._rebuild()
        return [v.name for v in self.vars if v.fanin == 0]

    def get_outputs(self):
        """Names of vars no layer consumes."""
        self._rebuild()
        return [v.name for v in self.vars if v.fanout == 0]

    # ------------------------------------------------------------------ order
    @property
    def execution_order(self):
        """Layer indexes in the order ``eval`` runs them forward."""
        self._rebuild()
        return list(self._order)

    def set_execution_order(self, order):
        """Fix the forward order (layer names or indexes); it must be topological."""
        idx = [self.layer_index(o) if isinstance(o, str) else int(o) for o in order]
        if sorted(idx) != list(range(len(self.layers))):
            raise ValueError(f'execution order must list each of the {len(self.layers)} layers once, '
                             f'got {len(idx)} entries')
        self._rebuild()
        produced_at = {}
        for pos, i in enumerate(idx):
            for v in self.layers[i].outputs:
                produced_at[v] = pos
        for pos, i in enumerate(idx):
            route = [self.layers[i].route[0]] if self.layers[i].route else []
            for v in self.layers[i].inputs + route:
                if produced_at.get(v, -1) > pos:
                    raise ValueError(f'execution order runs layer {self.layers[i].name!r} before the '
                                     f'layer producing its input {v!r}')
        self._order = idx
        self._pending_order = None

    def set_route(self, layer, gate_var, index):
        """Make ``layer`` run only on the images whose gating mask (``gate_var``'s second
        value, K x N) selects component ``index`` (1-based); None clears the route."""
        entry = self.get_layer(layer)
        entry.route = None if gate_var is None else (str(gate_var), int(index))
        self._dirty = True

    def _rebuild(self):
        routes = tuple(l.route for l in self.layers)
        if routes != getattr(self, '_route_sig', None):
            self._route_sig = routes
            self._dirty = True
            if self._order is not None:  # keep a custom order if it stays valid
                self._pending_order = [self.layers[i].name for i in self._order]
            self._order = None
        if not self._dirty:
            return
        for v in self.vars:
            v.fanin = v.fanout = 0
        for p in self.params:
            p.fanout = 0
        for l in self.layers:
            l.input_indexes = tuple(self._var_map[v] for v in l.inputs)
            l.output_indexes = tuple(self._var_map[v] for v in l.outputs)
            l.param_indexes = tuple(self._param_map[p] for p in l.params)
            for i in l.input_indexes:
                self.vars[i].fanout += 1
            for i in l.output_indexes:
                self.vars[i].fanin += 1
            for i in l.param_indexes:
                self.params[i].fanout += 1
            l.block.net = self
        for v in self.vars:
            if v.fanin > 1:
                producers = [l.name for l in self.layers if v.name in l.outputs]
                raise ValueError(f'var {v.name!r} is produced by several layers: {producers}')
        self._dirty = False
        pending = self._pending_order
        if self._order is None or len(self._order) != len(self.layers):
            self._order = self._topological_order()
            if pending and len(pending) == len(self.layers):
                try:
                    self.set_execution_order(pending)
                except (ValueError, KeyError):
                    pass
        self._pending_order = None

    def _topological_order(self):
        """MatConvNet's ``getOrder``: each layer's height (1 + the largest height of the
        layers consuming its outputs), layers sorted by decreasing height, ties by index.
        Reproducing it exactly matters: saved GM models store this order."""
        consumers = [[] for _ in self.vars]
        for i, l in enumerate(self.layers):
            gate = [self._var_map[l.route[0]]] if l.route and l.route[0] in self._var_map else []
            for v in list(l.input_indexes) + gate:  # a route reads its gate var
                consumers[v].append(i)
        height = [0] * len(self.layers)
        state = [0] * len(self.layers)  # 0 new, 1 open, 2 done
        for root in range(len(self.layers)):
            if state[root]:
                continue
            stack = [(root, iter(self._children(root, consumers)))]
            state[root] = 1
            while stack:
                node, it = stack[-1]
                child = next(it, None)
                if child is None:
                    stack.pop()
                    height[node] = 1 + max((height[c] for c in self._children(node, consumers)), default=0)
                    state[node] = 2
                elif state[child] == 1:
                    cyc = [self.layers[n].name for n, _ in stack]
                    raise ValueError(f'the network graph contains a cycle through layers {cyc}')
                elif state[child] == 0:
                    state[child] = 1
                    stack.append((child, iter(self._children(child, consumers))))
        return sorted(range(len(self.layers)), key=lambda i: -height[i])

    def _children(self, layer_index, consumers):
        return [c for o in self.layers[layer_index].output_indexes for c in consumers[o]]

    # ------------------------------------------------------------------ params
    def init_params(self, rng=None, dtype=np.float32):
        """Initialise every param with its block's ``init_params`` (MatConvNet initParams)."""
        self._rebuild()
        rng = rng if rng is not None else self.rng
        for l in self.layers:
            values = l.block.init_params(rng, dtype) or []
            for i, value in zip(l.param_indexes, values):
                self.params[i].value = backend.to_device(np.asarray(value, dtype=dtype), self.device) \
                    if self.device == 'gpu' else np.asarray(value, dtype=dtype)

    def reset(self):
        """Clear var values and derivatives, param derivatives and block state."""
        for v in self.vars:
            v.value = v.der = None
        for p in self.params:
            p.der = None
        for l in self.layers:
            l.block.reset()

    def move(self, device):
        """Move params to 'cpu' (NumPy) or 'gpu' (CuPy); var values are cleared.

        Blocks follow: a block's ``move(device)`` hook is called when it has one, else
        every NumPy / CuPy array among its plain attributes (a dropout mask, the loss
        average, fixed H_x noise) is moved. ``move('gpu')`` raises a RuntimeError that
        says why when CuPy or a CUDA device is missing (nothing is changed then).
        The optimizer's momentum lives outside the net (``cnn_train_dag``'s state);
        :func:`pydagnn.train.accumulate_gradients` moves it to the param's device."""
        if device not in ('cpu', 'gpu'):
            raise ValueError(f"move: device must be 'cpu' or 'gpu', got {device!r}")
        if device == 'gpu':
            backend.require_gpu("DagNN.move('gpu')")
        for v in self.vars:
            v.value = v.der = None
        for p in self.params:
            p.value = backend.to_device(p.value, device)
            p.der = backend.to_device(p.der, device)
        for l in self.layers:
            hook = getattr(l.block, 'move', None)
            if hook is not None:
                hook(device)
            else:
                _move_block_state(l.block, device)
        self._route_cache = {}
        self.device = device

    def num_params(self, include_moments=False):
        """Number of learnable values (BN moments, trainMethod 'average', excluded by default)."""
        return int(sum(int(np.prod(p.value.shape)) for p in self.params
                       if p.value is not None and (include_moments or p.train_method != 'average')))

    # ------------------------------------------------------------------ eval
    def eval(self, inputs, der_outputs=None):
        """Forward (and backward when ``der_outputs`` is given).

        inputs: ``{'input': x, 'label': y}`` or MatConvNet's ``['input', x, 'label', y]``.
        der_outputs: ``{'objective': 1.0}`` or ``['objective', 1]``: the derivative
        projected on each named output var.
        """
        self._rebuild()
        inputs = _pairs(inputs, 'eval inputs')
        der_outputs = _pairs(der_outputs, 'eval der_outputs') if der_outputs is not None else None
        self.computing_derivative = bool(der_outputs)
        self._check_names(inputs, der_outputs)
        for v in self.vars:
            v.value = v.der = None
        if not self.accumulate_param_ders:
            for p in self.params:
                p.der = None
        for name, value in inputs.items():
            self.vars[self._var_map[name]].value = self._to_net_device(value)
        skipped = self._forward()
        if der_outputs:
            self._seed_derivatives(der_outputs)
            self._backward(skipped)

    def _to_net_device(self, x):
        if self.device == 'gpu' and isinstance(x, np.ndarray):
            return backend.to_device(x, 'gpu')
        return x

    def _check_names(self, inputs, der_outputs):
        for name in inputs:
            if name not in self._var_map:
                raise KeyError(f'eval: input {name!r} is not a var of this net; '
                               f'its inputs are {self.get_inputs()}')
        for name in der_outputs or {}:
            if name not in self._var_map:
                raise KeyError(f'eval: der_outputs names {name!r}, which is not a var of this net; '
                               f'its outputs are {self.get_outputs()}')

    def _forward(self):
        pending = [v.fanout for v in self.vars]
        free = self.conserve_memory and not self.computing_derivative
        # with derivatives, conserve_memory still frees a var after its last forward
        # consumer when no backward reads it: no consumer's (the block says so with
        # ``backward_needs_inputs = False``) and not its producer's (the block says so
        # with ``backward_needs_outputs = False``). MatConvNet's ReLU short circuit,
        # generalised: conv -> BN -> ReLU keeps the conv output and the ReLU output only.
        keep = [False] * len(self.vars)
        if self.conserve_memory and self.computing_derivative:
            for l in self.layers:
                if getattr(l.block, 'backward_needs_inputs', True):
                    for i in l.input_indexes:
                        keep[i] = True
                if getattr(l.block, 'backward_needs_outputs', True):
                    for i in l.output_indexes:
                        keep[i] = True
        else:
            keep = [not free] * len(self.vars)
        skipped = set()
        self._routes = {}
        self._route_cache = {}
        sync = self._timing_sync()
        for li in self._order:
            layer = self.layers[li]
            ins = self._layer_inputs(layer, skipped)
            if ins is None:
                skipped.add(li)
                for o in layer.output_indexes:
                    self.vars[o].value = None
                continue
            pars = [self.params[i].value for i in layer.param_indexes]
            sync()
            t0 = time.perf_counter()
            outs = self._call(layer, 'forward', ins, pars)
            sync()
            layer.forward_time = time.perf_counter() - t0
            if not isinstance(outs, (list, tuple)) or len(outs) != len(layer.outputs):
                raise EvalError(f'layer {layer.name!r} ({layer.type}) returned '
                                f'{len(outs) if isinstance(outs, (list, tuple)) else type(outs).__name__} '
                                f'outputs, it declares {len(layer.outputs)}: {layer.outputs}')
            for o, val in zip(layer.output_indexes, outs):
                self.vars[o].value = self._select_all(o, val) if self._sizing else val
            for i in layer.input_indexes:
                pending[i] -= 1
                if pending[i] == 0 and not keep[i] and not self.vars[i].precious:
                    self.vars[i].value = None
        return skipped

    def _select_all(self, var_index, value):
        """In :meth:`get_var_sizes`, a gate var selects every image for every component,
        so that every routed branch runs on the whole batch and reports its size."""
        name = self.vars[var_index].name
        if isinstance(value, tuple) and len(value) > 1 and any(
                l.route and l.route[0] == name for l in self.layers):
            xp = backend.get_array_module(value[1])
            return (value[0], xp.ones(value[1].shape, dtype=bool)) + tuple(value[2:])
        return value

    def _layer_inputs(self, layer, skipped):
        """The input values of a layer, routed if it has a route; None = skip the layer
        (a routed layer that no image selects, or one fed only by skipped layers)."""
        ins = []
        missing = []
        for name, i in zip(layer.inputs, layer.input_indexes):
            val = self.vars[i].value
            if val is None:
                if self._skipped_var(i, skipped):
                    missing.append(name)
                else:
                    raise EvalError(self._no_value_message(layer, name, i))
            ins.append(val)
        if missing and not getattr(layer.block, 'accepts_missing_inputs', False):
            return None
        if layer.route is not None and ins:
            idx = self._route_index(layer)
            if idx is None or len(idx) == 0:
                self._routes[layer.name] = idx
                return None
            self._routes[layer.name] = idx
            ins[0] = _gather_images(ins[0], idx)
        return ins

    def _route_index(self, layer):
        """The batch indices (in batch order) of the images the layer's gate selects for
        its component: a device array on the GPU. All components of one gate are
        resolved together, once per eval: one argsort of the mask on the device and
        the per-component counts on the host, taken from the gate value's ``counts``
        when the gating block provides them (it reads them with its own single
        device-to-host transfer), else fetched here in one transfer."""
        gate_name, k = layer.route
        cached = self._route_cache.get(gate_name)
        if cached is None:
            gate = self.get_var(gate_name).value
            if not isinstance(gate, tuple) or len(gate) < 2:
                raise EvalError(f'layer {layer.name!r} is routed by var {gate_name!r}, whose value is '
                                f'{_shape_str(gate)}; expected the gating tuple (weights, mask, ...)')
            mask = gate[1]
            xp = backend.get_array_module(mask)
            mask = mask.astype(bool, copy=False)
            if mask.ndim != 2:
                mask = mask.reshape(mask.shape[0], -1)
            counts = getattr(gate, 'counts', None)
            if counts is None:
                counts = backend.to_host(mask.sum(axis=1))
            counts = [int(c) for c in np.asarray(counts).reshape(-1)]
            K, N = mask.shape
            ar = xp.arange(N)
            keys = xp.where(mask, ar[None, :], N + ar[None, :])   # selected first, in batch order
            order = xp.argsort(keys, axis=1)
            cached = self._route_cache[gate_name] = (order, counts)
        order, counts = cached
        i = int(k) - 1
        if not 0 <= i < len(counts):
            raise EvalError(f'layer {layer.name!r} is routed to component {k} of var {gate_name!r}, '
                            f'whose mask has {len(counts)} rows')
        return order[i, :counts[i]]

    def _skipped_var(self, var_index, skipped):
        for li in skipped:
            if var_index in self.layers[li].output_indexes:
                return True
        return False

    def _no_value_message(self, layer, name, i):
        v = self.vars[i]
        if v.fanin == 0:
            return (f'layer {layer.name!r} ({layer.type}) needs var {name!r}, which no layer produces '
                    f'and eval was not given; give it in inputs (net inputs: {self.get_inputs()})')
        return (f'layer {layer.name!r} ({layer.type}) needs var {name!r}, which has no value at this '
                f'point (freed or not yet computed)')

    def _call(self, layer, method, *args):
        try:
            with np.errstate(over='ignore'):
                return getattr(layer.block, method)(*args)
        except EvalError:
            raise
        except Exception as e:
            ins = ', '.join(f'{n}: {_shape_str(v)}' for n, v in zip(layer.inputs, args[0]))
            pars = ', '.join(f'{n}: {_shape_str(v)}' for n, v in zip(layer.params, args[1]))
            raise EvalError(f'layer {layer.name!r} ({layer.type}) failed in {method}: {e} '
                            f'[inputs {ins}] [params {pars}]') from e

    def _seed_derivatives(self, der_outputs):
        for name, d in der_outputs.items():
            var = self.get_var(name)
            val = _first(var.value)
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

    def _timing_sync(self):
        if self.sync_timing and self.device == 'gpu':
            return backend.synchronize
        return _noop

    def _backward(self, skipped):
        touched = set()
        sync = self._timing_sync()
        for li in reversed(self._order):
            layer = self.layers[li]
            if li in skipped:
                continue
            ders = [self.vars[o].der for o in layer.output_indexes]
            if all(d is None for d in ders) and not layer.block.always_backward:
                continue
            ins = [self.vars[i].value for i in layer.input_indexes]
            idx = self._routes.get(layer.name) if layer.route is not None else None
            if idx is not None:
                full = ins[0]
                ins[0] = _gather_images(full, idx)
            pars = [self.params[i].value for i in layer.param_indexes]
            outs = [self.vars[o].value for o in layer.output_indexes]
            sync()
            t0 = time.perf_counter()
            der_ins, der_pars = self._call(layer, 'backward', ins, pars, ders, outs)
            sync()
            layer.backward_time = time.perf_counter() - t0
            if idx is not None and der_ins and der_ins[0] is not None:
                der_ins = list(der_ins)
                der_ins[0] = self._scatter(full, idx, der_ins[0])
            self._accumulate_inputs(layer, der_ins)
            self._accumulate_params(layer, der_pars, touched)
            if self.conserve_memory:
                for o in layer.output_indexes:
                    if not self.vars[o].precious:
                        self.vars[o].value = None
                        self.vars[o].der = None

    @staticmethod
    def _scatter(full, idx, der):
        """The derivative for the whole batch: ``der`` (images ``idx``) at their places,
        zero elsewhere. With Fortran order every image is one contiguous block, so this
        is a row scatter of the C-order ``.T`` views (one kernel on the GPU)."""
        xp = backend.get_array_module(der)
        out = xp.zeros(full.shape, dtype=der.dtype, order='F')
        out.T[idx] = der.T
        return out

    def _accumulate_inputs(self, layer, der_ins):
        for name, i, d in zip(layer.inputs, layer.input_indexes, der_ins or ()):
            if d is None:
                continue
            var = self.vars[i]
            val = _first(var.value)
            if val is not None and hasattr(d, 'shape') and d.shape != val.shape:
                raise EvalError(f'layer {layer.name!r} ({layer.type}) returned a derivative of shape '
                                f'{d.shape} for var {name!r} of shape {val.shape}')
            var.der = d if var.der is None else var.der + d

    def _accumulate_params(self, layer, der_pars, touched):
        for name, i, d in zip(layer.params, layer.param_indexes, der_pars or ()):
            if d is None:
                continue
            p = self.params[i]
            if p.value is not None and d.shape != p.value.shape:
                d = d.reshape(p.value.shape)
            if p.der is None or (i not in touched and not self.accumulate_param_ders):
                p.der = d
            else:
                p.der = p.der + d
            touched.add(i)

    # ------------------------------------------------------------------ sizes & printing
    def get_var_sizes(self, input_sizes):
        """Sizes of every var for the given input sizes (``{'input': (64, 64, 3, 1), ...}``),
        as a dict var name -> shape tuple (of the first element for tuple-valued vars).
        Runs one forward pass in 'test' mode on zeros (label-like inputs get ones), with
        every gate selecting every image so that every layer runs on the whole batch."""
        self._rebuild()
        saved = (self.mode, self.conserve_memory, None,
                 [(v.value, v.der) for v in self.vars], [dict(l.block.__dict__) for l in self.layers],
                 self.rng.bit_generator.state)
        try:
            self.mode, self.conserve_memory = 'test', False
            self._sizing = True
            feed = {}
            for name, size in dict(input_sizes).items():
                size = tuple(int(s) for s in size)
                fill = np.ones if 'label' in name else np.zeros
                feed[name] = fill(size, dtype=np.float32, order='F')
            with np.errstate(all='ignore'):
                self.eval(feed)
            return {v.name: tuple(_first(v.value).shape) for v in self.vars
                    if v.value is not None and hasattr(_first(v.value), 'shape')}
        finally:
            self.mode, self.conserve_memory = saved[0], saved[1]
            self._sizing = False
            for v, (val, der) in zip(self.vars, saved[3]):
                v.value, v.der = val, der
            for l, state in zip(self.layers, saved[4]):
                l.block.__dict__.update(state)
            self.rng.bit_generator.state = saved[5]

    def summary(self, input_sizes=None, batch_size=1):
        """MatConvNet's ``net.print``: a text table of layers with output sizes, param counts
        and output memory, and the totals. ``input_sizes`` defaults to
        ``meta['inputs']`` or ``input`` = 64x64x3xbatch_size."""
        if input_sizes is None:
            input_sizes = {'input': (64, 64, 3, batch_size)}
            if 'label' in self._var_map:
                input_sizes['label'] = (1, 1, 1, batch_size)
        sizes = self.get_var_sizes(input_sizes)
        rows = [('layer', 'type', 'inputs', 'output', 'params', 'out MB')]
        total_mem = 0
        for li in self.execution_order:
            l = self.layers[li]
            out = sizes.get(l.outputs[0])
            mem = 4 * int(np.prod(out)) if out else 0
            total_mem += mem
            npar = sum(int(np.prod(self.params[i].value.shape)) for i in l.param_indexes
                       if self.params[i].value is not None)
            rows.append((l.name, l.type.replace('dagnn.', ''), ','.join(l.inputs)[:28],
                         'x'.join(map(str, out)) if out else '-', f'{npar:,}', f'{mem / 2**20:.2f}'))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ['  '.join(s.ljust(w) for s, w in zip(r, widths)) for r in rows]
        lines.insert(1, '-' * len(lines[0]))
        lines.append('-' * len(lines[0]))
        lines.append(f'layers: {len(self.layers)}  vars: {len(self.vars)}  params: {len(self.params)}')
        lines.append(f'parameters: {self.num_params():,} learnable ({self.num_params() / 1e6:.2f}M), '
                     f'{self.num_params(include_moments=True):,} with BN moments')
        lines.append(f'var memory (forward values, batch {next(iter(input_sizes.values()))[-1]}): '
                     f'{total_mem / 2**20:.1f} MB')
        return '\n'.join(lines)

    def print(self, *args, **kwargs):
        """Print :meth:`summary` (MatConvNet's ``net.print``)."""
        print(self.summary(*args, **kwargs))

    def __repr__(self):
        return f'DagNN({len(self.layers)} layers, {len(self.vars)} vars, {len(self.params)} params, {self.device})'
