"""How much of a KV cache holds real tokens: a step-by-step serving simulator.

Before paging, serving systems gave every request one contiguous stretch of KV memory, sized up
front for the longest output it might produce. The vLLM paper (Kwon et al., "Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP 2023) reports that in such
systems only 20.4%–38.2% of the KV cache memory held actual token states, and that paging cut
the waste to under 4% (``data/README.md`` says which of these figures were checked against a
stored copy of the paper). This module replays a trace of requests through a small
continuous-batching scheduler under a fixed KV budget and counts, step by step, the token slots
each policy reserves and the slots that hold a token. Nothing is estimated: every count is
allocation arithmetic.

**Requests.** A :class:`Trace` lists, per request, its arrival step, ``prompt_len``,
``output_len`` and an optional shared-prefix ``group`` with the ``prefix_len`` tokens its members'
prompts have in common (``group = -1``, ``prefix_len = 0``: none). Its final length is
``prompt_len + output_len``.

**The scheduler** (every policy runs the same one). Time advances in decode steps ``t = 0, 1, …``.

1. At the start of step ``t``, requests that have arrived (``arrival <= t``) join the queue,
   ordered by arrival (file order breaks ties). From its head, requests are admitted while the
   policy can place them (strict FCFS: a request that does not fit blocks the ones behind it).
   ``max_batch`` caps the running set if given.
2. Every running request appends one token: a request admitted at step ``t`` writes its prompt
   (prefill) and its first output token's slot at step ``t``, so it holds ``prompt_len + 1``
   tokens after step ``t`` and ``prompt_len + output_len`` after step ``t + output_len - 1``,
   its last step.
3. After the step's writes the simulator records: slots **reserved**, slots **used** (holding a
   token; a shared prefix counts once), requests **running**. Requests that reached their final
   length then finish and free their memory.

**Policies** (:class:`Policy`, or strings such as ``"paged-16"``):

- ``contiguous-max`` — each request reserves ``max_len`` slots at admission (its prompt plus the
  longest output the context window allows), as FasterTransformer and Orca (Max) in the paper.
- ``contiguous-pow2`` — reserves the next power of two ≥ its final length (Orca (Pow2)).
- ``contiguous-oracle`` — reserves exactly its final length, which no real system knows in
  advance (Orca (Oracle), the best case for contiguous reservation).

  Contiguous reservations live in one address space of ``budget_tokens`` slots, placed first-fit;
  a request waits while no free hole is large enough, even if the free slots add up
  (external fragmentation). They are never preempted: the reservation covers the final length.
- ``paged-B`` — blocks of ``B`` slots, allocated as tokens arrive (``ceil((prompt_len + 1) / B)``
  at admission, one more whenever a token starts a new block), freed when the request finishes.
  A request is admitted while the free blocks, less a ``watermark`` fraction of the pool, cover
  its prompt. When a running request needs a block and none is free, the running request that
  arrived last is preempted: its blocks are freed and it goes back into the queue in its arrival
  order (so ahead of everyone who arrived after it), to be recomputed (prefilled again with the
  prompt and the tokens it had generated) when memory frees up — vLLM's preemption by
  recomputation. Only the waste within each request's last block remains.
- ``paged-B-shared`` — as ``paged-B``, and requests of one group share the *full* blocks of their
  common prefix (``prefix_len // B`` blocks), reference counted: the first member allocates them,
  the others reuse them while any member holds them, and the last one out frees them.

**Results** (:class:`SimResult`): ``utilization`` = Σ used / Σ reserved over all steps (the
share of reserved memory that held real tokens), ``pool_utilization`` = Σ used / (steps × pool)
(the share of the whole KV pool: closer to what the paper's Fig. 2 calls "token states", since
there fragmented free memory counts as waste too), ``saturated_pool_utilization`` (the same over
the steps when requests were waiting, i.e. memory was the limit), peak and mean batch size,
throughput in requests finished per step, preemptions.

What this model leaves out: the prompt is written in the admission step (no chunked prefill, no
compute cost), every step takes the same time whatever the batch, and a preempted request is
recomputed rather than swapped to CPU memory.

The shipped traces (``data/trace_*.csv``, see ``data/README.md``) are synthetic: lengths drawn to
the means the vLLM paper reports for ShareGPT and Alpaca. :func:`make_trace` regenerates them.
"""
from __future__ import annotations

