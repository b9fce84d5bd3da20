"""Cropping (MatConvNet's ``vl_nncrop`` and ``dagnn.Crop``, the FCN layer), CPU and GPU.

``crop_forward(x, crop) -> y``: ``y = x[top:H-bottom, left:W-right, :, :]``
``crop_backward(input_size, crop, dy) -> dx``: zeros of ``input_size`` with ``dy`` in the
kept window.

``dagnn.Crop`` takes two inputs and crops the first to the spatial size of the second.
With ``dv = H1 - H2`` and ``du = W1 - W2`` and the property ``crop = [cv cu]`` (the base
offsets), its crop (``getAdaptedCrops``) is

    bottom = max(0, dv - cv), top = dv - bottom,  right = max(0, du - cu), left = du - right,

i.e. the offset ``cv`` from the top when the first input is large enough, whatever remains
at the bottom (the window is not centred). The second input only gives a size and gets no
derivative. A first input smaller than the second is an error (MATLAB fails on the
negative index).
"""
import numpy as np

from pydagnn.backend import get_array_module
from pydagnn.layer import Layer, register

__all__ = ['crop_forward', 'crop_backward', 'adapted_crops', 'Crop']


def _crop4(crop, op):
    c = [int(v) for v in np.asarray(crop, dtype=np.float64).ravel()]
    if len(c) != 4:
        raise ValueError(f'{op}: crop must be [top bottom left right], got {c}')
    if min(c) < 0:
        raise ValueError(f'{op}: crop must be non-negative, got {c}')
    return tuple(c)


def _size4(s):
    s = tuple(int(v) for v in s)
    return s + (1,) * (4 - len(s))


def crop_forward(x, crop):
    """``vl_nncrop(x, crop)``, crop = [top bottom left right]; Fortran-contiguous copy."""
    xp = get_array_module(x)
    t, b, l, r = _crop4(crop, 'crop_forward')
    H, W = _size4(x.shape)[:2]
    if t + b > H or l + r > W:
        raise ValueError(f'crop_forward: crop {[t, b, l, r]} is larger than x of shape {x.shape}')
    return xp.asfortranarray(x[t:H - b, l:W - r])


def crop_backward(input_size, crop, dy):
    """``vl_nncrop([], crop, dy, input_size)``: zeros of ``input_size`` (4 numbers or fewer,
    MATLAB style), ``dy`` pasted in the kept window."""
    xp = get_array_module(dy)
    t, b, l, r = _crop4(crop, 'crop_backward')
    sz = _size4(input_size)
    expect = (sz[0] - t - b, sz[1] - l - r) + sz[2:]
    if _size4(dy.shape) != expect:
        raise ValueError(f'crop_backward: dy has shape {dy.shape}, expected {expect} '
                         f'(input size {sz}, crop {[t, b, l, r]})')
    dx = xp.zeros(sz, dtype=dy.dtype, order='F')
    dx[t:sz[0] - b, l:sz[1] - r] = dy.reshape(expect, order='F')
    return dx


def adapted_crops(size1, size2, crop=(0, 0)):
    """``dagnn.Crop.getAdaptedCrops``: [top bottom left right] cropping ``size1`` to the
    height and width of ``size2`` with the base offsets ``crop = [cv cu]``."""
    c = [int(v) for v in np.asarray(crop, dtype=np.float64).ravel()]
    if len(c) == 1:
        c = c * 2
    if len(c) != 2:
        raise ValueError(f'Crop: crop must have 2 elements [vertical horizontal], got {c}')
    s1, s2 = _size4(size1), _size4(size2)
    dv, du = s1[0] - s2[0], s1[1] - s2[1]
    if dv < 0 or du < 0:
        raise ValueError(f'Crop: the first input ({s1}) is smaller than the second ({s2})')
    bottom, right = max(0, dv - c[0]), max(0, du - c[1])
    return (dv - bottom, bottom, du - right, right)


@register('dagnn.Crop')
class Crop(Layer):
    """``dagnn.Crop``: inputs [x, reference], outputs [x cropped to the reference's H x W]."""
    properties = {'crop': [0, 0]}
    #: backward reads the two inputs' sizes, never the output
    backward_needs_outputs = False

    def forward(self, inputs, params):
        c = adapted_crops(np.shape(inputs[0]), np.shape(inputs[1]), self.crop)
        return [crop_forward(inputs[0], c)]

    def backward(self, inputs, params, der_outputs, outputs=None):
        c = adapted_crops(np.shape(inputs[0]), np.shape(inputs[1]), self.crop)
        dx = crop_backward(np.shape(inputs[0]), c, der_outputs[0])
        return [dx.reshape(np.shape(inputs[0]), order='F'), None], []

    def get_output_sizes(self, input_sizes):
        if len(input_sizes) < 2 or input_sizes[0] is None or input_sizes[1] is None:
            return [None]
        s1 = _size4(input_sizes[0])
        t, b, l, r = adapted_crops(s1, input_sizes[1], self.crop)
        return [(s1[0] - t - b, s1[1] - l - r, s1[2], s1[3])]
