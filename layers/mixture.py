"""The batched mixture: K routed, identically shaped component branches and their
weighted fusion (``CM_out``), run as one block over all (image, component) pairs.

A GM net has K component modules (CMs): component i is a chain of layers whose first
layer is routed by the gate to the images selecting i, and ``CM_out`` fuses their
outputs. Looping over the K branches runs 16 small problems one after another. This
block runs them together (DESIGN.md, "Batch the mixture"):

1. the gate's :class:`pydagnn.routing.Pairs` (one argsort per step, shared with the
   engine) lists the P = N*k pairs grouped by component; one gather stacks the routed
   input for all of them, ``H x W x C x P``, each component's images a contiguous block;
2. each stage of the chain runs on the stack: a stage with params (a 1x1 conv) per
   component on that component's block (one GEMM each, with that component's own
   params), a param-free stage (ReLU, covariance pooling, trace norm, Newton-Schulz,
   ScaleTr) once on the whole stack with batched matmuls -- no per-component loop;
3. the weighted fusion is one scatter-add (:func:`pydagnn.layers.cm_out.fuse_pairs_forward`).

Backward runs the stages' own backward in reverse on the same stacks and sums the
routed input's derivative per image with :func:`pydagnn.routing.scatter_add`. A
component that no image selects runs nothing: its params get no derivative (None).

On the CPU the stages run *chain-major* instead, over cache-sized chunks of pairs
(:data:`CPU_PAIRS_PER_CHUNK`, each chunk within one component): the whole chain runs on
one chunk while its intermediates are in cache, and the chunks are shared out to the
worker threads (:func:`pydagnn.layers.kernels.threads_cpu.parallel_for`, each running
single-threaded BLAS). Stage-major over all pairs streams every intermediate stack
(``16 x 16 x 256 x 256`` pairs is 67 MB in ResNet18-GM-SOP) through main memory between
stages: measured on the 2-core machine it made the mixture about twice as slow as the
looped layers, while chain-major over chunks is faster than both (README, "Speed").
The gather, the fusion and the scatter-add stay one call each over all pairs; the
param derivatives of a component split over several chunks are summed per component.
The GPU keeps the stage-major stacks, where one big batched call is what pays.

The block is not a MatConvNet layer and is never saved: :func:`pydagnn.models.gm.fuse_mixture`
builds it from the net's own layers and blocks (the stages hold those blocks), as an
entry of the execution plan (:mod:`pydagnn.plan`); ``net.layers`` and the params table
stay as loaded, so saving, learning rates and per-param derivatives are the original's.

Inputs ``[x, gate]`` (the routed var, ``H x W x C x N``; the gate value
``(sfm K x N, mask K x N, ...)``); params: every component's stage params,
component-major (component 1's in stage order, then component 2's, ...); outputs
``[z 1 x 1 x D' x N, y_1, ..., y_K, state]``: the fusion, each component's chain output
(``1 x 1 x D' x n_i``, a view of the stack; None for a component without images: what
the looped path leaves in the ``CM_<i>`` output vars), and ``state``
(``state_outputs = 1``), the stacks backward needs.
"""
from pydagnn.backend import get_array_module, is_gpu_array
from pydagnn.layer import Layer
from pydagnn.layers.cm_out import fuse_pairs_backward, fuse_pairs_forward
from pydagnn.layers.kernels.threads_cpu import parallel_for
from pydagnn.routing import gather, route_index, scatter_add

__all__ = ['Stage', 'MixtureBlock', 'CPU_PAIRS_PER_CHUNK']

#: the local name of the routed input in a chain's wiring
ROUTED_INPUT = '<routed input>'

#: CPU: at most this many pairs per chunk of the chain-major path (see the module
#: docstring); None runs the stage-major stacks on the CPU too (the GPU's path, kept
#: testable here). Measured on ResNet18-GM-SOP at batch 32 (16 x 16 x 128 input, ~16
#: pairs per component): README, "Speed".
CPU_PAIRS_PER_CHUNK = 8


