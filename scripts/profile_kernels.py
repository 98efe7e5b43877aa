"""Launch kvlab's main CUDA kernels once each at the benchmark's real shape, for a profiler.

    ncu --profile-from-start off --kernel-name regex:'warp_attention|fused_write' \
        --section SpeedOfLight --section Occupancy --section WarpStateStats python3 scripts/profile_kernels.py

Every kernel is compiled and run once first (outside the profiled range: Numba compiles on the
first launch), then ``cuda.profile_start()`` opens the range and each kernel runs exactly once:
paged decode attention v2, v5 and v6 at 16 splits (8 x 32k cached tokens, 8 kv heads, GQA 4,
head_dim 128, fp16, the bench's ``--size real``) and the fused write at 1 and 16 tokens per block
(a 4k-token prefill, qk_mode 2). What the profiler reports — achieved occupancy, memory
throughput, why warps stall — is what notebook 05 needs to say what limits each kernel.
scripts/gpu_check.sh runs this under ncu when ncu is installed. Needs a GPU.
"""
from __future__ import annotations

import numpy as np

from kvlab.backends import get_backend
from kvlab.bench import EPS, PRESETS, THETA
from kvlab.checks import check_fused_write, check_paged_decode_attention
from kvlab.ref.fused_write import _one_sequence
from kvlab.ref.rope import rope_tables

SPLITS = 16
ATTENTION_VERSIONS = (2, 5, 6)
TOKENS_PER_BLOCK = (1, 16)


def attention_launches(be, rng: np.random.Generator, shape: dict, num_splits: int = SPLITS) -> list:
    from kvlab.kernels.cuda import attention

    b, n, h, d, bs = (shape[k] for k in ("num_seqs", "context_len", "num_kv_heads", "head_dim",
                                          "block_size"))
    per_seq = -(-n // bs)
    pool_shape = (b * per_seq, bs, h, d)
    q = be.asarray(rng.standard_normal((b, h * shape["group"], d)).astype(np.float16))
    k_pool, v_pool = (be.asarray(rng.standard_normal(pool_shape).astype(np.float16))
                      for _ in range(2))
    tables = be.asarray(rng.permutation(pool_shape[0]).astype(np.int32).reshape(b, per_seq))
    lens = be.asarray(np.full(b, n, np.int32))
    starts = be.asarray(np.arange(b + 1, dtype=np.int32))
    _, _, _, scale, window, splits = check_paged_decode_attention(
        q, k_pool, v_pool, tables, lens, starts, None, 0, None, None, num_splits)
    return [lambda v=v: attention.launch(q, k_pool, v_pool, None, None, None, tables, lens, starts,
                                         scale, window, True, splits, version=v)
            for v in ATTENTION_VERSIONS]


def fused_write_launches(be, rng: np.random.Generator, shape: dict) -> list:
    from kvlab.kernels.cuda import fused_write

    t, h, d, bs = shape["prefill"], shape["num_kv_heads"], shape["head_dim"], shape["block_size"]
    hq = h * shape["group"]
    qkv_host = rng.standard_normal((t, (hq + 2 * h) * d)).astype(np.float16)
    qkv = be.asarray(qkv_host)
    cos, sin = (be.asarray(x) for x in rope_tables(t, d, THETA))
    pool_shape = (-(-t // bs), bs, h, d)
    k_pool, v_pool = (be.asarray(np.zeros(pool_shape, np.float16)) for _ in range(2))
    table_host = rng.permutation(pool_shape[0]).astype(np.int32)
    table, starts, offsets = (be.asarray(a) for a in _one_sequence(qkv_host, table_host, 0))
    checked = check_fused_write(qkv, None, None, cos, sin, k_pool, v_pool, table, starts, offsets,
                                hq, h, EPS, 2, None, None, None)
    return [lambda n=n: fused_write.launch(qkv, None, None, cos, sin, k_pool, v_pool, None, None,
                                           table, starts, offsets, checked, EPS, 2, None, True, n)
            for n in TOKENS_PER_BLOCK]


def main() -> None:
    be = get_backend("cuda", device="gpu")
    from numba import cuda

    rng = np.random.default_rng(0)
    shape = PRESETS["real"]
    launches = attention_launches(be, rng, shape) + fused_write_launches(be, rng, shape)
    for run in launches:  # compile and warm up, outside the profiled range
        run()
    cuda.synchronize()
    cuda.profile_start()
    for run in launches:
        run()
    cuda.synchronize()
    cuda.profile_stop()
    print(f"profiled attention v{ATTENTION_VERSIONS} at {SPLITS} splits and the fused write at "
          f"{TOKENS_PER_BLOCK} tokens per block, shape {shape}")


if __name__ == "__main__":
    main()
