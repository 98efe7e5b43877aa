"""Stage 4 (fused write) on every backend against the unfused NumPy path, bad inputs on every
backend, the KvLayer methods, and the CUDA kernel at a real size on a GPU.

The unfused path is built from the earlier stages' NumPy ops: ``slot_mapping``, then
``split_qkv_norm_rope``, then ``write_kv`` (``write_kv_quant`` for int8/fp8). Tolerances:

| what | bound | why |
|---|---|---|
| q_out, fp16/fp32 cache, scales, int8/fp8 codes | bit for bit | every backend does the reference's float32 operations in its order (tree-ordered sum of squares; RoPE products through ``fmul_rn`` on a GPU, so no FMA contraction) |

The cuda backend runs in Numba's simulator here, where a barrier costs milliseconds: it gets a
subset of the cases (marked ``sim``), each a few tokens of <= 4 heads; the GPU test runs a real size.
"""
from typing import Any

import numpy as np
import pytest

from kvlab.backends import cuda_mode, get_backend
from kvlab.cache import KvLayer
from kvlab.ref.fused_write import split_qkv_norm_rope, token_positions
from kvlab.ref.paging import slot_mapping, write_kv
from kvlab.ref.quant import write_kv_quant
from kvlab.ref.rope import rope_tables

STORAGE = {None: None, "int8": np.int8, "fp8_e4m3": np.uint8}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def make_case(tokens, hq, hkv, d, pos_offset, dtype="float16", kv_dtype=None, block_size=16,
              shuffled=True, seed=0, rotary_dim=None):
    rng = np.random.default_rng(seed)
    qkv = (3 * rng.standard_normal((tokens, (hq + 2 * hkv) * d))).astype(dtype)
    q_w = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    k_w = (1 + 0.2 * rng.standard_normal(d)).astype(np.float16)
    cos, sin = rope_tables(pos_offset + tokens + 3, rotary_dim or d, 1000000.0)
    blocks = -(-(pos_offset + tokens) // block_size)
    num_blocks = blocks + 2
    ids = rng.permutation(num_blocks)[:blocks] if shuffled else np.arange(blocks)
    table = np.full(blocks + 1, -1, np.int32)
    table[:blocks] = ids
    storage = STORAGE[kv_dtype] or dtype
    pools = [np.zeros((num_blocks, block_size, hkv, d), storage) for _ in range(2)]
    scales = ([np.zeros((num_blocks, block_size, hkv), np.float16) for _ in range(2)]
              if kv_dtype else [None, None])
    return dict(qkv=qkv, q_norm_w=q_w, k_norm_w=k_w, cos=cos, sin=sin, k_pool=pools[0],
                v_pool=pools[1], block_table=table, pos_offset=pos_offset, num_q_heads=hq,
                num_kv_heads=hkv, eps=1e-6, k_scales=scales[0], v_scales=scales[1],
                kv_dtype=kv_dtype)


def unfused(case: dict, qk_mode: int) -> dict:
    """The reference answer from the earlier stages' ops, on copies of the case's pools."""
    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in case.items()}
    tokens = case["qkv"].shape[0]
    positions = np.arange(case["pos_offset"], case["pos_offset"] + tokens, dtype=np.int32)
    slots = slot_mapping(case["block_table"], positions, case["k_pool"].shape[1])
    q, k, v = split_qkv_norm_rope(case["qkv"], case["q_norm_w"], case["k_norm_w"], case["cos"],
                                  case["sin"], positions, case["num_q_heads"],
                                  case["num_kv_heads"], case["k_pool"].shape[3], case["eps"],
                                  qk_mode)
    if case["kv_dtype"]:
        write_kv_quant(k, v, out["k_pool"], out["v_pool"], out["k_scales"], out["v_scales"],
                       slots, case["kv_dtype"])
    else:
        write_kv(k, v, out["k_pool"], out["v_pool"], slots)
    out["q_out"] = q
    return out


ARRAYS = ("qkv", "q_norm_w", "k_norm_w", "cos", "sin", "k_pool", "v_pool", "block_table",
          "k_scales", "v_scales")


