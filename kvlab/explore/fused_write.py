"""Notebook 04's explorers: the bytes the fused write saves, and how its kernel's grid is laid out.

- :func:`traffic_state` (logic) and :func:`traffic_explorer`: qk_mode, qkv dtype and cache dtype
  -> the bytes each unfused step reads and writes against the one fused kernel
  (:func:`kvlab.ref.fused_write.write_traffic`).
- :func:`block_grid`, :func:`head_paths` (logic) and :func:`grid_explorer`: tokens per thread
  block, qk_mode and cache -> which thread block of the CUDA kernel carries which (token, head) of
  the packed rows, and which heads go through shared memory (drawn by
  :func:`kvlab.plot.plot_thread_blocks`). Both rules are read off
  ``kvlab.kernels.cuda.fused_write`` (its grid, and the test that picks a head's path);
  tests/test_explore_fused_write.py holds them against a traced run of that kernel, and the
  drawing against them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.explore import Explorer
from kvlab.ref.fused_write import write_traffic

QK_MODES = {0: "0: copy", 1: "1: RMSNorm + RoPE", 2: "2: RoPE", 3: "3: GPT-J RoPE"}
CACHES = ("same as qkv", "int8", "fp8_e4m3")
QWEN3_8B = {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128}


# --- bytes moved -------------------------------------------------------------------------------

def traffic_state(qk_mode: int, dtype: str = "float16", cache: str = "same as qkv",
                  num_tokens: int = 4096, num_q_heads: int = 32, num_kv_heads: int = 8,
                  head_dim: int = 128) -> dict[str, Any]:
    """The bytes of one layer's write step, unfused and fused (default: a 4096-token prefill of
    Qwen3-8B's heads). Returns ``steps`` (``write_traffic``'s dict), ``unfused`` and ``fused``
    (bytes read + written) and ``saved`` (the fraction of the unfused bytes fusion avoids)."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    steps = write_traffic(num_tokens, num_q_heads, num_kv_heads, head_dim, qk_mode=qk_mode,
                          dtype=dtype, kv_dtype=None if cache == CACHES[0] else cache)
    unfused = steps["unfused"]["read"] + steps["unfused"]["write"]
    fused = steps["fused"]["read"] + steps["fused"]["write"]
    return {"steps": steps, "unfused": unfused, "fused": fused, "saved": 1 - fused / unfused}


def draw_traffic(qk_mode: int, dtype: str, cache: str):
    """The bars of :func:`kvlab.plot.plot_write_traffic` for one setting; returns the Figure."""
    import matplotlib.pyplot as plt

    from kvlab.plot import plot_write_traffic

    state = traffic_state(qk_mode, dtype, cache)
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    storage = dtype if cache == CACHES[0] else cache
    plot_write_traffic(state["steps"], ax=ax, title=(
        f"qk_mode {QK_MODES[qk_mode]}, {dtype} qkv, {storage} cache: "
        f"fused {state['fused'] / 2**20:.0f} MiB vs unfused {state['unfused'] / 2**20:.0f} MiB "
        f"({state['saved']:.0%} saved)"))
    ax.title.set_fontsize(9)
    return fig


def traffic_explorer() -> Explorer:
    """qk_mode, qkv dtype and cache dtype -> bytes per step, unfused against fused."""
    import ipywidgets as widgets

    controls = {
        "qk_mode": widgets.ToggleButtons(options=[(label, mode) for mode, label in QK_MODES.items()],
                                         value=1, description="qk_mode"),
        "dtype": widgets.ToggleButtons(options=["float16", "float32"], description="qkv"),
        "cache": widgets.ToggleButtons(options=list(CACHES), description="cache"),
    }
    return Explorer(draw_traffic, controls,
                    "A 4096-token prefill, Qwen3-8B's heads: which steps vanish when fused, and "
                    "what is left?")


# --- the CUDA kernel's grid --------------------------------------------------------------------