class Stage:
    """One layer position of the component chain.

    ``blocks``: the K components' blocks at this position (their properties agree);
    ``inputs`` / ``outputs``: local var names (component 1's var names, the routed input
    as :data:`ROUTED_INPUT`); ``n_params``: params per component (0: run once on the
    whole stack with ``blocks[0]``)."""
    __slots__ = ('blocks', 'inputs', 'outputs', 'n_params')

    def __init__(self, blocks, inputs, outputs, n_params):
        self.blocks = list(blocks)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.n_params = int(n_params)


def _join(parts, bounds, P):
    """Per-component arrays (``... x n_i``; None for an empty component, or zeros) ->
    one ``... x P`` stack (Fortran order; each component's block a contiguous slice)."""
    first = next(p for p in parts if p is not None)
    xp = get_array_module(first)
    out = xp.empty(first.shape[:-1] + (P,), dtype=first.dtype, order='F')
    for (a, b), p in zip(bounds, parts):
        if b > a:
            out[..., a:b] = 0 if p is None else p
    return out


class _Chunks:
    """The chain-major path's state: ``chunks`` [(component, a, b), ...] (pair ranges
    within one component), ``kept``, per chunk, the local vars backward reads, and ``y``,
    the chain output's stack."""
    __slots__ = ('chunks', 'kept', 'y')

    def __init__(self, chunks, kept, y):
        self.chunks = chunks
        self.kept = kept
        self.y = y


