"""Communicators for data-parallel training: ``single`` | ``mpi`` | ``nccl``.

One process per GPU or per CPU rank. Every communicator has the same small interface:

* ``rank``, ``size``, ``name`` ('single' | 'mpi' | 'nccl'), ``timeout`` (seconds);
* ``allreduce(buf, op='sum')``: ``buf`` (a contiguous 1-D NumPy array; for ``nccl`` a
  CuPy array too) is replaced in place by the element-wise sum (or 'max' / 'min') over
  the ranks; returns ``buf``;
* ``broadcast(buf, root=0)``: rank ``root``'s ``buf`` copied into every rank's, in place;
* ``allgather_bytes(data)``: every rank's ``bytes`` (at most ``MAX_GATHER`` long), in
  rank order;
* ``barrier()``; ``abort(message)``: print ``message`` on stderr and end the whole job
  (``MPI_Abort``); ``where``: a string naming the step (epoch, batch) that error messages
  quote.

``mpi`` sums NumPy buffers over mpi4py (CPU ranks, CI); ``nccl`` sums CuPy buffers on the
current CUDA stream with ``cupy.cuda.nccl`` (its unique id broadcast over MPI) and keeps
MPI for control and host buffers. Nothing ever blocks for ever: every collective is
non-blocking underneath and waited for with a deadline of ``timeout`` seconds; a rank
that does not answer in time ends the job with a message naming the ranks that did not
arrive, the waiting rank and ``where``.

:func:`make_comm` picks one: ``'auto'`` is ``mpi`` (``nccl`` with GPUs) when the process
was started by ``mpiexec`` / ``srun`` with more than one rank, else ``single``.
"""
import io
import os
import stat
import struct
import sys
import time

try:                  # POSIX only: used to see whether the launcher read our pipes
    import fcntl
    import termios
except ImportError:
    fcntl = termios = None

import numpy as np

__all__ = ['SingleComm', 'MPIComm', 'NCCLComm', 'make_comm', 'launched_world_size', 'CommError',
           'DEFAULT_TIMEOUT', 'MAX_GATHER']

#: seconds a collective waits for the other ranks before the job is ended
DEFAULT_TIMEOUT = 300.0
#: the longest ``bytes`` one rank may give :meth:`allgather_bytes`
MAX_GATHER = 4096
_OPS = ('sum', 'max', 'min')
_ARRIVE_TAG = 77


class CommError(RuntimeError):
    """A communicator that cannot be made (mpi4py missing, a bad backend name)."""


def launched_world_size(environ=None):
    """How many ranks the launcher (MPICH/Intel hydra, Open MPI, PMIx, SLURM's ``srun``)
    started, read from its environment without initialising MPI; 1 when none."""
    env = os.environ if environ is None else environ
    for key in ('PMI_SIZE', 'OMPI_COMM_WORLD_SIZE', 'PMIX_SIZE', 'MPI_LOCALNRANKS'):
        if env.get(key, '').strip().isdigit():
            return int(env[key])
    if env.get('SLURM_STEP_NUM_TASKS', '').strip().isdigit() and 'SLURM_PROCID' in env:
        return int(env['SLURM_STEP_NUM_TASKS'])
    return 1


def _check_op(op):
    if op not in _OPS:
        raise ValueError(f'allreduce: op must be one of {_OPS}, got {op!r}')


class SingleComm:
    """One process: every collective is a no-op (today's path)."""
    name = 'single'
    rank = 0
    size = 1

    def __init__(self, timeout=DEFAULT_TIMEOUT):
        self.timeout = float(timeout)
        self.where = ''

    def allreduce(self, buf, op='sum', exact=False):
        _check_op(op)
        return buf

    def broadcast(self, buf, root=0):
        return buf

    def allgather_bytes(self, data):
        return [bytes(data)]

    def barrier(self):
        pass

    def abort(self, message, code=1):
        sys.stderr.write(message.rstrip('\n') + '\n')
        sys.stderr.flush()
        raise SystemExit(code)


