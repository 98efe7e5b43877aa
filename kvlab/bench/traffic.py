"""Bytes moved: the exact compulsory traffic of one call of each op, computed from its shapes
(what counts and what does not: :mod:`kvlab.bench`); ``tests/test_bench.py`` checks each formula
by hand."""
from __future__ import annotations


def bytes_write_kv(tokens: int, heads: int, head_dim: int, elem: int) -> int:
    """write_kv: read k, v ``[T, H, D]`` and the int32 slots; write the same K/V bytes into the pool."""
    kv = 2 * tokens * heads * head_dim * elem
    return kv + 4 * tokens + kv


def bytes_gather_kv(context_lens: list[int], block_size: int, heads: int, head_dim: int,
                    elem: int) -> int:
    """gather_kv: read the table entries in use (one int32 per block touched) and the lengths,
    the K/V rows of every cached token; write them contiguous."""
    rows = sum(context_lens)
    kv = 2 * rows * heads * head_dim * elem
    table = 4 * sum(-(-n // block_size) for n in context_lens)
    return table + 4 * len(context_lens) + kv + kv


def bytes_copy_blocks(num_blocks: int, block_size: int, heads: int, head_dim: int,
                      elem: int) -> int:
    """copy_blocks: read src and dst ids (int32) and N whole K and V blocks; write N blocks each."""
    blocks = 2 * num_blocks * block_size * heads * head_dim * elem
    return 2 * 4 * num_blocks + blocks + blocks


def bytes_slot_mapping(tokens: int) -> int:
    """slot_mapping: read positions and one table entry per token; write one int32 slot each."""
    return 3 * 4 * tokens


def bytes_quantize(tokens: int, heads: int, head_dim: int, elem: int) -> int:
    """quantize (int8): read x; write int8 codes and one fp16 scale per (token, head)."""
    return tokens * heads * head_dim * elem + tokens * heads * (head_dim + 2)


def bytes_dequantize(tokens: int, heads: int, head_dim: int) -> int:
    """dequantize (int8): read codes and fp16 scales; write float32."""
    return tokens * heads * (head_dim + 2) + tokens * heads * head_dim * 4


def bytes_write_kv_quant(tokens: int, heads: int, head_dim: int, elem: int) -> int:
    """write_kv_quant (int8): read k, v and the slots; write codes + fp16 scales for K and V."""
    return 2 * tokens * heads * head_dim * elem + 4 * tokens + 2 * tokens * heads * (head_dim + 2)


def bytes_gather_kv_quant(context_lens: list[int], block_size: int, heads: int,
                          head_dim: int) -> int:
    """gather_kv_quant (int8): read table entries, lengths, codes + scales of every cached token;
    write float32 K and V."""
    rows = sum(context_lens)
    table = 4 * sum(-(-n // block_size) for n in context_lens)
    return (table + 4 * len(context_lens) + 2 * rows * heads * (head_dim + 2)
            + 2 * rows * heads * head_dim * 4)


def bytes_apply_rope(tokens: int, heads: int, head_dim: int, elem: int,
                     rotary_dim: int | None = None) -> int:
    """apply_rope: read x and the positions, one cos and one sin row (rotary_dim/2 float32 each)
    per token; write x rotated."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    x = tokens * heads * head_dim * elem
    return x + 4 * tokens + tokens * rotary_dim * 4 + x


def bytes_paged_decode(num_seqs: int, context_len: int, block_size: int, num_q_heads: int,
                       num_kv_heads: int, head_dim: int, q_elem: int = 2,
                       kv_dtype: str | None = None) -> int:
    """paged_decode_attention, one query row per sequence: read q, every cached K and V element
    (fp16 2 B; int8 1 B + one fp16 scale per (token, kv head)), the table entries in use, the
    lengths and query_start; write float32 out."""
    q = num_seqs * num_q_heads * head_dim * q_elem
    per_token = num_kv_heads * (head_dim + 2) if kv_dtype else num_kv_heads * head_dim * 2
    kv = 2 * num_seqs * context_len * per_token
    index = 4 * num_seqs * -(-context_len // block_size) + 4 * num_seqs + 4 * (num_seqs + 1)
    return q + kv + index + num_seqs * num_q_heads * head_dim * 4


def bytes_sdpa(num_seqs: int, context_len: int, num_q_heads: int, num_kv_heads: int,
               head_dim: int, elem: int = 2) -> int:
    """torch SDPA on contiguous K/V ``[B, Hkv, L, D]``: read q, K, V; write out (q's dtype)."""
    q = num_seqs * num_q_heads * head_dim * elem
    return 2 * q + 2 * num_seqs * context_len * num_kv_heads * head_dim * elem


def bytes_gather_then_sdpa(num_seqs: int, context_len: int, block_size: int, num_q_heads: int,
                           num_kv_heads: int, head_dim: int, elem: int = 2) -> int:
    """gather-then-SDPA: the gather (table entries + whole blocks of K and V read, the gathered
    copy written) plus SDPA on that copy."""
    blocks = -(-context_len // block_size)
    gathered = 2 * num_seqs * blocks * block_size * num_kv_heads * head_dim * elem
    return (4 * num_seqs * blocks + 2 * gathered
            + bytes_sdpa(num_seqs, context_len, num_q_heads, num_kv_heads, head_dim, elem))