def _chunks(bounds, most):
    """Per component's pair range (a, b), nearly equal pieces of at most ``most`` pairs:
    [(component, a, b), ...] in pair order (empty components give none)."""
    out = []
    for i, (a, b) in enumerate(bounds):
        n = b - a
        if n == 0:
            continue
        parts = -(-n // most)
        q, r = divmod(n, parts)
        for j in range(parts):
            e = a + q + (1 if j < r else 0)
            out.append((i, a, e))
            a = e
    return out


def _block_of(v, a, b):
    return None if v is None else v[..., a:b]


class MixtureBlock(Layer):
    """See the module docstring. ``stages``: the chain (list of :class:`Stage`);
    ``output``: the local name of the chain's output (what ``CM_out`` fuses);
    ``hdim``: D' when no component has an image (``CM_out``'s property)."""
    type_name = 'pydagnn.Mixture'
    state_outputs = 1
    #: backward reads the routed input (the stacks are in the state) and the gate
    backward_needs_inputs = True
    backward_needs_outputs = False

    #: pairs per chunk of the CPU's chain-major path (None: stage-major stacks)
    pairs_per_chunk = CPU_PAIRS_PER_CHUNK

    def __init__(self, stages, output, hdim):
        super().__init__()
        self.stages = list(stages)
        self.output = output
        self.hdim = int(hdim)
        self.K = len(self.stages[0].blocks)
        per_comp = sum(s.n_params for s in self.stages)
        self.param_offsets = [i * per_comp for i in range(self.K)]
        self._keep = self._needed_by_backward()
        self._drop_after = self._last_uses()

    def _needed_by_backward(self):
        """The local vars backward reads (the others are dropped after forward, as the
        engine's conserve_memory would drop them in the looped path)."""
        keep = {self.output}
        for s in self.stages:
            if s.blocks[0].backward_needs_inputs:
                keep.update(s.inputs)
            if s.blocks[0].backward_needs_outputs:
                keep.update(s.outputs)
        return keep

    def _last_uses(self):
        """Per stage: the local vars to drop once it has run (read by no later stage,
        not needed by backward): freed as they go, the stacks of a forward pass stay
        few, as the engine's conserve_memory keeps them in the looped path."""
        last = {}
        for si, s in enumerate(self.stages):
            for v in s.inputs:
                last[v] = si
        drop = [[] for _ in self.stages]
        for v, si in last.items():
            if v not in self._keep:
                drop[si].append(v)
        return drop

    def _param_offset(self, i, s_index):
        """Position in the block's params of component ``i``'s first param of stage ``s_index``."""
        return self.param_offsets[i] + sum(s.n_params for s in self.stages[:s_index])

    def _params(self, params, i, s_index):
        off = self._param_offset(i, s_index)
        return list(params[off:off + self.stages[s_index].n_params])

    # -------------------------------------------------------------- forward
    def forward(self, inputs, params):
        x, gate = inputs[0], inputs[1]
        pairs = route_index(gate).pairs()
        sfm = gate[0]
        if len(pairs.bounds) != self.K:
            raise ValueError(f'mixture: the gate has {len(pairs.bounds)} components, the mixture {self.K}')
        P = len(pairs)
        if P == 0:
            xp = get_array_module(sfm)
            z = xp.zeros((1, 1, self.hdim, sfm.shape[1]), dtype=sfm.dtype, order='F')
            return [z] + [None] * self.K + [None]
        if is_gpu_array(x) or self.pairs_per_chunk is None:
            y, state = self._forward_stacked(x, pairs, params)
        else:
            y, state = self._forward_chunked(x, pairs, params)
        z = fuse_pairs_forward(sfm, pairs, y)
        return [z] + [y[..., a:b] if b > a else None for a, b in pairs.bounds] + [state]

    def _forward_stacked(self, x, pairs, params):
        """Stage-major: each stage once over the stack of all pairs. Returns (y, state:
        the kept stacks by local name)."""
        vals = {ROUTED_INPUT: gather(x, pairs.image)}
        for si, s in enumerate(self.stages):
            ins = [vals[v] for v in s.inputs]
            outs = self._stage_forward(s, si, ins, params, pairs)
            del ins
            vals.update(zip(s.outputs, outs))
            for v in self._drop_after[si]:
                vals.pop(v, None)
        return vals[self.output], {k: v for k, v in vals.items() if k in self._keep}

    def _forward_chunked(self, x, pairs, params):
        """Chain-major over chunks of pairs, on worker threads (CPU). Returns (y, state:
        a :class:`_Chunks`)."""
        chunks = _chunks(pairs.bounds, self.pairs_per_chunk)

        def part(lo, hi, _):
            return [self._chain_forward(x, pairs.image[a:b], i, params) for i, a, b in chunks[lo:hi]]
        kept = [v for vs in parallel_for(part, len(chunks)) for v in vs]
        first = kept[0][self.output]
        y = get_array_module(first).empty(first.shape[:-1] + (len(pairs),), dtype=first.dtype, order='F')
        for (_, a, b), vals in zip(chunks, kept):
            y[..., a:b] = vals[self.output]
        return y, _Chunks(chunks, kept, y)

    def _chain_forward(self, x, images, i, params):
        """The whole chain of component ``i`` on ``images`` (its pairs' images): the kept
        local vars (those backward reads, and the chain output)."""
        vals = {ROUTED_INPUT: gather(x, images)}
        for si, s in enumerate(self.stages):
            pars = self._params(params, i, si) if s.n_params else []
            outs = s.blocks[i].forward([vals[v] for v in s.inputs], pars)
            vals.update(zip(s.outputs, outs))
            for v in self._drop_after[si]:
                vals.pop(v, None)
        return {k: v for k, v in vals.items() if k in self._keep}

    def _stage_forward(self, s, si, ins, params, pairs):
        if s.n_params == 0:
            return s.blocks[0].forward(ins, [])
        parts = []                                   # per component: its outputs or None
        for i, (a, b) in enumerate(pairs.bounds):
            if b == a:
                parts.append(None)
                continue
            parts.append(s.blocks[i].forward([_block_of(v, a, b) for v in ins], self._params(params, i, si)))
        return [_join([p if p is None else p[j] for p in parts], pairs.bounds, len(pairs))
                for j in range(len(s.outputs))]

    # -------------------------------------------------------------- backward
    def backward(self, inputs, params, der_outputs, outputs):
        dz = der_outputs[0]
        der_params = [None] * len(params)
        state = outputs[-1] if outputs is not None and len(outputs) == self.K + 2 else None
        if dz is None or state is None:              # no derivative, or no pair ran
            return [None, None], der_params
        x, gate = inputs[0], inputs[1]
        pairs = route_index(gate).pairs()
        y = state.y if isinstance(state, _Chunks) else state[self.output]
        ds, dy = fuse_pairs_backward(gate[0], pairs, y, dz)
        for (a, b), dyi in zip(pairs.bounds, der_outputs[1:self.K + 1]):
            if dyi is not None and b > a:            # a derivative seeded on a CM output itself
                dy[..., a:b] += dyi
        if isinstance(state, _Chunks):
            dstack = self._backward_chunked(state, dy, params, der_params)
        else:
            dstack = self._backward_stacked(state, dy, params, pairs, der_params)
        dx = None if dstack is None else scatter_add(x.shape, pairs, dstack)
        return [dx, ds], der_params

    def _backward_stacked(self, state, dy, params, pairs, der_params):
        """Stage-major backward on the stacks: the routed input's derivative stack."""
        ders = {self.output: dy}
        for si in range(len(self.stages) - 1, -1, -1):
            s = self.stages[si]
            douts = [ders.get(o) for o in s.outputs]
            if all(d is None for d in douts):
                continue
            ins = [state.get(v) for v in s.inputs]
            outs = [state.get(o) for o in s.outputs]
            dins = self._stage_backward(s, si, ins, outs, douts, params, pairs, der_params)
            for v, d in zip(s.inputs, dins):
                if d is not None:
                    ders[v] = d if ders.get(v) is None else ders[v] + d
        return ders.get(ROUTED_INPUT)

    def _backward_chunked(self, state, dy, params, der_params):
        """Chain-major backward, chunk by chunk on worker threads: the routed input's
        derivative stack (None when no chunk gives one); the param derivatives summed
        per component into ``der_params``."""
        chunks = state.chunks

        def part(lo, hi, _):
            return [self._chain_backward(i, state.kept[c], dy[..., a:b], params)
                    for c, (i, a, b) in enumerate(chunks[lo:hi], lo)]
        results = [r for rs in parallel_for(part, len(chunks)) for r in rs]
        dstack = None
        for (i, a, b), (dxc, dpars) in zip(chunks, results):
            for k, d in dpars.items():
                der_params[k] = d if der_params[k] is None else der_params[k] + d
            if dxc is not None:
                if dstack is None:
                    dstack = get_array_module(dxc).zeros(dxc.shape[:-1] + (dy.shape[-1],),
                                                         dtype=dxc.dtype, order='F')
                dstack[..., a:b] = dxc
        return dstack

    def _chain_backward(self, i, vals, dy, params):
        """Backward of component ``i``'s chain on one chunk (``vals``: its kept vars;
        ``dy``: the chain output's derivative). Returns (the routed input's derivative
        or None, {param position: derivative})."""
        ders = {self.output: dy}
        dpars_out = {}
        for si in range(len(self.stages) - 1, -1, -1):
            s = self.stages[si]
            douts = [ders.get(o) for o in s.outputs]
            if all(d is None for d in douts):
                continue
            pars = self._params(params, i, si) if s.n_params else []
            dins, dpars = s.blocks[i].backward([vals.get(v) for v in s.inputs], pars, douts,
                                               [vals.get(o) for o in s.outputs])
            if s.n_params:
                off = self._param_offset(i, si)
                for k, d in enumerate(list(dpars or ())[:s.n_params]):
                    if d is not None:
                        dpars_out[off + k] = d
            for v, d in zip(s.inputs, dins):
                if d is not None:
                    ders[v] = d if ders.get(v) is None else ders[v] + d
        return ders.get(ROUTED_INPUT), dpars_out

    def _stage_backward(self, s, si, ins, outs, douts, params, pairs, der_params):
        """The stage's input derivatives (stacks); param derivatives go into
        ``der_params`` at their component's positions."""
        if s.n_params == 0:
            return s.blocks[0].backward(ins, [], douts, outs)[0]
        parts = []
        for i, (a, b) in enumerate(pairs.bounds):
            if b == a:
                parts.append(None)
                continue
            cut = lambda vs: [_block_of(v, a, b) for v in vs]  # noqa: E731
            dins, dpars = s.blocks[i].backward(cut(ins), self._params(params, i, si), cut(douts), cut(outs))
            off = self._param_offset(i, si)
            for k, d in enumerate(list(dpars or ())[:s.n_params]):
                der_params[off + k] = d
            parts.append(dins)
        live = [p for p in parts if p is not None]
        result = []
        for j in range(len(s.inputs)):
            if all(p[j] is None for p in live):
                result.append(None)
            else:
                result.append(_join([None if p is None else p[j] for p in parts], pairs.bounds, len(pairs)))
        return result

    def get_output_sizes(self, input_sizes):
        gate = input_sizes[1] if len(input_sizes) > 1 else None
        return [None if gate is None else (1, 1, self.hdim, int(gate[-1]))] + [None] * (self.K + 1)