import bisect
import heapq
import io
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from kvlab.checks import check_int
from kvlab.data import data_path

# The paper's context window for OPT (2048 tokens), and a pool of 16,384 token slots: about what an
# OPT-13B has for KV on a 40 GB A100 (40 layers x 5120 hidden x K and V x 2 bytes = 0.82 MB per
# token; 40 GB less ~26 GB of fp16 weights and some activation memory leaves ~13 GB ≈ 16k tokens).
DEFAULT_MAX_LEN = 2048
DEFAULT_BUDGET_TOKENS = 16_384
DEFAULT_POLICIES = ("contiguous-max", "contiguous-pow2", "contiguous-oracle",
                    "paged-256", "paged-16", "paged-1")

# What the vLLM paper reports (Kwon et al., SOSP 2023): the share of KV cache memory that holds
# actual token states in prior systems, and paging's waste (provenance in data/README.md).
VLLM_PRIOR_SYSTEMS_RANGE = (0.204, 0.382)
VLLM_PAGED_WASTE_BELOW = 0.04



# --- traces ----------------------------------------------------------------------------------

_COLUMNS = ("arrival", "prompt_len", "output_len", "group", "prefix_len")


@dataclass(frozen=True, eq=False)
class Trace:
    """Requests to serve: one entry per request in each int64 array (see the module docstring).

    Requests are served first come, first served by ``arrival``, ties in file order.
    """

    arrival: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    group: np.ndarray
    prefix_len: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        arrays = {}
        for col in _COLUMNS:
            arr = np.asarray(getattr(self, col))
            if arr.ndim != 1:
                raise ValueError(f"trace column {col} must be 1-D, got shape {list(arr.shape)}")
            if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"trace column {col} must hold integers, got {arr.dtype}")
            arrays[col] = arr.astype(np.int64)
            arrays[col].setflags(write=False)
        sizes = {arr.size for arr in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"trace columns differ in length: "
                             f"{ {c: a.size for c, a in arrays.items()} }")
        if not arrays["arrival"].size:
            raise ValueError("a trace needs at least one request")
        a = arrays
        for col, low in (("arrival", 0), ("prompt_len", 1), ("output_len", 1), ("group", -1),
                         ("prefix_len", 0)):
            bad = np.flatnonzero(a[col] < low)
            if bad.size:
                raise ValueError(f"request {bad[0]}: {col} must be >= {low}, got {a[col][bad[0]]}")
        bad = np.flatnonzero(a["prefix_len"] > a["prompt_len"])
        if bad.size:
            raise ValueError(f"request {bad[0]}: prefix_len {a['prefix_len'][bad[0]]} exceeds "
                             f"prompt_len {a['prompt_len'][bad[0]]}")
        bad = np.flatnonzero((a["group"] < 0) & (a["prefix_len"] > 0))
        if bad.size:
            raise ValueError(f"request {bad[0]}: prefix_len > 0 needs a group >= 0")
        for g in np.unique(a["group"][a["group"] >= 0]):
            lens = np.unique(a["prefix_len"][a["group"] == g])
            if lens.size > 1:
                raise ValueError(f"group {g}: every member must share one prefix_len, "
                                 f"got {lens.tolist()}")
        for col, arr in arrays.items():
            object.__setattr__(self, col, arr)

    def __len__(self) -> int:
        return int(self.arrival.size)

    @property
    def final_len(self) -> np.ndarray:
        """``prompt_len + output_len``: the tokens each request holds when it finishes."""
        return self.prompt_len + self.output_len

    def head(self, n: int) -> "Trace":
        """The first ``n`` requests (file order), e.g. a small run for a notebook."""
        n = check_int("n", n, 1)
        return Trace(*(getattr(self, c)[:n] for c in _COLUMNS), name=self.name)

    def to_csv(self) -> str:
        """The trace as CSV: a header line, then one ``arrival,prompt_len,…`` line per request."""
        lines = [",".join(_COLUMNS)]
        lines += [",".join(str(int(v)) for v in row)
                  for row in zip(*(getattr(self, c) for c in _COLUMNS))]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_csv(cls, text: str, name: str = "") -> "Trace":
        """Parse :meth:`to_csv`'s format (the header must name exactly the five columns)."""
        rows = [line for line in io.StringIO(text).read().splitlines() if line.strip()]
        if not rows or tuple(h.strip() for h in rows[0].split(",")) != _COLUMNS:
            raise ValueError(f"trace CSV must start with the header {','.join(_COLUMNS)}")
        try:
            values = np.array([[int(v) for v in row.split(",")] for row in rows[1:]],
                              dtype=np.int64).reshape(-1, len(_COLUMNS))
        except ValueError as exc:
            raise ValueError(f"trace CSV holds a row that is not {len(_COLUMNS)} integers: {exc}")
        return cls(*values.T, name=name)

    @classmethod
    def from_requests(cls, requests: Iterable[Sequence[int]], name: str = "") -> "Trace":
        """From ``(arrival, prompt_len, output_len[, group, prefix_len])`` tuples."""
        rows = []
        for i, r in enumerate(requests):
            r = tuple(r)
            if len(r) not in (3, 5):
                raise ValueError(f"request {i} must be (arrival, prompt_len, output_len[, group, "
                                 f"prefix_len]), got {r!r}")
            rows.append(r + (-1, 0) if len(r) == 3 else r)
        if not rows:
            raise ValueError("a trace needs at least one request")
        cols = list(zip(*rows))
        return cls(*(np.array(c) for c in cols), name=name)


