"""MPS safety of the torch backend, checked without a Mac (none of this project's machines has one).

- Every public op of ``kvlab.kernels.mps`` (every cache dtype, qk_mode, split count, window) and the
  model's torch path run under :class:`~kvlab.kernels.mps.allowlist.OpRecorder`, "as on MPS" (the
  branches the backend takes there); each aten op and dtype they call must be in the allowlist
  made from the installed torch's own files, and the check is shown to catch a float64 cast, an
  integer matrix product, an op MPS lacks and an allowlist made for another torch.
- Device-to-host reads: a fixed number per call, none per sequence or per tile.
- Three bugs found by reading the code: tables on the wrong device, ``"mps:0"`` missed by string
  comparisons, and rope bad-input tests that build a float64 tensor MPS cannot hold.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvlab.backends import get_backend
from kvlab.cache import KvCacheManager, KvPool
from kvlab.kernels import mps
from kvlab.kernels.mps import allowlist, fused_write
from kvlab.model import ModelConfig, Qwen3Model
from kvlab.ref.rope import rope_tables
from test_attention_ops import paged_batch
from test_rope_ops import APPLY_BAD_INPUTS
from test_rope_ops import test_apply_rope_rejects_bad_inputs as check_rope_rejects

TORCH = get_backend("torch", "cpu")
ALLOWLIST = allowlist.load()


@pytest.fixture
def as_on_mps(monkeypatch):
    """Make the torch backend take the branches it takes on MPS (no float64), on the CPU."""
    for module in (mps, fused_write):
        monkeypatch.setattr(module, "has_float64", lambda device: False)


def recorded(run) -> allowlist.OpRecorder:
    with allowlist.OpRecorder() as recorder:
        run()
    return recorder


# --- the allowlist itself -------------------------------------------------------------------------

def assert_current(made: dict) -> None:
    why = allowlist.stale(made)
    assert why is None, why


def test_allowlist_was_made_for_the_installed_torch():
    assert_current(ALLOWLIST)


@pytest.mark.parametrize("key, value", [("torch", "2.12.0"),
                                        ("git_version", "0123456789abcdef")])
def test_an_allowlist_for_another_torch_fails(key, value):
    other = {**ALLOWLIST, "provenance": {**ALLOWLIST["provenance"], key: value}}
    with pytest.raises(AssertionError, match="run python scripts/mps_allowlist.py"):
        assert_current(other)


def test_allowlist_reads_the_installed_torch_files():
    """A few facts of torch 2.13's files, as the generator reads them."""
    ops, excluded = ALLOWLIST["ops"], ALLOWLIST["excluded"]
    assert ops["aten::index_select"] == "mps" and ops["aten::exp"] == "mps"  # exp: a delegate
    assert ops["aten::_to_copy"] == "composite" and ops["aten::matmul"] == "composite"
    assert "aten::_fft_c2c" in ops and "aten::mode" not in ops and "aten::heaviside" not in ops
    assert excluded["take"] is None and "int32" in excluded["linear"]


# --- the check catches what MPS lacks -------------------------------------------------------------

@pytest.mark.parametrize("run, complaint", [
    (lambda: torch.ones(3).double(), "MPS has no float64"),
    (lambda: torch.ones(3, dtype=torch.float32).to(torch.float8_e4m3fn), "MPS has no float8"),
    (lambda: torch.ones(2, 2, dtype=torch.int32) @ torch.ones(2, 2, dtype=torch.int32),
     "no integer matrix product"),
    (lambda: torch.ones(2, 3, dtype=torch.int8).mm(torch.ones(3, 1, dtype=torch.int8)),
     "no integer matrix product"),
    (lambda: torch.take(torch.ones(4), torch.tensor([1, 2])), "excluded by common_mps.py"),
    (lambda: torch.mode(torch.ones(4)), "no MPS kernel"),
], ids=["float64-cast", "float8-cast", "int32-matmul", "int8-mm", "take", "mode"])
def test_the_check_catches_what_mps_lacks(run, complaint):
    calls = recorded(run).calls
    assert any(complaint in line for line in allowlist.violations(calls, ALLOWLIST))


