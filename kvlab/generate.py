"""Generation with :class:`kvlab.model.Qwen3Model`: one sequence through any cache, or many
requests at once through one shared paged pool (continuous batching). Notebook 06 uses both.

    generate(model, prompt_ids, 20, cache="paged", dtype="fp16")          # one sequence
    generate(model, prompt_ids, 20, cache="none")                         # recompute every step
    serve(model, [Request("a", ids_a, 12), Request("b", ids_b, 8, arrival=3)],
          num_blocks=32, block_size=4)                                    # continuous batching

**Continuous batching** (:func:`serve`), one step at a time: requests whose ``arrival`` step has
come are admitted while the pool can hold them (``KvCacheManager.add_sequence``: a prompt that
shares full blocks with one already seen reuses them, the prefix cache); every running request
brings its new tokens (the rest of its prompt on its first step, then its last sampled token) to
one batched forward (:meth:`Qwen3Model.forward_batch`: ``KvCacheManager.reserve`` takes the
blocks, ``paging.plan_step`` checks the step's index arrays once, then per layer one fused
``paged_write_batched`` and one ``paged_decode_attention`` over all of them); each request
samples its next token; a request that has its ``max_new_tokens`` leaves and its blocks go back
(``KvCacheManager.release``). Admission is conservative: a request waits until the pool has room
for its whole prompt + output, so nothing is ever preempted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np

from kvlab.cache import KvCacheManager, KvPool
from kvlab.paging import blocks_needed

CACHE_KINDS = ("none", "contiguous", "paged")


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0,
           rng: np.random.Generator | None = None) -> int:
    """The next token from one row of logits: greedy (``temperature == 0``: the first largest),
    else a draw from ``softmax(logits / temperature)`` over the ``top_k`` largest (0 = all)."""
    logits = np.asarray(logits, np.float64)
    if temperature < 0 or top_k < 0:
        raise ValueError("temperature and top_k must be >= 0")
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k:
        kth = np.sort(z)[-min(top_k, z.size)]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    rng = rng if rng is not None else np.random.default_rng(0)
    return int(rng.choice(z.size, p=p))


@dataclass
class Generation:
    """What :func:`generate` returns: the new tokens, each step's logits ``[steps, vocab]``, and
    the cache's bytes at the end (``reserved``: storage the cache holds; ``used``: bytes holding
    tokens; 0 for ``cache="none"``, which keeps nothing between steps)."""

    tokens: list[int]
    logits: np.ndarray
    bytes_reserved: int
    bytes_used: int


def _check_request(model: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                   capacity: int | None) -> list[int]:
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    needed = len(prompt) + max_new_tokens - 1  # the last new token is never fed back
    limit = model.config.max_position_embeddings
    if capacity is not None:
        limit = min(limit, capacity)
    if needed > limit:
        raise ValueError(f"a prompt of {len(prompt)} tokens + {max_new_tokens} new ones needs "
                         f"{needed} cached positions, but the cache allows {limit} (capacity "
                         f"{capacity}, max_position_embeddings "
                         f"{model.config.max_position_embeddings})")
    return prompt


def generate(model: Any, prompt_ids: Sequence[int], max_new_tokens: int, cache: str = "paged",
             dtype: str = "fp16", block_size: int = 16, capacity: int | None = None,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> Generation:
    """Generate ``max_new_tokens`` tokens after ``prompt_ids`` for one sequence.

    cache: ``"paged"`` or ``"contiguous"`` (a :class:`~kvlab.model.SequenceCache` of ``dtype``:
    ``"fp16"``, ``"float32"``, ``"int8"``, ``"fp8_e4m3"``; prefill once, then one token a step),
    or ``"none"`` (every step recomputes the whole sequence from scratch, through a throwaway fp16
    contiguous cache of exactly its length). capacity: the cache's tokens (default
    ``max_position_embeddings``). temperature 0 is greedy; else sampled with ``seed``.
    """
    if cache not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
    prompt = _check_request(model, prompt_ids, max_new_tokens, capacity)
    rng = np.random.default_rng(seed)
    tokens, rows = [], []
    if cache == "none":
        seq = list(prompt)
        for _ in range(max_new_tokens):
            row = model.forward_nocache(seq, dtype=dtype)[-1]
            rows.append(row)
            tokens.append(sample(row, temperature, top_k, rng))
            seq.append(tokens[-1])
        return Generation(tokens, np.stack(rows), 0, 0)
    kv = model.new_cache(cache, capacity, dtype, block_size)
    feed = prompt
    for step in range(max_new_tokens):
        row = model.forward(feed, kv)[-1]
        rows.append(row)
        tokens.append(sample(row, temperature, top_k, rng))
        feed = [tokens[-1]]
    return Generation(tokens, np.stack(rows), kv.nbytes_reserved, kv.nbytes_used)


# --- continuous batching ------------------------------------------------------------------------

@dataclass
class Request:
    """One request: ``prompt`` token ids, ``max_new_tokens`` to generate, the step it arrives at,
    and how it samples (``temperature`` 0 = greedy; ``seed`` for its own random generator)."""

    rid: Hashable
    prompt: Sequence[int]
    max_new_tokens: int
    arrival: int = 0
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0


@dataclass(frozen=True)
class StepRecord:
    """The pool after one step: blocks ``used`` (owned by a running request), ``cached`` (nobody
    owns them, their K/V kept for prefix hits), ``free``; which requests ran, joined, finished;
    each running request's block count and block ids (a block shared through the prefix cache
    appears under every request that holds it); the ids of the cached blocks; the tokens the step
    computed."""

    step: int
    used: int
    cached: int
    free: int
    running: tuple
    joined: tuple
    finished: tuple
    blocks: dict
    tokens: int
    block_ids: dict = field(default_factory=dict)
    cached_ids: tuple = ()


@dataclass
class ServeResult:
    """What :func:`serve` returns: each request's new tokens and logits ``[n, vocab]``, the
    tokens its prompt reused from the prefix cache, the step-by-step :class:`StepRecord`
    timeline, and the pool's shape."""

    outputs: dict
    logits: dict
    prefix_hits: dict
    timeline: list = field(default_factory=list)
    num_blocks: int = 0
    block_size: int = 0
    bytes_per_block: int = 0
    leaked_blocks: int = 0


