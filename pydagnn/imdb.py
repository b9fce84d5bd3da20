"""``python -m pydagnn.imdb``: the imdb.mat command line (convert, synth, info).

Only the ``-m`` entry point: the commands are in :mod:`pydagnn.imdb_cli`, the library in
:mod:`pydagnn.io.imdb`.
"""
import sys

from .imdb_cli import main

__all__ = ['main']

if __name__ == '__main__':
    sys.exit(main())
