"""One run per experiment folder: the folder is checked, locked and cleaned before training.

    with open_exp_dir(exp_dir, log) as lock:    # makedirs, writable?, lock, stale temps
        ...                                     # train; the lock is released on exit

* Writability is probed by creating (and removing) a file, not by ``os.access`` alone
  (root, ACLs and read-only mounts make ``os.access`` lie): a folder that cannot take a
  checkpoint fails here, before the net is trained for an epoch.
* The lock is ``fcntl.flock`` on ``exp_dir/.pydagnn-run.lock``, an open file held for the
  run: the kernel releases it when the process dies, however it dies. The file holds the
  owner's pid, host and start time, so that a second run fails at once saying who holds
  the folder. A lock file left by a killed run (its lock no longer held) is reported in
  one line and taken over.
* Our stale temporary files of dead writers are then removed
  (:func:`pydagnn.io.tmpfiles.clean_stale`).
"""
import errno
import fcntl
import os
import time

from .io.tmpfiles import clean_stale, create_tmp, host_name

__all__ = ['LOCK_NAME', 'RunLockError', 'ExpDirError', 'RunLock', 'open_exp_dir', 'check_writable']

LOCK_NAME = '.pydagnn-run.lock'


class RunLockError(RuntimeError):
    """Another run holds the experiment folder; the message names the folder and the process."""


class ExpDirError(RuntimeError):
    """The experiment folder cannot be created or written; the message names it and says why."""


def check_writable(folder):
    """Create ``folder`` if needed and prove a file can be created, written and removed in
    it; raises :class:`ExpDirError` naming the folder otherwise."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ExpDirError(f'experiment folder {folder} cannot be created: {e.strerror or e}') from None
    if not os.path.isdir(folder):
        raise ExpDirError(f'experiment folder {folder} is not a folder')
    probe = None
    try:
        probe = create_tmp(folder, 'write-probe')
        with open(probe, 'wb') as fh:
            fh.write(b'pydagnn')
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise ExpDirError(f'experiment folder {folder} is not writable ({e.strerror or e}); '
                          'checkpoints could not be saved: give a writable --exp-dir') from None
    finally:
        if probe is not None:
            try:
                os.unlink(probe)
            except OSError:
                pass


def _owner_text(text):
    """'pid 123 on host h, started 2026-01-01 10:00:00 UTC' from a lock file's content."""
    fields = dict(line.split('=', 1) for line in text.splitlines() if '=' in line)
    if not fields.get('pid'):
        return 'an unknown process (the lock file is empty)'
    return (f"pid {fields.get('pid')} on host {fields.get('host', '?')}, "
            f"started {fields.get('started', '?')}")


class RunLock:
    """The exclusive lock of one experiment folder (see the module docstring)."""

    def __init__(self, folder, log=None):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd = None
        self._log = log

    @property
    def locked(self):
        """Whether this object holds the folder's lock now."""
        return self._fd is not None

    def acquire(self):
        """Take the lock or raise :class:`RunLockError` at once (never waits). On a file
        system without locks (``ENOLCK``, ``EOPNOTSUPP``) one line is logged and the run
        goes on unlocked (``self.locked`` False)."""
        try:
            return self._acquire()
        except OSError as e:
            raise ExpDirError(f'{self.path}: cannot take the run lock ({e.strerror or e})') from None

    def _acquire(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = _owner_text(_read_fd(fd))
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockError(f'experiment folder {self.folder} is in use by another run '
                                       f'({owner}); wait for it to end or give another --exp-dir') from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                    if self._log is not None:
                        self._log(f'{self.folder}: the file system has no locks ({e.strerror}); '
                                  'running unlocked: make sure no other run uses this folder')
                    if not owner.startswith('pid '):   # the empty file we just created
                        os.unlink(self.path)
                    return self
                raise
            # the holder before us may have removed the file between our open and flock:
            # then we hold a lock on a deleted file; start again on the current one
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_fd(fd)
        if previous.strip() and self._log is not None:
            self._log(f'{self.path}: stale lock of a run that is no longer running '
                      f'({_owner_text(previous)}); taking it over')
        started = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid={os.getpid()}\nhost={host_name()}\nstarted={started}\n'.encode(), 0)
        self._fd = fd
        return self

    def release(self):
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)   # before unlocking: a waiting opener then re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _read_fd(fd):
    try:
        return os.pread(fd, 4096, 0).decode('utf-8', 'replace')
    except OSError:
        return ''


def open_exp_dir(folder, log=None):
    """Prepare ``folder`` for a run: create it, check it is writable
    (:class:`ExpDirError`), lock it (:class:`RunLockError` when another run holds it),
    then remove our stale temp files of dead writers in it. Returns the held
    :class:`RunLock` (a context manager)."""
    check_writable(folder)
    lock = RunLock(folder, log).acquire()
    try:
        clean_stale(folder, log)
    except BaseException:
        lock.release()
        raise
    return lock
