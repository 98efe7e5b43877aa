"""A step's plan (kvlab.step_plan, ``paging.plan_step``): the step's index arrays checked once,
then the fused write and the attention run with it on every backend exactly as without it — and
refuse a plan that does not fit, before anything is written."""
import dataclasses

import numpy as np
import pytest

from kvlab.backends import BACKENDS, get_backend
from kvlab.step_plan import StepPlan
from kvlab.ref.rope import rope_tables

HQ, HKV, D, BS = 4, 2, 32, 4


# the three backends, not the root conftest's extra "torch-tiles": these torch ops take no tiles
@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


def step(kv_dtype=None, seed=0):
    """Three sequences: 9 cached + 3 new tokens, 0 + 1 (a fresh prompt of one), 6 + 0 (sitting
    this step out), over a shuffled pool of 10 blocks; and the fused write's inputs for them."""
    rng = np.random.default_rng(seed)
    tables = np.array([[7, 2, 9, -1], [4, -1, -1, -1], [0, 5, -1, -1]], np.int32)
    lens = np.array([12, 1, 6], np.int32)
    starts = np.array([0, 3, 4, 4], np.int32)
    storage = {None: np.float32, "int8": np.int8, "fp8_e4m3": np.uint8}[kv_dtype]
    pools = [np.zeros((10, BS, HKV, D), storage) for _ in range(2)]
    if kv_dtype is None:
        pools = [rng.standard_normal(p.shape).astype(np.float32) for p in pools]
    scales = ([np.full((10, BS, HKV), 0.01, np.float16) for _ in range(2)] if kv_dtype
              else [None, None])
    qkv = rng.standard_normal((4, (HQ + 2 * HKV) * D)).astype(np.float32)
    cos, sin = rope_tables(32, D, 10000.0)
    weights = [(1 + 0.1 * rng.standard_normal(D)).astype(np.float32) for _ in range(2)]
    return dict(tables=tables, lens=lens, starts=starts, pools=pools, scales=scales, qkv=qkv,
                cos=cos, sin=sin, weights=weights, kv_dtype=kv_dtype)


def on(backend, *arrays):
    return [None if a is None else backend.asarray(a) for a in arrays]


def run_step(backend, s, planned):
    """The fused write, then the attention over what it wrote, with or without a plan; returns
    (q_out, attention out, pools and scales after) on the host."""
    qkv, cos, sin, qw, kw = on(backend, s["qkv"], s["cos"], s["sin"], *s["weights"])
    k_pool, v_pool, k_scales, v_scales = on(backend, *s["pools"], *s["scales"])
    offsets = (s["lens"] - np.diff(s["starts"])).astype(np.int32)
    if planned:
        plan = backend.paging.plan_step(k_pool, s["tables"], s["starts"], s["lens"])
        tables, starts, lens, offsets = (plan.block_tables, plan.query_start, plan.context_lens,
                                         plan.pos_offsets)
    else:
        plan = None
        tables, starts, lens, offsets = on(backend, s["tables"], s["starts"], s["lens"], offsets)
    q = backend.fused_write.paged_write_batched(
        qkv, qw, kw, cos, sin, k_pool, v_pool, tables, starts, offsets, HQ, HKV, 1e-6, 1,
        k_scales, v_scales, s["kv_dtype"], plan=plan)
    out = backend.attention.paged_decode_attention(q, k_pool, v_pool, tables, lens, starts,
                                                   k_scales=k_scales, v_scales=v_scales,
                                                   plan=plan)
    after = [backend.to_numpy(a) for a in (k_pool, v_pool, k_scales, v_scales) if a is not None]
    return backend.to_numpy(q), backend.to_numpy(out), after


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3"])
def test_a_planned_step_equals_an_unplanned_one(backend, kv_dtype):
    s = step(kv_dtype)
    q, out, after = run_step(backend, s, planned=True)
    q_ref, out_ref, after_ref = run_step(backend, step(kv_dtype), planned=False)
    assert q.tobytes() == q_ref.tobytes()
    assert out.tobytes() == out_ref.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(after, after_ref))
    assert np.isfinite(out).all() and np.abs(out).max() > 0


def test_the_plan_owns_copies_of_the_step(backend):
    s = step()
    k_pool = backend.asarray(s["pools"][0])
    plan = backend.paging.plan_step(k_pool, s["tables"], s["starts"], s["lens"])
    assert isinstance(plan, StepPlan) and plan.num_tokens == 4
    assert (plan.num_blocks, plan.block_size) == (10, BS)
    got = [backend.to_numpy(a) for a in (plan.block_tables, plan.query_start, plan.context_lens,
                                         plan.pos_offsets)]
    assert all(a.dtype == np.int32 for a in got)
    hosts = (plan.host_block_tables, plan.host_query_start, plan.host_context_lens,
             plan.host_pos_offsets)
    for want, have, host in zip((s["tables"], s["starts"], s["lens"], [9, 0, 6]), got, hosts):
        assert have.tolist() == np.asarray(want).tolist() == host.tolist()
    s["tables"][0, 0] = 99  # the caller's array changes after planning: the plan's does not
    assert backend.to_numpy(plan.block_tables)[0, 0] == 7
    assert "3 sequences, 4 new tokens" in repr(plan)