def run_paged_write(backend, case: dict, qk_mode: int) -> dict:
    moved = {k: (backend.asarray(v) if k in ARRAYS and v is not None else v)
             for k, v in case.items()}
    q = backend.fused_write.paged_write(qk_mode=qk_mode, **moved)
    got = {k: backend.to_numpy(moved[k]) for k in ("k_pool", "v_pool", "k_scales", "v_scales")
           if moved[k] is not None}
    got["q_out"] = backend.to_numpy(q)
    return got


def assert_fused_equals_unfused(got: dict, want: dict) -> None:
    for name, array in got.items():
        assert same_bits(array, want[name]), name


CASES = [  # id, tokens, hq, hkv, d, pos_offset, dtype, kv_dtype, sim
    ("cross-block-14+5", 5, 2, 1, 64, 14, "float16", None, True),
    ("cross-block-int8", 5, 2, 1, 64, 14, "float16", "int8", True),
    ("decode-1-fp8", 1, 4, 1, 64, 30, "float16", "fp8_e4m3", True),
    ("prefill-0-gqa4", 20, 4, 1, 64, 0, "float16", None, False),
    ("prefill-0-gqa8-int8", 40, 8, 1, 32, 0, "float16", "int8", False),
    ("mha-2-heads-fp32", 9, 2, 2, 64, 7, "float32", None, False),
    ("fp32-int8", 6, 2, 2, 64, 3, "float32", "int8", True),
    ("d128", 3, 2, 1, 128, 40, "float16", "int8", False),
    ("d256", 2, 1, 1, 256, 17, "float16", None, True),
]


@pytest.mark.parametrize("qk_mode", [0, 1, 2, 3])
@pytest.mark.parametrize("cid, tokens, hq, hkv, d, pos_offset, dtype, kv_dtype, sim", CASES,
                         ids=[c[0] for c in CASES])
def test_paged_write_equals_unfused(backend, qk_mode, cid, tokens, hq, hkv, d, pos_offset, dtype,
                                    kv_dtype, sim):
    if backend.name == "cuda" and backend.device == "simulator" and not (sim and qk_mode in (1, 3)):
        pytest.skip("simulator: a subset of cases (qk_mode 1 and 3); the GPU run takes them all")
    case = make_case(tokens, hq, hkv, d, pos_offset, dtype, kv_dtype, seed=tokens + qk_mode)
    assert_fused_equals_unfused(run_paged_write(backend, case, qk_mode), unfused(case, qk_mode))


@pytest.mark.gpu
@pytest.mark.parametrize("qk_mode", [0, 1, 2, 3])
@pytest.mark.parametrize("cid, tokens, hq, hkv, d, pos_offset, dtype, kv_dtype, sim", CASES,
                         ids=[c[0] for c in CASES])
def test_gpu_paged_write_equals_unfused_every_case(qk_mode, cid, tokens, hq, hkv, d, pos_offset,
                                                   dtype, kv_dtype, sim):
    """The whole parity table on a real GPU (the simulator runs a subset): run by -m gpu."""
    test_paged_write_equals_unfused(get_backend("cuda"), qk_mode, cid, tokens, hq, hkv, d,
                                    pos_offset, dtype, kv_dtype, sim)


@pytest.mark.parametrize("tokens_per_block, kv_dtype, qk_mode, registers", [
    (1, None, 1, False), (3, "int8", 1, False),
    # v3, heads carried in registers: RoPE-only and copied heads, float and quantized caches
    (3, None, 2, True), (1, None, 3, True), (3, None, 0, True), (3, "int8", 2, True),
    (1, "fp8_e4m3", 1, True), (3, None, 1, True)])
def test_cuda_kernel_steps(tokens_per_block, kv_dtype, qk_mode, registers):
    """The CUDA kernel's steps, bit-equal to the unfused ops: blocks that carry several tokens
    each (1 = the first version, a block per token and head; 7 tokens, 3 to a block, end in a
    partial block) and heads carried in registers (``pairs_in_registers``). (The public op's
    defaults, TOKENS_PER_BLOCK and PAIRS_IN_REGISTERS, run in every other test.)"""
    check_kernel_steps(tokens_per_block, kv_dtype, qk_mode, registers, tokens=7, hq=2, hkv=1,
                       d=32)


