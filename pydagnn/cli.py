"""What every pydagnn command does with a user's mistake: one ``error: ...`` line, exit 2.

    from pydagnn.cli import UsageError, run_main

    def main(argv=None):
        args = parser().parse_args(argv)
        if args.batch_size < 1:
            raise UsageError(f'--batch-size {args.batch_size}: must be at least 1')
        ...

    if __name__ == '__main__':
        sys.exit(run_main(main))

:func:`run_main` runs ``main(argv)`` and turns the errors a user causes into one line on
stderr and exit status 2: :class:`UsageError`, a malformed file (:class:`MatFileError`, a
``ValueError``), any other ``ValueError`` raised while checking the user's input, a file
that is missing or cannot be read or written (``OSError``), the trainer's
``CheckpointError``, and every class listed in :data:`EXPECTED_ERRORS` (a module whose
errors are the user's to fix but are neither ValueError nor OSError decorates its class
with :func:`expected_error`). A failure of the run itself (:class:`RunError`, or the
classes a command passes as ``run_errors``) is one ``error:`` line and exit 1. Ctrl-C is
one line too (``interrupted: ...``, exit 130), saying where the run will resume when the
command raised :class:`Interrupted` with that message. Anything else is a bug and keeps its
traceback; ``--debug`` anywhere on the command line (:func:`add_debug_flag` lists it in
``--help``) keeps the traceback for every error.
A flag argparse refuses (unknown, missing, not a number) is one line too when the command
builds its parser with :class:`ArgumentParser`: ``error: argument --batch-size: invalid int
value: 'x' (see --help)``, exit 2, without the long usage text.

This module imports nothing heavy: commands parse their arguments (and answer ``--help``)
before they import the engine.
"""
import argparse
import sys

__all__ = ['ArgumentParser', 'UsageError', 'RunError', 'Interrupted', 'run_main', 'add_debug_flag', 'check_gpus', 'expected_error',
           'EXPECTED_ERRORS', 'DEBUG_HELP']

#: the help line every command gives its --debug flag
DEBUG_HELP = 'show the Python traceback of an error instead of the one-line message'


class UsageError(ValueError):
    """A value the user gave (a flag, a file's content) that the command cannot use. The
    message names the flag, file or value and says what would be accepted."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of a flag is one ``error: ...`` line and exit 2
    (its subcommand parsers are of this class too)."""

    def error(self, message):
        self.exit(2, f'error: {message} (see {self.prog} --help)\n')


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the line to print (e.g. where the run will resume from)."""

    def __init__(self, message):
        super().__init__(message)
        self.message = str(message)


#: exception classes that are the user's mistake, not a bug (ValueError covers UsageError,
#: MatFileError and the engine's EvalError; OSError covers missing and unreadable files)
EXPECTED_ERRORS = [ValueError, OSError]


def expected_error(cls):
    """Class decorator: errors of ``cls`` end a command with one ``error:`` line (for
    error classes that are neither ValueError nor OSError, e.g. a run lock held by another
    process). Returns ``cls``."""
    if cls not in EXPECTED_ERRORS:
        EXPECTED_ERRORS.append(cls)
    return cls


def _expected():
    """The classes above plus the trainer's checkpoint error, found without importing the
    engine when it is not loaded yet (a command that never loaded it cannot raise it)."""
    found = list(EXPECTED_ERRORS)
    mod = sys.modules.get('pydagnn.io.checkpoint')
    if mod is not None:
        found.append(mod.CheckpointError)
    return tuple(found)


def _one_line(exc):
    """The exception's message on one line (a multi-line message is joined with '; ')."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f'{exc.filename}: {exc.strerror}'
    elif isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    return '; '.join(part.strip() for part in text.splitlines() if part.strip())


def add_debug_flag(parser):
    """Give ``parser`` the ``--debug`` flag (:func:`run_main` reads it), so that
    ``--help`` lists it. Returns ``parser``."""
    parser.add_argument('--debug', action='store_true', help=DEBUG_HELP)
    return parser


def check_gpus(gpus, flag='--gpus'):
    """Raise :class:`UsageError` naming ``flag`` when the CUDA devices ``gpus`` (0-based)
    cannot be used here: no CuPy, no device, or an index past the last device."""
    gpus = [int(g) for g in gpus]
    if not gpus:
        return
    from .backend import cupy_or_none
    given = f"{flag} {' '.join(map(str, gpus))}"
    cp = cupy_or_none()
    if cp is None:
        raise UsageError(f"{given}: no CUDA device is usable here (CuPy with a CUDA device is "
                         "needed: pip install -e '.[cuda12]'; leave out --gpus to run on the CPU)")
    n = cp.cuda.runtime.getDeviceCount()
    bad = [g for g in gpus if not 0 <= g < n]
    if bad:
        raise UsageError(f'{given}: this machine has {n} CUDA device(s), numbered 0..{n - 1}')


class RunError(Exception):
    """A run that failed in a way the user must act on (a full disk, a folder another run
    holds): one ``error:`` line, exit status 1 (the input was fine; the run was not)."""


def run_main(main, argv=None, run_errors=()):
    """Run ``main(argv)`` (``argv`` default ``sys.argv[1:]``) as a command and return its
    exit status: main's return value when it is an int, else 0; 2 after an expected error
    (the user's input); 1 after a :class:`RunError` or one of ``run_errors`` (classes of
    failures of the run itself, e.g. a non-finite step, a held experiment folder; or a
    function returning them, called only after an error, so that naming them imports
    nothing before ``--help`` is answered); 130 after Ctrl-C. Each prints one line.
    ``--debug`` is taken out of ``argv`` before ``main`` sees it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    argv = [a for a in argv if a != '--debug']
    try:
        status = main(argv)
    except KeyboardInterrupt as e:
        if debug:
            raise
        msg = e.message if isinstance(e, Interrupted) else 'stopped by Ctrl-C'
        print(f'interrupted: {msg}', file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        failed = (RunError,) + tuple(run_errors() if callable(run_errors) else run_errors)
        # a run failure first: its classes may subclass an input error's
        code = 1 if isinstance(e, failed) else 2 if isinstance(e, _expected()) else None
        if debug or code is None:
            raise
        print(f'error: {_one_line(e)}', file=sys.stderr, flush=True)
        return code
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
