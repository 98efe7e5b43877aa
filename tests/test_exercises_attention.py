"""Wrong answers the 05 (attention) checkers must reject (gathered by tests/test_exercises.py)."""
import numpy as np


# --- 05.online_softmax_update ---

def forgets_to_rescale_acc(m, l, acc, scores, values):
    """Rescales the sum but not the output accumulator when the max moves."""
    m_new = max(m, float(scores.max()))
    p = np.exp(scores - m_new)
    return m_new, l * np.exp(m - m_new) + p.sum(), acc + p @ values


def rescales_the_wrong_way(m, l, acc, scores, values):
    """exp(m' - m) instead of exp(m - m'): grows what it should shrink."""
    m_new = max(m, float(scores.max()))
    c = np.exp(m_new - m) if np.isfinite(m) else 0.0
    p = np.exp(scores - m_new)
    return m_new, l * c + p.sum(), acc * c + p @ values


def no_max_subtracted(m, l, acc, scores, values):
    """Plain exp(score): the right answer until a score passes ~88, then inf."""
    with np.errstate(over="ignore"):
        p = np.exp(scores)
    return max(m, float(scores.max())), l + p.sum(), acc + p @ values


def keeps_the_tile_max(m, l, acc, scores, values):
    """Takes this tile's max as the new m even when an earlier tile's was larger."""
    m_new = float(scores.max())
    c = np.exp(m - m_new)
    p = np.exp(scores - m_new)
    return m_new, l * c + p.sum(), acc * c + p @ values


# --- 05.merge_partials ---

def plain_average(lse, out):
    """Every partition counted alike, whatever its share of the softmax."""
    return out.mean(axis=0)


def exp_without_the_max(lse, out):
    """exp(lse) as it is: overflows to inf (then NaN) for large lse."""
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.exp(lse)
        return (w @ out) / w.sum()


def weights_not_normalized(lse, out):
    """exp(lse - max) without dividing by their sum."""
    return np.exp(lse - lse.max()) @ out


# --- 05.visible_range ---

def excludes_itself(context_len, num_tokens, token, sliding_window):
    """stop = p: a token that cannot see its own key."""
    p = context_len - num_tokens + token
    return (max(0, p - sliding_window) if sliding_window else 0), p


def every_token_at_the_end(context_len, num_tokens, token, sliding_window):
    """Every token of the step placed at the last position: sees its later neighbours."""
    p = context_len - 1
    return (max(0, p + 1 - sliding_window) if sliding_window else 0), p + 1


def window_one_too_wide(context_len, num_tokens, token, sliding_window):
    """start = p - W: W + 1 positions in the window."""
    p = context_len - num_tokens + token
    return (max(0, p - sliding_window) if sliding_window else 0), p + 1


WRONG_ANSWERS = {
    "05.online_softmax_update": [forgets_to_rescale_acc, rescales_the_wrong_way, no_max_subtracted,
                                 keeps_the_tile_max],
    "05.merge_partials": [plain_average, exp_without_the_max, weights_not_normalized],
    "05.visible_range": [excludes_itself, every_token_at_the_end, window_one_too_wide],
}


# --- 05.decode_kernel ---
import math  # noqa: E402

from numba import cuda  # noqa: E402

MAX_KEYS = 16