def check_kernel_steps(tokens_per_block, kv_dtype, qk_mode, registers, tokens, hq, hkv, d,
                       dtype="float16", version=3, rotary_dim=None, paged=True):
    """kvlab.kernels.cuda.fused_write.launch with these settings == the unfused ops."""
    from kvlab.checks import check_fused_write
    from kvlab.kernels.cuda import fused_write
    from kvlab.ref.fused_write import _one_sequence

    case = make_case(tokens, hq, hkv, d, 5, dtype=dtype, kv_dtype=kv_dtype, seed=5,
                     rotary_dim=rotary_dim, block_size=16 if paged else 1, shuffled=paged)
    want = unfused(case, qk_mode)
    gpu = get_backend("cuda")
    a = {k: (gpu.asarray(v) if k in ARRAYS and v is not None else v) for k, v in case.items()}
    table, starts, offsets = (gpu.asarray(x) for x in
                              _one_sequence(case["qkv"], case["block_table"], case["pos_offset"]))
    shape = check_fused_write(a["qkv"], a["q_norm_w"], a["k_norm_w"], a["cos"], a["sin"],
                              a["k_pool"], a["v_pool"], table, starts, offsets, hq, hkv, 1e-6,
                              qk_mode, a["k_scales"], a["v_scales"], kv_dtype)
    q = fused_write.launch(a["qkv"], a["q_norm_w"], a["k_norm_w"], a["cos"], a["sin"],
                           a["k_pool"], a["v_pool"], a["k_scales"], a["v_scales"], table, starts,
                           offsets, shape, 1e-6, qk_mode, kv_dtype, paged, tokens_per_block,
                           registers, version=version)
    got = {k: gpu.to_numpy(a[k]) for k in ("k_pool", "v_pool", "k_scales", "v_scales")
           if a[k] is not None}
    got["q_out"] = gpu.to_numpy(q)
    assert_fused_equals_unfused(got, want)


@pytest.mark.parametrize("option, error, message", [
    (dict(tokens_per_block=0), ValueError, "tokens_per_block must be an int >= 1"),
    (dict(tokens_per_block=True), ValueError, "tokens_per_block must be an int >= 1"),
    (dict(pairs_in_registers=1), TypeError, "pairs_in_registers must be a bool")])
def test_cuda_kernel_steps_refuse_bad_settings_before_writing(option, error, message):
    from kvlab.checks import check_fused_write
    from kvlab.kernels.cuda import fused_write
    from kvlab.ref.fused_write import _one_sequence

    case = make_case(3, 2, 1, 16, 0, seed=6)
    gpu = get_backend("cuda")
    a = {k: (gpu.asarray(v) if k in ARRAYS and v is not None else v) for k, v in case.items()}
    table, starts, offsets = (gpu.asarray(x) for x in _one_sequence(case["qkv"],
                                                                     case["block_table"], 0))
    shape = check_fused_write(a["qkv"], None, None, a["cos"], a["sin"], a["k_pool"], a["v_pool"],
                              table, starts, offsets, 2, 1, 1e-6, 2)
    with pytest.raises(error, match=message):
        fused_write.launch(a["qkv"], None, None, a["cos"], a["sin"], a["k_pool"], a["v_pool"],
                           None, None, table, starts, offsets, shape, 1e-6, 2, None, True,
                           **option)
    assert np.array_equal(gpu.to_numpy(a["k_pool"]), case["k_pool"])  # nothing written


@pytest.mark.gpu
@pytest.mark.parametrize("tokens_per_block", [4, 8, 32])
@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3"])
@pytest.mark.parametrize("qk_mode, registers", [(1, False), (1, True), (2, True)])
def test_gpu_kernel_tokens_per_block_at_prefill_size(tokens_per_block, kv_dtype, qk_mode,
                                                     registers):
    """The bench's candidates for TOKENS_PER_BLOCK and PAIRS_IN_REGISTERS, bit-equal to the
    unfused path on a GPU: 1,000 tokens (not a multiple of any of them), Qwen3-8B-like heads."""
    check_kernel_steps(tokens_per_block, kv_dtype, qk_mode, registers, tokens=1000, hq=32,
                       hkv=8, d=128)