# Lengths drawn to the means the vLLM paper reports for its two workloads (Fig. 11; §6.1 states
# that ShareGPT has 8.4x longer prompts and 5.8x longer outputs on average than Alpaca). Prompt and
# output lengths are independent log-normals, rounded to ints >= 1; pairs longer than max_len are
# drawn again. The spread `sigma` is our choice (the paper shows only histograms); `prompt_mu` and
# `output_mu` are solved (by `lognormal_means`, see tests/test_waste.py) so that this population —
# after rounding and the max_len redraw — has exactly the paper's means.
WORKLOADS = {
    "sharegpt": {"prompt_mean": 161.31, "output_mean": 337.99, "sigma": 1.0,
                 "prompt_mu": 4.623843, "output_mu": 5.456453},
    "alpaca": {"prompt_mean": 19.31, "output_mean": 58.45, "sigma": 0.7,
               "prompt_mu": 2.715623, "output_mu": 3.823173},
}

# The committed files and the exact arguments that regenerate them (data/README.md lists them too).
TRACE_SPECS = {
    "sharegpt": dict(workload="sharegpt", num_requests=1000, rate=0.5, seed=2023),
    "alpaca": dict(workload="alpaca", num_requests=600, rate=4.0, seed=2023),
    "fewshot": dict(workload="alpaca", num_requests=400, rate=4.0, seed=2016,
                    prefix_lens=(80, 160, 240, 320)),
}


def _lognormal_ints(rng: np.random.Generator, mu: float, sigma: float, n: int) -> np.ndarray:
    """``n`` draws of ``max(1, rint(X))``, X log-normal(mu, sigma)."""
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, n))).astype(np.int64)


def _rounded_lognormal_pmf(mu: float, sigma: float, max_len: int) -> np.ndarray:
    """P(max(1, rint(X)) = k) for k = 1 .. max_len (the last entry also holds the tail above)."""
    k = np.arange(1, max_len + 1, dtype=float)
    edges = k[:-1] + 0.5  # rint(X) = k for X in [k - 0.5, k + 0.5); 1 takes [0, 1.5)
    erf = np.frompyfunc(math.erf, 1, 1)
    cdf = 0.5 * (1 + erf((np.log(edges) - mu) / (sigma * math.sqrt(2))).astype(float))
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


def lognormal_means(prompt_mu: float, output_mu: float, sigma: float,
                    max_len: int = DEFAULT_MAX_LEN) -> tuple[float, float]:
    """Exact mean prompt and output length of :func:`make_trace`'s population (no prefix).

    Sums over the joint distribution of the two rounded log-normals, keeping the pairs with
    ``prompt + output <= max_len`` (the others are redrawn). Used to solve the ``*_mu`` of
    :data:`WORKLOADS` for the paper's means.
    """
    pp = _rounded_lognormal_pmf(prompt_mu, sigma, max_len)
    po = _rounded_lognormal_pmf(output_mu, sigma, max_len)
    k = np.arange(1, max_len + 1, dtype=float)
    keep = (k[:, None] + k[None, :]) <= max_len
    w = pp[:, None] * po[None, :] * keep
    total = w.sum()
    return float(w.sum(axis=1) @ k / total), float(w.sum(axis=0) @ k / total)


