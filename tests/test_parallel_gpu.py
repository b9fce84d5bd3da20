"""The NCCL communicator on a device (marker ``gpu``; skipped without CuPy, a CUDA device
and mpi4py): world size 1 through the whole trainer gives the bits of the single-process
GPU run, and the raw collectives sum/broadcast CuPy buffers in place. Multi-GPU runs use
the same code as the 2-rank MPI tests (tests/test_parallel.py) with ``--gpus 0 1``."""
import os
import sys

import numpy as np
import pytest

from pydagnn import backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not backend.gpu_available(), reason='needs cupy and a CUDA device')]

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _nccl():
    pytest.importorskip('mpi4py', reason="needs mpi4py (pip install -e '.[dist]')")
    from pydagnn.parallel import NCCLComm
    return NCCLComm(timeout=60.0, gpus=[0])


def test_nccl_collectives_world_one():
    import cupy as cp
    comm = _nccl()
    a = cp.arange(10, dtype=cp.float32)
    assert comm.allreduce(a) is a
    np.testing.assert_array_equal(cp.asnumpy(a), np.arange(10, dtype=np.float32))
    h = np.ones(3)
    comm.allreduce(h)  # host buffers go over MPI
    comm.broadcast(a)
    comm.barrier()


def test_nccl_trainer_world_one_equals_single(tmp_path):
    import mpi_worker as worker
    from pydagnn.train import cnn_train_dag
    runs = []
    for kind, comm in (('single', 'single'), ('nccl', _nccl())):
        net = worker.gm_net(dtype=np.float32)
        net, _ = cnn_train_dag(net, worker.imdb(n=30, size=16, classes=worker.GM_CLASSES), exp_dir=str(tmp_path / kind),
                               batch_size=10, num_sub_batches=2, num_epochs=1, learning_rate=0.01, gpus=[0],
                               plot_statistics=False, comm=comm, log=lambda line: None)
        runs.append({p.name: np.asarray(p.value) for p in net.params})
    for k in runs[0]:
        np.testing.assert_array_equal(runs[1][k], runs[0][k], err_msg=k)