@pytest.mark.gpu
@pytest.mark.sanitize
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_gpu_kernel_steps_under_sanitizer(kv_dtype):
    """The kernel steps the public op does not launch yet (several tokens per block, heads in
    registers), under compute-sanitizer: with qk_mode 1 one launch mixes register heads (V) and
    shared-memory heads (Q, K: the norm), and an int8 cache keeps K and V on the shared path."""
    check_kernel_steps(16, kv_dtype, 1, True, tokens=64, hq=8, hkv=2, d=128)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3"])
def test_no_tokens_write_nothing(backend, kv_dtype):
    case = make_case(0, 2, 1, 16, 4, kv_dtype=kv_dtype)  # a step in which this layer gets none
    assert_fused_equals_unfused(run_paged_write(backend, case, 1), unfused(case, 1))


def test_partial_rotary_and_unshuffled_table(backend):
    case = make_case(4, 2, 1, 64, 12, rotary_dim=32, shuffled=False)
    assert_fused_equals_unfused(run_paged_write(backend, case, 1), unfused(case, 1))


def test_contig_write_equals_paged_write(backend):
    """A contiguous cache holds what a paged one does, row p = position p."""
    for kv_dtype in (None, "int8"):
        case = make_case(3, 2, 1, 32, 5, kv_dtype=kv_dtype, block_size=1, shuffled=False)
        want = unfused(case, 1)
        cap = case["k_pool"].shape[0]
        caches = {"k_cache": case["k_pool"].reshape(cap, 1, 32), "v_cache": case["v_pool"]
                  .reshape(cap, 1, 32)}
        scales = {k: (None if case[k] is None else case[k].reshape(cap, 1)) for k in
                  ("k_scales", "v_scales")}
        args = {k: case[k] for k in ("qkv", "q_norm_w", "k_norm_w", "cos", "sin")}
        moved = {k: backend.asarray(v) for k, v in {**args, **caches}.items()}
        moved_scales = {k: (None if v is None else backend.asarray(v)) for k, v in scales.items()}
        q = backend.fused_write.contig_write(
            **moved, pos_offset=5, num_q_heads=2, num_kv_heads=1, eps=1e-6, qk_mode=1,
            kv_dtype=kv_dtype, **moved_scales)
        assert same_bits(backend.to_numpy(q), want["q_out"])
        assert same_bits(backend.to_numpy(moved["k_cache"]), want["k_pool"].reshape(cap, 1, 32))
        if kv_dtype:
            assert same_bits(backend.to_numpy(moved_scales["v_scales"]),
                             want["v_scales"].reshape(cap, 1))


def test_batched_write_equals_one_sequence_at_a_time(backend):
    """Three sequences (3, 1 and 0 new tokens) in one call; each lands where paged_write puts it."""
    rng = np.random.default_rng(3)
    hq, hkv, d, bs = 2, 1, 32, 4
    offsets = [6, 0, 2]  # 3, 1 and 0 new tokens: query_start below
    qkv = rng.standard_normal((4, (hq + 2 * hkv) * d)).astype(np.float16)
    tables = np.array([[5, 1, 7], [2, -1, -1], [0, -1, -1]], np.int32)
    cos, sin = rope_tables(16, d, 10000.0)
    w = np.ones(d, np.float32)
    pools = [np.zeros((8, bs, hkv, d), np.float16) for _ in range(2)]
    starts = np.array([0, 3, 4, 4], np.int32)
    want_pools = [p.copy() for p in pools]
    want_q = []
    for s in range(3):
        rows = qkv[starts[s]:starts[s + 1]]
        want_q.append(get_backend("numpy").fused_write.paged_write(
            rows, w, w, cos, sin, *want_pools, tables[s], offsets[s], hq, hkv, 1e-6, 1))
    moved = [backend.asarray(a) for a in (qkv, w, w, cos, sin, *pools, tables, starts,
                                          np.array(offsets, np.int32))]
    q = backend.fused_write.paged_write_batched(*moved, hq, hkv, 1e-6, 1)
    assert same_bits(backend.to_numpy(q), np.concatenate(want_q))
    assert same_bits(backend.to_numpy(moved[5]), want_pools[0])
    assert same_bits(backend.to_numpy(moved[6]), want_pools[1])
    seq, pos = token_positions(starts, np.array(offsets))
    assert seq.tolist() == [0, 0, 0, 1] and pos.tolist() == [6, 7, 8, 0]


