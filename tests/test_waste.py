"""kvlab.waste: the scheduler's step-by-step accounting on hand-worked traces, invariants on random
traces, the committed traces, and the headline result on the ShareGPT-like trace.

Conventions being checked (module docstring of kvlab.waste): a request admitted at step t holds
prompt_len + 1 tokens after step t and finishes after step t + output_len - 1; records are taken
after each step's writes and before finished requests free their memory.
"""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab import waste as W

DATA = Path(__file__).resolve().parents[1] / "data"


def _run(requests, policy, budget, max_len=6, **kw):
    return W.simulate_policy(W.Trace.from_requests(requests), policy, budget_tokens=budget,
                             max_len=max_len, **kw)


def _records(res):
    return {"reserved": res.reserved.tolist(), "used": res.used.tolist(),
            "running": res.running.tolist(), "finished": res.finished.tolist(),
            "queued": res.queued.tolist()}


# Two requests arriving at step 0: A (prompt 3, output 2 → 5 tokens), B (prompt 1, output 3 → 4)
# Both run; A writes 4 then 5 tokens and finishes after step 1; B writes 2, 3, 4, done after step 2.
TWO = [(0, 3, 2), (0, 1, 3)]
USED_TWO = [4 + 2, 5 + 3, 4]


@pytest.mark.parametrize("policy, reserved", [
    ("contiguous-max", [6 + 6, 6 + 6, 6]),      # max_len 6 each
    ("contiguous-pow2", [6 + 4, 6 + 4, 4]),     # 5 → 8, capped at max_len 6; 4 → 4
    ("contiguous-oracle", [5 + 4, 5 + 4, 4]),   # the final lengths
    # blocks of 2: A takes ceil(4/2) = 2, B 1; at step 1 both start a new block (A's 5th token,
    # B's 3rd): 5 blocks; A then frees 3, B holds 2 at step 2
    ("paged-2", [2 * 3, 2 * 5, 2 * 2]),
    ("paged-1", USED_TWO),                      # block size 1: nothing is ever wasted
    ("paged-16", [16 + 16, 16 + 16, 16]),
])
def test_two_requests_exact_records(policy, reserved):
    res = _run(TWO, policy, budget=32)
    assert _records(res) == {"reserved": reserved, "used": USED_TWO, "running": [2, 2, 1],
                             "finished": [0, 1, 1], "queued": [0, 0, 0]}
    assert res.utilization == pytest.approx(sum(USED_TWO) / sum(reserved))
    assert res.steps == 3 and res.peak_batch == 2 and res.preemptions == 0
    assert res.throughput == pytest.approx(2 / 3)


def test_contiguous_max_waits_for_memory():
    # budget 8, max_len 6: B's 6 slots do not fit next to A's; B waits for A, then runs 3 steps
    res = _run(TWO, "contiguous-max", budget=8)
    assert _records(res) == {"reserved": [6, 6, 6, 6, 6], "used": [4, 5, 2, 3, 4],
                             "running": [1] * 5, "finished": [0, 1, 0, 0, 1],
                             "queued": [1, 1, 0, 0, 0]}
    assert res.pool_tokens == 8
    assert res.pool_utilization == pytest.approx(18 / (5 * 8))
    assert res.saturated_pool_utilization == pytest.approx(9 / 16)


def test_first_fit_external_fragmentation():
    """Budget 10, oracle reservations: A = 3 slots [0, 3), B = 5 [3, 8), C = 2 [8, 10).
    A and C finish after step 0, leaving holes [0, 3) and [8, 10): 5 free slots, but D needs 5
    in one piece, so it waits until B frees [3, 8) after step 3 — then D runs one step."""
    reqs = [(0, 2, 1), (0, 1, 4), (0, 1, 1), (0, 4, 1)]
    res = _run(reqs, "contiguous-oracle", budget=10)
    assert _records(res) == {"reserved": [10, 5, 5, 5, 5], "used": [3 + 2 + 2, 3, 4, 5, 5],
                             "running": [3, 1, 1, 1, 1], "finished": [2, 0, 0, 1, 1],
                             "queued": [1, 1, 1, 1, 0]}


