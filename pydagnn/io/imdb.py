"""MatConvNet image databases (``imdb.mat``): the public names in one place.

    from pydagnn.io.imdb import load_imdb, save_imdb, ImdbWriter, ImageArray, Imdb

The code lives by job, all of it schema code over :mod:`pydagnn.io.matfile` (the one MAT
codec): reading and the field checks in :mod:`pydagnn.io.imdb_read` (:func:`load_imdb`,
:class:`Imdb`, :class:`ImageArray`, :func:`imdb_info`), writing in
:mod:`pydagnn.io.imdb_write` (:func:`save_imdb`, :class:`ImdbWriter`), colour statistics,
conversions and the synthetic data set in :mod:`pydagnn.io.imdb_tools` (:class:`RgbStats`,
:func:`convert_imagenet64`, :func:`repack_imdb`, :func:`read_class_list`, :func:`synth_imdb`). Each of those imports
only the ones before it; nothing imports this module back. The command line is
``python -m pydagnn.imdb`` (:mod:`pydagnn.imdb_cli`).
"""
from .errors import MatFileError
from .imdb_read import ImageArray, Imdb, Record, imdb_info, load_imdb
from .imdb_tools import RgbStats, convert_imagenet64, read_class_list, repack_imdb, synth_imdb
from .imdb_write import ImdbWriter, save_imdb

# the name this attribute-access dict had before it was told apart from matfile.MatStruct
MatStruct = Record

__all__ = ['Record', 'Imdb', 'ImageArray', 'MatFileError', 'load_imdb', 'save_imdb',
           'ImdbWriter', 'RgbStats', 'convert_imagenet64', 'repack_imdb', 'read_class_list', 'synth_imdb',
           'imdb_info']
