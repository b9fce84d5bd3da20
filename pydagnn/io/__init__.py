"""File formats: MatConvNet model files (``.mat`` v7 and v7.3) and the MATLAB file layer."""
from .errors import MatFileError  # noqa: F401
from .matconvnet import load_matconvnet, save_matconvnet, UnusableLayer, UnknownLayerTypeError  # noqa: F401
