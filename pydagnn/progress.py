"""Progress of a long step a user waits on (conversion, evaluation): count, rate, ETA.

    bar = Progress('convert', total=1281167, unit='images')
    for block in blocks:
        ...
        bar.update(len(block))
    bar.done()

prints to stderr, at most once every ``interval`` seconds (and once at the end)::

    convert: 409600/1281167 images (32.0%), 5230 images/s, ETA 2m47s

so that a redirected stdout (JSON results, the training log) stays clean.
"""
import sys
import time

__all__ = ['Progress', 'format_duration']


def format_duration(seconds):
    """``'47s'``, ``'2m47s'``, ``'1h02m'`` (``'?'`` for an unknown or infinite time)."""
    if seconds is None or seconds != seconds or seconds == float('inf'):
        return '?'
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m{s % 60:02d}s'
    return f'{s // 3600}h{(s % 3600) // 60:02d}m'


class Progress:
    """Counts work done out of ``total`` and prints ``label: done/total unit (p%), rate
    unit/s, ETA t`` lines on ``stream`` (default stderr), never more often than every
    ``interval`` seconds. ``total`` may be None (no percentage, no ETA). ``clock`` is for
    tests."""

    def __init__(self, label, total=None, unit='images', stream=None, interval=2.0,
                 clock=time.perf_counter):
        self.label = label
        self.total = None if total is None else int(total)
        self.unit = unit
        self.stream = stream
        self.interval = float(interval)
        self.clock = clock
        self.count = 0
        self.start = clock()
        self._last = self.start
        self.lines = 0

    def line(self, extra=''):
        """The progress line as it would be printed now."""
        elapsed = self.clock() - self.start
        rate = self.count / elapsed if elapsed > 0 else float('inf')
        text = f'{self.label}: {self.count}'
        if self.total is not None:
            share = 100.0 * self.count / self.total if self.total else 100.0
            text += f'/{self.total} {self.unit} ({share:.1f}%)'
        else:
            text += f' {self.unit}'
        text += f', {rate:.0f} {self.unit}/s' if rate != float('inf') else ''
        if self.total is not None and self.count < self.total:
            left = (self.total - self.count) / rate if rate > 0 else float('inf')
            text += f', ETA {format_duration(left)}'
        elif self.total is not None:
            text += f', {format_duration(elapsed)}'
        return text + (f' {extra}' if extra else '')

    def _print(self, extra):
        print(self.line(extra), file=self.stream or sys.stderr, flush=True)
        self.lines += 1

    def update(self, n=1, extra=''):
        """Add ``n`` done; print when ``interval`` seconds passed since the last line."""
        self.count += int(n)
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            self._print(extra)

    def done(self, extra=''):
        """Print the final line (always)."""
        self._last = self.clock()
        self._print(extra)
