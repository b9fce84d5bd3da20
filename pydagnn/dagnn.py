"""DagNN: MatConvNet's directed-acyclic-graph network container, in Python.

The tables ``layers``, ``vars`` and ``params`` and their fields are MatConvNet's
(``dagnn.DagNN``), with Python names. This module keeps the tables, their building
(add / remove / rename), look-ups, the execution order, ``move`` and the sizes
(``get_var_sizes``, ``summary``: shapes only, no forward pass). Running the net --
``eval``, forward and backward, memory, routing -- is :mod:`pydagnn.executor`'s job;
``DagNN.eval`` delegates to it.
"""
import numpy as np

from . import backend
from .executor import EvalError, Executor, first, shape_str

__all__ = ['DagNN', 'EvalError', 'Var', 'Param', 'LayerEntry']


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
        return f'Var({self.name!r}, value={shape_str(self.value)}, der={shape_str(self.der)})'


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
        return (f'Param({self.name!r}, value={shape_str(self.value)}, method={self.train_method}, '
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


def _ints(v):
    """A tuple of ints from a size (list, array); () when it is not one."""
    try:
        return tuple(int(d) for d in np.asarray(v, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        return ()


def _name_size_pairs(m):
    """``[(name, size ints)]`` from MatConvNet's ``meta.inputs`` forms: a struct
    (dict) or struct array (list of dicts) with ``name`` and ``size``, or a flat
    ``{name, size, name, size, ...}`` cell (list)."""
    if isinstance(m, dict):
        m = [m]
    if not isinstance(m, (list, tuple)) or not m:
        return []
    if all(isinstance(e, dict) for e in m):
        return [(e.get('name'), _ints(e.get('size'))) for e in m if isinstance(e.get('name'), str)]
    if len(m) % 2 == 0 and all(isinstance(n, str) for n in m[0::2]):
        return [(n, _ints(v)) for n, v in zip(m[0::2], m[1::2])]
    return []


def _names(x):
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    return [str(n) for n in x]


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
        #: None, or a function summing a small array over the ranks of a data-parallel
        #: step (the trainer sets it in sync mode; read through ``Layer.batch_sum``)
        self.batch_reducer = None
        self.device = 'cpu'
        self.computing_derivative = False
        self._order = None
        self._pending_order = None
        self._route_sig = None
        #: runs ``eval`` (:class:`pydagnn.executor.Executor`); its ``routes`` and
        #: ``route_indexes`` describe the last eval, its ``after_backward_hooks`` run
        #: once the param derivatives of a backward are complete
        self.executor = Executor(self)
        #: :class:`pydagnn.plan.FusedGroup` entries ``eval`` runs in place of their member
        #: layers while they apply (the batched mixture of a GM net); ``net.layers`` stays
        self.fused_groups = []
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
        # indexes first: the name map goes stale as soon as one layer is deleted
        for i in sorted({self.layer_index(n) for n in _names(name)}, reverse=True):
            del self.layers[i]
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
        if routes != self._route_sig:
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

        Blocks follow through their ``move(device)`` hook (:meth:`pydagnn.layer.Layer.move`:
        by default every NumPy / CuPy array among the block's plain attributes, such as
        a dropout mask, the loss average or fixed H_x noise, is moved). ``move('gpu')`` raises a RuntimeError that
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
            l.block.move(device)
        self.executor.route_indexes = {}
        self.device = device

    def num_params(self, include_moments=False):
        """Number of learnable values (BN moments, trainMethod 'average', excluded by default)."""
        return int(sum(int(np.prod(p.value.shape)) for p in self.params
                       if p.value is not None and (include_moments or p.train_method != 'average')))

    # ------------------------------------------------------------------ eval
    def eval(self, inputs, der_outputs=None):
        """Forward (and backward when ``der_outputs`` is given); see :mod:`pydagnn.executor`.

        inputs: ``{'input': x, 'label': y}`` or MatConvNet's ``['input', x, 'label', y]``.
        der_outputs: ``{'objective': 1.0}`` or ``['objective', 1]``: the derivative
        projected on each named output var.
        """
        self.executor.eval(inputs, der_outputs)

    def has_var(self, name):
        """Whether the net has a var called ``name``."""
        return name in self._var_map

    def has_layer(self, name):
        """Whether the net has a layer called ``name``."""
        return name in self._layer_map

    # ------------------------------------------------------------------ sizes & printing
    def get_var_sizes(self, input_sizes):
        """Sizes of every var for the given input sizes (``{'input': (64, 64, 3, 1), ...}``),
        as a dict var name -> shape tuple (of the first element for tuple-valued vars).

        Shapes only: each block's ``get_output_sizes`` in execution order, no forward
        pass; a routed layer is sized as if its gate selected every image. Only when a
        block cannot tell (its ``get_output_sizes`` gives None for an output whose inputs
        are all known; e.g. a user block that does not implement it) does this fall back
        to one forward pass in 'test' mode on zeros (label-like inputs get ones)."""
        sizes, unknown = self._static_sizes(input_sizes)
        if unknown:
            return self._forward_sizes(input_sizes)
        return sizes

    def _static_sizes(self, input_sizes):
        order = self.execution_order
        sizes = {}
        for name, size in dict(input_sizes).items():
            if not self.has_var(name):
                raise KeyError(f'get_var_sizes: {name!r} is not a var of this net; '
                               f'its inputs are {self.get_inputs()}')
            sizes[name] = tuple(int(s) for s in np.asarray(size).reshape(-1))
        unknown = []
        for li in order:
            l = self.layers[li]
            ins = [sizes.get(v) for v in l.inputs]
            try:
                outs = list(l.block.get_output_sizes(ins) or [])
            except Exception as e:
                raise ValueError(f'layer {l.name!r} ({l.type}) cannot size its outputs for inputs '
                                 f'{dict(zip(l.inputs, ins))}: {e}') from e
            outs += [None] * (len(l.outputs) - len(outs))
            for v, size in zip(l.outputs, outs):
                if size is not None:
                    sizes[v] = tuple(int(d) for d in size)
                elif all(s is not None for s in ins):
                    unknown.append(v)
        return sizes, unknown

    def _forward_sizes(self, input_sizes):
        saved = (self.mode, self.conserve_memory, [(v.value, v.der) for v in self.vars],
                 [dict(l.block.__dict__) for l in self.layers], self.rng.bit_generator.state)
        try:
            self.mode, self.conserve_memory = 'test', False
            feed = {}
            for name, size in dict(input_sizes).items():
                size = tuple(int(s) for s in np.asarray(size).reshape(-1))
                fill = np.ones if 'label' in name else np.zeros
                feed[name] = fill(size, dtype=np.float32, order='F')
            with np.errstate(all='ignore'):
                self.eval(feed)
            return {v.name: tuple(first(v.value).shape) for v in self.vars
                    if v.value is not None and hasattr(first(v.value), 'shape')}
        finally:
            self.mode, self.conserve_memory = saved[0], saved[1]
            for v, (val, der) in zip(self.vars, saved[2]):
                v.value, v.der = val, der
            for l, state in zip(self.layers, saved[3]):
                l.block.__dict__.update(state)
            self.rng.bit_generator.state = saved[4]

    def input_sizes(self, batch_size=1):
        """``{var: (H, W, C, batch_size)}`` for the net inputs, from ``meta['inputs']``
        (MatConvNet's struct array with ``name`` and ``size``, or a flat
        ``{name, size, ...}`` list), else ``meta['inputSize']``, else
        ``meta['normalization']['imageSize']`` for the first input, else 64x64x3; a
        ``label`` var gets ``1 x 1 x 1 x batch_size``."""
        meta = self.meta if isinstance(self.meta, dict) else {}
        inputs = self.get_inputs()
        found = {}
        for key in ('inputs', 'inputSize'):
            for name, size in _name_size_pairs(meta.get(key)):
                if name in inputs and len(size) >= 3:
                    found[name] = tuple(size[:3]) + (int(batch_size),)
            if found:
                break
        if not found:
            norm = meta.get('normalization')
            image = _ints(norm.get('imageSize')) if isinstance(norm, dict) else ()
            name = 'input' if 'input' in inputs else (inputs[0] if inputs else 'input')
            image = image[:3] if len(image) >= 3 else (64, 64, 3)
            found[name] = tuple(image) + (int(batch_size),)
        if 'label' in inputs and 'label' not in found:
            found['label'] = (1, 1, 1, int(batch_size))
        return found

    def summary(self, input_sizes=None, batch_size=1):
        """MatConvNet's ``net.print``: a text table of layers with output sizes, param counts
        and output memory, and the totals; shapes only (:meth:`get_var_sizes`), no
        forward pass. ``input_sizes`` defaults to :meth:`input_sizes` (``meta['inputs']``
        when present) with ``batch_size`` images."""
        if input_sizes is None:
            input_sizes = self.input_sizes(batch_size)
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
