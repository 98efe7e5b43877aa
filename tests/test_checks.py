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


def _batch(num_seqs: int, blocks_each: int = 3, block_size: int = 4):
    tables = np.arange(num_seqs * blocks_each, dtype=np.int32).reshape(num_seqs, blocks_each)
    lens = np.full(num_seqs, blocks_each * block_size - 1, np.int32)
    return tables, lens


def test_a_batch_table_is_checked_as_whole_arrays(monkeypatch):
    """A valid batch of many sequences costs no per-sequence Python work (a decode step of 256
    sequences took 0.84 ms of checks when each sequence was checked in its own call)."""
    import kvlab.checks as checks

    calls = []
    monkeypatch.setattr(checks, "_check_in_range", lambda *a: calls.append(a))
    tables, lens = _batch(300)
    table, got_lens = checks.check_table_and_lens(tables, lens, tables.size, 4)
    assert calls == [] and table.dtype == got_lens.dtype == np.int64
    assert (table == tables).all() and (got_lens == lens).all()


def test_the_first_bad_sequence_of_a_batch_is_named():
    """Errors in sequences 5 (an entry), 7 (a length) and 9: the message is about sequence 5,
    with its length and bad entry; the length error wins within one sequence."""
    from kvlab.checks import check_table_and_lens

    tables, lens = _batch(12)
    tables[5, 2], lens[7], tables[9, 0] = 99, 13, -1
    with pytest.raises(ValueError, match=r"entries read by context_len\[5\]=11 must be in "
                                         r"\[0, 36\) \(blocks of the pool\), got \[99\]$"):
        check_table_and_lens(tables, lens, tables.size, 4)
    tables[5, 2] = 17
    with pytest.raises(ValueError, match=r"context_len\[7\] must be in \[0, 12\] \(3 blocks of 4"):
        check_table_and_lens(tables, lens, tables.size, 4)
    lens[5], tables[5, 0] = 40, -1  # both wrong in sequence 5: its length is named
    with pytest.raises(ValueError, match=r"context_len\[5\] must be in \[0, 12\]"):
        check_table_and_lens(tables, lens, tables.size, 4)
    lens[5], tables[5, 0], lens[7] = 0, -1, 12  # a sequence reads no block: -1 there is fine
    with pytest.raises(ValueError, match=r"context_len\[9\]=11 .* got \[-1\]"):
        check_table_and_lens(tables, lens, tables.size, 4)