def test_a_float32_matmul_passes():
    calls = recorded(lambda: torch.ones(2, 2) @ torch.ones(2, 2)).calls
    assert calls and allowlist.violations(calls, ALLOWLIST) == []


# --- every public op, as on MPS -------------------------------------------------------------------

def _paged_batch(lens, tokens, kv_dtype=None, seed=0):
    return [None if a is None else TORCH.asarray(a)
            for a in paged_batch(lens, tokens, 4, 2, 16, kv_dtype=kv_dtype, seed=seed)]


def run_paging():
    k = TORCH.asarray(np.random.default_rng(0).standard_normal((5, 2, 16)).astype(np.float16))
    for dtype in (np.float16, np.float32):
        pool = [TORCH.asarray(np.zeros((6, 4, 2, 16), dtype)) for _ in range(2)]
        table = TORCH.asarray(np.array([3, 1, 4], np.int32))
        slots = TORCH.paging.slot_mapping(table, TORCH.asarray(np.arange(5, dtype=np.int32)), 4)
        TORCH.paging.write_kv(k.to(pool[0].dtype), k.to(pool[0].dtype), *pool, slots)
        TORCH.paging.gather_kv(*pool, table, 5)
        tables = TORCH.asarray(np.array([[3, 1], [0, 2]], np.int32))
        TORCH.paging.gather_kv(*pool, tables, TORCH.asarray(np.array([5, 2], np.int32)))
        TORCH.paging.slot_mapping(tables, TORCH.asarray(np.array([0, 5, -1], np.int32)), 4,
                                  TORCH.asarray(np.array([1, 0, 0], np.int32)))
        TORCH.paging.copy_blocks(*pool, TORCH.asarray(np.array([3], np.int32)),
                                 TORCH.asarray(np.array([5], np.int32)))


def run_quant():
    x = TORCH.asarray(np.random.default_rng(1).standard_normal((5, 2, 64)).astype(np.float16))
    for kv_dtype in ("int8", "fp8_e4m3", "int4"):
        codes, scales = TORCH.quant.quantize(x, kv_dtype)
        TORCH.quant.dequantize(codes, scales, kv_dtype)
    for kv_dtype, storage in (("int8", np.int8), ("fp8_e4m3", np.uint8)):
        pools = [TORCH.asarray(np.zeros((6, 4, 2, 64), storage)) for _ in range(2)]
        scales = [TORCH.asarray(np.zeros((6, 4, 2), np.float16)) for _ in range(2)]
        slots = TORCH.asarray(np.array([0, 5, -1, 9, 22], np.int32))
        TORCH.quant.write_kv_quant(x, x, *pools, *scales, slots, kv_dtype)
        TORCH.quant.write_kv_quant(x.float(), x.float(), *pools, *scales, slots, kv_dtype)
        TORCH.quant.gather_kv_quant(*pools, *scales, TORCH.asarray(np.array([0, 1], np.int32)),
                                    7, kv_dtype)
        TORCH.quant.copy_blocks_quant(*pools, *scales, TORCH.asarray(np.array([1], np.int32)),
                                      TORCH.asarray(np.array([4], np.int32)), kv_dtype)


def run_rope():
    cos, sin = TORCH.rope.rope_tables(32, 16, 1e4, {"rope_type": "linear", "factor": 2.0})
    positions = TORCH.asarray(np.array([0, 7, 31], np.int32))
    for dtype in (np.float16, np.float32):
        x = TORCH.asarray(np.ones((3, 2, 32), dtype))
        for style in ("neox", "gptj"):
            TORCH.rope.apply_rope(x, cos, sin, positions, style)


