"""The MatConvNet option forms expanded for the direct (loop) references of the layer
tests, written independently of :func:`pydagnn.layers.conv.parse_pad` / ``parse_pair``
(the code under test)."""
import numpy as np


def pad4(p):
    """pad as 1, 2 ([vertical horizontal]) or 4 numbers -> [top, bottom, left, right]."""
    p = list(np.ravel(p))
    return p * 4 if len(p) == 1 else ([p[0], p[0], p[1], p[1]] if len(p) == 2 else p)


def pair(s):
    """stride / dilate / pool size as 1 or 2 numbers -> [vertical, horizontal]."""
    s = list(np.ravel(s))
    return s * 2 if len(s) == 1 else s
