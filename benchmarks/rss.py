"""Peak resident memory of this process, for the benchmarks' JSON lines."""
import resource
import sys


def ru_maxrss_mb(ru_maxrss=None):
    """getrusage's ru_maxrss in MB (kilobytes on Linux, bytes on macOS); this process's
    when ``ru_maxrss`` is None. On Linux it is kept across exec, so a child can report its
    parent's peak: see :func:`peak_rss_mb`."""
    if ru_maxrss is None:
        ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru_maxrss / (1024 * 1024) if sys.platform == 'darwin' else ru_maxrss / 1024


def peak_rss_mb():
    """This process image's own peak RSS (Linux VmHWM), else :func:`ru_maxrss_mb`."""
    try:
        with open('/proc/self/status') as fh:
            for line in fh:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru_maxrss_mb()