def test_paged_preemption_by_recomputation():
    """paged-1, 5 blocks, no watermark. A (prompt 2, output 3) takes 3 blocks, B (1, 2) takes 2.
    Step 1: both need a block, none is free: B (arrived last) is preempted and queued with the
    2 tokens it had; A grows to 4. Step 2: B still does not fit (needs 3, 1 free); A writes its 5th
    token and finishes. Step 3: B is prefilled again (2 tokens) and writes its last token."""
    res = _run([(0, 2, 3), (0, 1, 2)], "paged-1", budget=5, watermark=0)
    assert _records(res) == {"reserved": [5, 4, 5, 3], "used": [5, 4, 5, 3],
                             "running": [2, 1, 1, 1], "finished": [0, 0, 1, 1],
                             "queued": [0, 1, 1, 0]}
    assert res.preemptions == 1


def test_watermark_holds_back_admission_but_never_blocks_an_empty_pool():
    # 10 blocks, watermark 0.2 → 2 blocks kept free when something already runs
    reqs = [(0, 5, 1), (0, 4, 1)]  # A needs 6 blocks (paged-1), B needs 5
    res = _run(reqs, "paged-1", budget=10, max_len=8, watermark=0.2)
    assert res.running.tolist() == [1, 1]          # B waits: 10 - 6 - 5 < 2
    res = _run([(0, 9, 1)], "paged-1", budget=10, max_len=10, watermark=0.5)
    assert res.running.tolist() == [1]             # alone, it may use the whole pool


def test_prefix_sharing_hand_worked():
    """Two requests of group 0 with a 4-token common prefix, blocks of 2: the prefix's 2 full
    blocks are stored once. Unshared: 3 + 3 blocks = 12 slots holding 6 + 6 tokens. Shared: the
    first allocates 3 blocks, the second only 1: 8 slots holding 6 + 6 - 4 = 8 distinct tokens."""
    reqs = [(0, 5, 1, 0, 4), (0, 5, 1, 0, 4)]
    plain = _run(reqs, "paged-2", budget=100, max_len=8)
    shared = _run(reqs, "paged-2-shared", budget=100, max_len=8)
    assert (plain.reserved.tolist(), plain.used.tolist()) == ([12], [12])
    assert (shared.reserved.tolist(), shared.used.tolist()) == ([8], [8])
    # a prefix shorter than a block shares nothing (only full blocks are shared)
    reqs = [(0, 5, 1, 0, 1), (0, 5, 1, 0, 1)]
    assert _run(reqs, "paged-2-shared", budget=100, max_len=8).reserved.tolist() == [12]


def test_prefix_blocks_live_while_any_member_runs():
    """A (prompt 5 = 4 shared + 1, output 1) allocates the 2 prefix blocks and finishes after
    step 0; B (same group, output 3) keeps them. Blocks of 2. Step 0: A 3 blocks + B 1 own = 4
    blocks (8 slots), used 6 + 6 - 4 = 8. A frees only its own block. Step 1: B's 7th token opens
    a block: 2 shared + 2 own = 8 slots, used 7. Step 2: B's 8th token fits: 8 slots, used 8.
    (Had A freed the prefix, step 1 would show 4 slots.)"""
    reqs = [(0, 5, 1, 0, 4), (0, 5, 3, 0, 4)]
    res = _run(reqs, "paged-2-shared", budget=100, max_len=8)
    assert res.reserved.tolist() == [8, 8, 8] and res.used.tolist() == [8, 7, 8]
    assert res.finished.tolist() == [1, 0, 1]


def test_idle_steps_before_late_arrivals_are_recorded():
    res = _run([(3, 1, 2)], "paged-1", budget=10)
    assert res.running.tolist() == [0, 0, 0, 1, 1]
    assert res.reserved.tolist() == [0, 0, 0, 2, 3]


def test_max_batch_caps_the_running_set():
    reqs = [(0, 1, 2)] * 4
    res = _run(reqs, "paged-1", budget=100, max_batch=2)
    assert res.peak_batch == 2 and res.running.tolist() == [2, 2, 2, 2]


# --- invariants on random traces -------------------------------------------------------------

@st.composite
def _traces(draw):
    n = draw(st.integers(1, 12))
    groups = draw(st.integers(0, 2))
    prefix = [draw(st.integers(1, 12)) for _ in range(groups)]
    rows = []
    for _ in range(n):
        g = draw(st.integers(-1, groups - 1)) if groups else -1
        pre = prefix[g] if g >= 0 else 0
        rows.append((draw(st.integers(0, 20)), pre + draw(st.integers(1, 12)),
                     draw(st.integers(1, 15)), g, pre))
    return W.Trace.from_requests(rows)


POLICIES = ["contiguous-max", "contiguous-pow2", "contiguous-oracle", "paged-1", "paged-3",
            "paged-8", "paged-3-shared", "paged-1-shared"]


