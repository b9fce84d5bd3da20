"""Starting the ranks of a data-parallel run, as MatConvNet's ``gpus`` option opened its pool.

``python examples/cnn_imagenet64.py --gpus 0 1`` run without ``mpiexec`` starts itself
again as ``<mpiexec> -n 2 <python> -m mpi4py <script> <same arguments>`` (rank r uses
``gpus[r]``) and exits with its status. The mpiexec used is the one beside
``sys.executable`` (the venv's, from the ``dist`` extra: the MPICH wheel), never one found
on PATH, which may belong to another MPI than the one mpi4py was built against (an Open
MPI brought by another package makes every rank a rank 0 of its own). Where none is
installed, :func:`relaunch_under_mpi` says how to install one and what to run.
"""
import os
import subprocess
import sys

from .parallel import launched_world_size

__all__ = ['mpiexec_path', 'under_launcher', 'env_rank', 'launch_command', 'relaunch_under_mpi', 'LaunchError']


class LaunchError(RuntimeError):
    """No way to start the ranks (the message says what to install or run)."""


def mpiexec_path(python=None):
    """The ``mpiexec`` beside ``python`` (default ``sys.executable``), or None."""
    d = os.path.dirname(os.path.abspath(python or sys.executable))
    for name in ('mpiexec', 'mpiexec.hydra', 'mpirun'):
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def under_launcher(environ=None):
    """True when this process is a rank started by mpiexec or srun (even a job of one)."""
    env = os.environ if environ is None else environ
    return launched_world_size(env) > 1 or any(k in env for k in ('PMI_RANK', 'OMPI_COMM_WORLD_RANK',
                                                                  'PMIX_RANK')) or 'mpi4py.MPI' in sys.modules


def env_rank(environ=None):
    """This process's rank as the launcher's environment gives it (0 when none)."""
    env = os.environ if environ is None else environ
    for key in ('PMI_RANK', 'OMPI_COMM_WORLD_RANK', 'PMIX_RANK', 'SLURM_PROCID'):
        if env.get(key, '').strip().isdigit():
            return int(env[key])
    return 0


def launch_command(n, script, argv, mpiexec=None, python=None):
    """``[mpiexec, -n, n, python, -m, mpi4py, script, *argv]``."""
    return [mpiexec or mpiexec_path(python) or 'mpiexec', '-n', str(int(n)), python or sys.executable,
            '-m', 'mpi4py', os.path.abspath(script), *argv]


def relaunch_under_mpi(n, script, argv):
    """Run ``script argv`` on ``n`` ranks through the venv's mpiexec; returns its exit
    status. Raises :class:`LaunchError` (with the install line and the command) when
    mpi4py or mpiexec is missing."""
    cmd = launch_command(n, script, argv)
    shown = ' '.join(cmd)
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise LaunchError(f"--gpus with {n} GPUs runs one process per GPU under MPI, and mpi4py is not "
                          f"installed: pip install 'pydagnn[dist]' (mpi4py and the MPICH wheel, no "
                          f"compiler needed), then run again, or launch yourself: {shown}") from None
    if mpiexec_path() is None:
        raise LaunchError(f"--gpus with {n} GPUs runs one process per GPU under MPI, and there is no "
                          f"mpiexec beside {sys.executable}: pip install mpich (or 'pydagnn[dist]'), or "
                          f"launch with your cluster's MPI: {shown.replace(cmd[0], 'mpiexec', 1)} "
                          "(under SLURM: srun -n N python -m mpi4py ...)")
    print(f'pydagnn: starting {n} ranks: {shown}', flush=True)
    return subprocess.call(cmd)
