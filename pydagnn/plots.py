"""The training figure: one panel per statistic, train and val against epoch, as
``cnn_train_dag`` draws it, written as ``net-train.pdf`` and ``net-train.png``.

matplotlib is optional (``pip install pydagnn[plot]``); without it :func:`plot_stats`
prints a one-line notice (once per process) and returns None. It draws on a bare
``matplotlib.figure.Figure`` (Agg canvas), so it never opens a window or touches
pyplot's global state.
"""
import os

from .io.tmpfiles import create_tmp

__all__ = ['plot_stats', 'draw_figure', 'stat_names']

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


def draw_figure(stats):
    """The figure of ``stats`` (a bare matplotlib ``Figure`` with an Agg canvas, one panel
    per statistic), or None when there is nothing to draw. Needs matplotlib."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import MaxNLocator
    names = stat_names(stats)
    if not names:
        return None
    fig = Figure(figsize=(max(4.0, 3.6 * len(names)), 3.4))
    FigureCanvasAgg(fig)
    epochs = max(len(stats.get(split, [])) for split in ('train', 'val'))
    many = epochs > 20   # markers on 60 epochs would hide the curves
    for k, name in enumerate(names, start=1):
        ax = fig.add_subplot(1, len(names), k)
        for split in ('train', 'val'):
            xs, ys = _series(stats.get(split, []), name)
            if xs:
                ax.plot(xs, ys, '-' if many else 'o-', label=split)
        ax.set_xlabel('epoch')
        # whole epochs only, at most 6 labels, and half an epoch of margin: without the
        # fixed limits one epoch gets labels 0.945 0.960 ... that run into each other
        ax.set_xlim(0.5, max(epochs, 1) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, min_n_ticks=1))
        ax.set_title(name)
        ax.grid(True)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    return fig


def plot_stats(stats, path_base, log=print):
    """Draw ``stats`` (``{'train': [per-epoch dicts], 'val': [...]}``) into
    ``path_base + '.pdf'`` and ``'.png'``. Returns the list of files written, or None
    when matplotlib is not installed."""
    global _NOTICE_SHOWN
    try:
        import matplotlib.figure  # noqa: F401
        import matplotlib.backends.backend_agg  # noqa: F401
    except ImportError:
        if not _NOTICE_SHOWN:
            log('plots: matplotlib is not installed, so net-train.pdf/.png are not drawn '
                '(pip install matplotlib)')
            _NOTICE_SHOWN = True
        return None
    fig = draw_figure(stats)
    if fig is None:
        return []
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
