"""Hot loops that NumPy/CuPy cannot express fast: numba (CPU) and CuPy kernels (GPU)."""