def make_trace(workload: str = "sharegpt", num_requests: int = 1000, rate: float = 0.5,
               seed: int = 0, max_len: int = DEFAULT_MAX_LEN,
               prefix_lens: Sequence[int] = ()) -> Trace:
    """A synthetic trace: log-normal lengths with the paper's mean lengths, Poisson arrivals.

    workload: ``"sharegpt"`` or ``"alpaca"`` (:data:`WORKLOADS`).
    rate: mean arrivals per decode step (exponential gaps, arrival = floor of the running sum).
    max_len: requests with ``prompt_len + output_len > max_len`` are drawn again (the paper's OPT
        models have a 2048-token context).
    prefix_lens: if given, each request joins one of ``len(prefix_lens)`` groups uniformly at
        random, and group ``g``'s shared prefix of ``prefix_lens[g]`` tokens (a system prompt or
        few-shot examples, as the paper's §6.4) is put in front of its drawn prompt.

    Deterministic for a given seed under the pinned NumPy (``numpy.random.default_rng``).
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    n = check_int("num_requests", num_requests, 1)
    max_len = check_int("max_len", max_len, 2)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise ValueError(f"rate must be a positive number, got {rate!r}")
    prefix_lens = [check_int("each prefix_len", p, 1) for p in prefix_lens]
    spec = WORKLOADS[workload]
    rng = np.random.default_rng(check_int("seed", seed, 0))
    groups = (rng.integers(0, len(prefix_lens), n) if prefix_lens
              else np.full(n, -1, dtype=np.int64))
    prefix = np.array([prefix_lens[g] if g >= 0 else 0 for g in groups], dtype=np.int64)
    prompts = np.zeros(n, dtype=np.int64)
    outputs = np.zeros(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:  # redraw the requests that do not fit the context window
        p = _lognormal_ints(rng, spec["prompt_mu"], spec["sigma"], todo.size) + prefix[todo]
        o = _lognormal_ints(rng, spec["output_mu"], spec["sigma"], todo.size)
        prompts[todo], outputs[todo] = p, o
        todo = todo[p + o > max_len]
    arrival = np.floor(np.cumsum(rng.exponential(1.0 / rate, n))).astype(np.int64)
    arrival -= arrival[0]  # the first request arrives at step 0
    return Trace(arrival, prompts, outputs, groups, prefix, name=workload)


def write_trace(path, name: str | None = None, **kwargs) -> Trace:
    """Generate a trace and write it as CSV to ``path``; return it.

    ``name`` picks a committed file's arguments from :data:`TRACE_SPECS` (``"sharegpt"``,
    ``"alpaca"``, ``"fewshot"``); otherwise ``kwargs`` go to :func:`make_trace`. To regenerate::

        from kvlab.waste import write_trace
        write_trace("data/trace_sharegpt.csv", "sharegpt")  # from the repository root
    """
    if name is not None:
        if name not in TRACE_SPECS:
            raise ValueError(f"unknown trace {name!r}; committed traces: {', '.join(TRACE_SPECS)}")
        kwargs = {**TRACE_SPECS[name], **kwargs}
    trace = make_trace(**kwargs)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(trace.to_csv())
    return trace


def load_trace(name: str) -> Trace:
    """A committed trace by name (``"sharegpt"``, ``"alpaca"``, ``"fewshot"``) from ``data/``."""
    if name not in TRACE_SPECS:
        raise ValueError(f"unknown trace {name!r}; committed traces: {', '.join(TRACE_SPECS)}")
    return Trace.from_csv(data_path(f"trace_{name}.csv").read_text(encoding="utf-8"), name=name)


# --- policies --------------------------------------------------------------------------------

_RESERVE = ("max", "pow2", "oracle")


@dataclass(frozen=True)
class Policy:
    """How KV memory is handed to requests. ``kind`` is ``"contiguous"`` or ``"paged"``."""

    kind: str
    reserve: str = "max"        # contiguous: "max", "pow2" or "oracle"
    block_size: int = 16        # paged
    share_prefix: bool = False  # paged: share a group's full prefix blocks

    def __post_init__(self) -> None:
        if self.kind not in ("contiguous", "paged"):
            raise ValueError(f"policy kind must be 'contiguous' or 'paged', got {self.kind!r}")
        if self.kind == "contiguous":
            if self.reserve not in _RESERVE:
                raise ValueError(f"contiguous reserve must be one of {_RESERVE}, "
                                 f"got {self.reserve!r}")
            if self.share_prefix:
                raise ValueError("contiguous reservations cannot share a prefix: each request's "
                                 "KV lives in its own stretch of memory")
        else:
            check_int("block_size", self.block_size, 1)

    @property
    def name(self) -> str:
        if self.kind == "contiguous":
            return f"contiguous-{self.reserve}"
        return f"paged-{self.block_size}" + ("-shared" if self.share_prefix else "")


def parse_policy(spec: str | Policy) -> Policy:
    """``"contiguous-max" | "contiguous-pow2" | "contiguous-oracle" | "paged-<B>" |
    "paged-<B>-shared"`` (or a :class:`Policy`) → :class:`Policy`."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a policy must be a name or a Policy, got {type(spec).__name__}")
    parts = spec.split("-")
    if parts[0] == "contiguous" and len(parts) == 2 and parts[1] in _RESERVE:
        return Policy("contiguous", reserve=parts[1])
    if parts[0] == "paged" and len(parts) in (2, 3) and parts[1].isdigit() and int(parts[1]) > 0:
        if len(parts) == 2 or parts[2] == "shared":
            return Policy("paged", block_size=int(parts[1]), share_prefix=len(parts) == 3)
    raise ValueError(f"unknown policy {spec!r}; expected contiguous-max, contiguous-pow2, "
                     f"contiguous-oracle, paged-<block_size> or paged-<block_size>-shared")


