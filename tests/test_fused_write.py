"""Stage 4 (fused write) NumPy reference: the pieces by hand, the composition against Hugging
Face's Qwen3 attention pre-processing, and the bytes-moved accounting.

Tolerances against Hugging Face (transformers' Qwen3RMSNorm + apply_rotary_pos_emb, same weights,
same cos/sin rows):

| run | bound | why |
|---|---|---|
| float32 model | ``4e-6 * (max|x| + 1)`` abs per element (measured max 9.5e-7) | HF sums squares with torch's ``mean`` (another order), uses ``rsqrt`` and rotates with ``q*cos + rotate_half(q)*sin``: a few float32 roundings apart |
| float16 model | 2 float16 ulps of ``|a| + |b|`` for a rotated pair (a, b) (measured max 1.0, mean 0.15) | HF rounds to fp16 after the weight, and after each of ``q*cos``, ``rotate_half(q)*sin`` and their sum, with fp16 cos/sin; kvlab rounds once at the end from float32 |
"""
import numpy as np
import pytest

from kvlab.ref.fused_write import (
    paged_write, rms_norm_heads, split_qkv, split_qkv_norm_rope, tree_sum_of_squares,
    write_traffic,
)
from kvlab.ref.rope import rope_tables


def test_split_qkv_takes_q_then_k_then_v():
    qkv = np.arange(2 * (4 + 2 * 2) * 3, dtype=np.float32).reshape(2, -1)  # Hq 4, Hkv 2, D 3
    q, k, v = split_qkv(qkv, 4, 2, 3)
    assert q.shape == (2, 4, 3) and k.shape == v.shape == (2, 2, 3)
    assert q[1, 0, 0] == 24 and k[0, 0, 0] == 12 and v[0, 1, 2] == 23
    with pytest.raises(ValueError, match=r"qkv must have shape .* = \[2, 24\]"):
        split_qkv(np.zeros((2, 21), np.float32), 4, 2, 3)


def test_tree_sum_is_the_tree_order():
    x = np.array([[1e8, 1.0, -1e8, 1.0, 3.0]], np.float32)  # pads to 8: (1e16+1e16+9) + (1+1)
    s = x * x
    want = ((s[0, 0] + s[0, 4]) + s[0, 2]) + (s[0, 1] + s[0, 3])
    assert tree_sum_of_squares(x)[0] == want
    assert tree_sum_of_squares(np.ones((2, 3, 64), np.float32)).tolist() == [[64.0] * 3] * 2


def test_rms_norm_heads_by_hand():
    x = np.array([[[3.0, 4.0]], [[0.0, 0.0]]], np.float32)  # rms 5/sqrt(2); zeros stay zeros
    y = rms_norm_heads(x, np.array([1.0, 2.0], np.float32), eps=1e-6)
    np.testing.assert_allclose(y[0, 0], [3 / 5 * np.sqrt(2), 2 * 4 / 5 * np.sqrt(2)], rtol=1e-6)
    assert y.dtype == np.float32 and not y[1].any()  # eps keeps an all-zero head finite


def test_mode_0_copies_and_v_is_never_touched():
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((3, (2 + 2) * 8)).astype(np.float16)
    cos, sin = rope_tables(8, 8, 10000.0)
    positions = np.arange(3, dtype=np.int32)
    w = np.full(8, 3.0, np.float32)
    q0, k0, v0 = split_qkv(qkv, 2, 1, 8)
    for mode in range(4):
        q, k, v = split_qkv_norm_rope(qkv, w, w, cos, sin, positions, 2, 1, 8, 1e-6, mode)
        assert v.tobytes() == v0.tobytes()
        assert (q.tobytes() == q0.tobytes()) == (mode == 0)


# --- against Hugging Face's Qwen3 ------------------------------------------------------------

