"""Batches for training: the original's ``getDagNNBatch`` and a background prefetcher.

``get_batch(imdb, batch, mode, rgb_mean=None, rng=None)`` reads the images of one batch
lazily from an imdb (``imdb.images.data[:, :, :, idx]``, H x W x 3 x n uint8), returns
``{'input': float32 images minus meta.rgbMean per channel (flipped left-right with
probability 1/2 each in 'train' mode), 'label': float32 1-based labels, shape (n,)}``.
Batch indexes are 0-based positions into the imdb (``numpy.nonzero(set == 1)[0]``).

:class:`Prefetcher` runs a batch function on a background thread, a bounded number of
batches ahead of the consumer, in order; an exception raised while preparing a batch is
raised again in the consumer, and :meth:`Prefetcher.close` stops the thread cleanly.
Both it and :class:`SyncLoader` (no thread) count the seconds the consumer waited.
"""
import queue
import threading
import time

import numpy as np

__all__ = ['get_batch', 'imdb_field', 'Prefetcher', 'SyncLoader', 'make_loader']


def imdb_field(obj, *path):
    """``imdb.images.data`` for an object with attributes or nested dicts (or a mix)."""
    for name in path:
        if isinstance(obj, dict):
            if name not in obj:
                raise KeyError(f"imdb: missing field {'.'.join(path)} (no {name!r})")
            obj = obj[name]
        else:
            if not hasattr(obj, name):
                raise KeyError(f"imdb: missing field {'.'.join(path)} (no {name!r})")
            obj = getattr(obj, name)
    return obj


def _read_images(data, idx):
    """``data[:, :, :, idx]`` as a NumPy array. For an h5py dataset the indexes are read
    in increasing order without repeats (what h5py requires) and put back in batch order."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size == 0 or not type(data).__module__.startswith('h5py'):
        return np.asarray(data[:, :, :, idx])  # NumPy arrays and pydagnn's ImageArray take any order
    uniq, inverse = np.unique(idx, return_inverse=True)
    block = np.asarray(data[:, :, :, uniq])
    if block.ndim != 4 or block.shape[3] != uniq.size:
        raise ValueError(f'imdb.images.data[:, :, :, idx] gave shape {block.shape} for {uniq.size} images; '
                         'expected H x W x 3 x n')
    if uniq.size == idx.size and np.array_equal(uniq, idx):
        return block
    return block[:, :, :, inverse.reshape(-1)]


def get_batch(imdb, batch, mode='train', rgb_mean=None, rng=None):
    """One batch as the original ``getDagNNBatch`` makes it.

    imdb: an imdb object (``images.data``, ``images.labels``, ``meta.rgbMean``; see
    :mod:`pydagnn.io.imdb`) or the same as nested dicts.
    batch: 0-based image indexes. mode: 'train' flips each image left-right with
    probability 1/2 (``rng.random() > 0.5``, one draw per image, in batch order);
    any other mode ('val', 'test') does not.
    rgb_mean: 3 values subtracted per channel (default ``imdb.meta.rgbMean``; pass 0
    to subtract nothing). rng: a ``numpy.random.Generator`` for the flips (default: a
    fresh unseeded one; the training loop always passes a seeded one).
    Returns ``{'input': H x W x 3 x n float32 (Fortran order), 'label': (n,) float32}``.
    """
    batch = np.asarray(batch, dtype=np.int64).reshape(-1)
    images = _read_images(imdb_field(imdb, 'images', 'data'), batch)
    labels = np.asarray(imdb_field(imdb, 'images', 'labels')).reshape(-1)[batch].astype(np.float32)
    if rgb_mean is None:
        rgb_mean = imdb_field(imdb, 'meta', 'rgbMean')
    mean = np.asarray(rgb_mean, dtype=np.float32).reshape(-1)
    if mean.size not in (1, images.shape[2]):
        raise ValueError(f'get_batch: rgbMean has {mean.size} values, the images have {images.shape[2]} channels')
    x = np.asfortranarray(images, dtype=np.float32)
    x -= mean.reshape(1, 1, -1, 1)
    if mode == 'train' and batch.size:
        rng = rng if rng is not None else np.random.default_rng()
        flip = np.nonzero(rng.random(batch.size) > 0.5)[0]
        if flip.size:
            x[:, :, :, flip] = x[:, ::-1, :, flip]
    return {'input': x, 'label': labels}


class _Failure:
    __slots__ = ('exc',)

    def __init__(self, exc):
        self.exc = exc


_DONE = object()


class SyncLoader:
    """Calls ``fn(*job)`` for each job when asked, in the consumer's thread.
    ``wait_time``: seconds spent in ``fn``."""

    def __init__(self, jobs, fn):
        self._jobs = iter(jobs)
        self._fn = fn
        self.wait_time = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        job = next(self._jobs)
        t0 = time.perf_counter()
        try:
            return self._fn(*job)
        finally:
            self.wait_time += time.perf_counter() - t0

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Prefetcher:
    """Prepares ``fn(*job)`` for each job on a background thread, at most ``depth``
    results ahead of the consumer, delivered in job order.

    Iterate it to get the results; an exception raised by ``fn`` is raised again by
    the iteration that would have returned that result. ``close()`` (also on leaving
    a ``with`` block) stops the thread and waits for it. ``wait_time``: seconds the
    consumer spent waiting for a result that was not ready yet.
    """

    def __init__(self, jobs, fn, depth=2, name='pydagnn-prefetch'):
        if depth < 1:
            raise ValueError(f'Prefetcher: depth must be at least 1, got {depth}')
        self._jobs = list(jobs)
        self._fn = fn
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self.wait_time = 0.0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self):
        for job in self._jobs:
            if self._stop.is_set():
                return
            try:
                item = self._fn(*job)
            except BaseException as e:  # delivered to the consumer, then stop
                self._put(_Failure(e))
                return
            if not self._put(item):
                return
        self._put(_DONE)

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        t0 = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._finished = True
                    raise RuntimeError('Prefetcher: the background thread ended without a result') from None
        self.wait_time += time.perf_counter() - t0
        if item is _DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            self.close()
            raise item.exc
        return item

    def close(self):
        """Stop the background thread and wait for it (idempotent)."""
        self._stop.set()
        while True:  # unblock a put waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._finished = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass


def make_loader(jobs, fn, prefetch=True, depth=2):
    """A :class:`Prefetcher` when ``prefetch``, else a :class:`SyncLoader`."""
    return Prefetcher(jobs, fn, depth=depth) if prefetch else SyncLoader(jobs, fn)
