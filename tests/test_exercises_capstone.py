"""Wrong answers the 06 (capstone) checkers must reject (gathered by tests/test_exercises.py)."""
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


WRONG_ANSWERS = {
    "06.paged_bytes": [bytes_of_the_tokens_only, bytes_without_scales, bytes_of_k_only],
    "06.prefix_hit": [longest_common_prefix, reuses_the_last_token, blocks_matched_anywhere],
}
