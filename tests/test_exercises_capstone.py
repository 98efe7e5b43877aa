"""Wrong answers the 06 (capstone) checkers must reject (gathered by tests/test_exercises.py)."""
import numpy as np

from kvlab.dtypes import get_dtype


def bytes_of_the_tokens_only(num_tokens, num_layers, num_kv_heads, head_dim, block_size,
                             kv_dtype):
    """Counts the tokens, not the whole blocks they occupy."""
    per_head = get_dtype(kv_dtype).bytes_per_vector(head_dim)
    return 2 * num_layers * num_tokens * num_kv_heads * per_head


def bytes_without_scales(num_tokens, num_layers, num_kv_heads, head_dim, block_size, kv_dtype):
    """Forgets the fp16 scale each (token, head) of an int8/fp8 cache keeps."""
    blocks = -(-num_tokens // block_size)
    return int(2 * num_layers * blocks * block_size * num_kv_heads * head_dim
               * get_dtype(kv_dtype).bytes_per_elem)


def bytes_of_k_only(num_tokens, num_layers, num_kv_heads, head_dim, block_size, kv_dtype):
    """Forgets V."""
    blocks = -(-num_tokens // block_size)
    return num_layers * blocks * block_size * num_kv_heads * get_dtype(kv_dtype).bytes_per_vector(
        head_dim)


def longest_common_prefix(prompt, earlier_prompts, block_size):
    """Reuses partial blocks: every matching token, not whole blocks."""
    best = 0
    for earlier in earlier_prompts:
        n = 0
        while n < min(len(prompt) - 1, len(earlier)) and prompt[n] == earlier[n]:
            n += 1
        best = max(best, n)
    return best


def reuses_the_last_token(prompt, earlier_prompts, block_size):
    """Forgets that the prompt's last token must be computed (its logits pick the next token)."""
    best = 0
    for earlier in earlier_prompts:
        n = 0
        while n < min(len(prompt), len(earlier) // block_size * block_size) and \
                prompt[n] == earlier[n]:
            n += 1
        best = max(best, n // block_size * block_size)
    return best


def blocks_matched_anywhere(prompt, earlier_prompts, block_size):
    """Counts every block equal to the earlier prompt's block at the same place, even after a
    mismatch: a block's K/V depend on every token before it (RoPE positions, attention)."""
    best = 0
    for earlier in earlier_prompts:
        full = min(len(earlier), len(prompt) - 1) // block_size
        same = sum(prompt[i * block_size:(i + 1) * block_size] ==
                   earlier[i * block_size:(i + 1) * block_size] for i in range(full))
        best = max(best, same * block_size)
    return best


def slots_after_the_context(block_tables, query_start, context_lens, block_size):
    """Takes context_lens as the length before the step: each sequence's new tokens land as many
    positions too far as it has new tokens."""
    slots = []
    for s in range(len(context_lens)):
        for i in range(query_start[s + 1] - query_start[s]):
            pos = context_lens[s] + i
            slots.append(block_tables[s, pos // block_size] * block_size + pos % block_size)
    return np.array(slots, np.int32)


def slots_from_the_row(block_tables, query_start, context_lens, block_size):
    """Uses a token's row in qkv as its position in the sequence."""
    slots = []
    for s in range(len(context_lens)):
        for row in range(query_start[s], query_start[s + 1]):
            slots.append(block_tables[s, row // block_size] * block_size + row % block_size)
    return np.array(slots, np.int32)


def positions_not_slots(block_tables, query_start, context_lens, block_size):
    """Forgets the block table: returns the positions themselves."""
    positions = []
    for s in range(len(context_lens)):
        new = query_start[s + 1] - query_start[s]
        positions += range(context_lens[s] - new, context_lens[s])
    return np.array(positions, np.int32)


WRONG_ANSWERS = {
    "06.paged_bytes": [bytes_of_the_tokens_only, bytes_without_scales, bytes_of_k_only],
    "06.prefix_hit": [longest_common_prefix, reuses_the_last_token, blocks_matched_anywhere],
    "06.step_slots": [slots_after_the_context, slots_from_the_row, positions_not_slots],
}
