"""Fusing a batch norm with the ReLU after it, two patterns:

* BN -> ReLU: every ``dagnn.BatchNorm`` whose output only a ``dagnn.ReLU`` reads runs
  with that ReLU as one :class:`pydagnn.layers.bnorm_relu.BatchNormReLU`;
* BN -> Sum -> ReLU (a residual block's tail): a ``dagnn.BatchNorm`` whose output only a
  two-input ``dagnn.Sum`` reads, whose output only a ``dagnn.ReLU`` reads, runs with the
  two as one :class:`pydagnn.layers.bnorm_sum_relu.BatchNormSumReLU`.

Each is an entry of the execution plan (:class:`pydagnn.plan.FusedGroup`); a layer is in
at most one. ``net.layers``, vars and params stay the net's, so saving, learning rates
and per-param derivatives are unchanged, and the plan runs the layers again whenever a
group no longer describes the net (rewired, or the BN or Sum output made precious). The
default of every net the builders make (:func:`pydagnn.models.build`) or the loader
reads (``dagnn.BatchNorm``'s ``net_finalizer``); ``set_fused_bn_relu(net, False)`` runs
the layers one by one.

The layer library is imported inside the functions, as in :mod:`pydagnn.models.gm`:
``pydagnn.models`` must import without numba (a command's ``--help`` comes at once)."""
from pydagnn.plan import FusedGroup

__all__ = ['fuse_bn_relu', 'set_fused_bn_relu']


def _consumers(net):
    """var name -> the layers reading it (a layer once per var)."""
    out = {}
    for l in net.layers:
        for v in dict.fromkeys(l.inputs):
            out.setdefault(v, []).append(l)
    return out


def _plain_bn(bn):
    """Whether layer ``bn`` is a BN with one input, one output and the three params, not
    routed."""
    return (bn.type == 'dagnn.BatchNorm' and len(bn.inputs) == 1 and len(bn.outputs) == 1
            and len(bn.params) == 3 and bn.route is None)


def _sole_relu(layer, readers):
    """The ``dagnn.ReLU`` that alone reads ``layer``'s one output, as its only input
    (no params, not routed, not writing a var ``layer`` reads), or None."""
    found = readers.get(layer.outputs[0], []) if len(layer.outputs) == 1 else []
    if len(found) != 1:
        return None
    relu = found[0]
    ok = (relu.type == 'dagnn.ReLU' and relu.inputs == layer.outputs and len(relu.outputs) == 1
          and not relu.params and relu.route is None and relu.outputs[0] not in layer.inputs)
    return relu if ok else None


def _is_pair(bn, readers):
    """Whether BN layer ``bn`` and the readers of its output make a pair: a plain BN
    (:func:`_plain_bn`) whose output only a ReLU reads (:func:`_sole_relu`)."""
    return _plain_bn(bn) and _sole_relu(bn, readers) is not None


def _tail(sum_layer, readers, producers):
    """``(bn, relu, s)`` when ``sum_layer`` is the Sum of a residual tail: two distinct
    inputs, one of them the output of a plain BN that only this Sum reads (the later
    input when both are: the residual branch, in the builders' order), the other the
    shortcut ``s``; no params, not routed, its output read only by a ReLU. Else None."""
    if (sum_layer.type != 'dagnn.Sum' or len(sum_layer.inputs) != 2 or sum_layer.params
            or sum_layer.route is not None or len(set(sum_layer.inputs)) != 2):
        return None
    relu = _sole_relu(sum_layer, readers)
    if relu is None:
        return None
    for k in (1, 0):
        h, s = sum_layer.inputs[k], sum_layer.inputs[1 - k]
        made = producers.get(h, [])
        if (len(made) == 1 and _plain_bn(made[0]) and len(readers.get(h, [])) == 1
                and made[0].inputs[0] != relu.outputs[0]):
            return made[0], relu, s
    return None


def _producers(net):
    """var name -> the layers writing it."""
    out = {}
    for l in net.layers:
        for v in l.outputs:
            out.setdefault(v, []).append(l)
    return out


def _is_bn_relu(group):
    """Whether ``group`` is one of this module's (BN -> ReLU or BN -> Sum -> ReLU: the
    latter's block is a BatchNormReLU too)."""
    from pydagnn.layers.bnorm_relu import BatchNormReLU
    return isinstance(group.block, BatchNormReLU)


def _unique(name, taken):
    """``name``, or ``name#2``, ``name#3``, ... : the first not in ``taken``."""
    out, k = name, 1
    while out in taken:
        k += 1
        out = f'{name}#{k}'
    return out


def fuse_bn_relu(net):
    """The BN -> ReLU and BN -> Sum -> ReLU groups of ``net``, in layer order:

    * a :class:`pydagnn.plan.FusedGroup` named ``'<bn>+<relu>'`` for each
      ``dagnn.BatchNorm`` layer whose output only one ``dagnn.ReLU`` reads (see
      :func:`_is_pair`): inputs the BN's, outputs the ReLU's, params the BN's;
    * one named ``'<bn>+<sum>+<relu>'`` for each residual tail (see :func:`_tail`):
      inputs [the BN's input, the shortcut], outputs the ReLU's, params the BN's;

    each with a leak >= 0 (the fused backward masks by the output's sign). Layers already
    in another kind of fused group (the batched mixture) are left to it."""
    readers, producers = _consumers(net), _producers(net)
    other = [g for g in net.fused_groups if not _is_bn_relu(g)]
    owned = {m for g in other for m in g.members}
    taken = {l.name for l in net.layers} | {g.name for g in other}
    groups = []
    for layer in net.layers:
        found = _group_of(layer, readers, producers)
        if found is None:
            continue
        block, inputs, members, outputs, params = found
        if owned & set(members):
            continue
        name = _unique('+'.join(members), taken)
        taken.add(name)
        owned.update(members)
        groups.append(FusedGroup(net, name, block, inputs, outputs, params, members))
    return groups


def _group_of(layer, readers, producers):
    """``(block, inputs, members, outputs, params)`` of the group found at ``layer``:
    the BN of a BN -> ReLU pair or the Sum of a residual tail; None when ``layer`` is
    neither, or the ReLU's leak is negative."""
    from pydagnn.layers.bnorm_relu import BatchNormReLU
    from pydagnn.layers.bnorm_sum_relu import BatchNormSumReLU
    tail = _tail(layer, readers, producers) if layer.type == 'dagnn.Sum' else None
    if layer.type == 'dagnn.BatchNorm' and _is_pair(layer, readers):
        relu = _sole_relu(layer, readers)
        block = BatchNormReLU(layer.block, relu.block)
        inputs, members, params = layer.inputs, [layer.name, relu.name], layer.params
    elif tail is not None:
        bn, relu, s = tail
        block = BatchNormSumReLU(bn.block, layer.block, relu.block)
        inputs, members, params = [bn.inputs[0], s], [bn.name, layer.name, relu.name], bn.params
    else:
        return None
    if not block.fusable():
        return None
    return block, inputs, members, relu.outputs, params


def set_fused_bn_relu(net, on=True):
    """Run the net's BN -> ReLU pairs and BN -> Sum -> ReLU tails fused
    (:func:`fuse_bn_relu`, the default) or layer by layer (``on=False``); replaces the
    groups of both kinds made before, keeps the other fused groups. Returns the number
    of fused groups (both kinds)."""
    net.fused_groups = [g for g in net.fused_groups if not _is_bn_relu(g)]
    groups = fuse_bn_relu(net) if on else []
    net.fused_groups.extend(groups)
    return len(groups)
