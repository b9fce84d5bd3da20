"""What makes a DagNN a GM-SOP network: routing of the component modules, the
original's execution order and the batched mixture (the K routed component chains and
``CM_out`` run as one :class:`pydagnn.layers.mixture.MixtureBlock`, an execution-plan
entry: ``net.layers`` keep the original structure). Applied by the model builders and,
once, by the loader."""
import re

_CM_ENTRY = re.compile(r'^CM_(\d+)_a_conv$')


def set_routes(net, gate_var='gating'):
    """Route every layer named ``CM_<i>_a_conv`` by the gating mask, as the original's
    ``Layer.m`` does by name. Returns the number of routed layers."""
    n = 0
    for layer in net.layers:
        m = _CM_ENTRY.match(layer.name)
        if m:
            net.set_route(layer.name, gate_var, int(m.group(1)))
            n += 1
    return n


def gm_execution_order(net, section_len=2):
    """The original's ``ExecutionOrder_GM``: MatConvNet's default order up to the layer
    ``conv5_<section_len>_relu``, then every later layer in the order it was added.
    (The original calls it with its default ``sectionLen`` 2 for every model.)"""
    b5 = net.layer_index(f'conv5_{section_len}_relu')
    order = net.execution_order
    return order[:b5 + 1] + list(range(b5 + 1, len(net.layers)))


def gate_var(net):
    """The var of the net's gating layer (a ``dagnn.gating`` block), or None."""
    for layer in net.layers:
        if layer.type == 'dagnn.gating':
            return layer.outputs[0]
    return None


def finalize_gm(net):
    """Set routes, the original's execution order and the batched mixture
    (:func:`set_batched_mixture`) on a net with a gating layer (no-op otherwise).
    Returns True when the net is a GM net. The ``gating`` block declares it as its
    ``net_finalizer``, so the loader calls it on GM nets."""
    gate = gate_var(net)
    if gate is None:
        return False
    set_routes(net, gate)
    if 'conv5_2_relu' in {l.name for l in net.layers}:
        net.set_execution_order(gm_execution_order(net))
    set_batched_mixture(net, True)
    return True


# ---------------------------------------------------------------------------- batched mixture
MIXTURE_NAME = 'CM_mixture'


def _chain(net, producer, y, route):
    """Names of the layers computing var ``y`` back to the one layer routed by
    ``route`` (whose input is the routed var), or None when ``y`` is not computed by
    such a chain of its own (another route, a net input or a second routed layer on
    the way)."""
    members, stack, entry = set(), [y], None
    while stack:
        layer = producer.get(stack.pop())
        if layer is None:
            return None
        if layer.name in members:
            continue
        members.add(layer.name)
        if layer.route is not None:
            if layer.route != route or entry is not None or len(layer.inputs) != 1:
                return None
            entry = layer
            continue
        stack.extend(layer.inputs)
    return None if entry is None else (members, entry)


def _local_names(layers, entry):
    """The chain's wiring with component-independent names: var name -> position key
    (``(j, 'out', k)`` for output k of the chain's j-th layer; the routed var is
    ROUTED_INPUT)."""
    from pydagnn.layers.mixture import ROUTED_INPUT
    names = {entry.inputs[0]: ROUTED_INPUT}
    for j, l in enumerate(layers):
        for k, v in enumerate(l.outputs):
            names[v] = (j, 'out', k)
    return names


def _wiring(layers, names):
    """Per layer: (type, saved properties, local inputs, local outputs, number of params);
    the properties by ``repr`` (they may hold small arrays, which ``==`` cannot compare)."""
    return [(l.type, repr(sorted(l.block.save().items())), tuple(names.get(v) for v in l.inputs),
             tuple(names[v] for v in l.outputs), len(l.params)) for l in layers]