def block_grid(num_tokens: int, num_heads: int, tokens_per_block: int) -> np.ndarray:
    """int ``[num_tokens, num_heads]``: the thread block that carries head ``h`` of token ``t``,
    numbered as CUDA numbers blocks (x fastest). The grid is
    ``(ceil(num_tokens / tokens_per_block), num_heads)``: block ``(b, h)`` takes head ``h`` of
    tokens ``b * tokens_per_block`` up to the next multiple."""
    for name, value in (("num_tokens", num_tokens), ("num_heads", num_heads),
                        ("tokens_per_block", tokens_per_block)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    grid_x = -(-num_tokens // tokens_per_block)
    x = np.arange(num_tokens)[:, None] // tokens_per_block
    y = np.arange(num_heads)[None, :]
    return x + grid_x * y


def head_paths(num_q_heads: int, num_kv_heads: int, qk_mode: int, cache: str) -> list[str]:
    """For each head of the packed row (Q, then K, then V): ``"shared"`` when its threads must
    share values — the norm's sum of squares (qk_mode 1, Q and K) or a quantized store's amax (K
    and V into an int8/fp8 cache) — so they go through shared memory with barriers, else
    ``"registers"``: each thread carries its own pairs from qkv to their destination."""
    if qk_mode not in QK_MODES:
        raise ValueError(f"qk_mode must be one of {list(QK_MODES)}, got {qk_mode!r}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    quantized = cache != CACHES[0]
    q = ["shared" if qk_mode == 1 else "registers"] * num_q_heads
    k = ["shared" if qk_mode == 1 or quantized else "registers"] * num_kv_heads
    v = ["shared" if quantized else "registers"] * num_kv_heads
    return q + k + v


GRID_HEADS = (4, 2)   # the explorer's model: 4 Q heads, 2 KV heads
GRID_TOKENS = 32
PREFILL_TOKENS = 4096


def draw_grid(tokens_per_block: int, qk_mode: int, cache: str, num_tokens: int = GRID_TOKENS,
              num_q_heads: int = GRID_HEADS[0], num_kv_heads: int = GRID_HEADS[1]):
    """:func:`kvlab.plot.plot_thread_blocks` for one setting, with the number of blocks here and
    in a 4096-token prefill of Qwen3-8B's heads. Returns the Figure."""
    from kvlab.plot import plot_thread_blocks

    heads = num_q_heads + 2 * num_kv_heads
    ax = plot_thread_blocks(num_q_heads, num_kv_heads, num_tokens,
                            tokens_per_block=tokens_per_block, qk_mode=qk_mode,
                            quantized=cache != CACHES[0])
    blocks = int(block_grid(num_tokens, heads, tokens_per_block).max()) + 1
    prefill = -(-PREFILL_TOKENS // tokens_per_block) * (QWEN3_8B["num_q_heads"]
                                                         + 2 * QWEN3_8B["num_kv_heads"])
    ax.set_xlabel(f"{blocks} blocks for these {num_tokens} tokens; a {PREFILL_TOKENS}-token "
                  f"prefill of Qwen3-8B (48 heads) launches {prefill:,}", fontsize=9)
    return ax.figure


def grid_explorer() -> Explorer:
    """Tokens per block, qk_mode and cache -> the kernel's thread blocks and each head's path."""
    import ipywidgets as widgets

    controls = {
        "tokens_per_block": widgets.SelectionSlider(options=[4, 8, 16, 32], value=16,
                                                    description="tokens/block"),
        "qk_mode": widgets.ToggleButtons(options=[(label, mode) for mode, label in QK_MODES.items()],
                                         value=1, description="qk_mode"),
        "cache": widgets.ToggleButtons(options=list(CACHES), description="cache"),
    }
    return Explorer(draw_grid, controls,
                    "How many blocks does a step launch, and which heads must share values "
                    "between threads (hatched) rather than keep them in registers?")