@dataclass
class _Running:
    request: Request
    feed: list
    rng: np.random.Generator
    out: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    need: int = 0  # blocks it holds once finished


def serve(model: Any, requests: Sequence[Request], num_blocks: int, block_size: int = 16,
          dtype: str = "fp16", max_blocks_per_seq: int | None = None,
          enable_prefix_caching: bool = True, max_running: int | None = None) -> ServeResult:
    """Run ``requests`` with continuous batching over one paged pool of ``num_blocks`` blocks
    (all layers share one block table per request, through :class:`~kvlab.cache.KvCacheManager`).

    Every step, one batched forward covers every running request (see the module notes). A
    request whose prompt + output cannot ever fit (past ``max_blocks_per_seq``, the whole pool,
    or ``max_position_embeddings``) is a ValueError before anything runs. At the end every
    request has been released; ``leaked_blocks`` counts blocks still owned (0, checked).
    """
    c = model.config
    max_blocks_per_seq = max_blocks_per_seq or num_blocks
    capacity = max_blocks_per_seq * block_size
    ids = [r.rid for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError(f"request ids must be unique, got {ids}")
    for r in requests:
        prompt = _check_request(model, r.prompt, r.max_new_tokens, capacity)
        if blocks_needed(len(prompt) + r.max_new_tokens - 1, block_size) > num_blocks:
            raise ValueError(f"request {r.rid!r} needs more blocks than the pool's {num_blocks}")
    pool = KvPool(c.num_hidden_layers, num_blocks, block_size, c.num_key_value_heads, c.head_dim,
                  dtype=dtype, backend=model.backend)
    mgr = KvCacheManager(pool, max_blocks_per_seq, enable_prefix_caching=enable_prefix_caching)
    pending = sorted(requests, key=lambda r: r.arrival)  # stable: ties keep the given order
    running: dict[Hashable, _Running] = {}
    result = ServeResult({}, {}, {}, num_blocks=num_blocks, block_size=block_size,
                         bytes_per_block=pool.nbytes // num_blocks)
    step = 0
    while pending or running:
        joined = []
        while pending and pending[0].arrival <= step and (
                max_running is None or len(running) < max_running):
            r = pending[0]
            need = blocks_needed(len(r.prompt) + r.max_new_tokens - 1, block_size)
            promised = sum(s.need - len(mgr.block_table(rid)[mgr.block_table(rid) >= 0])
                           for rid, s in running.items())
            if mgr.allocator.num_available - promised < need:
                break  # wait for a request to finish (first come, first served)
            pending.pop(0)
            cached = mgr.add_sequence(r.rid, r.prompt)
            result.prefix_hits[r.rid] = cached
            running[r.rid] = _Running(r, list(r.prompt)[cached:], np.random.default_rng(r.seed),
                                      need=need)
            joined.append(r.rid)
        finished, tokens = [], 0
        if running:
            rids = list(running)
            offsets = [mgr.context_len(rid) for rid in rids]
            for rid in rids:
                mgr.reserve(rid, running[rid].feed)
            logits = model.forward_batch(pool, mgr.block_tables(rids), offsets,
                                         [running[rid].feed for rid in rids])
            for rid, rows in zip(rids, logits):
                s, r = running[rid], running[rid].request
                tokens += len(s.feed)
                s.rows.append(rows[-1])
                s.out.append(sample(rows[-1], r.temperature, r.top_k, s.rng))
                s.feed = [s.out[-1]]
                if len(s.out) == r.max_new_tokens:
                    mgr.release(rid)
                    result.outputs[rid], result.logits[rid] = s.out, np.stack(s.rows)
                    del running[rid]
                    finished.append(rid)
        a = mgr.allocator
        tables = {rid: tuple(int(b) for b in mgr.block_table(rid) if b >= 0) for rid in running}
        result.timeline.append(StepRecord(
            step, a.num_used, a.num_cached, a.num_free, tuple(running) + tuple(finished),
            tuple(joined), tuple(finished), {rid: len(ids) for rid, ids in tables.items()},
            tokens, tables,
            tuple(b for b in range(num_blocks) if a.ref_count(b) == 0 and not a.is_free(b))))
        step += 1
    mgr.check_invariants()
    result.leaked_blocks = mgr.allocator.num_used
    if result.leaked_blocks or len(mgr):
        raise AssertionError(f"{result.leaked_blocks} blocks still owned after every request "
                             f"finished")
    result.outputs = {r.rid: result.outputs[r.rid] for r in requests}
    return result