def _unread_bytes(stream):
    """Bytes written to ``stream``'s pipe that its reader has not taken yet; 0 when
    the stream is not a pipe (a file or a terminal has nothing to lose)."""
    if fcntl is None or not _is_pipe(stream):
        return 0
    try:
        fd = stream.fileno()
        return struct.unpack('i', fcntl.ioctl(fd, termios.FIONREAD, b'\0\0\0\0'))[0]
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return 0


def _wait_until_read(streams, limit_s=3.0, settle_s=0.2):
    """Wait (at most ``limit_s`` seconds) until the readers of ``streams``' pipes have
    taken every byte, then ``settle_s`` more so that they can pass it on."""
    pipes = [s for s in streams if _is_pipe(s)]
    if not pipes:
        return
    end = time.monotonic() + limit_s
    while time.monotonic() < end and any(_unread_bytes(s) for s in pipes):
        time.sleep(0.01)
    time.sleep(settle_s)


def _is_pipe(stream):
    try:
        return stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        raise CommError("the 'mpi' and 'nccl' communicators need mpi4py and an MPI library: "
                        "pip install 'pydagnn[dist]' (mpi4py and the MPICH wheel)") from None
    return MPI


class MPIComm:
    """NumPy buffers over mpi4py (``MPI.COMM_WORLD`` duplicated, so that pydagnn's
    messages never mix with a user's)."""
    name = 'mpi'

    def __init__(self, timeout=DEFAULT_TIMEOUT, comm=None):
        self.MPI = MPI = _mpi()
        base = MPI.COMM_WORLD if comm is None else comm
        self.comm = base.Dup()
        self._hello = base.Dup()      # arrival notes: who reached a collective
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = float(timeout)
        self.where = ''
        self._ops = {'sum': MPI.SUM, 'max': MPI.MAX, 'min': MPI.MIN}
        self._count = 0

    # -------------------------------------------------------------- waiting
    def _arrive(self):
        """Tell every peer that this rank reached collective number ``_count`` and
        ask to hear the same from them: the requests show who is missing on a timeout."""
        self._count += 1
        note = np.array([self._count], dtype=np.int64)
        reqs, got = [], {}
        for peer in range(self.size):
            if peer == self.rank:
                continue
            reqs.append(self._hello.Isend(note, dest=peer, tag=_ARRIVE_TAG))
            buf = np.zeros(1, dtype=np.int64)
            got[peer] = (buf, self._hello.Irecv(buf, source=peer, tag=_ARRIVE_TAG))
        return reqs, got

    def _wait(self, req, what, notes):
        """Wait for ``req`` and the arrival notes, at most ``timeout`` seconds."""
        sends, got = notes
        pending = [req] + sends + [r for _, r in got.values()]
        deadline = time.monotonic() + self.timeout
        pause = 0.0
        while not self.MPI.Request.Testall(pending):
            if time.monotonic() > deadline:
                missing = [p for p, (_, r) in got.items() if not r.Test()]
                who = (f'rank(s) {", ".join(map(str, missing))} did not reach it' if missing else
                       'every rank reached it but it did not complete')
                self.abort(f'pydagnn.parallel: rank {self.rank} of {self.size}: {what} '
                           f'{self.where or "(before training)"}: no answer within {self.timeout:g} s '
                           f'(--comm-timeout): {who}; ending the job')
            time.sleep(pause)
            pause = min(pause + 2e-5, 2e-3)  # poll fast at first: a step's allreduce is short
        return True

    # -------------------------------------------------------------- collectives
    def allreduce(self, buf, op='sum', exact=False):
        """In place. ``exact`` (sum, a power-of-two world): pair ranks ``r`` and
        ``r ^ d`` for ``d = size/2, ..., 1``, each pair adding the two halves of the tree
        of :mod:`pydagnn.gradsync`, so the bits do not depend on MPI's reduction order."""
        _check_op(op)
        if self.size == 1:
            return buf
        if not (isinstance(buf, np.ndarray) and buf.ndim == 1 and buf.flags.c_contiguous):
            raise ValueError(f'mpi allreduce: expected a contiguous 1-D NumPy array, got '
                             f'{type(buf).__name__} {getattr(buf, "shape", "")}')
        if exact and op == 'sum' and self.size > 2 and self.size & (self.size - 1) == 0:
            return self._pairwise_sum(buf)
        notes = self._arrive()
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self._ops[op]), 'allreduce', notes)
        return buf

    def _pairwise_sum(self, buf):
        other = np.empty_like(buf)
        d = self.size // 2
        while d >= 1:
            peer = self.rank ^ d
            notes = self._arrive()
            send = self.comm.Isend(buf, dest=peer, tag=d)
            recv = self.comm.Irecv(other, source=peer, tag=d)
            self._wait(recv, 'allreduce', notes)
            self._wait(send, 'allreduce', ([], {}))
            buf += other  # a + b == b + a: both partners hold the same bits
            d //= 2
        return buf

    def broadcast(self, buf, root=0):
        if self.size == 1:
            return buf
        notes = self._arrive()
        self._wait(self.comm.Ibcast(buf, root=root), 'broadcast', notes)
        return buf

    def allgather_bytes(self, data):
        data = bytes(data)
        if len(data) > MAX_GATHER:
            raise ValueError(f'allgather_bytes: {len(data)} bytes, at most {MAX_GATHER}')
        if self.size == 1:
            return [data]
        send = np.zeros(MAX_GATHER + 8, dtype=np.uint8)
        send[:8] = np.frombuffer(np.int64(len(data)).tobytes(), dtype=np.uint8)
        send[8:8 + len(data)] = np.frombuffer(data, dtype=np.uint8)
        recv = np.zeros((self.size, send.size), dtype=np.uint8)
        notes = self._arrive()
        self._wait(self.comm.Iallgather(send, recv), 'allgather', notes)
        out = []
        for row in recv:
            n = int(np.frombuffer(row[:8].tobytes(), dtype=np.int64)[0])
            out.append(row[8:8 + n].tobytes())
        return out

    def barrier(self):
        if self.size > 1:
            notes = self._arrive()
            self._wait(self.comm.Ibarrier(), 'barrier', notes)

    def abort(self, message, code=1):
        """Print ``message`` and end every rank of the job (MPI_Abort)."""
        sys.stderr.write(message.rstrip('\n') + '\n')
        sys.stderr.flush()
        sys.stdout.flush()
        # MPI_Abort has the launcher kill every rank at once; Hydra's proxy may then
        # drop what it has not yet read from our pipes, and the message is lost.
        # So first let it read what we wrote (bounded: a stalled reader cannot hang us).
        _wait_until_read((sys.stderr, sys.stdout))
        self.MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # Abort may return before the launcher kills us: never run on