def run_fused_write():
    rng = np.random.default_rng(2)
    hq, hkv, d = 4, 2, 16
    cos, sin = (TORCH.asarray(t) for t in rope_tables(32, d, 1e6))
    qn, kn = (TORCH.asarray(1 + rng.random(d, dtype=np.float32)) for _ in range(2))
    for dtype, kv_dtype in (("float16", None), ("float32", None), ("float32", "int8"),
                            ("float16", "fp8_e4m3")):
        storage = {None: dtype, "int8": np.int8, "fp8_e4m3": np.uint8}[kv_dtype]
        qkv = TORCH.asarray(rng.standard_normal((5, (hq + 2 * hkv) * d)).astype(dtype))
        pools = [TORCH.asarray(np.zeros((6, 4, hkv, d), storage)) for _ in range(2)]
        scales = ([TORCH.asarray(np.zeros((6, 4, hkv), np.float16)) for _ in range(2)]
                  if kv_dtype else [None, None])
        caches = [TORCH.asarray(np.zeros((12, hkv, d), storage)) for _ in range(2)]
        cache_scales = ([TORCH.asarray(np.zeros((12, hkv), np.float16)) for _ in range(2)]
                        if kv_dtype else [None, None])
        for qk_mode in (0, 1, 2, 3):
            TORCH.fused_write.paged_write(qkv, qn, kn, cos, sin, *pools,
                                          TORCH.asarray(np.array([2, 5], np.int32)), 3, hq, hkv,
                                          1e-6, qk_mode, *scales, kv_dtype)
            TORCH.fused_write.contig_write(qkv, qn, kn, cos, sin, *caches, 2, hq, hkv, 1e-6,
                                           qk_mode, *cache_scales, kv_dtype)
        TORCH.fused_write.paged_write_batched(
            qkv, qn, kn, cos, sin, *pools, TORCH.asarray(np.array([[0, 1], [3, 4]], np.int32)),
            TORCH.asarray(np.array([0, 2, 5], np.int32)),
            TORCH.asarray(np.array([1, 4], np.int32)), hq, hkv, 1e-6, 1, *scales, kv_dtype)


def run_attention():
    rng = np.random.default_rng(3)
    q, k, v = (TORCH.asarray(rng.standard_normal(s).astype(np.float16))
               for s in ((3, 4, 16), (9, 2, 16), (9, 2, 16)))
    for causal in (True, False):
        for window in (0, 4):
            TORCH.attention.decode_attention(q, k, v, causal=causal, sliding_window=window)
    for kv_dtype in (None, "int8", "fp8_e4m3"):
        for lens, tokens in (([9, 9], [1, 1]), ([4, 7, 2], [1, 0, 2])):  # uniform, ragged
            q, kp, vp, tables, lens_, starts, ks, vs = _paged_batch(lens, tokens, kv_dtype)
            for splits, window in ((None, 0), (1, 0), (3, 5)):
                TORCH.attention.paged_decode_attention(q, kp, vp, tables, lens_, starts,
                                                       sliding_window=window, k_scales=ks,
                                                       v_scales=vs, num_splits=splits)


TINY = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=32, rope_theta=10000.0)


def run_model():
    model = Qwen3Model.random(TINY, backend=TORCH)
    for dtype in ("fp16", "float32", "int8", "fp8_e4m3"):
        for kind in ("contiguous", "paged"):
            cache = model.new_cache(kind, 16, dtype, block_size=4)
            model.forward([1, 2, 3, 4, 5], cache)
            model.forward([6], cache)
        pool = KvPool(TINY.num_hidden_layers, 8, 4, 2, 16, dtype=dtype, backend=TORCH)
        mgr = KvCacheManager(pool, 4)
        for seq, prompt in (("a", [1, 2, 3]), ("b", [4, 5, 6, 7, 8])):
            mgr.add_sequence(seq, [])
            mgr.reserve(seq, prompt)
        model.forward_batch(pool, mgr.block_tables(["a", "b"]), [0, 0],
                            [[1, 2, 3], [4, 5, 6, 7, 8]])


