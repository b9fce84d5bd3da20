"""pydagnn: a MatConvNet-compatible DagNN engine in Python."""
from .layer import Layer, register, REGISTRY  # noqa: F401