class NCCLComm:
    """CuPy buffers reduced by NCCL on the current stream; NumPy buffers, barriers and
    the NCCL unique id go over MPI (:class:`MPIComm`)."""
    name = 'nccl'

    def __init__(self, timeout=DEFAULT_TIMEOUT, mpi_comm=None, gpus=()):
        self.mpi = mpi_comm if mpi_comm is not None else MPIComm(timeout)
        self.rank, self.size, self.timeout = self.mpi.rank, self.mpi.size, self.mpi.timeout
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError:
            raise CommError("the 'nccl' communicator needs CuPy with NCCL: pip install "
                            "'pydagnn[cuda12,dist]' (or cuda13)") from None
        self.cupy, self.nccl = cupy, nccl
        gpus = list(gpus or ())
        if gpus:  # NCCL binds its communicator to the current device: rank r's is gpus[r]
            cupy.cuda.Device(int(gpus[self.rank] if len(gpus) > 1 else gpus[0])).use()
        uid = np.zeros(128, dtype=np.int8)  # NCCL_UNIQUE_ID_BYTES signed chars
        if self.rank == 0:
            uid[:] = np.asarray(nccl.get_unique_id(), dtype=np.int8)
        self.mpi.broadcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, tuple(int(v) for v in uid), self.rank)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int64): nccl.NCCL_INT64,
                       np.dtype(np.int32): nccl.NCCL_INT32, np.dtype(np.uint8): nccl.NCCL_UINT8}
        self._ops = {'sum': nccl.NCCL_SUM, 'max': nccl.NCCL_MAX, 'min': nccl.NCCL_MIN}

    @property
    def where(self):
        return self.mpi.where

    @where.setter
    def where(self, value):
        self.mpi.where = value

    def _device(self, buf, what):
        if isinstance(buf, np.ndarray):
            return False
        if not (isinstance(buf, self.cupy.ndarray) and buf.ndim == 1 and buf.flags.c_contiguous):
            raise ValueError(f'nccl {what}: expected a contiguous 1-D CuPy or NumPy array, got '
                             f'{type(buf).__name__} {getattr(buf, "shape", "")}')
        if buf.dtype not in self._types:
            raise ValueError(f'nccl {what}: dtype {buf.dtype} is not supported')
        return True

    def _wait_stream(self, stream, what):
        """NCCL calls are asynchronous: wait for the stream's work with a deadline."""
        event = stream.record()
        deadline = time.monotonic() + self.timeout
        while not event.done:
            if time.monotonic() > deadline:
                self.abort(f'pydagnn.parallel: rank {self.rank} of {self.size}: nccl {what} '
                           f'{self.where or "(before training)"}: no answer within {self.timeout:g} s '
                           '(--comm-timeout); ending the job')
            time.sleep(1e-4)

    def allreduce(self, buf, op='sum', exact=False):
        """In place; NCCL's ring order decides the rounding for more than 2 ranks."""
        _check_op(op)
        if not self._device(buf, 'allreduce'):
            return self.mpi.allreduce(buf, op, exact)
        if self.size > 1:
            stream = self.cupy.cuda.get_current_stream()
            ptr = buf.data.ptr
            self.comm.allReduce(ptr, ptr, buf.size, self._types[buf.dtype], self._ops[op], stream.ptr)
            self._wait_stream(stream, 'allreduce')
        return buf

    def broadcast(self, buf, root=0):
        if not self._device(buf, 'broadcast'):
            return self.mpi.broadcast(buf, root)
        if self.size > 1:
            stream = self.cupy.cuda.get_current_stream()
            ptr = buf.data.ptr
            self.comm.broadcast(ptr, ptr, buf.size, self._types[buf.dtype], int(root), stream.ptr)
            self._wait_stream(stream, 'broadcast')
        return buf

    def allgather_bytes(self, data):
        return self.mpi.allgather_bytes(data)

    def barrier(self):
        self.cupy.cuda.get_current_stream().synchronize()
        self.mpi.barrier()

    def abort(self, message, code=1):
        try:
            self.comm.abort()
        except Exception:  # the job ends below whatever NCCL says
            pass
        self.mpi.abort(message, code)


def make_comm(kind='auto', gpus=(), timeout=DEFAULT_TIMEOUT):
    """A communicator: ``kind`` 'single' | 'mpi' | 'nccl' | 'auto' (see the module
    docstring), or a communicator object, returned as is."""
    if not isinstance(kind, str):
        return kind
    if kind == 'auto':
        if launched_world_size() <= 1 and 'mpi4py.MPI' not in sys.modules:
            return SingleComm(timeout)
        comm = MPIComm(timeout)
        if comm.size == 1:
            return SingleComm(timeout)
        return NCCLComm(timeout, comm, gpus) if gpus else comm
    if kind == 'single':
        return SingleComm(timeout)
    if kind == 'mpi':
        return MPIComm(timeout)
    if kind == 'nccl':
        return NCCLComm(timeout, gpus=gpus)
    raise CommError(f"comm: expected 'auto', 'single', 'mpi' or 'nccl', got {kind!r}")
