"""The training figure: one panel per statistic, train and val against epoch, as
``cnn_train_dag`` draws it, written as ``net-train.pdf`` and ``net-train.png``.

matplotlib is optional (``pip install pydagnn[plot]``); without it :func:`plot_stats`
prints a one-line notice (once per process) and returns None. It draws on a bare
``matplotlib.figure.Figure`` (Agg canvas), so it never opens a window or touches
pyplot's global state.
"""
import os

from .io.tmpfiles import create_tmp

__all__ = ['plot_stats', 'stat_names']

_NOTICE_SHOWN = False
SKIP = ('num', 'time')


def stat_names(stats):
    """The statistics to plot: every field of the train and val records but num and
    time, sorted as MATLAB's ``setdiff`` returns them."""
    names = set()
    for split in ('train', 'val'):
        for rec in stats.get(split, []):
            names.update(k for k in rec if k not in SKIP)
    return sorted(names)


def _series(records, name):
    xs, ys = [], []
    for e, rec in enumerate(records, start=1):
        if rec and name in rec and rec[name] is not None:
            xs.append(e)
            ys.append(float(rec[name]))
    return xs, ys


def plot_stats(stats, path_base, log=print):
    """Draw ``stats`` (``{'train': [per-epoch dicts], 'val': [...]}``) into
    ``path_base + '.pdf'`` and ``'.png'``. Returns the list of files written, or None
    when matplotlib is not installed."""
    global _NOTICE_SHOWN
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        if not _NOTICE_SHOWN:
            log('plots: matplotlib is not installed, so net-train.pdf/.png are not drawn '
                '(pip install matplotlib)')
            _NOTICE_SHOWN = True
        return None
    names = stat_names(stats)
    if not names:
        return []
    fig = Figure(figsize=(max(4.0, 3.6 * len(names)), 3.4))
    FigureCanvasAgg(fig)
    for k, name in enumerate(names, start=1):
        ax = fig.add_subplot(1, len(names), k)
        for split in ('train', 'val'):
            xs, ys = _series(stats.get(split, []), name)
            if xs:
                ax.plot(xs, ys, 'o-', label=split)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(True)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    written = []
    for ext in ('.pdf', '.png'):
        path = path_base + ext
        # our temp name (a killed run's is removed at the next start: io.tmpfiles)
        tmp = create_tmp(os.path.dirname(os.path.abspath(path)), os.path.basename(path), 0o644)
        try:
            fig.savefig(tmp, format=ext[1:], dpi=100)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        written.append(path)
    return written
