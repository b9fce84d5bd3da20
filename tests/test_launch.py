"""Starting the ranks (pydagnn.launch) and the --gpus self-launch of the main command."""
import os
import subprocess
import sys

import pytest

from pydagnn import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launch_command_uses_the_mpiexec_beside_python(tmp_path):
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'python').write_text('')
    (fake / 'mpiexec').write_text('#!/bin/sh\n')
    os.chmod(fake / 'mpiexec', 0o755)
    cmd = launch.launch_command(2, 'x.py', ['--gpus', '0', '1'], python=str(fake / 'python'))
    assert cmd[:3] == [str(fake / 'mpiexec'), '-n', '2']
    assert cmd[3:6] == [str(fake / 'python'), '-m', 'mpi4py'] and cmd[-3:] == ['--gpus', '0', '1']
    assert launch.mpiexec_path(str(tmp_path / 'python')) is None


def test_under_launcher_reads_the_environment():
    assert launch.under_launcher({'PMI_SIZE': '2', 'PMI_RANK': '1'})
    assert launch.under_launcher({'OMPI_COMM_WORLD_RANK': '0'})
    assert launch.under_launcher({'SLURM_STEP_NUM_TASKS': '4', 'SLURM_PROCID': '0'})
    assert launch.env_rank({'PMI_RANK': '3'}) == 3 and launch.env_rank({}) == 0


def test_relaunch_without_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mpi4py', None)  # import mpi4py -> ImportError
    with pytest.raises(launch.LaunchError, match=r"pip install 'pydagnn\[dist\]'.*-m mpi4py"):
        launch.relaunch_under_mpi(2, 'examples/cnn_imagenet64.py', ['--gpus', '0', '1'])


def test_cli_gpus_without_mpi_is_one_error_line(tmp_path):
    blocker = tmp_path / 'mpi4py'
    blocker.mkdir()
    (blocker / '__init__.py').write_text('raise ImportError("blocked for the test")\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    for k in ('PMI_SIZE', 'PMI_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'PMIX_RANK'):
        env.pop(k, None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'examples', 'cnn_imagenet64.py'), '--gpus', '0', '1'],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'mpiexec -n 2' in lines[0], p.stderr


def test_cli_gpus_starts_its_ranks_through_the_venv_mpiexec(tmp_path):
    """--gpus 0 1 without mpiexec starts 2 ranks through the mpiexec beside this Python;
    without CuPy here each rank then stops with the NCCL error (rank 0 says it once)."""
    pytest.importorskip('mpi4py', reason="needs mpi4py (pip install -e '.[dist]')")
    from pydagnn import backend
    if backend.gpu_available():
        pytest.skip('with a GPU the ranks would train: this checks the launch on a CPU machine')
    env = dict(os.environ, PYDAGNN_CACHE=str(tmp_path))
    for k in ('PMI_SIZE', 'PMI_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'PMIX_RANK'):
        env.pop(k, None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'examples', 'cnn_imagenet64.py'), '--gpus', '0', '1',
                        '--exp-dir', str(tmp_path / 'exp')], capture_output=True, text=True, env=env, timeout=120)
    mpiexec = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    assert f'pydagnn: starting 2 ranks: {mpiexec} -n 2 {sys.executable} -m mpi4py' in p.stdout, p.stdout
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'NCCL' in errors[0], p.stderr


def test_example_comm_timeout_default_is_the_communicators():
    """examples/cnn_imagenet64.py keeps its own copy of the default (so that --help imports
    no communicator): it must equal pydagnn.parallel.DEFAULT_TIMEOUT."""
    import importlib.util
    from pydagnn.parallel import DEFAULT_TIMEOUT
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'examples', 'cnn_imagenet64.py')
    spec = importlib.util.spec_from_file_location('cnn_imagenet64_for_test', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.DEFAULT_COMM_TIMEOUT == DEFAULT_TIMEOUT
