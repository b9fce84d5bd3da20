"""What makes a DagNN a GM-SOP network: routing of the component modules and the
original's execution order. Applied by the model builders and, once, by the loader."""
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
    """Set routes and the original's execution order on a net with a gating layer
    (no-op otherwise). Returns True when the net is a GM net. The ``gating`` block
    declares it as its ``net_finalizer``, so the loader calls it on GM nets."""
    gate = gate_var(net)
    if gate is None:
        return False
    set_routes(net, gate)
    if 'conv5_2_relu' in {l.name for l in net.layers}:
        net.set_execution_order(gm_execution_order(net))
    return True
