"""kvlab.dtypes and kvlab.memory against numbers worked out by hand."""
import pytest

from kvlab.dtypes import KvDtype, get_dtype, list_dtypes, register
from kvlab.memory import (
    GIB,
    bytes_per_token,
    bytes_per_token_per_layer,
    kv_bytes_for_sequence,
    kv_heads_per_rank,
    kv_replication,
    plan,
    reservation,
    tokens_that_fit,
)


def test_dtype_bytes_per_vector():
    assert get_dtype("fp16").bytes_per_vector(128) == 256
    assert get_dtype("int8").bytes_per_vector(128) == 128 + 2  # one fp16 scale per (token, head)
    assert get_dtype("fp16").bytes_per_elem == 2 and get_dtype("int8").bytes_per_elem == 1
    grouped = KvDtype("int4-test", bits=4, storage="uint8", scale_bytes=2, group_size=32)
    assert grouped.bytes_per_vector(128) == 64 + 4 * 2
    assert {"fp16", "int8"} <= set(list_dtypes())


def test_dtype_errors():
    with pytest.raises(ValueError, match="unknown KV dtype 'bf8'; known: fp16, int8"):
        get_dtype("bf8")
    with pytest.raises(ValueError, match="already registered"):
        register(KvDtype("int8", bits=8, storage="int8"))
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        get_dtype("fp16").bytes_per_vector(0)


def test_qwen3_8b_by_hand():
    # 2 (K and V) x 8 kv heads x 128 dims x 2 bytes = 4096 B per layer; 36 layers.
    assert bytes_per_token_per_layer("qwen3-8b", "fp16") == 4096
    assert bytes_per_token("qwen3-8b", "fp16") == 147_456
    # int8: 2 x 8 x (128 + 2 scale bytes) = 2080 per layer
    assert bytes_per_token("qwen3-8b", "int8") == 74_880
    # 80 GiB x 0.9 - 8,190,735,360 params x 2 B = 60,927,940,608 B; / 74,880 = 813,674.4
    assert tokens_that_fit("qwen3-8b", "int8", 80 * GIB) == 813_674


def test_tensor_parallel_splits_then_replicates_kv_heads():
    assert kv_heads_per_rank("llama-3.1-70b", 1) == 8
    assert kv_heads_per_rank("llama-3.1-70b", 4) == 2
    assert kv_heads_per_rank("llama-3.1-70b", 16) == 1 and kv_replication("llama-3.1-70b", 16) == 2
    # one head per rank: 2 x 1 x 256 B x 80 layers
    assert bytes_per_token("llama-3.1-70b", "fp16", tp=8) == 40_960
    assert bytes_per_token("llama-3.1-70b", "fp16", tp=16) == 40_960


def test_sliding_window_layers_keep_only_the_window():
    # gemma-3-27b: 16 kv heads -> 8192 B per layer per token in fp16; 10 full + 52 sliding (1024)
    assert kv_bytes_for_sequence("gemma-3-27b", "fp16", 512) == 8192 * 62 * 512
    assert kv_bytes_for_sequence("gemma-3-27b", "fp16", 2048) == 8192 * (10 * 2048 + 52 * 1024)


def test_reservation_contiguous_vs_paged():
    per_token = 147_456  # qwen3-8b fp16
    res = reservation("qwen3-8b", "fp16", [1, 16, 17], max_len=32, block_size=16)
    assert res.used_bytes == 34 * per_token
    assert res.paged_bytes == (16 + 16 + 32) * per_token
    assert res.contiguous_bytes == 3 * 32 * per_token
    assert res.paged_utilization == pytest.approx(34 / 64)


def test_weights_that_do_not_fit_leave_no_tokens():
    assert tokens_that_fit("llama-3.1-405b", "fp16", 80 * GIB) == 0
    assert tokens_that_fit("llama-3.1-405b", "fp16", 80 * GIB, tp=16) > 0


def test_plan_rows():
    rows = plan("qwen3-8b", ["fp16", "int8"], 80 * GIB, seq_lens=[100, 200], max_len=4096)
    assert [r.dtype for r in rows] == ["fp16", "int8"]
    assert rows[1].tokens_that_fit == 813_674
    assert rows[0].reservation["used_bytes"] == 300 * 147_456


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kv_heads_per_rank("llama-3.1-70b", 3), "must divide"),
        (lambda: kv_heads_per_rank("llama-3.1-70b", 12), "must be a multiple"),
        (lambda: kv_heads_per_rank("llama-3.1-70b", True), "tp must be a positive int"),
        (lambda: tokens_that_fit("qwen3-8b", "fp16", 0), "memory_bytes must be a positive number"),
        (lambda: tokens_that_fit("qwen3-8b", "fp16", GIB, utilization=1.5), "utilization"),
        (lambda: reservation("qwen3-8b", "fp16", [10, 50], max_len=32), "exceeds max_len"),
        (lambda: reservation("qwen3-8b", "fp16", [10], max_len=10**6), "exceeds .*max_positions"),
        (lambda: reservation("qwen3-8b", "fp16", [], max_len=32), "at least one"),
        (lambda: reservation("qwen3-8b", "fp16", [0], max_len=32), "positive int"),
        (lambda: kv_bytes_for_sequence("qwen3-8b", "fp16", 10, block_size=0), "block_size"),
        (lambda: bytes_per_token("nope", "fp16"), "unknown model"),
    ],
)
def test_bad_numbers_are_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_paged_sliding_window_holds_every_block_the_window_touches():
    # gemma-3-27b at 1030 tokens, 16-token blocks: the window is tokens 6..1029, which touch
    # blocks 0..64 (65 blocks), one more than ceil(1024 / 16) = 64.
    per_layer = 8192
    full_slots = 65 * 16  # ceil(1030 / 16) blocks
    window_slots = 65 * 16
    assert kv_bytes_for_sequence("gemma-3-27b", "fp16", 1030, block_size=16) == \
        per_layer * (10 * full_slots + 52 * window_slots)
    # 2048 tokens: window = tokens 1024..2047 = blocks 64..127 exactly (aligned: 64 blocks)
    assert kv_bytes_for_sequence("gemma-3-27b", "fp16", 2048, block_size=16) == \
        per_layer * (10 * 2048 + 52 * 1024)