@cuda.jit
def decode_ignores_the_block_table(q, k_pool, v_pool, block_table, context_len, scale, out):
    """Reads key t from pool block t // block_size: right only for a table 0, 1, 2, ..."""
    head, t = cuda.blockIdx.x, cuda.threadIdx.x
    kv_head = head // (q.shape[0] // k_pool.shape[2])
    bs, head_dim = k_pool.shape[1], q.shape[1]
    p = cuda.shared.array(MAX_KEYS, np.float32)
    if t < context_len:
        s = np.float32(0)
        for d in range(head_dim):
            s += q[head, d] * k_pool[t // bs, t % bs, kv_head, d]
        p[t] = s * scale
    cuda.syncthreads()
    if t == 0:
        m = p[0]
        for j in range(1, context_len):
            m = max(m, p[j])
        total = np.float32(0)
        for j in range(context_len):
            p[j] = math.exp(p[j] - m)
            total += p[j]
        for j in range(context_len):
            p[j] /= total
    cuda.syncthreads()
    for d in range(t, head_dim, cuda.blockDim.x):
        acc = np.float32(0)
        for j in range(context_len):
            acc += p[j] * v_pool[j // bs, j % bs, kv_head, d]
        out[head, d] = acc


@cuda.jit
def decode_interleaves_the_gqa_groups(q, k_pool, v_pool, block_table, context_len, scale, out):
    """kv_head = head % Hkv: query heads 0 and 1 should share K/V head 0, not split over 0 and 1."""
    head, t = cuda.blockIdx.x, cuda.threadIdx.x
    kv_head = head % k_pool.shape[2]
    bs, head_dim = k_pool.shape[1], q.shape[1]
    p = cuda.shared.array(MAX_KEYS, np.float32)
    if t < context_len:
        s = np.float32(0)
        for d in range(head_dim):
            s += q[head, d] * k_pool[block_table[t // bs], t % bs, kv_head, d]
        p[t] = s * scale
    cuda.syncthreads()
    if t == 0:
        m = p[0]
        for j in range(1, context_len):
            m = max(m, p[j])
        total = np.float32(0)
        for j in range(context_len):
            p[j] = math.exp(p[j] - m)
            total += p[j]
        for j in range(context_len):
            p[j] /= total
    cuda.syncthreads()
    for d in range(t, head_dim, cuda.blockDim.x):
        acc = np.float32(0)
        for j in range(context_len):
            acc += p[j] * v_pool[block_table[j // bs], j % bs, kv_head, d]
        out[head, d] = acc


@cuda.jit
def decode_without_the_max(q, k_pool, v_pool, block_table, context_len, scale, out):
    """exp(score) as it is: right until a score passes ~88, then it overflows."""
    head, t = cuda.blockIdx.x, cuda.threadIdx.x
    kv_head = head // (q.shape[0] // k_pool.shape[2])
    bs, head_dim = k_pool.shape[1], q.shape[1]
    p = cuda.shared.array(MAX_KEYS, np.float32)
    if t < context_len:
        s = np.float32(0)
        for d in range(head_dim):
            s += q[head, d] * k_pool[block_table[t // bs], t % bs, kv_head, d]
        p[t] = s * scale
    cuda.syncthreads()
    if t == 0:
        total = np.float32(0)
        for j in range(context_len):
            p[j] = math.exp(p[j])  # past a score of ~88 float32 overflows to inf; inf / inf is NaN
            total += p[j]
        for j in range(context_len):
            p[j] /= total
    cuda.syncthreads()
    for d in range(t, head_dim, cuda.blockDim.x):
        acc = np.float32(0)
        for j in range(context_len):
            acc += p[j] * v_pool[block_table[j // bs], j % bs, kv_head, d]
        out[head, d] = acc


@cuda.jit
def decode_without_the_second_barrier(q, k_pool, v_pool, block_table, context_len, scale, out):
    """No barrier after thread 0's softmax: the other threads may read the scores before they
    are weights (the tracer sees thread 1 read p[0] as thread 0 writes it)."""
    head, t = cuda.blockIdx.x, cuda.threadIdx.x
    kv_head = head // (q.shape[0] // k_pool.shape[2])
    bs, head_dim = k_pool.shape[1], q.shape[1]
    p = cuda.shared.array(MAX_KEYS, np.float32)
    if t < context_len:
        s = np.float32(0)
        for d in range(head_dim):
            s += q[head, d] * k_pool[block_table[t // bs], t % bs, kv_head, d]
        p[t] = s * scale
    cuda.syncthreads()
    if t == 0:
        m = p[0]
        for j in range(1, context_len):
            m = max(m, p[j])
        total = np.float32(0)
        for j in range(context_len):
            p[j] = math.exp(p[j] - m)
            total += p[j]
        for j in range(context_len):
            p[j] /= total
    for d in range(t, head_dim, cuda.blockDim.x):
        acc = np.float32(0)
        for j in range(context_len):
            acc += p[j] * v_pool[block_table[j // bs], j % bs, kv_head, d]
        out[head, d] = acc


WRONG_ANSWERS["05.decode_kernel"] = [decode_ignores_the_block_table,
                                     decode_interleaves_the_gqa_groups, decode_without_the_max,
                                     decode_without_the_second_barrier]


def test_a_missing_barrier_after_the_softmax_is_named(monkeypatch, capsys):
    from kvlab.exercises import SOLUTIONS_ENV, get

    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)
    assert get("05.decode_kernel").check(decode_without_the_second_barrier) is False
    out = capsys.readouterr().out
    assert "(SharedMemoryRaceError): in block (0, 0, 0), thread 1 read shared p[0] at line " in out
    assert "(acc += p[j] * v_pool[block_table[j // bs], j % bs, kv_head, d])" in out
    assert "and thread 0 wrote it at line " in out


# --- 05.paged_decode_torch ---
import torch  # noqa: E402


def _decode_torch(q, k_pool, v_pool, block_tables, context_lens, scale, *, mask_scores=True,
                  zero_v=True, kv_head_of=lambda h, group, hkv: h // group, use_table=True,
                  additive_mask=False):
    """The solution with one step changed (each wrong answer below switches one off)."""
    num_seqs, hq, d = q.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    j = torch.arange(int(context_lens.max()))
    visible = j < context_lens[:, None].long()
    blocks = block_tables[:, j // bs].long() if use_table else (j // bs).expand(num_seqs, -1)
    slots = torch.where(visible, blocks * bs + j % bs, 0)
    k = k_pool.view(-1, hkv, d)[slots].float()
    v = v_pool.view(-1, hkv, d)[slots].float()
    if zero_v:
        v = torch.where(visible[:, :, None, None], v, 0.0)
    heads = torch.tensor([kv_head_of(h, hq // hkv, hkv) for h in range(hq)])
    scores = torch.einsum("shd,slhd->shl", q, k[:, :, heads]) * scale
    if additive_mask:
        scores = scores + torch.where(visible, 0.0, float("-inf"))[:, None, :]
    elif mask_scores:
        scores = torch.where(visible[:, None, :], scores, float("-inf"))
    return torch.einsum("shl,slhd->shd", torch.softmax(scores, -1), v[:, :, heads])


def attends_to_the_padding(**kwargs):
    """No mask: every sequence also weighs the positions past its own length."""
    return _decode_torch(**kwargs, mask_scores=False)


def zero_weight_times_nan(**kwargs):
    """Masks the scores but not V: a masked position's 0 weight times a stale NaN is NaN."""
    return _decode_torch(**kwargs, zero_v=False)


def additive_minus_inf_mask(**kwargs):
    """Adds -inf where masked (and zeroes nothing): a stale NaN key plus -inf is still NaN."""
    return _decode_torch(**kwargs, zero_v=False, additive_mask=True)


def interleaves_the_gqa_groups(**kwargs):
    """Query head h reads K/V head h % Hkv: right only when Hkv = 1 or Hq = Hkv."""
    return _decode_torch(**kwargs, kv_head_of=lambda h, group, hkv: h % hkv)


def ignores_the_block_table(**kwargs):
    """Position j read from pool block j // block_size: right only for a table 0, 1, 2, ..."""
    return _decode_torch(**kwargs, use_table=False)


def forgets_the_scale(**kwargs):
    """Softmax of the raw dot products."""
    return _decode_torch(**{**kwargs, "scale": 1.0})


WRONG_ANSWERS["05.paged_decode_torch"] = [attends_to_the_padding, zero_weight_times_nan,
                                          additive_minus_inf_mask, interleaves_the_gqa_groups,
                                          ignores_the_block_table, forgets_the_scale]


def test_the_torch_decode_checker_walks_the_sequences_and_names_the_nan(monkeypatch, capsys):
    from kvlab.exercises import SOLUTIONS_ENV, check

    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)  # check the wrong answer, not the solution
    check("05.paged_decode_torch", zero_weight_times_nan)
    out = capsys.readouterr().out
    assert "1: 2 positions in blocks [3] -> NaN in yours" in out
    assert "a weight of 0 times a stale NaN in V is NaN" in out
    check("05.paged_decode_torch", attends_to_the_padding)
    out = capsys.readouterr().out
    assert "2: 1 position in blocks [3] -> largest |yours - expected| = 2.3" in out
    assert "NaN" not in out.split("sequence by sequence")[1]
