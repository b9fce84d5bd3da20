"""Engine tests with small stand-in blocks: forward/backward scheduling, derivative
accumulation, memory, ordering, routing and error messages."""
import numpy as np
import pytest

from pydagnn import DagNN, EvalError, Layer
from pydagnn.gradcheck import numerical_derivative


class Affine(Layer):
    """y = w * x + b, elementwise over channels (w, b: (C,))."""
    type_name = 'test.Affine'

    def forward(self, inputs, params):
        x, (w, b) = inputs[0], params
        return [x * w[None, None, :, None] + b[None, None, :, None]]

    def backward(self, inputs, params, der_outputs, outputs):
        x, (w, b), dy = inputs[0], params, der_outputs[0]
        return [dy * w[None, None, :, None]], [(dy * x).sum(axis=(0, 1, 3)), dy.sum(axis=(0, 1, 3))]

    def init_params(self, rng, dtype=np.float32):
        return [rng.standard_normal(3).astype(dtype), np.zeros(3, dtype)]


class Mul(Layer):
    type_name = 'test.Mul'

    def forward(self, inputs, params):
        return [inputs[0] * inputs[1]]

    def backward(self, inputs, params, der_outputs, outputs):
        a, b = inputs
        return [der_outputs[0] * b, der_outputs[0] * a], []


class SumSquares(Layer):
    """A loss: 0.5 * sum(x^2) weighted by a second input."""
    type_name = 'test.SumSquares'

    def forward(self, inputs, params):
        return [np.array(0.5 * np.sum(inputs[0] ** 2), dtype=inputs[0].dtype).reshape(1, 1, 1, 1)]

    def backward(self, inputs, params, der_outputs, outputs):
        return [der_outputs[0].reshape(()) * inputs[0]], []


class Gate(Layer):
    """Emits a gating tuple (weights, mask) selecting images for 2 components."""
    type_name = 'test.Gate'

    def __init__(self, mask):
        super().__init__()
        self.mask = np.asarray(mask, bool)

    def forward(self, inputs, params):
        return [(self.mask.astype(inputs[0].dtype), self.mask)]

    def backward(self, inputs, params, der_outputs, outputs):
        return [None], []


class Merge(Layer):
    """Scatter routed component outputs back into a full batch (a tiny CM_out)."""
    type_name = 'test.Merge'
    accepts_missing_inputs = True

    def forward(self, inputs, params):
        gate, ys = inputs[0], inputs[1:]
        mask = gate[1]
        n = mask.shape[1]
        shape = next(y.shape for y in ys if y is not None)[:3] + (n,)
        z = np.zeros(shape, dtype=ys[0].dtype if ys[0] is not None else ys[1].dtype)
        for k, y in enumerate(ys):
            if y is not None:
                z[..., np.nonzero(mask[k])[0]] += y
        return [z]

    def backward(self, inputs, params, der_outputs, outputs):
        mask = inputs[0][1]
        dz = der_outputs[0]
        return [None] + [None if y is None else dz[..., np.nonzero(mask[k])[0]]
                         for k, y in enumerate(inputs[1:])], []


def small_dag(seed=0):
    """x -> a1 -> h1 -> loss1 ; x -> a2 -> h2 ; h1*h2 -> loss2 (shared input, two losses)."""
    net = DagNN()
    net.add_layer('a1', Affine(), 'x', 'h1', ['w1', 'b1'])
    net.add_layer('a2', Affine(), 'x', 'h2', ['w2', 'b2'])
    net.add_layer('mul', Mul(), ['h1', 'h2'], 'p')
    net.add_layer('loss1', SumSquares(), 'h1', 'obj1')
    net.add_layer('loss2', SumSquares(), 'p', 'obj2')
    net.init_params(np.random.default_rng(seed), dtype=np.float64)
    for p in net.params:
        p.value += 0.1
    return net


def test_two_losses_match_finite_differences():
    net = small_dag()
    x = np.random.default_rng(1).standard_normal((2, 2, 3, 4))

    def objective():
        net.eval({'x': x})
        return float(net.get_var('obj1').value.sum() + net.get_var('obj2').value.sum())

    net.eval({'x': x}, {'obj1': 1.0, 'obj2': 1.0})
    ders = {p.name: p.der.copy() for p in net.params}
    dx = net.get_var('x').der.copy()
    for p in net.params:
        idx, num = numerical_derivative(objective, p.value)
        np.testing.assert_allclose(ders[p.name].ravel()[idx], num, rtol=1e-6, atol=1e-7)
    xf = np.asfortranarray(x)
    x = xf
    idx, num = numerical_derivative(objective, xf)
    np.testing.assert_allclose(dx.ravel(order='F')[idx], num, rtol=1e-6, atol=1e-7)