# --- bad inputs: a clear error, and nothing written ----------------------------------------------

BAD = [  # {argument: bad value}, error, message
    ({"qkv": np.zeros((5, 3 * 64), np.float16)}, ValueError,
     r"qkv must have 256 columns per token \(\(num_q_heads 2 \+ 2 x num_kv_heads 1\) x head_dim "
     r"64"),
    ({"num_q_heads": 3}, ValueError, "qkv must have 320 columns"),
    ({"num_q_heads": 3, "num_kv_heads": 2}, ValueError, "must be a multiple of num_kv_heads"),
    ({"qkv": np.zeros((5, 256), np.float32)}, TypeError, "qkv must have the cache's dtype"),
    ({"block_table": np.array([1], np.int32)}, ValueError, "the block table is too short"),
    ({"block_table": np.array([1, -1], np.int32)}, ValueError,
     r"block table entries must be in \[0, 4\).*got \[-1, -1, -1\]"),
    ({"pos_offset": -1}, ValueError, r"pos_offset must be in \[0, 2\*\*31\)"),
    ({"pos_offset": 40}, ValueError, "outside the RoPE table"),
    ({"qk_mode": 4}, ValueError, "qk_mode must be 0"),
    ({"eps": -1.0}, ValueError, "eps must be a float"),
    ({"q_norm_w": np.ones(32, np.float32)}, ValueError, r"q_norm_w must have shape \[head_dim\]"),
    ({"k_norm_w": np.ones(64, np.int32)}, TypeError, "k_norm_w must have dtype float16 or"),
    ({"cos": np.zeros((32, 40), np.float32)}, ValueError, r"sin must have shape"),
    ({"k_scales": np.zeros((4, 16, 1), np.float16)}, ValueError, "only for a quantized cache"),
]


def bad_case(**changes: Any) -> dict:
    case = make_case(5, 2, 1, 64, 14)  # a write crossing from block 0 into block 1
    case.update(changes)
    return case


@pytest.mark.parametrize("changes, error, message", BAD,
                         ids=[f"{next(iter(c))}-{i}" for i, (c, _, _) in enumerate(BAD)])
def test_bad_inputs_raise_and_write_nothing(backend, changes, error, message):
    case = bad_case(**changes)
    moved = {k: (backend.asarray(v) if k in ARRAYS and v is not None else v)
             for k, v in case.items()}
    with pytest.raises(error, match=message):
        backend.fused_write.paged_write(qk_mode=case.pop("qk_mode", 1), **{
            k: v for k, v in moved.items() if k != "qk_mode"})
    for name in ("k_pool", "v_pool"):
        assert not backend.to_numpy(moved[name]).any(), name


def test_quantized_cache_refuses_nan(backend):
    case = make_case(2, 2, 1, 32, 0, kv_dtype="int8")
    case["qkv"][1, 2 * 32 + 3] = np.nan  # a K element
    moved = {k: (backend.asarray(v) if k in ARRAYS and v is not None else v)
             for k, v in case.items()}
    with pytest.raises(ValueError, match="qkv's K holds 1 value"):
        backend.fused_write.paged_write(qk_mode=1, **moved)
    assert not backend.to_numpy(moved["k_pool"]).any()


@pytest.mark.parametrize("where, name", [(2 * 32 + 3, "qkv's K"), (3 * 32 + 5, "qkv's V")])
def test_after_a_refused_write_the_next_one_writes(backend, where, name):
    """The refused value is named (K or V: the CUDA op checks both in one launch), and the next,
    valid call writes: a check flag raised by the first (the CUDA backend keeps one per process)
    must not refuse the second."""
    case = make_case(2, 2, 1, 32, 0, kv_dtype="int8")
    good = case["qkv"].copy()
    case["qkv"][1, where] = np.inf
    moved = {k: (backend.asarray(v) if k in ARRAYS and v is not None else v)
             for k, v in case.items()}
    with pytest.raises(ValueError, match=f"{name} holds 1 value"):
        backend.fused_write.paged_write(qk_mode=1, **moved)
    moved["qkv"] = backend.asarray(good)
    backend.fused_write.paged_write(qk_mode=1, **moved)
    assert backend.to_numpy(moved["k_scales"]).any() and backend.to_numpy(moved["v_pool"]).any()