SCENARIOS = {"paging": run_paging, "quant": run_quant, "rope": run_rope,
             "fused_write": run_fused_write, "attention": run_attention, "model": run_model}


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_op_calls_only_what_mps_has(as_on_mps, name):
    calls = recorded(SCENARIOS[name]).calls
    assert calls
    assert allowlist.violations(calls, ALLOWLIST) == []


def test_off_mps_the_fused_write_takes_its_float64_sqrt():
    """The other branch, for contrast: on the CPU the correctly rounded sqrt goes through float64,
    which the check would refuse on MPS (so the recording above must run as on MPS)."""
    calls = recorded(run_fused_write).calls
    assert any("MPS has no float64" in line for line in allowlist.violations(calls, ALLOWLIST))


# --- read-backs: a fixed number per call ----------------------------------------------------------

def read_backs(run) -> list[str]:
    return recorded(run).read_backs


def attention_call(num_seqs: int, length: int):
    args = _paged_batch([length] * num_seqs, [1] * num_seqs, seed=num_seqs)
    return lambda: TORCH.attention.paged_decode_attention(*args[:6])


def test_paged_attention_reads_back_the_same_for_any_batch_or_context(monkeypatch):
    from kvlab.kernels.mps import attention

    monkeypatch.setattr(attention, "TILE_BYTES", 0)  # a tile per 16 positions
    counts = {(b, n): read_backs(attention_call(b, n)) for b, n in ((1, 5), (6, 5), (2, 70))}
    first = next(iter(counts.values()))
    assert all(c == first for c in counts.values()), counts
    # the checks' three index arrays (block_tables, context_lens, query_start), nothing else
    assert first == ["Tensor.cpu", "Tensor.numpy"] * 3


def _sized_calls(n: int) -> dict:
    """One call of each op over n tokens, blocks or sequences (the read-back test's sizes)."""
    a = TORCH.asarray
    rng = np.random.default_rng(n)
    x = a(rng.standard_normal((n, 2, 32)).astype(np.float16))
    pool = lambda dtype=np.float16: a(np.zeros((2 * n, 4, 2, 32), dtype))  # noqa: E731
    scales = lambda: a(np.zeros((2 * n, 4, 2), np.float16))  # noqa: E731
    slots = a(np.arange(n, dtype=np.int32) * 3)
    tables = a(np.arange(2 * n, dtype=np.int32).reshape(n, 2))
    lens = a(np.full(n, 7, np.int32))
    ids = (a(np.arange(n, dtype=np.int32)), a(np.arange(n, 2 * n, dtype=np.int32)))
    cos, sin = (a(t) for t in rope_tables(4 * n, 32, 1e4))
    qkv = a(rng.standard_normal((n, 8 * 32)).astype(np.float16))
    norms = (a(np.ones(32, np.float32)), a(np.ones(32, np.float32)))
    return {
        "slot_mapping": lambda: TORCH.paging.slot_mapping(tables, a(np.arange(n, dtype=np.int32)
                                                                    % 8), 4, ids[0]),
        "write_kv": lambda: TORCH.paging.write_kv(x, x, pool(), pool(), slots),
        "gather_kv": lambda: TORCH.paging.gather_kv(pool(), pool(), tables, lens),
        "copy_blocks": lambda: TORCH.paging.copy_blocks(pool(), pool(), *ids),
        "quantize": lambda: TORCH.quant.quantize(x, "fp8_e4m3"),
        "write_kv_quant": lambda: TORCH.quant.write_kv_quant(
            x, x, pool(np.int8), pool(np.int8), scales(), scales(), slots, "int8"),
        "gather_kv_quant": lambda: TORCH.quant.gather_kv_quant(
            pool(np.int8), pool(np.int8), scales(), scales(), tables, lens, "int8"),
        "apply_rope": lambda: TORCH.rope.apply_rope(x, cos, sin, slots),
        "paged_write_batched": lambda: TORCH.fused_write.paged_write_batched(
            qkv, *norms, cos, sin, pool(), pool(), tables, a(np.arange(n + 1, dtype=np.int32)),
            a(np.arange(n, dtype=np.int32) % 8), 4, 2, 1e-6, 1),
    }


