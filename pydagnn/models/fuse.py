"""Fusing a batch norm with the ReLU after it: every ``dagnn.BatchNorm`` whose output
only a ``dagnn.ReLU`` reads runs with that ReLU as one
:class:`pydagnn.layers.bnorm_relu.BatchNormReLU`, an entry of the execution plan
(:class:`pydagnn.plan.FusedGroup`). ``net.layers``, vars and params stay the net's, so
saving, learning rates and per-param derivatives are unchanged, and the plan runs the
two layers again whenever a group no longer describes the net (rewired, or the BN
output made precious). The default of every net the builders make
(:func:`pydagnn.models.build`) or the loader reads (``dagnn.BatchNorm``'s
``net_finalizer``); ``set_fused_bn_relu(net, False)`` runs the layers one by one.

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


def _is_pair(bn, readers):
    """Whether BN layer ``bn`` and the readers of its output make a pair: one input,
    output and the three params, only a ReLU reads the output, as its only input, and
    neither is routed."""
    if len(bn.inputs) != 1 or len(bn.outputs) != 1 or len(bn.params) != 3 or bn.route is not None:
        return False
    if len(readers) != 1:
        return False
    relu = readers[0]
    return (relu.type == 'dagnn.ReLU' and relu.inputs == bn.outputs and len(relu.outputs) == 1
            and not relu.params and relu.route is None and relu.outputs != bn.inputs)


def _is_bn_relu(group):
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
    """The BN -> ReLU groups of ``net``: a :class:`pydagnn.plan.FusedGroup` named
    ``'<bn>+<relu>'`` for each ``dagnn.BatchNorm`` layer whose output only one
    ``dagnn.ReLU`` reads (see :func:`_is_pair`) with a leak >= 0 (the fused backward
    masks by the output's sign), inputs the BN's, outputs the ReLU's, params the BN's.
    Layers already in another kind of fused group (the batched mixture) are left to it."""
    from pydagnn.layers.bnorm_relu import BatchNormReLU
    readers = _consumers(net)
    other = [g for g in net.fused_groups if not _is_bn_relu(g)]
    owned = {m for g in other for m in g.members}
    taken = {l.name for l in net.layers} | {g.name for g in other}
    groups = []
    for bn in net.layers:
        if bn.type != 'dagnn.BatchNorm' or bn.name in owned:
            continue
        found = readers.get(bn.outputs[0], []) if bn.outputs else []
        if not _is_pair(bn, found) or found[0].name in owned:
            continue
        relu = found[0]
        block = BatchNormReLU(bn.block, relu.block)
        if not block.fusable():
            continue
        name = _unique(f'{bn.name}+{relu.name}', taken)
        taken.add(name)
        groups.append(FusedGroup(net, name, block, bn.inputs, relu.outputs, bn.params,
                                 [bn.name, relu.name]))
    return groups


def set_fused_bn_relu(net, on=True):
    """Run the net's BN -> ReLU pairs fused (:func:`fuse_bn_relu`, the default) or as
    two layers each (``on=False``); replaces the BN -> ReLU groups made before, keeps
    the other fused groups. Returns the number of fused pairs."""
    net.fused_groups = [g for g in net.fused_groups if not _is_bn_relu(g)]
    groups = fuse_bn_relu(net) if on else []
    net.fused_groups.extend(groups)
    return len(groups)
