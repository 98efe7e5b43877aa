"""kvlab.checks helpers shared by every backend's argument checks."""
import numpy as np
import pytest
import torch

from kvlab.backends import get_backend
from kvlab.checks import dtype_name


@pytest.mark.parametrize("x, name", [
    (np.float16, "float16"), (np.dtype("int8"), "int8"), ("float32", "float32"),
    (torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
    (np.zeros(2, np.uint8), "uint8"), (torch.zeros(2, dtype=torch.int32), "int32"),
])
def test_dtype_name_of_dtypes_and_arrays(x, name):
    assert dtype_name(x) == name
    assert dtype_name(x) == name  # the second call comes from the cache


def test_dtype_name_of_a_cuda_device_array():
    cu = get_backend("cuda")
    assert dtype_name(cu.asarray(np.zeros(3, np.float16))) == "float16"
