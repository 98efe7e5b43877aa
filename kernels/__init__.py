"""Device code, installed as ``kvlab.kernels``: ``cuda`` (Numba CUDA) and ``mps`` (torch ops).

Neither subpackage imports the other, and neither holds host state (no allocator, no block
bookkeeping): each mirrors ``kvlab.ref`` function for function.
"""