def test_plan_step_takes_the_backends_own_arrays_too(backend):
    s = step()
    k_pool, tables, starts, lens = on(backend, s["pools"][0], s["tables"], s["starts"], s["lens"])
    plan = backend.paging.plan_step(k_pool, tables, starts, lens)
    assert backend.to_numpy(plan.block_tables).tolist() == s["tables"].tolist()


BAD_STEPS = [  # what plan_step refuses: the op checks' messages, and slots of the new tokens
    ({"tables": np.array([[7, 2, 10, -1], [4, -1, -1, -1], [0, 5, -1, -1]], np.int32)},
     r"entries read by context_len\[0\]=12 must be in \[0, 10\) .* got \[10\]"),
    ({"lens": np.array([12, 1, 17], np.int32)}, r"context_len\[2\] must be in \[0, 16\]"),
    ({"lens": np.array([2, 1, 6], np.int32)},
     r"sequence 0 has 3 query tokens but context_lens\[0\] = 2"),
    ({"starts": np.array([0, 3, 2, 4], np.int32)}, "query_start must not decrease"),
    ({"starts": np.array([1, 3, 4, 4], np.int32)}, "query_start must begin at 0, got 1"),
    ({"tables": np.array([[7, 2, 9, -1], [7, 2, 9, -1], [0, 5, -1, -1]], np.int32),
      "lens": np.array([12, 10, 6], np.int32)},  # seq 1's new token on seq 0's position 9
     r"slots must not repeat \(each slot holds one token\), got duplicates \[37\]"),
    ({"tables": np.array([7, 2, 9, -1], np.int32)}, "block_tables must be 2-D"),
    ({"lens": np.array([12, 1, 6], np.int64)}, "context_len must have dtype int32"),
    ({"tables": np.zeros((0, 4), np.int32), "lens": np.zeros(0, np.int32),
      "starts": np.zeros(1, np.int32)}, "a step needs at least one sequence"),
]


@pytest.mark.parametrize("changes, message", BAD_STEPS)
def test_plan_step_refuses_what_the_ops_refuse(backend, changes, message):
    s = {**step(), **changes}
    with pytest.raises((ValueError, TypeError), match=message):
        backend.paging.plan_step(backend.asarray(s["pools"][0]), s["tables"], s["starts"],
                                 s["lens"])


def _copy_of(backend, array):
    """The same values in a new array of the backend (not the plan's own)."""
    return backend.asarray(backend.to_numpy(array))


ATTENTION_INDEX = ("block_tables", "context_lens", "query_start")
WRITE_INDEX = ("block_tables", "query_start", "pos_offsets")


@pytest.mark.parametrize("what, error, message", [
    *((name, ValueError, rf"{name} must be plan.{name} when a plan is given")
      for name in ATTENTION_INDEX),
    ("another pool", ValueError, r"pool has 12 blocks of 4 slots, but the plan was made for 10"),
    ("other rows", ValueError, r"q has 3 rows, but the plan's step has 4 new tokens"),
    ("not a plan", TypeError, r"plan must be a StepPlan .* got dict"),
    ("a plan with other arrays", ValueError, r"plan was not made by paging.plan_step"),
])
def test_attention_refuses_a_plan_that_does_not_fit(backend, what, error, message):
    s = step()
    k_pool, v_pool = on(backend, *s["pools"])
    plan = backend.paging.plan_step(k_pool, s["tables"], s["starts"], s["lens"])
    q = backend.asarray(np.zeros((4, HQ, D), np.float32))
    index = {name: getattr(plan, name) for name in ATTENTION_INDEX}
    if what in index:
        index[what] = _copy_of(backend, index[what])
    if what == "another pool":
        k_pool, v_pool = on(backend, *(np.zeros((12, BS, HKV, D), np.float32),) * 2)
    if what == "other rows":
        q = backend.asarray(np.zeros((3, HQ, D), np.float32))
    if what == "not a plan":
        plan = dict(index)
    if what == "a plan with other arrays":  # a copy never checked: its table reads block 50
        bad = s["tables"].copy()
        bad[0, 0] = 50
        index["block_tables"] = backend.asarray(bad)
        plan = dataclasses.replace(plan, block_tables=index["block_tables"])
    with pytest.raises(error, match=message):
        backend.attention.paged_decode_attention(q, k_pool, v_pool, *index.values(), plan=plan)


