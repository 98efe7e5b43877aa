"""kvlab: a teaching lab and reference implementation of the KV cache LLM inference engines run on.

Layers (docs/design.md#layers): ``kvlab.ref`` (NumPy reference ops) · ``kvlab.kernels.cuda`` (Numba CUDA)
· ``kvlab.kernels.mps`` (PyTorch) · host state and tools in ``kvlab`` itself. Importing kvlab
imports neither numba nor torch; :func:`kvlab.backends.get_backend` loads a backend on request.
"""
from kvlab.backends import get_backend
from kvlab.dtypes import get_dtype
from kvlab.shapes import ModelShape, get_model, list_models

__version__ = "0.1.0"
__all__ = ["ModelShape", "get_backend", "get_dtype", "get_model", "list_models", "__version__"]