def hf_qwen3_preprocess(torch, modeling, config, qkv, q_w, k_w, positions, dtype):
    """What Qwen3Attention.forward does between the projections and the cache update."""
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    x = torch.from_numpy(qkv).to(dtype)[None]  # [1, T, width]
    q, k, _ = x.split([hq * d, hkv * d, hkv * d], dim=-1)
    q_norm = modeling.Qwen3RMSNorm(d, eps=config.rms_norm_eps).to(dtype)
    k_norm = modeling.Qwen3RMSNorm(d, eps=config.rms_norm_eps).to(dtype)
    q_norm.weight.data = torch.from_numpy(q_w).to(dtype)
    k_norm.weight.data = torch.from_numpy(k_w).to(dtype)
    q = q_norm(q.view(1, -1, hq, d)).transpose(1, 2)  # [1, H, T, D], as HF lays them out
    k = k_norm(k.view(1, -1, hkv, d)).transpose(1, 2)
    rotary = modeling.Qwen3RotaryEmbedding(config)
    cos, sin = rotary(x, torch.from_numpy(positions.astype(np.int64))[None])
    q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    return (q[0].transpose(0, 1).float().numpy(), k[0].transpose(0, 1).float().numpy(),
            cos[0].float().numpy(), sin[0].float().numpy())


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_matches_hugging_face_qwen3(dtype_name):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import Qwen3Config
    from transformers.models.qwen3 import modeling_qwen3 as modeling

    hq, hkv, d, tokens, pos_offset = 8, 2, 128, 6, 37
    config = Qwen3Config(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv,
                         head_dim=d, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=256)
    dtype = getattr(torch, dtype_name)
    rng = np.random.default_rng(6)
    qkv = (2 * rng.standard_normal((tokens, (hq + 2 * hkv) * d))).astype(dtype_name)
    q_w = (1 + 0.3 * rng.standard_normal(d)).astype(dtype_name)  # HF's weights: the model dtype
    k_w = (1 + 0.3 * rng.standard_normal(d)).astype(dtype_name)
    positions = np.arange(pos_offset, pos_offset + tokens, dtype=np.int32)
    with torch.no_grad():
        hf_q, hf_k, hf_cos, hf_sin = hf_qwen3_preprocess(torch, modeling, config, qkv, q_w, k_w,
                                                         positions, dtype)
    # kvlab's tables agree with HF's float32 ones; feed HF's own rows so only the ops differ.
    cos, sin = rope_tables(256, d, 1000000.0)
    if dtype_name == "float32":
        np.testing.assert_allclose(cos[positions], hf_cos[:, :d // 2], atol=2e-5)
    table_cos = np.zeros((256, d // 2), np.float32)
    table_sin = np.zeros((256, d // 2), np.float32)
    table_cos[positions], table_sin[positions] = hf_cos[:, :d // 2], hf_sin[:, :d // 2]

    k_pool = np.zeros((2, 32, hkv, d), dtype_name)
    v_pool = np.zeros_like(k_pool)
    q = paged_write(qkv, q_w, k_w, table_cos, table_sin, k_pool, v_pool,
                    np.array([1, 0], np.int32), pos_offset, hq, hkv, 1e-6, 1)
    k = k_pool[0, 5:5 + tokens]  # positions 37.. live in block 0 (table entry 1 is block 0)
    for ours, theirs in ((q, hf_q), (k, hf_k)):
        ours = ours.astype(np.float64)
        if dtype_name == "float32":
            err = np.abs(ours - theirs).max()
            print(f"float32: max |kvlab - HF| = {err:.2e}")
            assert err <= 4e-6 * (np.abs(theirs).max() + 1)
        else:
            # a rotated value is a sum of two products, so its error is relative to the pair's
            # size, not to the (possibly cancelled, tiny) result: ulps of |a| + |b|
            pair = np.abs(theirs[..., :d // 2]) + np.abs(theirs[..., d // 2:])
            size = np.concatenate([pair, pair], axis=-1).astype(np.float16)
            ulps = np.abs(ours - theirs) / np.spacing(size).astype(np.float64)
            print(f"float16: max error {ulps.max():.2f} ulp of |a|+|b|, mean {ulps.mean():.3f}")
            assert ulps.max() <= 2, ulps.max()
    v = qkv.reshape(tokens, -1, d)[:, hq + hkv:]
    assert v_pool[0, 5:5 + tokens].tobytes() == v.tobytes()  # V untouched, bit for bit


# --- bytes moved --------------------------------------------------------------------------

def test_traffic_counts_by_hand():
    t = write_traffic(10, 4, 2, 8, qk_mode=1, dtype="float16")
    q, kv = 10 * 4 * 8 * 2, 10 * 2 * 8 * 2
    assert t["q_norm"] == {"read": q + 32, "write": q}
    assert t["cache_write"] == {"read": 2 * kv + 40, "write": 2 * kv}
    assert t["fused"] == {"read": q + 2 * kv + 64 + 10 * 8 * 4 + 40, "write": q + 2 * kv}
    assert t["unfused"]["read"] > t["fused"]["read"]
    int8 = write_traffic(10, 4, 2, 8, kv_dtype="int8")
    assert int8["fused"]["write"] == q + 2 * (10 * 2 * (8 + 2))
    assert set(write_traffic(1, 1, 1, 8, qk_mode=0)) == {"copy_q", "slot_mapping", "cache_write",
                                                         "unfused", "fused"}