@settings(max_examples=60, deadline=None)
@given(trace=_traces(), budget=st.integers(40, 120), policy=st.sampled_from(POLICIES))
def test_invariants(trace, budget, policy):
    res = W.simulate_policy(trace, policy, budget_tokens=budget, max_len=40)
    assert res.finished.sum() == len(trace)                   # everyone finishes
    assert np.all(res.used <= res.reserved)                   # tokens live in reserved memory
    assert np.all(res.reserved <= res.pool_tokens)            # within the budget
    # each running request writes one generated token per step; preemption loses none of them
    assert res.running.sum() == trace.output_len.sum()
    if policy.startswith("paged-1"):
        assert np.array_equal(res.used, res.reserved)         # block size 1 wastes nothing
    if policy.startswith("contiguous"):
        assert res.preemptions == 0
    idle = res.running == 0
    assert np.all(res.reserved[idle] == 0)                    # nothing leaks between requests


@settings(max_examples=40, deadline=None)
@given(trace=_traces(), block=st.integers(1, 6))
def test_prefix_sharing_never_uses_more(trace, block):
    """With memory to spare the two schedules are the same step for step, and sharing never
    reserves more; the tokens it stores once are exactly the duplicates it saves."""
    kw = dict(budget_tokens=100_000, max_len=40, watermark=0)
    plain = W.simulate_policy(trace, f"paged-{block}", **kw)
    shared = W.simulate_policy(trace, f"paged-{block}-shared", **kw)
    assert np.array_equal(plain.running, shared.running)
    assert np.all(shared.reserved <= plain.reserved)
    assert np.all(shared.used <= plain.used)
    assert np.array_equal(plain.reserved - shared.reserved, plain.used - shared.used)


# --- traces ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(W.TRACE_SPECS))
def test_committed_trace_regenerates_identically(name, tmp_path):
    committed = (DATA / f"trace_{name}.csv").read_text(encoding="utf-8")
    assert W.make_trace(**W.TRACE_SPECS[name]).to_csv() == committed
    out = tmp_path / "t.csv"
    W.write_trace(out, name)
    assert out.read_text(encoding="utf-8") == committed
    trace = W.load_trace(name)
    assert W.Trace.from_csv(committed).to_csv() == committed
    assert len(trace) <= 2000 and len(committed) < 40_000
    assert np.all(trace.final_len <= W.DEFAULT_MAX_LEN)


def test_trace_sizes_and_shared_prefixes():
    sizes = {name: len(W.load_trace(name)) for name in W.TRACE_SPECS}
    assert sum(sizes.values()) <= 2000
    fewshot = W.load_trace("fewshot")
    assert set(fewshot.group.tolist()) == {0, 1, 2, 3}
    assert set(fewshot.prefix_len.tolist()) == {80, 160, 240, 320}
    assert np.all(W.load_trace("sharegpt").group == -1)


@pytest.mark.parametrize("workload", sorted(W.WORKLOADS))
def test_workload_population_means_are_the_papers(workload):
    """The log-normal parameters give exactly the means the vLLM paper reports (Fig. 11)."""
    w = W.WORKLOADS[workload]
    prompt, output = W.lognormal_means(w["prompt_mu"], w["output_mu"], w["sigma"])
    assert prompt == pytest.approx(w["prompt_mean"], rel=1e-4)
    assert output == pytest.approx(w["output_mean"], rel=1e-4)


def test_sample_means_close_to_the_papers():
    # the paper: ShareGPT prompts 8.4x and outputs 5.8x longer than Alpaca's on average (§6.1)
    share, alp = W.load_trace("sharegpt"), W.load_trace("alpaca")
    assert share.prompt_len.mean() == pytest.approx(161.31, rel=0.06)
    assert share.output_len.mean() == pytest.approx(337.99, rel=0.06)
    assert alp.prompt_len.mean() == pytest.approx(19.31, rel=0.06)
    assert alp.output_len.mean() == pytest.approx(58.45, rel=0.06)
    assert 161.31 / 19.31 == pytest.approx(8.4, abs=0.05)
    assert 337.99 / 58.45 == pytest.approx(5.8, abs=0.05)


# --- the headline result ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_run():
    """The notebook's run: the first 300 ShareGPT-like requests, every default policy."""
    return W.simulate(W.load_trace("sharegpt").head(300), progress=False)


