"""The execution plan: what ``eval`` runs, in order -- the net's layers in its
execution order, with each *fused group* in place of its member layers.

A fused group (:class:`FusedGroup`) is a set of layers that one block computes
together, faster than one by one (the batched mixture of a GM net:
:func:`pydagnn.models.gm.fuse_mixture`). It is a plan entry, not a layer:
``net.layers``, ``net.vars`` and ``net.params`` are unchanged, so saving, loading,
learning rates and the per-param derivatives stay the original layers'. The group's
vars are its members' external inputs and outputs; its params are its members' params,
by name. Its members' internal vars get no value in an eval.

A group is used only while it still describes the net: the member layers are there
with the wiring, params and routes recorded when the group was made, and no internal
var is precious (a precious var's value is wanted: the looped path gives it). Otherwise
the plan runs the member layers, which is always correct.
"""

__all__ = ['FusedGroup', 'execution_plan']


def _layer_signature(layer):
    return (layer.name, layer.block, tuple(layer.inputs), tuple(layer.outputs), tuple(layer.params),
            layer.route)


class FusedGroup:
    """A plan entry standing for ``members`` (layer names), computed by ``block`` from
    vars ``inputs`` to vars ``outputs`` with params ``params`` (names; the members').
    ``routed``: ``[(member name, (gate var, component)), ...]`` of the routed members,
    whose routes the executor records as if they had run. Looks like a
    :class:`pydagnn.dagnn.LayerEntry` to the executor (``name``, ``block``, ``type``,
    the index tuples, ``route`` None, the clocks)."""

    def __init__(self, net, name, block, inputs, outputs, params, members):
        self.name = name
        self.block = block
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.params = list(params)
        self.members = list(members)
        self.route = None
        layers = [net.get_layer(m) for m in self.members]
        self.routed = [(l.name, l.route) for l in layers if l.route is not None]
        self._signature = [_layer_signature(l) for l in layers]
        self._internal = sorted({v for l in layers for v in l.outputs} - set(self.outputs))
        self.input_indexes = self.output_indexes = self.param_indexes = ()
        self.forward_time = 0.0
        self.backward_time = 0.0
        block.net = net

    @property
    def type(self):
        return self.block.type_name

    def applies(self, net):
        """Whether the group still describes ``net`` (see the module docstring)."""
        for sig in self._signature:
            if not net.has_layer(sig[0]) or _layer_signature(net.get_layer(sig[0])) != sig:
                return False
        return not any(net.get_var(v).precious for v in self._internal)

    def bind(self, net):
        """Resolve the var and param indexes (after the net's tables are up to date)."""
        self.input_indexes = tuple(net.var_index(v) for v in self.inputs)
        self.output_indexes = tuple(net.var_index(v) for v in self.outputs)
        self.param_indexes = tuple(net.param_index(p) for p in self.params)

    def __repr__(self):
        return f'FusedGroup({self.name!r}, {self.type}, {len(self.members)} layers, inputs={self.inputs}, ' \
               f'outputs={self.outputs})'


def execution_plan(net):
    """The entries ``eval`` runs forward, in order: layers (``LayerEntry``) and the
    applicable fused groups of ``net.fused_groups``, each at the place of its last
    member in the execution order (all its inputs are computed by then, and nothing
    outside the group reads its members' vars before)."""
    order = net.execution_order
    groups = [g for g in net.fused_groups if g.applies(net)]
    if not groups:
        return [net.layers[i] for i in order]
    owner = {}
    for g in groups:
        g.bind(net)
        for m in g.members:
            owner[net.layer_index(m)] = g
    pos_of = {li: pos for pos, li in enumerate(order)}
    last = {id(g): max(pos_of[net.layer_index(m)] for m in g.members) for g in groups}
    plan = []
    for pos, li in enumerate(order):
        g = owner.get(li)
        if g is None:
            plan.append(net.layers[li])
        elif last[id(g)] == pos:
            plan.append(g)
    return plan
