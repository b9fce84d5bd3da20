"""Our temporary files: named so that a later run can tell them apart and clean them up.

A writer (:func:`pydagnn.io.matfile.tmp_beside`: checkpoints, ``save_matconvnet``, the
imdb writers) grows a file under a temporary name beside its target and renames it when
complete. A killed writer leaves that file behind (a whole imdb, a checkpoint). The name
says whose it is::

    .<target name>~<pid>@<host>~<random>.pydagnn-tmp

:func:`clean_stale` removes, in one folder, only the files of that exact form whose
writer (``pid`` on this ``host``) is no longer running; a file of a live writer, of
another host, a symlink, or any other file is never touched.
"""
import os
import re
import secrets
import socket
import stat

__all__ = ['TMP_SUFFIX', 'create_tmp', 'parse_tmp_name', 'clean_stale', 'pid_alive', 'host_name']

TMP_SUFFIX = '.pydagnn-tmp'
#: what tempfile.mkstemp beside a .mat gave before pydagnn named its temp files (no pid)
_LEGACY_RE = re.compile(r'^\..+\.mat\.[a-z0-9_]{8}\.tmp$')
_NAME_RE = re.compile(r'^\.(?P<base>.+)~(?P<pid>\d{1,10})@(?P<host>[A-Za-z0-9_.-]{1,64})'
                      r'~(?P<rand>[0-9a-f]{12})' + re.escape(TMP_SUFFIX) + r'$')


def host_name():
    """This machine's name as it appears in our temp names ([A-Za-z0-9_.-], <= 64 chars)."""
    return re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname() or 'localhost')[:64]


def pid_alive(pid):
    """Whether process ``pid`` exists on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_tmp(folder, base, mode=0o600):
    """Create a new empty file ``folder/.<base>~<pid>@<host>~<random>.pydagnn-tmp``
    (O_EXCL: never an existing file) and return its path."""
    for _ in range(100):
        name = f'.{base}~{os.getpid()}@{host_name()}~{secrets.token_hex(6)}{TMP_SUFFIX}'
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f'{folder}: could not create a temporary file for {base!r}')


def parse_tmp_name(name):
    """``(target name, pid, host)`` of one of our temp names, else None."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    return m.group('base'), int(m.group('pid')), m.group('host')


def clean_stale(folder, log=None):
    """Remove the temp files in ``folder`` (not below it) left by our writers that are no
    longer running on this host; returns ``[(path, bytes)]`` of what was removed and,
    when some were, logs one line (``log(line)``). Errors removing one file are logged
    and skipped: a cleanup never stops a run."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    me = host_name()
    removed = []
    for name in sorted(names):
        parsed = parse_tmp_name(name)
        if parsed is None or parsed[2] != me or pid_alive(parsed[1]):
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            os.unlink(path)
        except OSError as e:
            if log is not None:
                log(f'{path}: could not remove this stale temporary file ({e.strerror or e})')
            continue
        removed.append((path, st.st_size))
    legacy = [n for n in names if _LEGACY_RE.match(n)]
    if legacy and log is not None:   # whose they are is unknown: only said, never removed
        log(f'{folder}: {len(legacy)} temporary file(s) of an older pydagnn (writer unknown, not '
            f'removed; delete them if no writer is running): ' + ', '.join(sorted(legacy)[:5])
            + (' ...' if len(legacy) > 5 else ''))
    if removed and log is not None:
        total = sum(s for _, s in removed) / 1e6
        log(f'{folder}: removed {len(removed)} stale temporary file(s) of killed writers '
            f'({total:.1f} MB): ' + ', '.join(os.path.basename(p) for p, _ in removed))
    return removed