def test_default_run_reproduces_the_papers_shape(default_run):
    util = {name: r.utilization for name, r in default_run.items()}
    assert list(util) == list(W.DEFAULT_POLICIES)
    assert util["contiguous-max"] < 0.40                       # prior systems: 20.4–38.2%
    assert W.VLLM_PRIOR_SYSTEMS_RANGE[0] < util["contiguous-max"]
    assert util["paged-16"] > 1 - W.VLLM_PAGED_WASTE_BELOW     # paging wastes < 4%
    assert util["paged-1"] == 1.0
    assert util["contiguous-max"] < util["contiguous-pow2"] < util["contiguous-oracle"] \
        < util["paged-256"] < util["paged-16"]
    # less waste → more requests in flight → fewer steps for the same work
    steps = {name: r.steps for name, r in default_run.items()}
    assert steps["paged-16"] < steps["contiguous-oracle"] < steps["contiguous-max"]
    assert default_run["paged-16"].peak_batch > 4 * default_run["contiguous-max"].peak_batch
    assert default_run["paged-16"].saturated_pool_utilization > 0.9
    table = W.summary_table(default_run)
    assert "contiguous-max" in table and "%" in table


def test_progress_bar_runs(capsys):
    res = W.simulate(W.Trace.from_requests(TWO), ["paged-1"], budget_tokens=32, max_len=6,
                     progress=True)
    assert res["paged-1"].finished.sum() == 2


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: W.Trace.from_requests([]), "at least one request"),
    (lambda: W.Trace.from_requests([(0, 0, 3)]), "prompt_len must be >= 1"),
    (lambda: W.Trace.from_requests([(0, 3, 0)]), "output_len must be >= 1"),
    (lambda: W.Trace.from_requests([(-1, 3, 1)]), "arrival must be >= 0"),
    (lambda: W.Trace.from_requests([(0, 3, 1, 0, 4)]), "exceeds prompt_len"),
    (lambda: W.Trace.from_requests([(0, 3, 1, -1, 2)]), "needs a group"),
    (lambda: W.Trace.from_requests([(0, 5, 1, 0, 2), (0, 5, 1, 0, 3)]), "one prefix_len"),
    (lambda: W.Trace.from_requests([(0, 3)]), "arrival, prompt_len, output_len"),
    (lambda: W.Trace(np.zeros(2), [1, 1], [1, 1], [-1, -1], [0, 0]), "integers"),
    (lambda: W.Trace([0], [1, 1], [1, 1], [-1, -1], [0, 0]), "differ in length"),
    (lambda: W.Trace.from_csv("a,b\n1,2\n"), "header"),
    (lambda: W.Trace.from_csv("arrival,prompt_len,output_len,group,prefix_len\n0,1,x,-1,0\n"),
     "integers"),
    (lambda: W.parse_policy("paged"), "unknown policy"),
    (lambda: W.parse_policy("paged-0"), "unknown policy"),
    (lambda: W.parse_policy("contiguous-min"), "unknown policy"),
    (lambda: W.parse_policy(16), "a name or a Policy"),
    (lambda: W.Policy("contiguous", share_prefix=True), "cannot share"),
    (lambda: W.Policy("buddy"), "kind"),
    (lambda: _run(TWO, "paged-1", budget=32, max_len=4), "more than max_len"),
    (lambda: _run(TWO, "contiguous-max", budget=5), "more than budget_tokens"),
    (lambda: _run(TWO, "paged-4", budget=4), "could never finish"),
    (lambda: _run(TWO, "paged-64", budget=32), "smaller than one block"),
    (lambda: _run(TWO, "paged-1", budget=32, watermark=1.0), "watermark"),
    (lambda: _run(TWO, "paged-1", budget=0), "budget_tokens must be >= 1"),
    (lambda: _run(TWO, "paged-1", budget=32, max_batch=0), "max_batch"),
    (lambda: W.simulate_policy([(0, 1, 1)], "paged-1"), "kvlab.waste.Trace"),
    (lambda: W.simulate(W.Trace.from_requests(TWO), [], progress=False), "empty"),
    (lambda: W.simulate(W.Trace.from_requests(TWO), ["paged-1", "paged-1"], progress=False),
     "more than once"),
    (lambda: W.make_trace("lmsys"), "unknown workload"),
    (lambda: W.make_trace(rate=0), "rate"),
    (lambda: W.load_trace("lmsys"), "unknown trace"),
    (lambda: W.write_trace("/tmp/never.csv", "lmsys"), "unknown trace"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