def test_der_outputs_flat_list_and_dict_agree():
    net = small_dag()
    x = np.random.default_rng(2).standard_normal((2, 2, 3, 4))
    net.eval(['x', x], ['obj1', 1, 'obj2', 2.0])
    a = [p.der.copy() for p in net.params]
    net.eval({'x': x}, {'obj1': 1, 'obj2': 2.0})
    for u, v in zip(a, net.params):
        np.testing.assert_array_equal(u, v.der)


def live_values(net):
    return sum(v.value is not None for v in net.vars)


def test_conserve_memory_frees_values_and_precious_keeps_them():
    net = small_dag()
    x = np.ones((2, 2, 3, 4))
    net.conserve_memory = False
    net.eval({'x': x})
    assert live_values(net) == len(net.vars)
    net.conserve_memory = True
    net.eval({'x': x})
    # Only the outputs (nobody consumes them) survive a forward pass.
    assert {v.name for v in net.vars if v.value is not None} == {'obj1', 'obj2'}
    net.get_var('h2').precious = True
    net.eval({'x': x})
    assert net.get_var('h2').value is not None
    # In backward the intermediate values and derivatives are dropped after use.
    net.get_var('h2').precious = False
    net.eval({'x': x}, {'obj1': 1, 'obj2': 1})
    assert net.get_var('h1').value is None and net.get_var('h1').der is None
    assert net.get_var('x').der is not None


def test_derivatives_do_not_depend_on_conserve_memory():
    x = np.random.default_rng(3).standard_normal((2, 2, 3, 4))
    out = []
    for cm in (True, False):
        net = small_dag()
        net.conserve_memory = cm
        net.eval({'x': x}, {'obj1': 1, 'obj2': 1})
        out.append([p.der for p in net.params] + [net.get_var('x').der])
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_accumulate_param_ders_sums_two_evals():
    net = small_dag()
    x1 = np.random.default_rng(4).standard_normal((2, 2, 3, 4))
    x2 = np.random.default_rng(5).standard_normal((2, 2, 3, 4))
    net.eval({'x': x1}, {'obj1': 1, 'obj2': 1})
    d1 = [p.der.copy() for p in net.params]
    net.eval({'x': x2}, {'obj1': 1, 'obj2': 1})
    d2 = [p.der.copy() for p in net.params]
    net.accumulate_param_ders = True
    for p in net.params:  # as MatConvNet: accumulation adds to whatever der holds
        p.der = None
    net.eval({'x': x1}, {'obj1': 1, 'obj2': 1})
    net.eval({'x': x2}, {'obj1': 1, 'obj2': 1})
    for a, b, p in zip(d1, d2, net.params):
        np.testing.assert_allclose(p.der, a + b)
    # Without accumulation, a new eval replaces (never re-uses) old derivatives.
    net.accumulate_param_ders = False
    net.eval({'x': x2}, {'obj1': 1, 'obj2': 1})
    for b, p in zip(d2, net.params):
        np.testing.assert_allclose(p.der, b)


def test_param_shared_by_two_layers_accumulates_within_one_eval():
    net = DagNN()
    net.add_layer('a1', Affine(), 'x', 'h1', ['w', 'b'])
    net.add_layer('a2', Affine(), 'h1', 'h2', ['w', 'b'])
    net.add_layer('loss', SumSquares(), 'h2', 'obj')
    net.init_params(np.random.default_rng(0), dtype=np.float64)
    assert net.get_param('w').fanout == 2
    x = np.random.default_rng(1).standard_normal((1, 1, 3, 2))

    def f():
        net.eval({'x': x})
        return float(net.get_var('obj').value.sum())
    net.eval({'x': x}, {'obj': 1})
    dw = net.get_param('w').der.copy()
    idx, num = numerical_derivative(f, net.get_param('w').value)
    np.testing.assert_allclose(dw[idx], num, rtol=1e-6)


def test_unused_branch_gets_no_derivative():
    net = small_dag()
    net.eval({'x': np.ones((2, 2, 3, 1))}, {'obj1': 1})
    assert net.get_param('w2').der is None and net.get_param('w1').der is not None


def test_execution_order_is_topological_and_settable():
    net = DagNN()
    net.add_layer('late', SumSquares(), 'h', 'obj')
    net.add_layer('early', Affine(), 'x', 'h', ['w', 'b'])
    assert [net.layers[i].name for i in net.execution_order] == ['early', 'late']
    with pytest.raises(ValueError, match="before the layer producing"):
        net.set_execution_order(['late', 'early'])
    net.set_execution_order(['early', 'late'])


def test_cycle_is_reported_with_layer_names():
    net = DagNN()
    net.add_layer('a', Mul(), ['x', 'c'], 'b')
    net.add_layer('b2c', Affine(), 'b', 'c', ['w', 'bb'])
    with pytest.raises(ValueError, match="cycle.*'a'"):
        net.execution_order