# --- results ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SimResult:
    """One policy's run: per-step records (index = step) and the totals derived from them."""

    policy: str
    pool_tokens: int          # token slots in the pool (budget rounded down to whole blocks)
    reserved: np.ndarray      # int64 [steps]: slots reserved after each step's writes
    used: np.ndarray          # int64 [steps]: slots holding a token (a shared prefix once)
    running: np.ndarray       # int64 [steps]: requests that wrote a token in the step
    finished: np.ndarray      # int64 [steps]: requests that finished at the end of the step
    queued: np.ndarray        # int64 [steps]: requests that had arrived but waited
    preemptions: int = 0      # paged: times a running request was evicted for recomputation
    num_requests: int = 0

    @property
    def steps(self) -> int:
        return int(self.reserved.size)

    @property
    def utilization(self) -> float:
        """Σ used / Σ reserved: the share of reserved KV memory that held real tokens."""
        total = int(self.reserved.sum())
        return float(self.used.sum() / total) if total else 1.0

    @property
    def pool_utilization(self) -> float:
        """Σ used / (steps × pool): the share of the whole KV pool that held real tokens."""
        return float(self.used.sum() / (self.steps * self.pool_tokens)) if self.steps else 0.0

    @property
    def saturated_pool_utilization(self) -> float:
        """:attr:`pool_utilization` over the steps when requests were queued, i.e. when memory
        (or ``max_batch``), not a lack of requests, limited the batch. NaN if there were none."""
        busy = self.queued > 0
        if not busy.any():
            return float("nan")
        return float(self.used[busy].sum() / (busy.sum() * self.pool_tokens))

    @property
    def peak_batch(self) -> int:
        return int(self.running.max()) if self.steps else 0

    @property
    def mean_batch(self) -> float:
        return float(self.running.mean()) if self.steps else 0.0

    @property
    def throughput(self) -> float:
        """Requests finished per decode step, over the whole run."""
        return self.num_requests / self.steps if self.steps else 0.0

    def summary(self) -> dict:
        """The headline numbers as a plain dict (for a table or JSON)."""
        return {"policy": self.policy, "utilization": self.utilization,
                "pool_utilization": self.pool_utilization,
                "saturated_pool_utilization": self.saturated_pool_utilization,
                "steps": self.steps, "peak_batch": self.peak_batch, "mean_batch": self.mean_batch,
                "throughput": self.throughput, "preemptions": self.preemptions}


