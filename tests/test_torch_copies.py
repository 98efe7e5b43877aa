"""The torch backend's row copies (``write_kv``, ``copy_blocks``, ``copy_blocks_quant``) move rows
as the widest integer words their size allows (``kvlab.kernels.mps.paging.as_words``): rows of
every size, including ones no word divides, equal the NumPy reference bit for bit."""
import numpy as np
import pytest
import torch

from kvlab.backends import get_backend
from kvlab.kernels.mps.paging import as_words
from kvlab.ref import paging as ref_paging, quant as ref_quant

TORCH = get_backend("torch", "cpu")


@pytest.mark.parametrize("shape, dtype, word", [
    ((4, 8, 128), torch.float16, torch.int64),   # 2048 bytes a row
    ((4, 1, 6), torch.float16, torch.int32),     # 12 bytes
    ((4, 1, 3), torch.float16, torch.int16),     # 6 bytes
    ((4, 1, 3), torch.int8, torch.int8),         # 3 bytes: no wider word divides them
    ((0, 2, 8), torch.float32, torch.int64),     # no rows at all
])
def test_as_words_is_a_view_in_the_widest_word(shape, dtype, word):
    rows = torch.zeros(shape, dtype=dtype)
    words = as_words(rows)
    assert words.dtype == word and words.shape[0] == shape[0]
    assert words.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()


@pytest.mark.parametrize("heads, head_dim, dtype", [(2, 8, np.float16), (1, 3, np.float16),
                                                    (3, 5, np.float32)])
def test_write_and_copy_blocks_equal_the_reference_for_any_row_size(heads, head_dim, dtype):
    rng = np.random.default_rng(head_dim)
    k, v = (rng.standard_normal((5, heads, head_dim)).astype(dtype) for _ in range(2))
    slots = np.array([3, -1, 0, 9, -1], np.int32)  # padding skipped
    pools = [rng.standard_normal((4, 3, heads, head_dim)).astype(dtype) for _ in range(2)]
    mine = [TORCH.asarray(p) for p in pools]
    ref_paging.write_kv(k, v, *pools, slots)
    TORCH.paging.write_kv(TORCH.asarray(k), TORCH.asarray(v), *mine, TORCH.asarray(slots))
    src, dst = np.array([0, 3], np.int32), np.array([2, 1], np.int32)
    ref_paging.copy_blocks(*pools, src, dst)
    TORCH.paging.copy_blocks(*mine, TORCH.asarray(src), TORCH.asarray(dst))
    for got, want in zip(mine, pools):
        np.testing.assert_array_equal(TORCH.to_numpy(got).view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("kv_dtype, storage", [("int8", np.int8), ("fp8_e4m3", np.uint8)])
def test_copy_blocks_quant_equals_the_reference_for_odd_rows(kv_dtype, storage):
    rng = np.random.default_rng(1)
    codes = [rng.integers(0, 120, (4, 3, 1, 3)).astype(storage) for _ in range(2)]
    scales = [rng.random((4, 3, 1)).astype(np.float16) for _ in range(2)]
    mine = [TORCH.asarray(a) for a in (*codes, *scales)]
    src, dst = np.array([1], np.int32), np.array([3], np.int32)
    ref_quant.copy_blocks_quant(*codes, *scales, src, dst, kv_dtype)
    TORCH.quant.copy_blocks_quant(*mine, TORCH.asarray(src), TORCH.asarray(dst), kv_dtype)
    for got, want in zip(mine, (*codes, *scales)):
        np.testing.assert_array_equal(TORCH.to_numpy(got).view(np.uint8), want.view(np.uint8))