def test_bad_names_and_missing_inputs_are_clear_errors():
    net = small_dag()
    with pytest.raises(KeyError, match="'y' is not a var"):
        net.eval({'y': np.ones((1, 1, 3, 1))})
    with pytest.raises(KeyError, match="'nope'"):
        net.eval({'x': np.ones((1, 1, 3, 1))}, {'nope': 1})
    with pytest.raises(EvalError, match="layer 'a1'.*needs var 'x'.*no layer produces"):
        net.eval({})
    with pytest.raises(ValueError, match="alternate names and values"):
        net.eval(['x'])


def test_block_failure_names_layer_type_and_shapes():
    net = small_dag()
    with pytest.raises(EvalError) as e:
        net.eval({'x': np.ones((2, 2, 5, 1))})
    msg = str(e.value)
    assert "layer 'a1' (test.Affine) failed in forward" in msg and 'x: 2x2x5x1' in msg


def test_two_producers_of_one_var_is_an_error():
    net = DagNN()
    net.add_layer('a', Affine(), 'x', 'h', ['w', 'b'])
    net.add_layer('b', Affine(), 'x', 'h', ['w2', 'b2'])
    with pytest.raises(ValueError, match="'h' is produced by several layers"):
        net.eval({'x': np.ones((1, 1, 3, 1))})


def routed_net(mask):
    """Two routed components fed from x, merged by gating mask."""
    net = DagNN()
    net.add_layer('gate', Gate(mask), 'x', 'g')
    for k in (1, 2):
        e = net.add_layer(f'CM_{k}_a', Affine(), 'x', f'c{k}', [f'w{k}', f'b{k}'])
        e.route = ('g', k)
        net.add_layer(f'CM_{k}_sq', Mul(), [f'c{k}', f'c{k}'], f'q{k}')
    net.add_layer('merge', Merge(), ['g', 'q1', 'q2'], 'z')
    net.add_layer('loss', SumSquares(), 'z', 'obj')
    net.init_params(np.random.default_rng(0), dtype=np.float64)
    return net


def test_routing_equals_dense_masked_reference():
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)
    net = routed_net(mask)
    x = np.random.default_rng(1).standard_normal((1, 1, 3, 4))
    net.conserve_memory = False
    net.eval({'x': x}, {'obj': 1})
    assert net.get_var('c1').value.shape[-1] == 3 and net.get_var('c2').value.shape[-1] == 2
    w = [net.get_param(f'w{k}').value for k in (1, 2)]
    b = [net.get_param(f'b{k}').value for k in (1, 2)]
    dense = sum(((x * w[k][None, None, :, None] + b[k][None, None, :, None]) ** 2) * mask[k]
                for k in range(2))
    np.testing.assert_allclose(net.get_var('z').value, dense)
    # Derivatives against finite differences of the routed net.
    def f():
        net.eval({'x': x})
        return float(net.get_var('obj').value.sum())
    net.eval({'x': x}, {'obj': 1})
    dw1 = net.get_param('w1').der.copy()
    dx = net.get_var('x').der.copy()
    idx, num = numerical_derivative(f, net.get_param('w1').value)
    np.testing.assert_allclose(dw1[idx], num, rtol=1e-6)
    xf = np.asfortranarray(x)
    x = xf
    idx, num = numerical_derivative(f, xf)
    np.testing.assert_allclose(dx.ravel(order='F')[idx], num, rtol=1e-6, atol=1e-9)


def test_component_selected_by_no_image_runs_on_nothing():
    mask = np.array([[1, 1, 1], [0, 0, 0]], bool)
    net = routed_net(mask)
    net.conserve_memory = False
    net.eval({'x': np.ones((1, 1, 3, 3))}, {'obj': 1})
    assert net.get_var('c2').value is None and net.get_var('q2').value is None
    assert net.get_param('w2').der is None and net.get_param('b2').der is None
    assert net.get_param('w1').der is not None
    # A later eval in which CM 2 runs does not see anything left from this one.
    net.get_layer('gate').block.mask = np.array([[1, 0, 0], [0, 1, 1]], bool)
    net.eval({'x': np.ones((1, 1, 3, 3))}, {'obj': 1})
    assert net.get_var('c2').value.shape[-1] == 2


def test_var_sizes_summary_and_renames():
    net = small_dag()
    sizes = net.get_var_sizes({'x': (2, 2, 3, 5)})
    assert sizes['h1'] == (2, 2, 3, 5) and sizes['obj2'] == (1, 1, 1, 1)
    text = net.summary({'x': (2, 2, 3, 5)})
    assert 'a1' in text and 'parameters: 12 learnable' in text
    net.rename_var('h1', 'hidden')
    net.rename_layer('a1', 'first')
    net.rename_param('w1', 'weights')
    assert net.get_layer('first').outputs == ['hidden'] and 'weights' in net.get_layer('first').params
    net.eval({'x': np.ones((1, 1, 3, 1))})
    net.remove_layer('loss1')
    assert 'obj1' not in [v.name for v in net.vars]
    net.eval({'x': np.ones((1, 1, 3, 1))})