def _branches(net, fusion):
    """The K component chains feeding ``fusion`` (a CM_out layer): per component, its
    layers in execution order, or None when they are not K identical, separate,
    batch-independent chains on one routed var."""
    gate, ys = fusion.inputs[0], fusion.inputs[1:]
    producer = {v: l for l in net.layers for v in l.outputs}
    pos = {net.layers[li].name: p for p, li in enumerate(net.execution_order)}
    consumers = {}
    for l in net.layers:
        for v in l.inputs:
            consumers.setdefault(v, set()).add(l.name)
    chains, trunk, wiring = [], None, None
    for k, y in enumerate(ys, start=1):
        found = _chain(net, producer, y, (gate, k))
        if found is None:
            return None
        members, entry = found
        layers = sorted((net.get_layer(m) for m in members), key=lambda l: pos[l.name])
        if trunk is None:
            trunk = entry.inputs[0]
        names = _local_names(layers, entry)
        w = _wiring(layers, names)
        internal = {v for l in layers for v in l.outputs}
        ok = (entry.inputs[0] == trunk and layers[0] is entry
              and all(l.block.batch_independent for l in layers)
              and all(None not in lw[2] for lw in w)                   # no other outside input
              and all(consumers.get(v, set()) <= members for v in internal - {y})
              and consumers.get(y) == {fusion.name}
              and (wiring is None or w == wiring))
        if not ok:
            return None
        wiring = wiring or w
        chains.append(layers)
    return chains, trunk


def fuse_mixture(net):
    """The batched mixture of ``net`` as a :class:`pydagnn.plan.FusedGroup`, or None.

    Recognised from the net's routing, not from names: a ``CM_out`` layer whose K
    inputs after the gate are computed by K separate chains of the same shape (types,
    properties, wiring, param counts), each starting at one layer routed by the gate to
    its component, all on the same routed var, made of ``batch_independent`` blocks,
    with no internal var read outside its chain. The group (named ``CM_mixture``) takes
    ``[routed var, gate]``, gives ``CM_out``'s output and the K chain outputs (the vars
    ``CM_out`` reads, as the looped path leaves them), and holds every chain param by
    its own name (component-major), so an original loaded net and a built one take
    the same path."""
    from pydagnn.layers.mixture import MixtureBlock, Stage
    from pydagnn.plan import FusedGroup
    fusions = [l for l in net.layers if l.type == 'dagnn.CM_out']
    if len(fusions) != 1:
        return None
    fusion = fusions[0]
    found = _branches(net, fusion)
    if found is None:
        return None
    chains, trunk = found
    first = chains[0]
    names = _local_names(first, first[0])
    stages = [Stage([c[j].block for c in chains], [names[v] for v in layer.inputs],
                    [names[v] for v in layer.outputs], len(layer.params))
              for j, layer in enumerate(first)]
    block = MixtureBlock(stages, names[fusion.inputs[1]], _hdim(fusion))
    params = [p for chain in chains for l in chain for p in l.params]
    members = [l.name for chain in chains for l in chain] + [fusion.name]
    outputs = list(fusion.outputs) + list(fusion.inputs[1:])     # the fusion, then each CM's output
    return FusedGroup(net, MIXTURE_NAME, block, [trunk, fusion.inputs[0]], outputs, params, members)


def _hdim(fusion):
    """``CM_out``'s ``hdim`` (D' when no component has an image) as an int."""
    import numpy as np
    return int(np.asarray(fusion.block.hdim, dtype=np.float64).ravel()[0])


def set_batched_mixture(net, on=True):
    """Run the net's mixture batched (:func:`fuse_mixture`; the default of every GM net
    the builders make or the loader reads) or looped, layer by layer (``on=False``:
    the reference the batched path is tested against). Returns whether it is batched."""
    group = fuse_mixture(net) if on else None
    net.fused_groups = [g for g in net.fused_groups if g.name != MIXTURE_NAME]
    if group is not None:
        net.fused_groups.append(group)
    return group is not None