# --- the simulator ---------------------------------------------------------------------------

class _FirstFit:
    """Contiguous placement in ``[0, size)``: first free hole that fits; holes merge on free."""

    def __init__(self, size: int):
        self.starts, self.sizes = [0], [size]

    def alloc(self, n: int) -> int | None:
        for i, (start, size) in enumerate(zip(self.starts, self.sizes)):
            if size >= n:
                if size == n:
                    del self.starts[i], self.sizes[i]
                else:
                    self.starts[i], self.sizes[i] = start + n, size - n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.sizes.insert(i, n)
        if i + 1 < len(self.starts) and self.starts[i] + self.sizes[i] == self.starts[i + 1]:
            self.sizes[i] += self.sizes.pop(i + 1)
            self.starts.pop(i + 1)
        if i > 0 and self.starts[i - 1] + self.sizes[i - 1] == self.starts[i]:
            self.sizes[i - 1] += self.sizes.pop(i)
            self.starts.pop(i)


def _reservation(policy: Policy, final_len: np.ndarray, max_len: int) -> np.ndarray:
    if policy.reserve == "max":
        return np.full_like(final_len, max_len)
    if policy.reserve == "oracle":
        return final_len.copy()
    pow2 = np.array([1 << (int(n) - 1).bit_length() for n in final_len], dtype=np.int64)
    return np.minimum(pow2, max_len)


