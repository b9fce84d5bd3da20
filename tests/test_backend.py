"""The device-independent parts of the GPU backend: dispatch, moving a net, the routing
helpers of the engine, and the helpers of pydagnn.backend. Runs without CuPy (the tests
that need a device are in tests/test_gpu.py)."""
import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest

import pydagnn
from pydagnn import backend
from pydagnn.dagnn import DagNN
from pydagnn.routing import gather, scatter
from pydagnn.layers.gating import GateValue, gating, gating_forward, topk_mask, topk_mask_counts


def test_import_does_not_need_cupy():
    # a fresh interpreter in which 'import cupy' fails must still import pydagnn and
    # build and run a net on the CPU
    code = ('import sys; sys.modules["cupy"] = None\n'
            'import numpy as np, pydagnn\n'
            'from pydagnn import backend\n'
            'assert not backend.gpu_available()\n'
            'assert backend.get_array_module(np.zeros(2)) is np\n'
            'print("ok")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'ok'


def test_get_array_module_picks_numpy_for_host_arrays():
    assert backend.get_array_module(np.zeros(3)) is np
    assert backend.get_array_module(np.zeros(3), None, 1.0) is np
    assert backend.get_array_module() is np
    assert not backend.is_gpu_array(np.zeros(3))


def test_to_device_cpu_and_tuples():
    a = np.arange(6.0).reshape(2, 3, order='F')
    assert backend.to_device(a, 'cpu') is a
    assert backend.to_device(None, 'cpu') is None
    t = backend.to_device((a, None, a), 'cpu')
    assert isinstance(t, tuple) and t[1] is None and t[0] is a
    with pytest.raises(ValueError, match='unknown device'):
        backend.to_device(a, 'tpu')
    assert backend.to_host(a) is a


def test_memory_helpers_without_gpu(monkeypatch):
    monkeypatch.setattr(backend, '_cupy', None)
    assert backend.memory_stats() == {}
    backend.synchronize()        # no-op
    backend.free_gpu_memory()    # no-op
    with backend.PeakMemory() as pm:
        np.zeros(10)
    assert pm.peak == 0


def _no_gpu(monkeypatch):
    monkeypatch.setattr(backend, '_cupy', None)
    monkeypatch.setattr(backend, '_cupy_checked', True)


def test_move_gpu_without_device_raises_clearly(monkeypatch):
    _no_gpu(monkeypatch)
    from pydagnn.models import build
    net = build('ResNet18-GAP', num_classes=10, section_len=1)
    before = [p.value for p in net.params]
    with pytest.raises(RuntimeError, match=r"move\('gpu'\) needs a GPU.*cuda1[23]"):
        net.move('gpu')
    assert net.device == 'cpu'
    assert all(p.value is v for p, v in zip(net.params, before))    # nothing changed
    with pytest.raises(RuntimeError, match='needs a GPU'):
        backend.set_tf32(True)
    with pytest.raises(RuntimeError, match='cupy'):
        backend.to_device(np.zeros(2), 'gpu')
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        net.move('cuda')


def test_move_cpu_is_a_noop_on_host_arrays_and_moves_block_state():
    from pydagnn.models import build
    net = build('ResNet18-GM-SOP', num_classes=10, section_len=1, cm_num=4, topk=2,
                gating_widths=(8, 4), cm_widths=(8, 4))
    drop = net.get_layer('dropout').block
    drop.mask = np.ones((1, 1, 10, 2), np.float32)
    hx = net.get_layer('H_x').block
    hx.noise = np.zeros(2)
    net.move('cpu')
    assert net.device == 'cpu'
    assert isinstance(drop.mask, np.ndarray) and isinstance(hx.noise, np.ndarray)
    # stored properties are never touched
    assert net.get_layer('conv1_conv').block.pad == [1, 1, 1, 1]


def test_gather_and_scatter_images():
    rng = np.random.default_rng(0)
    x = np.asfortranarray(rng.standard_normal((3, 2, 4, 6)))
    idx = np.array([1, 4, 5])
    g = gather(x, idx)
    assert g.flags.f_contiguous and g.shape == (3, 2, 4, 3)
    np.testing.assert_array_equal(g, x[..., idx])
    d = np.asfortranarray(rng.standard_normal(g.shape))
    full = scatter(x, idx, d)
    assert full.flags.f_contiguous
    ref = np.zeros_like(x)
    ref[..., idx] = d
    np.testing.assert_array_equal(full, ref)
    # 2-D (D x N) values too
    y = rng.standard_normal((5, 6))
    np.testing.assert_array_equal(gather(y, idx), y[:, idx])


def test_gating_returns_counts_with_the_value():
    rng = np.random.default_rng(1)
    H = rng.standard_normal((6, 9)).astype(np.float32)
    m, counts = topk_mask_counts(H, 3)
    np.testing.assert_array_equal(m, topk_mask(H, 3))
    np.testing.assert_array_equal(counts, m.sum(axis=1))
    assert counts.dtype == np.int64
    out = gating_forward(H, 3, return_counts=True)
    assert len(out) == 5 and np.array_equal(out[4], counts)
    assert len(gating_forward(H, 3)) == 4
    # all-tie case: counts of the random re-draw
    Ht = np.ones((6, 9), np.float32)
    m2, c2 = topk_mask_counts(Ht, 2, np.random.default_rng(3))
    np.testing.assert_array_equal(c2, m2.sum(axis=1))
    assert (m2.sum(axis=0) == 2).all()
    # the block's output value: a tuple with counts
    b = gating(topk=3, CM_num=6)
    v = b.forward([(H, None)], [])[0]
    assert isinstance(v, tuple) and isinstance(v, GateValue) and len(v) == 6
    assert v[3] is None and v[4] is None
    np.testing.assert_array_equal(v.counts, v[1].sum(axis=1))
    v2 = pickle.loads(pickle.dumps(v))
    assert isinstance(v2, GateValue) and np.array_equal(v2.counts, v.counts)
    v3 = copy.deepcopy(v)
    assert np.array_equal(v3.counts, v.counts) and np.array_equal(v3[1], v[1])


def test_engine_routes_once_per_eval_with_the_gate_counts():
    """The engine resolves every component of a gate from one argsort and the counts
    carried by the gate value (no per-component nonzero)."""
    from pydagnn.models import build
    net = build('ResNet18-GM-SOP', num_classes=10, section_len=1, cm_num=4, topk=2,
                gating_widths=(8, 4), cm_widths=(8, 4))
    rng = np.random.default_rng(2)
    # break the all-equal init of the gating weights
    for name in ('gating_w', 'gating_noise_w'):
        p = net.get_param(name)
        p.value = np.asfortranarray(rng.standard_normal(p.value.shape).astype(np.float32))
    x = np.asfortranarray(rng.standard_normal((64, 64, 3, 5)).astype(np.float32))
    lab = rng.integers(1, 11, 5).astype(np.float32)
    net.conserve_memory = False
    net.eval({'input': x, 'label': lab}, {'objective': 1})
    gate = net.get_var('gating').value
    assert isinstance(gate, GateValue)
    index = net.executor.route_indexes['gating']
    assert index.counts == gate.counts.tolist()
    assert gate.index is index          # CM_out reads the same RouteIndex: one argsort per step
    for i in range(4):
        sel = np.nonzero(gate[1][i])[0]
        np.testing.assert_array_equal(net.executor.routes[f'CM_{i + 1}_a_conv'], sel)


def test_sync_timing_flag_is_harmless_on_cpu():
    from pydagnn.models import build
    net = build('ResNet18-GAP', num_classes=10, section_len=1)
    net.sync_timing = True
    x = np.asfortranarray(np.random.default_rng(0).standard_normal((64, 64, 3, 2)).astype(np.float32))
    net.eval({'input': x, 'label': np.array([1, 2], np.float32)}, {'objective': 1})
    assert all(l.forward_time >= 0 for l in net.layers)


def test_seed_derivative_scalar_and_array():
    from pydagnn.models import build
    net = build('ResNet18-GAP', num_classes=10, section_len=1)
    x = np.asfortranarray(np.random.default_rng(0).standard_normal((64, 64, 3, 2)).astype(np.float32))
    feed = {'input': x, 'label': np.array([1, 2], np.float32)}
    net.eval(feed, {'objective': 1})
    d1 = net.get_param('prediction_f').der.copy()
    net.eval(feed, {'objective': np.float32(2)})
    np.testing.assert_allclose(net.get_param('prediction_f').der, 2 * d1, rtol=1e-5)
    net.eval(feed, {'objective': np.ones((1, 1, 1, 1), np.float32)})
    np.testing.assert_allclose(net.get_param('prediction_f').der, d1, rtol=1e-6)


def test_accumulate_gradients_keeps_host_momentum_on_host():
    from pydagnn.train import accumulate_gradients
    from pydagnn.models import build
    net = build('ResNet18-GAP', num_classes=10, section_len=1)
    x = np.asfortranarray(np.random.default_rng(0).standard_normal((64, 64, 3, 2)).astype(np.float32))
    net.eval({'input': x, 'label': np.array([1, 2], np.float32)}, {'objective': 1})
    state = {}
    accumulate_gradients(net, state, learning_rate=0.1, batch_size=2)
    assert all(isinstance(m, np.ndarray) for m in state['momentum'].values())


def test_tf32_flag_default_off(monkeypatch):
    monkeypatch.delenv('CUPY_TF32', raising=False)
    monkeypatch.setattr(backend, '_tf32', None)
    assert backend.tf32_enabled() is False
    monkeypatch.setenv('CUPY_TF32', '1')
    assert backend.tf32_enabled() is True


def test_gpu_kernel_modules_import_without_cupy():
    # the kernel modules import cupy only when a kernel runs
    code = ('import sys; sys.modules["cupy"] = None\n'
            'from pydagnn.layers.kernels import gpu_common, im2col_gpu, pool_gpu, bnorm_gpu\n'
            'print(gpu_common.ctype("float32"))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'float'


def test_pydagnn_version_still_there():
    assert pydagnn.__version__