@pytest.mark.parametrize("what, message", [
    *((name, rf"{name} must be plan.{name}") for name in WRITE_INDEX),
    ("rows", r"qkv has 3 rows, but the plan's step has 4 new tokens"),
    ("another pool", r"pool has 12 blocks of 4 slots, but the plan was made for 10"),
    ("contiguous", r"a plan is for a paged pool"),
])
def test_a_write_refuses_a_plan_that_does_not_fit_and_writes_nothing(backend, what, message):
    s = step()
    k_pool, v_pool = on(backend, *s["pools"])
    plan = backend.paging.plan_step(k_pool, s["tables"], s["starts"], s["lens"])
    qkv, cos, sin, qw, kw = on(backend, s["qkv"], s["cos"], s["sin"], *s["weights"])
    index = {name: getattr(plan, name) for name in WRITE_INDEX}
    if what in index:
        index[what] = _copy_of(backend, index[what])
    if what == "rows":
        qkv = backend.asarray(s["qkv"][:3])
    if what == "another pool":
        k_pool, v_pool = on(backend, *(np.zeros((12, BS, HKV, D), np.float32),) * 2)
    offsets = index["pos_offsets"]
    before = backend.to_numpy(k_pool).copy()
    if what == "contiguous":  # the checks' contiguous-cache path (what contig_write runs)
        from kvlab.checks import check_fused_write

        call = lambda: check_fused_write(  # noqa: E731
            qkv, qw, kw, cos, sin, k_pool.reshape(-1, HKV, D), v_pool.reshape(-1, HKV, D), None,
            plan.query_start, offsets, HQ, HKV, 1e-6, 1, paged=False, plan=plan)
    else:
        call = lambda: backend.fused_write.paged_write_batched(  # noqa: E731
            qkv, qw, kw, cos, sin, k_pool, v_pool, *index.values(), HQ, HKV, 1e-6, 1, plan=plan)
    with pytest.raises(ValueError, match=message):
        call()
    assert backend.to_numpy(k_pool).tobytes() == before.tobytes()


def test_a_planned_step_reads_no_index_array_back(backend, monkeypatch):
    """Every index read-back of the checks goes through kvlab.checks.host_ints: with a plan (made
    from host arrays), the write and the attention never give it a device array, nor the plan's
    own (the reference's RoPE checks its host positions with it, which costs no copy)."""
    import kvlab.checks

    s = step()
    k_pool = backend.asarray(s["pools"][0])
    plan = backend.paging.plan_step(k_pool, s["tables"], s["starts"], s["lens"])
    host_ints = kvlab.checks.host_ints
    planned = (plan.block_tables, plan.query_start, plan.context_lens, plan.pos_offsets)

    def refuse(x):
        if not isinstance(x, np.ndarray) or any(x is a for a in planned):
            raise AssertionError(f"an index array was read back: {type(x).__name__}")
        return host_ints(x)
    monkeypatch.setattr(kvlab.checks, "host_ints", refuse)
    monkeypatch.setattr(backend.paging, "plan_step", lambda *a: plan)  # the plan made above
    run_step(backend, s, planned=True)


def test_a_plan_cannot_be_written_where_the_backend_can_tell(backend):
    """NumPy: the plan's arrays (and every backend's host copies) are read-only. torch: a write
    moves the tensors' version counter and the ops refuse the plan. Numba device arrays can be
    neither locked nor versioned: there, not writing to a plan is the caller's promise."""
    s = step()
    k_pool, v_pool = on(backend, *s["pools"])
    plan = backend.paging.plan_step(k_pool, s["tables"], s["starts"], s["lens"])
    for host in (plan.host_block_tables, plan.host_query_start, plan.host_context_lens,
                 plan.host_pos_offsets):
        with pytest.raises(ValueError, match="read-only"):
            host[0] = 1
    q = backend.asarray(np.zeros((4, HQ, D), np.float32))
    call = lambda: backend.attention.paged_decode_attention(  # noqa: E731
        q, k_pool, v_pool, plan.block_tables, plan.context_lens, plan.query_start, plan=plan)
    if backend.name == "numpy":
        with pytest.raises(ValueError, match="read-only"):
            plan.block_tables[1, 0] = -1
    elif backend.name == "torch":
        plan.context_lens[2] = 16  # past what was checked: sequence 2 would read block -1
        with pytest.raises(ValueError, match="written after it was made"):
            call()
    else:
        pytest.skip("a Numba device array cannot refuse a write")


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8_e4m3"])
def test_gpu_a_planned_step_equals_an_unplanned_one(kv_dtype):
    """On a real GPU the plan's arrays are views into one device buffer (slices and a reshape):
    the kernels must read them as they read arrays of their own."""
    test_a_planned_step_equals_an_unplanned_one(get_backend("cuda"), kv_dtype)