def simulate_policy(trace: Trace, policy: str | Policy,
                    budget_tokens: int = DEFAULT_BUDGET_TOKENS, max_len: int = DEFAULT_MAX_LEN,
                    max_batch: int | None = None, watermark: float = 0.01,
                    progress: bool = False) -> SimResult:
    """Serve ``trace`` under one policy (see the module docstring) and return its records.

    budget_tokens: the KV pool in token slots (a paged pool holds ``budget_tokens // B`` blocks).
    max_len: the context window; ``contiguous-max`` reserves this many slots per request, and
        every request's final length must fit in it.
    max_batch: most requests running at once (``None``: memory is the only limit).
    watermark: paged policies keep this fraction of the blocks free when admitting (not when
        growing), so a request just admitted is rarely preempted at once; ignored while nothing
        runs.
    progress: show a tqdm bar of finished requests.
    """
    if not isinstance(trace, Trace):
        raise ValueError(f"trace must be a kvlab.waste.Trace, got {type(trace).__name__}")
    policy = parse_policy(policy)
    budget = check_int("budget_tokens", budget_tokens, 1)
    max_len = check_int("max_len", max_len, 1)
    if max_batch is not None:
        max_batch = check_int("max_batch", max_batch, 1)
    if isinstance(watermark, bool) or not isinstance(watermark, (int, float)) or \
            not 0 <= watermark < 1:
        raise ValueError(f"watermark must be a fraction in [0, 1), got {watermark!r}")
    final = trace.final_len
    too_long = np.flatnonzero(final > max_len)
    if too_long.size:
        i = too_long[0]
        raise ValueError(f"request {i} holds {final[i]} tokens when done, more than max_len "
                         f"{max_len}")
    paged = policy.kind == "paged"
    bs = policy.block_size if paged else 1
    num_blocks = budget // bs
    if paged and num_blocks < 1:
        raise ValueError(f"budget_tokens {budget} is smaller than one block of {bs}")
    pool_tokens = num_blocks * bs
    if paged:
        need_alone = -(-final // bs)
        i = int(np.argmax(need_alone))
        if need_alone[i] > num_blocks:
            raise ValueError(f"request {i} needs {need_alone[i]} blocks of {bs} when done, more "
                             f"than the pool's {num_blocks}: it could never finish")
        share = policy.share_prefix
        shared_blocks = trace.prefix_len // bs if share else np.zeros(len(trace), np.int64)
        watermark_blocks = int(watermark * num_blocks)
        ref: dict[int, int] = {}
    else:
        reserve = _reservation(policy, final, max_len)
        i = int(np.argmax(reserve))
        if reserve[i] > budget:
            raise ValueError(f"request {i} reserves {reserve[i]} slots, more than "
                             f"budget_tokens {budget}")
        space = _FirstFit(budget)

    order = np.lexsort((np.arange(len(trace)), trace.arrival))  # first come, first served
    arrival = trace.arrival
    arrived = arrival[order]  # arrival steps in rank order (sorted)
    # the queue: a heap of (rank, request, tokens to prefill); rank = place in `order`, so a
    # preempted request goes back ahead of everyone who arrived after it
    waiting: list[tuple[int, int, int]] = []
    nxt = 0  # next rank to arrive

    # the running set, one entry per request, in admission order
    ids = np.zeros(0, np.int64)
    ranks = np.zeros(0, np.int64)
    lens = np.zeros(0, np.int64)    # tokens held before the current step
    caps = np.zeros(0, np.int64)    # slots it may fill without a new allocation
    targets = np.zeros(0, np.int64)
    addr = np.zeros(0, np.int64)    # contiguous: start address
    free_blocks = num_blocks
    dup = 0  # paged-shared: token slots counted twice in sum(lens) because a prefix is shared

    chunks: list[tuple[np.ndarray, ...]] = []
    t = 0
    done = 0
    preemptions = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(trace), desc=policy.name, unit="req", leave=False)

    def release(rid: int, length_cap: int, start: int) -> None:
        nonlocal free_blocks, dup
        if not paged:
            space.free(start, int(reserve[rid]))
            return
        s = int(shared_blocks[rid])
        own = length_cap // bs - s
        free_blocks += own
        if s:
            g = int(trace.group[rid])
            if ref[g] > 1:
                dup -= s * bs
            ref[g] -= 1
            if ref[g] == 0:
                free_blocks += s

    while done < len(trace):
        while nxt < len(order) and arrival[order[nxt]] <= t:
            rid = int(order[nxt])
            heapq.heappush(waiting, (nxt, rid, int(trace.prompt_len[rid])))
            nxt += 1
        # admit from the head of the queue, first come first served
        new = []
        running = ids.size
        while waiting and (max_batch is None or running + len(new) < max_batch):
            rank, rid, prefill = waiting[0]
            if paged:
                total = -(-(prefill + 1) // bs)
                s = int(shared_blocks[rid])
                g = int(trace.group[rid])
                live = s > 0 and ref.get(g, 0) > 0
                need = total - (s if live else 0)
                floor = watermark_blocks if (running or new) else 0
                if free_blocks - need < floor:
                    break
                free_blocks -= need
                if s:
                    if live:
                        dup += s * bs
                    ref[g] = ref.get(g, 0) + 1
                new.append((rid, rank, prefill, total * bs, 0))
            else:
                start = space.alloc(int(reserve[rid]))
                if start is None:
                    break
                new.append((rid, rank, prefill, int(reserve[rid]), start))
            heapq.heappop(waiting)
        if new:
            cols = np.array(new, dtype=np.int64).T
            ids = np.concatenate([ids, cols[0]])
            ranks = np.concatenate([ranks, cols[1]])
            lens = np.concatenate([lens, cols[2]])
            caps = np.concatenate([caps, cols[3]])
            addr = np.concatenate([addr, cols[4]])
            targets = np.concatenate([targets, final[cols[0]]])
        n = ids.size
        if n == 0:  # idle until the next arrival
            gap = int(arrival[order[nxt]]) - t
            zeros = np.zeros(gap, np.int64)
            chunks.append((zeros, zeros, zeros, zeros, zeros))
            t += gap
            continue
        # k: steps until something happens (a finish, an allocation, or an arrival to admit)
        k = int((targets - lens).min())
        if paged:
            k = min(k, int((caps - lens).min()) + 1)
        if not waiting and nxt < len(order):
            k = min(k, int(arrival[order[nxt]]) - t)
        reserved_now = (num_blocks - free_blocks) * bs if paged else int(reserve[ids].sum())
        if k > 1:  # k - 1 quiet steps: every request appends a token, nothing else changes
            used0 = int(lens.sum()) - dup
            steps = np.arange(t, t + k - 1)
            queued = len(waiting) + np.searchsorted(arrived, steps, side="right") - nxt
            chunks.append((np.full(k - 1, reserved_now, np.int64),
                           used0 + n * np.arange(1, k, dtype=np.int64),
                           np.full(k - 1, n, np.int64), np.zeros(k - 1, np.int64), queued))
            lens = lens + (k - 1)
        # the k-th step: allocate (preempting if the pool is dry), write, record, finish
        if paged:
            needs = lens == caps
            while int(needs.sum()) > free_blocks:
                v = int(np.argmax(ranks))  # the running request that arrived last
                rid = int(ids[v])
                release(rid, int(caps[v]), 0)
                heapq.heappush(waiting, (int(ranks[v]), rid, int(lens[v])))
                preemptions += 1
                keep = np.arange(ids.size) != v
                ids, ranks, lens, caps, addr, targets, needs = (
                    a[keep] for a in (ids, ranks, lens, caps, addr, targets, needs))
            free_blocks -= int(needs.sum())
            caps = caps + needs * bs
            reserved_now = (num_blocks - free_blocks) * bs
        n = ids.size
        lens = lens + 1
        fin = lens == targets
        queued = len(waiting) + int(np.searchsorted(arrived, t + k - 1, "right")) - nxt
        chunks.append((np.array([reserved_now]), np.array([int(lens.sum()) - dup]),
                       np.array([n]), np.array([int(fin.sum())]), np.array([queued])))
        if fin.any():
            for v in np.flatnonzero(fin):
                release(int(ids[v]), int(caps[v]), int(addr[v]))
            keep = ~fin
            ids, ranks, lens, caps, addr, targets = (
                a[keep] for a in (ids, ranks, lens, caps, addr, targets))
            done += int(fin.sum())
            if bar is not None:
                bar.update(int(fin.sum()))
        t += k
    if bar is not None:
        bar.close()
    reserved, used, running_, finished, queued = (np.concatenate(c) for c in zip(*chunks))
    return SimResult(policy.name, pool_tokens, reserved, used, running_, finished, queued,
                     preemptions=preemptions, num_requests=len(trace))


def simulate(trace: Trace, policies: Iterable[str | Policy] = DEFAULT_POLICIES,
             budget_tokens: int = DEFAULT_BUDGET_TOKENS, max_len: int = DEFAULT_MAX_LEN,
             max_batch: int | None = None, watermark: float = 0.01,
             progress: bool = True) -> dict[str, SimResult]:
    """Serve ``trace`` under each policy; return ``{policy name: SimResult}`` in the given order.

    ``progress=True`` shows a tqdm bar per policy (``tqdm.auto``: a widget in Jupyter); pass
    ``progress=False`` in tests and scripts. See :func:`simulate_policy` for the arguments.
    """
    resolved = [parse_policy(p) for p in policies]
    if not resolved:
        raise ValueError("policies is empty: name at least one policy")
    names = [p.name for p in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"policies lists a policy more than once: {names}")
    return {p.name: simulate_policy(trace, p, budget_tokens, max_len, max_batch, watermark,
                                    progress) for p in resolved}


def summary_table(results: Mapping[str, SimResult]) -> str:
    """A fixed-width text table of each result's headline numbers (for a notebook or a CLI).

    "saturated" is the pool's use over the steps when requests were queued: n/a if none were."""
    lines = [f"{'policy':<18} {'of reserved':>11} {'of pool':>8} {'saturated':>9} {'steps':>7} "
             f"{'peak batch':>10} {'req/step':>8} {'preempt':>7}"]
    for r in results.values():
        saturated = r.saturated_pool_utilization  # NaN when no request ever had to wait
        saturated = "n/a" if math.isnan(saturated) else f"{saturated:.1%}"
        lines.append(f"{r.policy:<18} {r.utilization:>11.1%} {r.pool_utilization:>8.1%} "
                     f"{saturated:>9} {r.steps:>7,} {r.peak_batch:>10} "
                     f"{r.throughput:>8.4f} {r.preemptions:>7}")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_BUDGET_TOKENS", "DEFAULT_MAX_LEN", "DEFAULT_POLICIES", "Policy", "SimResult",
    "TRACE_SPECS", "Trace", "VLLM_PAGED_WASTE_BELOW", "VLLM_PRIOR_SYSTEMS_RANGE", "WORKLOADS",
    "load_trace", "lognormal_means", "make_trace", "parse_policy", "simulate", "simulate_policy",
    "summary_table", "write_trace",
]