def test_quantized_cache_refuses_k_that_overflows_after_rope(backend):
    """Raw qkv is finite, but rotating the pair (60000, 60000) by 1 radian gives 82,900: inf in
    fp16. Every backend must see the rotated K, refuse it, and write nothing (the CUDA wrapper
    runs the kernel dry first for exactly this)."""
    case = make_case(2, 2, 1, 32, 0, kv_dtype="int8")
    case["qkv"][1, 2 * 32 + 0] = case["qkv"][1, 2 * 32 + 16] = 60000.0  # token 1 = position 1
    moved = {k: (backend.asarray(v) if k in ARRAYS and v is not None else v)
             for k, v in case.items()}
    with pytest.raises(ValueError, match="holds"):
        backend.fused_write.paged_write(qk_mode=2, **moved)
    for name in ("k_pool", "v_pool", "k_scales", "v_scales"):
        assert not backend.to_numpy(moved[name]).any(), name


# --- ferrum's API: KvLayer.paged_write / contig_write --------------------------------------------

def test_layer_paged_write_checks_len_reserves_and_rolls_back(backend):
    layer = KvLayer.alloc_paged(4, 16, 1, 64, backend=backend, dtype="int8")
    case = make_case(14, 2, 1, 64, 0)
    args = [backend.asarray(case[k]) for k in ("qkv", "q_norm_w", "k_norm_w", "cos", "sin")]
    layer.paged_write(*args, pos_offset=0, eps=1e-6, qk_mode=1)
    assert layer.len == 14 and len(layer.paged_block_indices) == 1
    more = make_case(5, 2, 1, 64, 14)
    more_args = [backend.asarray(more[k]) for k in ("qkv", "q_norm_w", "k_norm_w", "cos", "sin")]
    with pytest.raises(ValueError, match="pos_offset must equal the cache length 14, got 13"):
        layer.paged_write(*more_args, pos_offset=13, eps=1e-6, qk_mode=1)
    short_tables = [more_args[0], more_args[1], more_args[2], *(backend.asarray(t[:10]) for t in
                                                                 (more["cos"], more["sin"]))]
    with pytest.raises(ValueError, match="outside the RoPE table"):
        layer.paged_write(*short_tables, pos_offset=14, eps=1e-6, qk_mode=1)
    assert layer.len == 14 and len(layer.paged_block_indices) == 1  # the new block went back
    q = layer.paged_write(*more_args, pos_offset=14, eps=1e-6, qk_mode=1)
    assert layer.len == 19 and len(layer.paged_block_indices) == 2
    assert backend.to_numpy(q).shape == (5, 2, 64)
    k, _ = layer.gather()
    assert backend.to_numpy(k).shape == (19, 1, 64)


def test_layer_contig_write(backend):
    layer = KvLayer.alloc_contig(32, 1, 64, backend=backend)
    case = make_case(5, 2, 1, 64, 0)
    args = [backend.asarray(case[k]) for k in ("qkv", "q_norm_w", "k_norm_w", "cos", "sin")]
    q = layer.contig_write(*args, pos_offset=0, eps=1e-6, qk_mode=2)
    assert layer.len == 5
    want = unfused(case, 2)["q_out"]
    assert same_bits(backend.to_numpy(q), want)


# --- a real size on a GPU ------------------------------------------------------------------------

def gpu_case(kv_dtype):
    """Qwen3-8B's heads (32 q, 8 kv, head_dim 128): a 4096-token prefill after 100 cached."""
    return make_case(4096, 32, 8, 128, 100, kv_dtype=kv_dtype, seed=8)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_gpu_prefill_matches_numpy(kv_dtype):
    assert cuda_mode() == "gpu"
    case = gpu_case(kv_dtype)
    assert_fused_equals_unfused(run_paged_write(get_backend("cuda"), case, 1), unfused(case, 1))


@pytest.mark.gpu
@pytest.mark.sanitize
def test_gpu_prefill_under_sanitizer():
    """Run by scripts/gpu_check.sh under compute-sanitizer: no out-of-bounds access, no race."""
    case = make_case(64, 32, 8, 128, 14, kv_dtype="fp8_e4m3", seed=9)
    assert_fused_equals_unfused(run_paged_write(get_backend("cuda"), case, 3), unfused(case, 3))


