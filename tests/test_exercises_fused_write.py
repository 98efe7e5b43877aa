"""Wrong answers the 04 (fused write) checkers must reject (gathered by tests/test_exercises.py)."""
import math

import numpy as np


def _split(qkv, hq, hkv, d):
    heads = qkv.reshape(len(qkv), hq + 2 * hkv, d)
    return heads[:, :hq], heads[:, hq:hq + hkv], heads[:, hq + hkv:]


# --- 04.split_and_norm ---

def norm_over_the_whole_row(qkv, q_norm_w, k_norm_w, num_q_heads, num_kv_heads, head_dim, eps):
    """One RMS for the token's whole packed row instead of one per head."""
    rms = np.sqrt((qkv * qkv).mean(axis=-1) + eps)[:, None, None]
    q, k, v = _split(qkv, num_q_heads, num_kv_heads, head_dim)
    return q_norm_w * q / rms, k_norm_w * k / rms, v


def eps_outside_the_root(qkv, q_norm_w, k_norm_w, num_q_heads, num_kv_heads, head_dim, eps):
    """x / (sqrt(mean(x*x)) + eps): fine for tiny eps and big x, not in general."""
    q, k, v = _split(qkv, num_q_heads, num_kv_heads, head_dim)
    norm = lambda x, w: w * x / (np.sqrt((x * x).mean(-1, keepdims=True)) + eps)  # noqa: E731
    return norm(q, q_norm_w), norm(k, k_norm_w), v


def v_heads_before_k_heads(qkv, q_norm_w, k_norm_w, num_q_heads, num_kv_heads, head_dim,
                                   eps):
    """Reads the row as V heads before K heads (the order is Q, K, V)."""
    heads = qkv.reshape(len(qkv), num_q_heads + 2 * num_kv_heads, head_dim)
    q = heads[:, :num_q_heads]
    v = heads[:, num_q_heads:num_q_heads + num_kv_heads]
    k = heads[:, num_q_heads + num_kv_heads:]
    norm = lambda x, w: w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)  # noqa: E731
    return norm(q, q_norm_w), norm(k, k_norm_w), v


# --- 04.fused_write_loop ---

