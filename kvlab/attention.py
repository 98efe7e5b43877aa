"""Decode attention on kvlab's caches: ferrum's ``AttnConfig`` and
``contig_decode_attention`` (the Rust engine whose cache API kvlab mirrors), and the same call for a paged :class:`~kvlab.cache.KvLayer`.

The ops themselves are array-level and live in each backend's ``attention`` module
(``kvlab.ref.attention``, ``kvlab.kernels.cuda.attention``, ``kvlab.kernels.mps.attention``);
this host module only unpacks a layer (its arrays, length, table and scales) and calls its
backend's op. Notebook 05 teaches both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvlab.checks import check_attention_options, non_negative_int


@dataclass(frozen=True)
class AttnConfig:
    """How one attention call is computed (ferrum's ``AttnConfig``).

    Attributes:
        scale: the factor on ``q . k``; None = ``1/sqrt(head_dim)``.
        causal: token i of a T-token step sees positions ``< len - T + 1 + i`` (a decode step,
            T = 1, sees everything either way). The paged op is always causal.
        sliding_window: W > 0 keeps the W most recent positions ``(p - W, p]``, the query's own
            included (Mistral / Hugging Face); 0 = no window.
        kv_stride: ferrum's stride, in elements, between consecutive tokens' K (and V) rows of
            a contiguous cache. kvlab's contiguous caches are dense ``[capacity, num_kv_heads,
            head_dim]`` arrays, so the stride is always ``num_kv_heads * head_dim`` (what
            ``layer.k.strides[0] / itemsize`` says); None means exactly that, and any other value
            is a ValueError rather than a silent misread. (A padded row, as ferrum allows, is
            what a strided view would express: kvlab refuses strided caches, see docs/ops.md.)
    """

    scale: float | None = None
    causal: bool = True
    sliding_window: int = 0
    kv_stride: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.causal, (bool, np.bool_)):
            raise TypeError(f"causal must be a bool, got {type(self.causal).__name__}")
        check_attention_options(self.scale, self.sliding_window, 1)  # scale > 0, window >= 0
        if self.kv_stride is not None:
            non_negative_int("kv_stride", self.kv_stride)


def _check_stride(cfg: AttnConfig, layer: Any) -> None:
    dense = layer.num_kv_heads * layer.head_dim
    if cfg.kv_stride not in (None, dense):
        raise ValueError(f"kv_stride {cfg.kv_stride} does not match the layer: its cache is dense "
                         f"[capacity, {layer.num_kv_heads}, {layer.head_dim}], so consecutive "
                         f"tokens' rows are {dense} elements apart")


def contig_decode_attention(q: Any, layer: Any, cfg: AttnConfig | None = None) -> Any:
    """Attention of q (``[T, num_q_heads, head_dim]``, the layer's backend, float16/float32) over
    a contiguous :class:`~kvlab.cache.KvLayer`'s ``len`` positions, the step's T tokens already
    written. Returns float32 ``[T, num_q_heads, head_dim]`` on the layer's backend.

    A quantized (int8 / fp8_e4m3) contiguous layer is dequantized with its scales first.
    """
    cfg = cfg or AttnConfig()
    if layer.is_paged:
        raise ValueError("contig_decode_attention needs a contiguous layer; this one is paged "
                         "(use layer.decode_attention or paged_decode_attention)")
    _check_stride(cfg, layer)
    length, be = layer.len, layer.backend
    k, v = layer.k[:length], layer.v[:length]
    if layer.kv_dtype:
        k = be.quant.dequantize(k, layer.k_scales[:length], layer.kv_dtype)
        v = be.quant.dequantize(v, layer.v_scales[:length], layer.kv_dtype)
    return be.attention.decode_attention(q, k, v, scale=cfg.scale, causal=cfg.causal,
                                         sliding_window=cfg.sliding_window)


def paged_layer_attention(q: Any, layer: Any, cfg: AttnConfig | None = None,
                          num_splits: int | None = None) -> Any:
    """Attention of q over a paged :class:`~kvlab.cache.KvLayer` (one sequence): the layer's pools,
    table, length and scales passed to its backend's ``paged_decode_attention`` (``num_splits``
    None: the backend's choice)."""
    cfg = cfg or AttnConfig()
    if not layer.is_paged:
        raise ValueError("paged_layer_attention needs a paged layer; use contig_decode_attention")
    if not cfg.causal and q.shape[0] > 1:
        raise ValueError("the paged op is always causal; causal=False needs a contiguous layer")
    be = layer.backend
    index = (layer.block_table[None, :], layer.context_lens,
             np.array([0, q.shape[0]], dtype=np.int32))
    return be.attention.paged_decode_attention(
        q, layer.k_pool, layer.v_pool, *(be.asarray(a) for a in index), scale=cfg.scale,
        sliding_window=cfg.sliding_window, k_scales=layer.k_scales, v_scales=layer.v_scales,
        num_splits=num_splits)