# --- v4: a warp per token (not yet what the public ops launch) ----------------------------------

V4_CASES = [  # dtype, qk_mode, kv_dtype, rotary_dim, paged
    ("float16", 0, None, None, True), ("float16", 1, None, None, True),
    ("float16", 2, None, 16, True), ("float16", 3, None, None, False),
    ("float16", 1, "int8", None, True), ("float16", 2, "fp8_e4m3", None, False),
    ("float32", 1, None, None, True), ("float32", 2, "int8", None, True),
    ("float32", 3, "fp8_e4m3", 16, True)]


@pytest.mark.parametrize("dtype, qk_mode, kv_dtype, rotary_dim, paged", V4_CASES)
def test_cuda_fused_write_v4_equals_unfused(dtype, qk_mode, kv_dtype, rotary_dim, paged):
    """v4's own lane logic (its shuffles emulated in the simulator) bit for bit against the
    unfused ops: every qk_mode, fp16 and fp32 qkv, float/int8/fp8 caches, partial rotary, paged
    and contiguous caches; 5 tokens of 4 heads, so a CTA's last warp has no token."""
    from kvlab.kernels.cuda import fused_write_v4

    elem = np.dtype(dtype).itemsize
    assert fused_write_v4.layout(elem, 32, qk_mode, (rotary_dim or 32) // 2) is not None
    check_kernel_steps(1, kv_dtype, qk_mode, True, tokens=5, hq=2, hkv=1, d=32, dtype=dtype,
                       version=4, rotary_dim=rotary_dim, paged=paged)


def test_cuda_fused_write_v4_dry_run_refuses_before_writing():
    """A K head the norm's weight makes too large for an int8 cache: v4's dry run flags it and
    nothing is written (the raw qkv passed the host-side check)."""
    from kvlab.checks import check_fused_write
    from kvlab.kernels.cuda import fused_write
    from kvlab.ref.fused_write import _one_sequence

    case = make_case(3, 2, 1, 32, 0, kv_dtype="int8", seed=7)
    case["k_norm_w"] = np.full(32, 1e7, np.float32)
    gpu = get_backend("cuda")
    a = {k: (gpu.asarray(v) if k in ARRAYS and v is not None else v) for k, v in case.items()}
    table, starts, offsets = (gpu.asarray(x) for x in _one_sequence(case["qkv"],
                                                                     case["block_table"], 0))
    args = (a["qkv"], a["q_norm_w"], a["k_norm_w"], a["cos"], a["sin"], a["k_pool"], a["v_pool"])
    shape = check_fused_write(*args, table, starts, offsets, 2, 1, 1e-6, 1, a["k_scales"],
                              a["v_scales"], "int8")
    with pytest.raises(ValueError, match="nothing was written"):
        fused_write.launch(*args, a["k_scales"], a["v_scales"], table, starts, offsets, shape,
                           1e-6, 1, "int8", True, version=4)
    assert np.array_equal(gpu.to_numpy(a["k_pool"]), case["k_pool"])
    assert np.array_equal(gpu.to_numpy(a["v_pool"]), case["v_pool"])


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype, qk_mode", [("float16", 1), ("float16", 2), ("float16", 3),
                                            ("float32", 1)])
def test_gpu_fused_write_v4_at_prefill_size(kv_dtype, dtype, qk_mode):
    """v4 bit-equal to the unfused path on a GPU: 1,000 tokens (not a multiple of the 4 tokens
    of a CTA), Qwen3-8B-like heads."""
    check_kernel_steps(16, kv_dtype, qk_mode, True, tokens=1000, hq=32, hkv=8, d=128,
                       dtype=dtype, version=4)


@pytest.mark.gpu
@pytest.mark.sanitize
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_gpu_fused_write_v4_under_sanitizer(kv_dtype):
    """v4's 16-byte loads and stores under compute-sanitizer (memcheck, racecheck, initcheck)."""
    check_kernel_steps(16, kv_dtype, 1, True, tokens=63, hq=8, hkv=2, d=128, version=4)