def _loop(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, hq, hkv, d, *,
          position=lambda pos_offset, t: pos_offset + t, interleaved=False, rotate_v=False,
          slot_is_position=False):
    block_size = k_pool.shape[1]
    q_out = np.empty((len(qkv), hq, d), qkv.dtype)
    for t, row in enumerate(qkv):
        heads = row.reshape(hq + 2 * hkv, d).copy()
        pos = position(pos_offset, t)
        c, s = cos[pos], sin[pos]
        last = hq + 2 * hkv if rotate_v else hq + hkv
        if interleaved:
            a, b = heads[:last, 0::2].copy(), heads[:last, 1::2].copy()
            heads[:last, 0::2], heads[:last, 1::2] = a * c - b * s, b * c + a * s
        else:
            a, b = heads[:last, :d // 2].copy(), heads[:last, d // 2:].copy()
            heads[:last] = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
        if slot_is_position:
            block, offset = pos // block_size, pos % block_size
        else:
            block, offset = block_table[pos // block_size], pos % block_size
        q_out[t] = heads[:hq]
        k_pool[block, offset] = heads[hq:hq + hkv]
        v_pool[block, offset] = heads[hq + hkv:]
    return q_out


def forgets_pos_offset(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads,
                       num_kv_heads, head_dim):
    """Token t at position t: as if the cache were empty."""
    return _loop(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads,
                 num_kv_heads, head_dim, position=lambda pos_offset, t: t)


def slot_is_position(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads,
                     num_kv_heads, head_dim):
    """Stores at block pos // block_size of the pool, not the block the table names."""
    return _loop(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads,
                 num_kv_heads, head_dim, slot_is_position=True)


def rotates_v_too(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads,
                  num_kv_heads, head_dim):
    """Turns V as well: V carries content, not position, and is never rotated."""
    return _loop(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads,
                 num_kv_heads, head_dim, rotate_v=True)


def interleaved_pairs(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads,
                      num_kv_heads, head_dim):
    """GPT-J's pairs (2i, 2i + 1) where qk_mode 2 means rotate-half (i, i + D/2)."""
    return _loop(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, num_q_heads,
                 num_kv_heads, head_dim, interleaved=True)


# --- 04.fused_write_kernel ---
from kvlab.backends import cuda_mode  # noqa: E402

cuda_mode()  # the simulator, decided before numba is imported
from numba import cuda, float32  # noqa: E402


def _fused_kernel(*, own_position=True, use_table=True, turn_v=False, interleaved=False):
    """The solution with one thing changed, as a kernel (each wrong answer below sets one)."""
    @cuda.jit
    def kernel(qkv, cos, sin, block_table, pos_offset, q_out, k_pool, v_pool):
        token = cuda.blockIdx.x
        hq, d, hkv = q_out.shape[1], q_out.shape[2], k_pool.shape[2]
        half = d // 2
        head = cuda.threadIdx.x // half
        p = cuda.threadIdx.x % half
        first, second = (2 * p, 2 * p + 1) if interleaved else (p, p + half)
        a = float32(qkv[token, head * d + first])
        b = float32(qkv[token, head * d + second])
        pos = pos_offset + token if own_position else token
        bs = k_pool.shape[1]
        block = block_table[pos // bs] if use_table else pos // bs
        if head < hq + hkv or turn_v:
            c, s = cos[pos, p], sin[pos, p]
            a, b = a * c - b * s, b * c + a * s
        if head < hq:
            q_out[token, head, first], q_out[token, head, second] = a, b
        elif head < hq + hkv:
            k_pool[block, pos % bs, head - hq, first] = a
            k_pool[block, pos % bs, head - hq, second] = b
        else:
            v_pool[block, pos % bs, head - hq - hkv, first] = a
            v_pool[block, pos % bs, head - hq - hkv, second] = b
    return kernel


@cuda.jit
def kernel_recomputes_the_angles(qkv, cos, sin, block_table, pos_offset, q_out, k_pool, v_pool):
    """theta 10,000 built in: wrong for any other base (or a scaled table, such as Llama 3.1's)."""
    token = cuda.blockIdx.x
    hq, d, hkv = q_out.shape[1], q_out.shape[2], k_pool.shape[2]
    half = d // 2
    head, p = cuda.threadIdx.x // half, cuda.threadIdx.x % half
    a = float32(qkv[token, head * d + p])
    b = float32(qkv[token, head * d + p + half])
    pos = pos_offset + token
    block, offset = block_table[pos // k_pool.shape[1]], pos % k_pool.shape[1]
    if head >= hq + hkv:
        v_pool[block, offset, head - hq - hkv, p] = a
        v_pool[block, offset, head - hq - hkv, p + half] = b
        return
    angle = pos * math.pow(10000.0, -2.0 * p / d)
    c, s = float32(math.cos(angle)), float32(math.sin(angle))
    if head < hq:
        q_out[token, head, p], q_out[token, head, p + half] = a * c - b * s, b * c + a * s
    else:
        k_pool[block, offset, head - hq, p] = a * c - b * s
        k_pool[block, offset, head - hq, p + half] = b * c + a * s


kernel_forgets_pos_offset = _fused_kernel(own_position=False)    # token t at position t
kernel_slot_is_position = _fused_kernel(use_table=False)         # pool block pos // block_size
kernel_turns_v_too = _fused_kernel(turn_v=True)                  # V rotated as well
kernel_interleaved_pairs = _fused_kernel(interleaved=True)       # GPT-J's (2p, 2p + 1)


# --- 04.unfused_bytes ---

def forgets_the_angle_tables(num_q_heads, num_kv_heads, head_dim):
    """Counts the heads and indices but not the cos/sin rows RoPE reads."""
    q, kv = num_q_heads * head_dim * 2, num_kv_heads * head_dim * 2
    return q + kv + 4 + 2 * kv + 4, q + kv + 4 + 2 * kv


def counts_elements_not_bytes(num_q_heads, num_kv_heads, head_dim):
    """Numbers of values, not bytes (fp16 is 2 bytes, float32 and int32 are 4)."""
    q, kv = num_q_heads * head_dim, num_kv_heads * head_dim
    return q + head_dim + kv + head_dim + 1 + 2 * kv + 1, q + kv + 1 + 2 * kv


WRONG_ANSWERS = {
    "04.split_and_norm": [norm_over_the_whole_row, eps_outside_the_root,
                          v_heads_before_k_heads],
    "04.fused_write_loop": [forgets_pos_offset, slot_is_position, rotates_v_too,
                            interleaved_pairs],
    "04.unfused_bytes": [forgets_the_angle_tables, counts_elements_not_bytes],
    "04.fused_write_kernel": [kernel_forgets_pos_offset, kernel_slot_is_position,
                              kernel_turns_v_too, kernel_interleaved_pairs,
                              kernel_recomputes_the_angles],
}


# --- 04.fused_write_torch ---
import torch  # noqa: E402


def _write_torch(qkv, cos, sin, k_pool, v_pool, block_tables, query_start, pos_offsets,
                 num_q_heads, num_kv_heads, *, own_positions=True, use_table=True,
                 float32=True, float64=False, in_place=True):
    """The solution with one step changed (each wrong answer below switches one off)."""
    num_tokens, block_size, head_dim = qkv.shape[0], k_pool.shape[1], k_pool.shape[3]
    starts = query_start.long()
    seq = torch.repeat_interleave(torch.arange(len(starts) - 1), starts[1:] - starts[:-1])
    rows = torch.arange(num_tokens) - (starts[seq] if own_positions else 0)
    positions = pos_offsets.long()[seq] + rows
    block = block_tables.long()[seq, positions // block_size] if use_table else (
        positions // block_size)
    slots = block * block_size + positions % block_size
    heads = qkv.view(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim)
    qk = heads[:, :num_q_heads + num_kv_heads]
    qk, c, s = (qk.float(), cos[positions], sin[positions]) if float32 else (
        qk, cos[positions].half(), sin[positions].half())
    if float64:
        qk, c, s = qk.double(), c.double(), s.double()
    a, b = qk[..., :head_dim // 2], qk[..., head_dim // 2:]
    c, s = c[:, None], s[:, None]
    rotated = torch.cat([a * c - b * s, b * c + a * s], dim=-1).half()
    k_rows, v_rows = (pool.view(-1, num_kv_heads, head_dim) for pool in (k_pool, v_pool))
    if in_place:
        k_rows[slots], v_rows[slots] = rotated[:, num_q_heads:], heads[:, num_q_heads
                                                                       + num_kv_heads:]
    else:  # torch.index_copy returns a new tensor: the pools never change
        torch.index_copy(k_rows, 0, slots, rotated[:, num_q_heads:])
        torch.index_copy(v_rows, 0, slots, heads[:, num_q_heads + num_kv_heads:].contiguous())
    return rotated[:, :num_q_heads]


def row_index_as_position(**kwargs):
    """Row t of the batch at position pos_offsets[seq] + t: right for the first sequence only."""
    return _write_torch(**kwargs, own_positions=False)


def turns_in_fp16(**kwargs):
    """Multiplies fp16 by fp16: every product is rounded, not only the result."""
    return _write_torch(**kwargs, float32=False)


def index_copy_out_of_place(**kwargs):
    """torch.index_copy (no underscore) returns a new tensor: the cache never changes."""
    return _write_torch(**kwargs, in_place=False)


def turns_in_float64(**kwargs):
    """float64 arithmetic, then fp16: a value in ten thousand rounds the other way."""
    return _write_torch(**kwargs, float64=True)


def returns_float32(**kwargs):
    """q_out left in float32: the cache's dtype is fp16, and so is q_out."""
    return _write_torch(**kwargs).float()


def write_ignores_the_block_table(**kwargs):
    """Block pos // block_size of the pool, not the block the sequence's table names."""
    return _write_torch(**kwargs, use_table=False)


WRONG_ANSWERS["04.fused_write_torch"] = [row_index_as_position, turns_in_fp16, turns_in_float64,
                                         returns_float32, index_copy_out_of_place,
                                         write_ignores_the_block_table]


def test_the_torch_write_checker_walks_the_tokens(monkeypatch, capsys):
    from kvlab.exercises import SOLUTIONS_ENV, check

    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)  # check the wrong answer, not the solution
    check("04.fused_write_torch", turns_in_fp16)
    out = capsys.readouterr().out
    assert "0: sequence 0, position 5 -> block_tables[0][1] = 1, offset 1 -> slot 5:" in out, out
    assert "Every difference is a few fp16 steps at most" in out
    check("04.fused_write_torch", row_index_as_position)
    out = capsys.readouterr().out
    assert "1: sequence 1, position 0 -> block_tables[1][0] = 0, offset 0 -> slot 0: q: " in out
    assert "k: not written" in out and "Slots [28] changed, though no token" in out, out
    check("04.fused_write_torch", index_copy_out_of_place)
    out = capsys.readouterr().out
    assert "k: not written, v: not written" in out and "fp16 steps" not in out, out
    check("04.fused_write_torch", turns_in_float64)  # caught by the large case alone
    out = capsys.readouterr().out
    assert "fails on case 'random, large: 384 tokens" in out and "tokens off; the first" in out
    assert "not fp16, bf16 or float64" in out
    check("04.fused_write_torch", returns_float32)
    out = capsys.readouterr().out
    assert "  q_out should be float16, got torch.float32" in out, out
    assert "your function raised" not in out


def test_the_kernel_checker_names_the_wrong_rows_and_draws_them(monkeypatch, capsys):
    from kvlab.exercises import SOLUTIONS_ENV, check

    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)  # check the wrong answer, not the solution
    check("04.fused_write_kernel", kernel_turns_v_too)
    out = capsys.readouterr().out
    assert "fails on case '3 tokens after 2 cached" in out, out    # position 0 turns nothing
    assert "v_pool differs at slot 0, head 0: dims 0-6; slot 22, head 0" in out, out
    assert "q_out differs" not in out and "k_pool differs" not in out
    check("04.fused_write_kernel", kernel_slot_is_position)
    out = capsys.readouterr().out
    assert "k_pool differs at slot 0, head 0" in out and "q_out differs" not in out, out


def test_a_racing_kernel_and_a_kernel_with_the_wrong_parameter_order_are_told_so(monkeypatch,
                                                                                  capsys):
    from kvlab.exercises import SOLUTIONS_ENV, check

    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)

    @cuda.jit
    def zeroes_the_next_pair_first(qkv, cos, sin, block_table, pos_offset, q_out, k_pool, v_pool):
        token, half = cuda.blockIdx.x, q_out.shape[2] // 2
        head, p = cuda.threadIdx.x // half, cuda.threadIdx.x % half
        if head < q_out.shape[1]:
            if p + 1 < half:
                q_out[token, head, p + 1] = 0  # another thread's element: a race on a GPU
            pos = pos_offset + token
            a = float32(qkv[token, head * q_out.shape[2] + p])
            b = float32(qkv[token, head * q_out.shape[2] + p + half])
            q_out[token, head, p] = a * cos[pos, p] - b * sin[pos, p]
            q_out[token, head, p + half] = b * cos[pos, p] + a * sin[pos, p]

    check("04.fused_write_kernel", zeroes_the_next_pair_first)
    out = capsys.readouterr().out
    assert "the tracer refuses your kernel (WriteRaceError): thread 0 of block (0, 0, 0) and " \
        "thread 1 of block (0, 0, 0) both wrote q_out[0, 0, 1], different values (0.0 and " in out
    assert "your kernel raised" not in out

    @cuda.jit
    def loop_order(qkv, cos, sin, k_pool, v_pool, block_table, pos_offset, q_out):
        pass

    check("04.fused_write_kernel", loop_order)
    out = capsys.readouterr().out
    assert "Your kernel's parameters are (qkv, cos, sin, k_pool, v_pool, block_table, " \
        "pos_offset, q_out); the launch passes (qkv, cos, sin, block_table, pos_offset, q_out, " \
        "k_pool, v_pool), in that order, by position." in out, out
