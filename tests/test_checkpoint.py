"""pydagnn.io.checkpoint: saving copies each parameter and momentum to the host once and
never moves the net (a GPU net stays where it is); the names stay reachable from train."""
import numpy as np
import pytest

from pydagnn import DagNN, backend
from pydagnn import train as ptrain
from pydagnn.io import checkpoint
from pydagnn.layers.conv import Conv
from pydagnn.layers.loss import Loss


def _net():
    net = DagNN(seed=0)
    net.add_layer('conv1', Conv(size=[3, 3, 3, 4], pad=1), 'input', 'x1', ['conv1_f', 'conv1_b'])
    net.add_layer('pred', Conv(size=[4, 4, 4, 5]), 'x1', 'prediction', ['pred_f', 'pred_b'])
    net.add_layer('loss', Loss(loss='softmaxlog'), ['prediction', 'label'], 'objective')
    net.init_params(np.random.default_rng(0), dtype=np.float32)
    return net


def test_train_reexports_the_checkpoint_names():
    for name in ('save_checkpoint', 'load_checkpoint', 'find_last_checkpoint', 'checkpoint_path',
                 'CheckpointError'):
        assert getattr(ptrain, name) is getattr(checkpoint, name)


def test_save_copies_to_host_once_without_moving(tmp_path, monkeypatch):
    net = _net()
    moms = {p.name: np.full(p.value.shape, 0.5, p.value.dtype) for p in net.params[:3]}
    seen = []
    real = backend.to_host

    def counting(x):
        seen.append(id(x))
        return real(x)

    def no_move(device):
        raise AssertionError(f'save_checkpoint moved the net to {device!r}')

    monkeypatch.setattr(backend, 'to_host', counting)
    monkeypatch.setattr(net, 'move', no_move)
    path = tmp_path / 'net-epoch-1.mat'
    checkpoint.save_checkpoint(str(path), net, {'momentum': moms}, {'train': [{'objective': 1.0}], 'val': []})
    for p in net.params:
        assert seen.count(id(p.value)) == 1, p.name
    for name, m in moms.items():
        assert seen.count(id(m)) == 1, name
    monkeypatch.undo()
    loaded, state, stats = checkpoint.load_checkpoint(str(path))
    for p in net.params:
        np.testing.assert_array_equal(loaded.get_param(p.name).value, p.value)
    assert sorted(state['momentum']) == sorted(moms)
    assert stats['train'] == [{'objective': 1.0}]
    assert checkpoint.find_last_checkpoint(str(tmp_path)) == 1


def test_resume_last_skips_a_broken_checkpoint(tmp_path):
    net = _net()
    checkpoint.save_checkpoint(checkpoint.checkpoint_path(str(tmp_path), 1), net, {}, {'train': [], 'val': []})
    (tmp_path / 'net-epoch-2.mat').write_bytes(b'MATLAB 5.0 MAT-file, half')
    lines = []
    with pytest.warns(RuntimeWarning, match='previous checkpoint'):
        ep, loaded = checkpoint.resume_last(str(tmp_path), lines.append)
    assert ep == 1 and loaded is not None
    assert checkpoint.checkpoint_epochs(str(tmp_path)) == [1, 2]