@pytest.mark.parametrize("op", _sized_calls(1))
def test_other_ops_read_back_the_same_for_any_size(op):
    """No read-back per token, block or sequence: 1 and 9 of them read back alike."""
    assert read_backs(_sized_calls(1)[op]) == read_backs(_sized_calls(9)[op])


def test_a_planned_step_reads_nothing_back():
    """With a plan (checked once, from host arrays), neither the fused write nor the attention
    reads an index array back: the per-layer calls of a model step never synchronise on one."""
    args = _paged_batch([5, 9], [1, 2], seed=4)
    q, k_pool, v_pool, tables, lens, starts = args[:6]
    host = [TORCH.to_numpy(a) for a in (tables, starts, lens)]
    plan = TORCH.paging.plan_step(k_pool, *host)
    a = TORCH.asarray
    hq, hkv, d = q.shape[1], k_pool.shape[2], k_pool.shape[3]
    qkv = a(np.ones((3, (hq + 2 * hkv) * d), np.float16))
    cos, sin = (a(t) for t in rope_tables(16, d, 1e4))
    kp, vp = (a(np.zeros(k_pool.shape, np.float16)) for _ in range(2))

    def step():
        q_out = TORCH.fused_write.paged_write_batched(
            qkv, None, None, cos, sin, kp, vp, plan.block_tables, plan.query_start,
            plan.pos_offsets, hq, hkv, 1e-6, 2, plan=plan)
        TORCH.attention.paged_decode_attention(q_out, kp, vp, plan.block_tables,
                                               plan.context_lens, plan.query_start, plan=plan)
    assert read_backs(step) == []


@pytest.mark.parametrize("op", ["gather_kv", "gather_kv_quant"])
def test_a_gather_reads_its_table_and_lengths_back_once(op):
    """The checks' host copies of block_table and context_len serve the slot arithmetic too."""
    assert read_backs(_sized_calls(3)[op]) == ["Tensor.cpu", "Tensor.numpy"] * 2


# --- three MPS bugs found by reading the code -----------------------------------------------------

def test_model_tables_follow_the_backend_not_the_default_device(monkeypatch):
    """On a Mac the torch backend's default device is mps; a model built for torch on the CPU
    must still get its RoPE tables on the CPU. The meta device stands in for mps here."""
    monkeypatch.setattr(mps.rope, "pick_device", lambda device=None: "meta")
    assert TORCH.rope.rope_tables(8, 4, 1e4)[0].device.type == "meta"  # the default device
    model = Qwen3Model.random(TINY, backend=TORCH)
    assert model.cos.device.type == model.sin.device.type == "cpu"


@pytest.mark.parametrize("device", ["mps", "mps:0", torch.device("mps", 0)])
def test_float64_is_refused_on_every_spelling_of_mps(device):
    with pytest.raises(TypeError, match="MPS has no float64"):
        mps.asarray(np.zeros(2), device=device)
    assert not mps.has_float64(device) and mps.has_float64("cpu") and mps.has_float64("cuda:1")


@pytest.mark.parametrize("device", ["mps", "mps:0"])
def test_synchronize_waits_on_every_spelling_of_mps(monkeypatch, device):
    waited = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append(True))
    mps.synchronize(device)
    assert waited == [True]


@pytest.mark.parametrize("bad, error, message", APPLY_BAD_INPUTS,
                         ids=[str(i) for i in range(len(APPLY_BAD_INPUTS))])
def test_rope_bad_input_tests_run_where_there_is_no_float64(as_on_mps, bad, error, message):
    """tests/test_rope_ops.py's bad-input table on a torch backend without float64 (as MPS): a
    float64 array cannot even be made there, and the test must expect that refusal instead of
    erroring while it builds its input."""
    check_rope_rejects(TORCH, bad, error, message)
