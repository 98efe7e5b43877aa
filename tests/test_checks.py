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


def test_check_unique_names_each_repeated_value_once():
    from kvlab.checks import _check_unique

    for ok in (np.array([], np.int64), np.array([5]), np.arange(10)[::-1]):
        _check_unique("slots", ok, "one token per slot")
    with pytest.raises(ValueError, match=r"slots must not repeat \(one token per slot\), got "
                                         r"duplicates \[3, 7\]$"):
        _check_unique("slots", np.array([7, 3, 1, 7, 3, 3]), "one token per slot")
