"""KV caches built from the paging ops: one sequence's layer (:class:`KvLayer`), or many sequences
across every layer (:class:`KvCacheManager`), over per-layer pools (:class:`KvPool`).

:class:`KvLayer` mirrors the API of ferrum, the Rust inference engine whose ``ferrum-kernels`` crate
defines ``KvFp16``, ``KvInt8``, ``KvScales`` and ``KvLayer``: "ferrum's" below names those.

Who does what::

    KvPool            the bytes: per layer k_pool, v_pool [num_blocks, block_size, num_kv_heads,
                      head_dim] on one backend (numpy / cuda / torch)
    BlockAllocator    the bookkeeping (kvlab.paging): which block is free, shared, cached
    KvLayer           one sequence x one layer, ferrum's ``KvLayer`` API: paged or contiguous
    KvCacheManager    many sequences x all layers: one block table per sequence, used by every
                      layer (vLLM's layout), prefix caching, fork with copy-on-write

The classes here hold host state (block lists, lengths, token ids) and call the backend's
``paging`` ops (``slot_mapping``, ``write_kv``, ``gather_kv``, ``copy_blocks``) to move bytes.
Every method that changes anything is all or nothing: its arguments and the pool's room are
checked first, and a failure leaves every table, length, ref count and byte as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Hashable, Iterable, Sequence

import numpy as np

from kvlab.backends import Backend, get_backend
from kvlab.checks import (
    CACHE_QUANT_DTYPES, POOL_DTYPES, QUANT_INPUT_DTYPES, TOKEN_DIMS, check_array, check_int,
    dtype_name, non_negative_int, positive_int,
)
from kvlab.dtypes import get_dtype, list_dtypes
from kvlab.paging import AllocatorSnapshot, BlockAllocator, BlockKey, Growth, blocks_needed

INDEX_DTYPE = np.int32  # block tables, positions, slots, lengths (docs/design.md)


# --- the bytes --------------------------------------------------------------------------------

class KvPool:
    """Paged K/V storage for ``num_layers`` layers on one backend.

    ``k_pools[layer]`` and ``v_pools[layer]`` are backend arrays of shape
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` ("NHD", docs/design.md), zero-filled.
    Block ``b`` means the same block id in every layer: a sequence has one block table for all
    its layers, so one allocator serves the whole pool.

    dtype: ``"fp16"`` (ferrum's ``KvFp16``; default), a pool dtype the paging ops accept
        (``"float16"``, ``"float32"``), or a quantized KV dtype, ``"int8"`` (ferrum's ``KvInt8``)
        or ``"fp8_e4m3"``: then the pools hold codes (int8 / uint8) and ``k_scales[layer]``,
        ``v_scales[layer]`` hold their fp16 scales ``[num_blocks, block_size, num_kv_heads]``
        (ferrum's ``KvScales``), and writes quantize through ``kvlab.ref.quant.write_kv_quant``.
    backend: a backend name (``"numpy"``, ``"cuda"``, ``"torch"``) or a
        :class:`~kvlab.backends.Backend`.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: str = "fp16", backend: str | Backend = "numpy"):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            positive_int(name, value)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype = storage_dtype(dtype)
        self.kv_dtype = quant_dtype(dtype)  # "int8" / "fp8_e4m3", or None for fp16/fp32 pools
        self.backend = as_backend(backend)
        zeros = np.zeros(self.block_shape, dtype=self.dtype)
        self.k_pools = [self.backend.asarray(zeros) for _ in range(num_layers)]
        self.v_pools = [self.backend.asarray(zeros) for _ in range(num_layers)]
        scale_zeros = np.zeros(self.block_shape[:3], dtype=np.float16)
        self.k_scales = [self.backend.asarray(scale_zeros) for _ in range(num_layers)
                         ] if self.kv_dtype else None
        self.v_scales = [self.backend.asarray(scale_zeros) for _ in range(num_layers)
                         ] if self.kv_dtype else None

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """One layer's pool shape: ``(num_blocks, block_size, num_kv_heads, head_dim)``."""
        return (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def nbytes(self) -> int:
        """Bytes of K and V across all layers, scales included."""
        codes = int(np.prod(self.block_shape)) * np.dtype(self.dtype).itemsize
        scales = int(np.prod(self.block_shape[:3])) * 2 if self.kv_dtype else 0
        return 2 * self.num_layers * (codes + scales)

    def copy_blocks(self, copies: Sequence[tuple[int, int]], layers: Iterable[int] | None = None
                    ) -> None:
        """Copy block ``src`` to block ``dst`` for each ``(src, dst)`` pair, in every layer (or in
        ``layers``): the bytes side of copy-on-write."""
        if not copies:
            return
        src = self.backend.asarray(np.array([s for s, _ in copies], dtype=INDEX_DTYPE))
        dst = self.backend.asarray(np.array([d for _, d in copies], dtype=INDEX_DTYPE))
        for layer in range(self.num_layers) if layers is None else layers:
            if self.kv_dtype:
                self.backend.quant.copy_blocks_quant(
                    self.k_pools[layer], self.v_pools[layer], self.k_scales[layer],
                    self.v_scales[layer], src, dst, self.kv_dtype)
            else:
                self.backend.paging.copy_blocks(self.k_pools[layer], self.v_pools[layer], src,
                                                dst)

    def new_allocator(self, hash_fn=None) -> BlockAllocator:
        """A :class:`BlockAllocator` over exactly this pool's blocks."""
        return BlockAllocator(self.num_blocks, self.block_size, hash_fn=hash_fn)

    def __repr__(self) -> str:
        return (f"KvPool({self.num_layers} layers x {list(self.block_shape)} {self.dtype} "
                f"on {self.backend.name}, {self.nbytes / 2**20:.2f} MiB)")


# --- one sequence, one layer: ferrum's KvLayer API -----------------------------------------------

class KvLayer:
    """One sequence's K/V cache for one layer, paged or contiguous (ferrum's ``KvLayer``).

    Build one with :meth:`alloc_paged` or :meth:`alloc_contig`. Both hold ``len`` tokens at
    positions ``0 .. len-1`` and take new tokens with :meth:`write`:

    - contiguous: ``k``, ``v`` ``[capacity, num_kv_heads, head_dim]``; token p is row p.
    - paged: token p lives in block ``block_table[p // block_size]`` of this layer's pool, at
      offset ``p % block_size``. Blocks are taken from the allocator as positions cross block
      boundaries, and copied first (copy-on-write) if another owner shares them.
    """

    def __init__(self, *, backend: Backend, num_kv_heads: int, head_dim: int, dtype: str,
                 capacity: int, k: Any = None, v: Any = None, pool: KvPool | None = None,
                 layer: int = 0, allocator: BlockAllocator | None = None,
                 max_blocks_per_seq: int | None = None, kv_dtype: str | None = None,
                 k_scales: Any = None, v_scales: Any = None):
        """Use :meth:`alloc_paged` or :meth:`alloc_contig`; this only stores what they checked."""
        self.backend, self.num_kv_heads, self.head_dim = backend, num_kv_heads, head_dim
        self.dtype, self.capacity = dtype, capacity
        self.kv_dtype = kv_dtype  # "int8" / "fp8_e4m3" for a quantized layer, else None
        self._k, self._v = k, v  # contiguous storage (None when paged)
        self._k_scales, self._v_scales = k_scales, v_scales  # contiguous + quantized only
        self.pool, self.layer, self.allocator = pool, layer, allocator  # paged (None when contig)
        self.max_blocks_per_seq = max_blocks_per_seq
        self._blocks: list[int] = []  # paged: the block ids this sequence owns, in order
        self._len = 0

    @classmethod
    def alloc_paged(cls, max_blocks_per_seq: int, block_size: int, num_kv_heads: int,
                    head_dim: int, *, num_blocks: int | None = None, dtype: str | None = None,
                    backend: str | Backend | None = None, pool: KvPool | None = None,
                    allocator: BlockAllocator | None = None) -> KvLayer:
        """A paged layer holding up to ``max_blocks_per_seq * block_size`` tokens.

        Standalone (no ``pool``): the layer owns a one-layer pool of ``num_blocks`` blocks
        (default ``max_blocks_per_seq``, enough for one full sequence) and its own allocator, as
        ferrum's layer does. ``dtype`` defaults to ``"fp16"``, ``backend`` to ``"numpy"``.

        Shared: pass a one-layer ``pool`` (a :class:`KvPool`) and the ``allocator`` that manages
        it; the layer takes blocks from ``allocator`` alongside other sequences' layers.
        ``dtype``/``backend``, if given, must match the pool's. A pool of several layers is refused:
        each KvLayer keeps its own block table, so two layers of one sequence would each take
        blocks and leave the other layers' copies of them unused. :class:`KvCacheManager` gives a
        sequence one block table for all its layers.
        """
        positive_int("max_blocks_per_seq", max_blocks_per_seq)
        if pool is None:
            if allocator is not None:
                raise ValueError("an allocator was given without the pool it manages; pass both "
                                 "(or neither, for a standalone layer)")
            num_blocks = max_blocks_per_seq if num_blocks is None else num_blocks
            pool = KvPool(1, num_blocks, block_size, num_kv_heads, head_dim,
                          dtype=dtype or "fp16", backend=backend or "numpy")
            allocator = pool.new_allocator()
        else:
            if allocator is None:
                raise ValueError("a shared pool needs the BlockAllocator that manages it")
            _check_pool_matches(pool, block_size=block_size, num_kv_heads=num_kv_heads,
                                head_dim=head_dim)
            _check_allocator_matches(allocator, pool)
            if num_blocks not in (None, pool.num_blocks):
                raise ValueError(f"num_blocks={num_blocks} but the pool has {pool.num_blocks}")
            if dtype is not None and (storage_dtype(dtype), quant_dtype(dtype)) != (
                    pool.dtype, pool.kv_dtype):
                raise ValueError(f"dtype {dtype!r} does not match the pool's {pool.dtype}")
            if backend is not None and as_backend(backend).name != pool.backend.name:
                raise ValueError(f"backend {backend!r} does not match the pool's "
                                 f"{pool.backend.name!r}")
            if pool.num_layers != 1:
                raise ValueError(f"a shared KvLayer needs a one-layer pool, got {pool.num_layers} "
                                 f"layers; use KvCacheManager for a sequence across layers")
        return cls(backend=pool.backend, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   dtype=pool.dtype, capacity=max_blocks_per_seq * block_size, pool=pool,
                   layer=0, allocator=allocator, max_blocks_per_seq=max_blocks_per_seq,
                   kv_dtype=pool.kv_dtype)

    @classmethod
    def alloc_contig(cls, capacity: int, num_kv_heads: int, head_dim: int, *,
                     dtype: str = "fp16", backend: str | Backend = "numpy") -> KvLayer:
        """A contiguous layer: ``k``, ``v`` ``[capacity, num_kv_heads, head_dim]``, reserved up
        front (what paging avoids: a short sequence still pays for ``capacity`` tokens).

        A quantized dtype (``"int8"``, ``"fp8_e4m3"``) also reserves ``k_scales``, ``v_scales``
        ``[capacity, num_kv_heads]`` fp16 (ferrum panics on a contiguous INT8 cache; kvlab
        writes it as a pool of ``capacity`` blocks of one slot)."""
        for name, value in (("capacity", capacity), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            positive_int(name, value)
        backend, kv_dtype, dtype = as_backend(backend), quant_dtype(dtype), storage_dtype(dtype)
        zeros = np.zeros((capacity, num_kv_heads, head_dim), dtype=dtype)
        scales = (backend.asarray(np.zeros((capacity, num_kv_heads), np.float16)) if kv_dtype
                  else None for _ in range(2))
        return cls(backend=backend, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                   capacity=capacity, k=backend.asarray(zeros), v=backend.asarray(zeros),
                   kv_dtype=kv_dtype, k_scales=next(scales), v_scales=next(scales))

    # --- what it holds ---------------------------------------------------------------------

    @property
    def is_paged(self) -> bool:
        return self.pool is not None

    @property
    def len(self) -> int:
        """Tokens held (positions ``0 .. len-1``)."""
        return self._len

    @property
    def block_size(self) -> int | None:
        """Token slots per block (None for a contiguous layer)."""
        return self.pool.block_size if self.is_paged else None

    @property
    def block_table(self) -> np.ndarray | None:
        """int32 ``[max_blocks_per_seq]``: the blocks this sequence owns, in order, then -1.
        A fresh host copy (None for a contiguous layer)."""
        if not self.is_paged:
            return None
        return _table_row(self._blocks, self.max_blocks_per_seq)

    @property
    def context_lens(self) -> np.ndarray:
        """int32 ``[1]``: ``[len]``, the batched form attention ops take."""
        return np.array([self._len], dtype=INDEX_DTYPE)

    @property
    def paged_block_indices(self) -> np.ndarray | None:
        """int32 ``[blocks in use]``: the block ids in use, in table order (None if contiguous)."""
        return np.array(self._blocks, dtype=INDEX_DTYPE) if self.is_paged else None

    @property
    def k(self) -> Any:
        """Contiguous layer: the K cache ``[capacity, num_kv_heads, head_dim]`` (None if paged)."""
        return self._k

    @property
    def v(self) -> Any:
        """Contiguous layer: the V cache ``[capacity, num_kv_heads, head_dim]`` (None if paged)."""
        return self._v

    @property
    def k_scales(self) -> Any:
        """A quantized layer's K scales (ferrum's ``KvScales``): fp16 ``[capacity, Hkv]``
        when contiguous, its layer of the pool's ``[num_blocks, block_size, Hkv]`` when paged;
        None for an fp16/fp32 layer."""
        if not self.kv_dtype:
            return None
        return self.pool.k_scales[self.layer] if self.is_paged else self._k_scales

    @property
    def v_scales(self) -> Any:
        """A quantized layer's V scales (see :attr:`k_scales`)."""
        if not self.kv_dtype:
            return None
        return self.pool.v_scales[self.layer] if self.is_paged else self._v_scales

    @property
    def k_pool(self) -> Any:
        """Paged layer: its layer of the K pool ``[num_blocks, block_size, num_kv_heads,
        head_dim]``, shared with every sequence in the pool (None if contiguous)."""
        return self.pool.k_pools[self.layer] if self.is_paged else None

    @property
    def v_pool(self) -> Any:
        """Paged layer: its layer of the V pool (None if contiguous)."""
        return self.pool.v_pools[self.layer] if self.is_paged else None

    # --- changing it -------------------------------------------------------------------------

    def write(self, k: Any, v: Any) -> None:
        """Append ``T`` tokens' K and V (``[T, num_kv_heads, head_dim]``, this layer's dtype and
        backend) at positions ``len .. len+T-1``; then ``len += T``.

        Raises ValueError/TypeError (bad arrays, or more than ``capacity`` tokens), or
        OutOfBlocksError (a shared pool ran out), before anything is written.
        """
        num_new = self._check_tokens(k, v)
        self._check_room(self._len + num_new)
        if num_new == 0:
            return
        if not self.is_paged and self.kv_dtype:
            # A contiguous cache is a pool of `capacity` blocks of one slot: row p is slot p.
            cap, heads, dim = self.capacity, self.num_kv_heads, self.head_dim
            slots = self.backend.asarray(np.arange(self._len, self._len + num_new,
                                                   dtype=INDEX_DTYPE))
            self.backend.quant.write_kv_quant(
                k, v, self._k.reshape(cap, 1, heads, dim), self._v.reshape(cap, 1, heads, dim),
                self._k_scales.reshape(cap, 1, heads), self._v_scales.reshape(cap, 1, heads),
                slots, self.kv_dtype)
        elif not self.is_paged:
            self._k[self._len:self._len + num_new] = k  # plain slice assignment: row p = token p
            self._v[self._len:self._len + num_new] = v
        else:
            growth = self.allocator.grow(self._blocks, self._len, num_new)
            try:
                paging = self.backend.paging
                self.pool.copy_blocks(growth.copies, layers=[self.layer])
                positions = np.arange(self._len, self._len + num_new, dtype=INDEX_DTYPE)
                table = _table_row(growth.blocks, self.max_blocks_per_seq)
                slots = paging.slot_mapping(self.backend.asarray(table),
                                            self.backend.asarray(positions), self.block_size)
                if self.kv_dtype:
                    self.backend.quant.write_kv_quant(k, v, self.k_pool, self.v_pool,
                                                      self.k_scales, self.v_scales, slots,
                                                      self.kv_dtype)
                else:
                    paging.write_kv(k, v, self.k_pool, self.v_pool, slots)
            except BaseException:
                self.allocator.undo_grow(growth)
                raise
            self._blocks = growth.blocks
        self._len += num_new

    def paged_write(self, qkv: Any, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                    pos_offset: int, eps: float, qk_mode: int) -> Any:
        """ferrum's fused write for a paged layer: split the packed ``qkv`` rows, (norm and)
        rotate Q and K, store K and V at positions ``pos_offset ..`` through the block table,
        return ``q_out [T, num_q_heads, head_dim]`` (``kvlab.ref.fused_write.paged_write``).

        num_q_heads is read from qkv's width, ``(Hq + 2 * Hkv) * head_dim``. pos_offset must equal
        :attr:`len`. Blocks are reserved first (copy-on-write included); if the op raises, they go
        back and nothing changes. Then ``len += T``.
        """
        if not self.is_paged:
            raise ValueError("paged_write needs a paged layer; use contig_write")
        num_new, num_q_heads = self._check_fused(qkv, pos_offset)
        growth = self.allocator.grow(self._blocks, self._len, num_new)
        try:
            self.pool.copy_blocks(growth.copies, layers=[self.layer])
            table = self.backend.asarray(_table_row(growth.blocks, self.max_blocks_per_seq))
            q_out = self.backend.fused_write.paged_write(
                qkv, q_norm_w, k_norm_w, cos, sin, self.k_pool, self.v_pool, table, pos_offset,
                num_q_heads, self.num_kv_heads, eps, qk_mode, self.k_scales, self.v_scales,
                self.kv_dtype)
        except BaseException:
            self.allocator.undo_grow(growth)
            raise
        self._blocks = growth.blocks
        self._len += num_new
        return q_out

    def contig_write(self, qkv: Any, q_norm_w: Any, k_norm_w: Any, cos: Any, sin: Any,
                     pos_offset: int, eps: float, qk_mode: int) -> Any:
        """:meth:`paged_write` for a contiguous layer: K/V land in rows ``pos_offset ..``
        (``kvlab.ref.fused_write.contig_write``). Returns q_out; then ``len += T``."""
        if self.is_paged:
            raise ValueError("contig_write needs a contiguous layer; use paged_write")
        num_new, num_q_heads = self._check_fused(qkv, pos_offset)
        q_out = self.backend.fused_write.contig_write(
            qkv, q_norm_w, k_norm_w, cos, sin, self._k, self._v, pos_offset, num_q_heads,
            self.num_kv_heads, eps, qk_mode, self._k_scales, self._v_scales, self.kv_dtype)
        self._len += num_new
        return q_out

    def _check_fused(self, qkv: Any, pos_offset: Any) -> tuple[int, int]:
        """``(T, num_q_heads)`` of a fused write, after the checks only the layer can make."""
        if not hasattr(qkv, "shape") or len(qkv.shape) != 2:
            raise ValueError("qkv must be a 2-D array [T, (num_q_heads + 2 * num_kv_heads) * "
                             "head_dim]")
        if isinstance(pos_offset, bool) or not isinstance(pos_offset, Integral) or \
                pos_offset != self._len:
            raise ValueError(f"pos_offset must equal the cache length {self._len}, got "
                             f"{pos_offset!r}: a write appends after the tokens already held")
        heads, rest = divmod(int(qkv.shape[1]), self.head_dim)
        num_q_heads = heads - 2 * self.num_kv_heads
        if rest or num_q_heads < 1:
            raise ValueError(f"qkv has {qkv.shape[1]} columns: not (num_q_heads + 2 x "
                             f"{self.num_kv_heads}) heads of head_dim {self.head_dim}")
        num_new = int(qkv.shape[0])
        self._check_room(self._len + num_new)
        return num_new, num_q_heads

    def reserve(self, num_new_tokens: int) -> None:
        """Make the block table reach positions ``len .. len+num_new_tokens-1`` without writing.

        For an op that writes through the table itself (e.g. a later stage's fused
        ``paged_write``): reserve, run the op with ``block_table`` and ``pos_offset=len``, then
        ``set_len(len + num_new_tokens)``. A no-op for a contiguous layer (beyond the check).
        """
        num_new_tokens = non_negative_int("num_new_tokens", num_new_tokens)
        self._check_room(self._len + num_new_tokens)
        if self.is_paged and num_new_tokens:
            self._apply_growth(self.allocator.grow(self._blocks, self._len, num_new_tokens))

    def set_len(self, n: int) -> None:
        """Declare that the cache holds ``n`` tokens (``0 <= n <= capacity``).

        Shrinking forgets positions ``n ..`` (a paged layer gives back the blocks it no longer
        needs). Growing declares positions ``len .. n-1`` written by someone else (an op); a
        paged layer reserves any blocks the table lacks, but an op must have had them *before* it
        wrote: see :meth:`reserve`.
        """
        n = non_negative_int("n", n)
        self._check_room(n)
        if self.is_paged:
            keep = blocks_needed(n, self.block_size)
            if keep < len(self._blocks):
                self.allocator.free(reversed(self._blocks[keep:]))  # tail first: see free()
                self._blocks = self._blocks[:keep]
            elif n > self._len:
                self._apply_growth(self.allocator.grow(self._blocks, self._len, n - self._len))
        self._len = n

    def release(self) -> None:
        """Forget every token and, if paged, give every block back to the allocator."""
        self.set_len(0)

    def gather(self) -> tuple[Any, Any]:
        """``(k, v)``, each ``[len, num_kv_heads, head_dim]`` on this layer's backend.

        Paged: new arrays copied out of the pool by ``gather_kv``. Contiguous: views of the first
        ``len`` rows (no copy: that is the point of a contiguous cache). Quantized (int8,
        fp8_e4m3): new float32 arrays, dequantized with the stored scales.
        """
        quant = self.backend.quant if self.kv_dtype else None
        if not self.is_paged:
            if quant:
                n = self._len
                return (quant.dequantize(self._k[:n], self._k_scales[:n], self.kv_dtype),
                        quant.dequantize(self._v[:n], self._v_scales[:n], self.kv_dtype))
            return self._k[:self._len], self._v[:self._len]
        table = self.backend.asarray(self.block_table)
        if quant:
            return quant.gather_kv_quant(self.k_pool, self.v_pool, self.k_scales, self.v_scales,
                                         table, self._len, self.kv_dtype)
        return self.backend.paging.gather_kv(self.k_pool, self.v_pool, table, self._len)

    def decode_attention(self, q: Any, cfg: Any = None, num_splits: int | None = None) -> Any:
        """Attention of q ``[T, num_q_heads, head_dim]`` over this layer's ``len`` positions (the
        step's T tokens already written), float32 ``[T, num_q_heads, head_dim]``.
        ``cfg``: a :class:`kvlab.attention.AttnConfig` (None = the defaults). Contiguous:
        ferrum's ``contig_decode_attention``; paged: ``paged_decode_attention`` with this layer's
        pools, table and scales (``num_splits`` partitions, merged; None: the backend
        chooses)."""
        from kvlab.attention import contig_decode_attention, paged_layer_attention

        if self.is_paged:
            return paged_layer_attention(q, self, cfg, num_splits=num_splits)
        return contig_decode_attention(q, self, cfg)

    def _apply_growth(self, growth: Growth) -> None:
        """Take blocks from a grow that writes nothing itself: copy shared blocks' bytes first."""
        try:
            self.pool.copy_blocks(growth.copies, layers=[self.layer])
        except BaseException:
            self.allocator.undo_grow(growth)
            raise
        self._blocks = growth.blocks

    def _check_tokens(self, k: Any, v: Any) -> int:
        _check_token_arrays(k, v, self.num_kv_heads, self.head_dim,
                            input_dtypes(self.dtype, self.kv_dtype),
                            self.k_pool if self.is_paged else self._k, self.backend)
        return int(k.shape[0])

    def _check_room(self, new_len: int) -> None:
        if new_len > self.capacity:
            where = (f"{self.max_blocks_per_seq} blocks of {self.block_size}" if self.is_paged
                     else "a contiguous cache")
            raise ValueError(f"cannot hold {new_len} tokens: capacity is {self.capacity} "
                             f"({where}); the layer holds {self._len}")

    def __repr__(self) -> str:
        kind = (f"paged, {len(self._blocks)} blocks of {self.block_size}" if self.is_paged
                else "contiguous")
        return (f"KvLayer({kind}, len={self._len}/{self.capacity}, {self.num_kv_heads} kv heads x "
                f"{self.head_dim}, {self.dtype} on {self.backend.name})")


# --- many sequences, all layers -----------------------------------------------------------------

@dataclass
class SequenceState:
    """What the manager knows about one sequence (host state only).

    blocks: the block ids it owns, in position order: its block table, shared by every layer.
    token_ids: the tokens whose K/V it holds; ``len(token_ids)`` is its context length.
    keys: one prefix-cache key per *full* block (``len(keys) == len(token_ids) // block_size``):
        the parent for the next full block's key.
    """

    blocks: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    keys: list[BlockKey] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class ManagerSnapshot:
    """A :class:`KvCacheManager`'s host state as plain values: equal iff nothing changed."""

    allocator: AllocatorSnapshot
    sequences: tuple[tuple[Hashable, tuple[int, ...], tuple[int, ...]], ...]


class KvCacheManager:
    """Many sequences' KV caches in one :class:`KvPool`, managed by one :class:`BlockAllocator`.

    A sequence's life::

        cached = mgr.add_sequence("a", prompt)       # prefix-cache hits: `cached` tokens reused
        mgr.append("a", ks, vs, prompt[cached:])     # prefill the rest (ks[l]: [T, Hkv, D])
        mgr.append("a", ks, vs, [next_token])        # decode, one token at a time
        mgr.fork("a", "b")                           # share every block (parallel sampling)
        mgr.release("a")                             # blocks back; full ones stay cached

    ``block_tables(ids)`` and ``context_lens(ids)`` give the int32 arrays the attention ops take.

    **A fully cached prompt.** The model must still compute logits for the prompt's last token,
    and the only way to do that is to run it, which writes its K/V. So ``add_sequence`` looks up
    ``prompt[:-1]``: the block holding the final prompt token is never a hit, and at least one
    token is always left to compute (vLLM does the same). A prompt of exactly ``n`` full blocks
    therefore reuses ``n - 1`` of them and recomputes the last block.

    pool: the K/V storage. max_blocks_per_seq: the width of every block table.
    allocator: defaults to ``pool.new_allocator()``; pass one to inject a ``hash_fn``.
    enable_prefix_caching: False turns off lookups and registration (blocks are freed empty).
    """

    def __init__(self, pool: KvPool, max_blocks_per_seq: int,
                 allocator: BlockAllocator | None = None, enable_prefix_caching: bool = True):
        self.pool = pool
        self.max_blocks_per_seq = positive_int("max_blocks_per_seq", max_blocks_per_seq)
        self.allocator = pool.new_allocator() if allocator is None else allocator
        _check_allocator_matches(self.allocator, pool)
        self.enable_prefix_caching = enable_prefix_caching
        self.block_size = pool.block_size
        self.capacity = max_blocks_per_seq * pool.block_size  # tokens per sequence
        self._seqs: dict[Hashable, SequenceState] = {}

    # --- sequences in and out ----------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable, prompt_token_ids: Sequence[int]) -> int:
        """Start a sequence; reuse cached full blocks of its prompt. Returns the tokens reused.

        The return value ``n`` is a multiple of ``block_size`` and at most ``len(prompt) - 1``
        (see the class notes): the caller appends K/V for ``prompt[n:]`` next. Nothing is
        allocated here; blocks are taken as :meth:`append` needs them.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        prompt = _token_list(prompt_token_ids)
        if len(prompt) > self.capacity:
            raise ValueError(f"a prompt of {len(prompt)} tokens exceeds the per-sequence capacity "
                             f"{self.capacity} ({self.max_blocks_per_seq} blocks of "
                             f"{self.block_size})")
        hits = self.allocator.lookup_prefix(prompt[:-1]) if self.enable_prefix_caching else []
        cached = len(hits) * self.block_size
        self._seqs[seq_id] = SequenceState(
            blocks=hits, token_ids=prompt[:cached],
            keys=[self.allocator.key_of(b) for b in hits])
        return cached

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start ``child_id`` as a copy of ``parent_id`` that shares all its blocks (no bytes move).

        The first write into a shared, partly filled last block copies it (copy-on-write).
        """
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already exists")
        self._seqs[child_id] = SequenceState(blocks=self.allocator.fork(parent.blocks),
                                             token_ids=list(parent.token_ids),
                                             keys=list(parent.keys))

    def release(self, seq_id: Hashable) -> None:
        """End a sequence: drop its reference to each block, last block first (so that its tail
        is evicted before its head). Blocks in the prefix cache keep their K/V for future hits."""
        seq = self._seq(seq_id)
        self.allocator.free(reversed(seq.blocks))
        del self._seqs[seq_id]

    # --- writing ------------------------------------------------------------------------------

    def append(self, seq_id: Hashable, k_per_layer: Sequence[Any], v_per_layer: Sequence[Any],
               token_ids: Sequence[int]) -> None:
        """Write ``T = len(token_ids)`` new tokens' K/V for every layer at positions
        ``context_len .. context_len+T-1``.

        k_per_layer, v_per_layer: one array per layer, ``[T, num_kv_heads, head_dim]``, in the
            pool's dtype and on its backend.
        token_ids: the tokens these K/V belong to; full blocks are keyed by them in the prefix
            cache.

        Blocks are allocated as positions cross block boundaries; a shared last block is first
        copied (copy-on-write); blocks that become full are registered in the prefix cache.
        All or nothing: a ValueError/TypeError (bad arguments, or past ``max_blocks_per_seq``) or
        OutOfBlocksError leaves every table, length, ref count and byte unchanged.
        """
        seq = self._seq(seq_id)
        tokens = _token_list(token_ids)
        num_new = len(tokens)
        self._check_layers(k_per_layer, v_per_layer, num_new)
        if seq.num_tokens + num_new > self.capacity:
            raise ValueError(f"sequence {seq_id!r} cannot hold {seq.num_tokens + num_new} tokens: "
                             f"capacity is {self.capacity} ({self.max_blocks_per_seq} blocks of "
                             f"{self.block_size})")
        if num_new == 0:
            return
        growth = self.allocator.grow(seq.blocks, seq.num_tokens, num_new)  # may raise: no change
        try:
            self.pool.copy_blocks(growth.copies)  # CoW: the shared bytes, before anything lands
            backend = self.pool.backend
            positions = np.arange(seq.num_tokens, seq.num_tokens + num_new, dtype=INDEX_DTYPE)
            slots = backend.paging.slot_mapping(
                backend.asarray(_table_row(growth.blocks, self.max_blocks_per_seq)),
                backend.asarray(positions), self.block_size)
            pool = self.pool
            for layer in range(pool.num_layers):
                if pool.kv_dtype:
                    backend.quant.write_kv_quant(
                        k_per_layer[layer], v_per_layer[layer], pool.k_pools[layer],
                        pool.v_pools[layer], pool.k_scales[layer], pool.v_scales[layer], slots,
                        pool.kv_dtype)
                else:
                    backend.paging.write_kv(k_per_layer[layer], v_per_layer[layer],
                                            pool.k_pools[layer], pool.v_pools[layer], slots)
        except BaseException:
            self.allocator.undo_grow(growth)
            raise
        seq.blocks = growth.blocks
        seq.token_ids.extend(tokens)
        self._register_full_blocks(seq)

    def reserve(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Take the blocks for ``T = len(token_ids)`` new tokens and record the tokens, without
        writing K/V: for an op that writes through the block table itself (the fused
        ``paged_write_batched`` of a model step, :mod:`kvlab.generate`). Call it, then run the op
        with :meth:`block_tables` and ``pos_offset`` = the length before this call.

        Copy-on-write happens here (a shared last block is copied before the op writes into it),
        and blocks that become full are registered in the prefix cache at once: the caller must
        write their K/V before another sequence is added. All or nothing, as :meth:`append`.
        """
        seq = self._seq(seq_id)
        tokens = _token_list(token_ids)
        if seq.num_tokens + len(tokens) > self.capacity:
            raise ValueError(f"sequence {seq_id!r} cannot hold {seq.num_tokens + len(tokens)} "
                             f"tokens: capacity is {self.capacity} ({self.max_blocks_per_seq} "
                             f"blocks of {self.block_size})")
        if not tokens:
            return
        growth = self.allocator.grow(seq.blocks, seq.num_tokens, len(tokens))  # may raise
        try:
            self.pool.copy_blocks(growth.copies)
        except BaseException:
            self.allocator.undo_grow(growth)
            raise
        seq.blocks = growth.blocks
        seq.token_ids.extend(tokens)
        self._register_full_blocks(seq)

    def _register_full_blocks(self, seq: SequenceState) -> None:
        """Key every block that has become full since the last call (one key per full block)."""
        bs = self.block_size
        for i in range(len(seq.keys), seq.num_tokens // bs):
            parent = seq.keys[i - 1] if i else None
            chunk = seq.token_ids[i * bs:(i + 1) * bs]
            if self.enable_prefix_caching:
                key = self.allocator.register_full_block(seq.blocks[i], chunk, parent)
            else:  # still track the key, so turning caching on later stays consistent
                key = BlockKey(None, tuple(chunk), parent)
            seq.keys.append(key)

    # --- reading ------------------------------------------------------------------------------

    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def context_len(self, seq_id: Hashable) -> int:
        """Tokens the sequence holds."""
        return self._seq(seq_id).num_tokens

    def token_ids(self, seq_id: Hashable) -> list[int]:
        """The tokens whose K/V the sequence holds (a copy)."""
        return list(self._seq(seq_id).token_ids)

    def block_table(self, seq_id: Hashable) -> np.ndarray:
        """int32 ``[max_blocks_per_seq]``: the sequence's blocks in order, then -1."""
        return _table_row(self._seq(seq_id).blocks, self.max_blocks_per_seq)

    def block_tables(self, seq_ids: Sequence[Hashable]) -> np.ndarray:
        """int32 ``[len(seq_ids), max_blocks_per_seq]``: one row per sequence, -1 padded."""
        table = np.full((len(seq_ids), self.max_blocks_per_seq), -1, dtype=INDEX_DTYPE)
        for row, seq_id in enumerate(seq_ids):
            table[row] = self.block_table(seq_id)
        return table

    def context_lens(self, seq_ids: Sequence[Hashable]) -> np.ndarray:
        """int32 ``[len(seq_ids)]``: each sequence's length."""
        return np.array([self.context_len(s) for s in seq_ids], dtype=INDEX_DTYPE)

    def gather(self, seq_id: Hashable, layer: int) -> tuple[Any, Any]:
        """``(k, v)`` of one sequence in one layer, ``[context_len, num_kv_heads, head_dim]``,
        copied out of the pool on the pool's backend."""
        layer = check_int("layer", layer, minimum=0)  # any integer, NumPy's too; not a bool
        if layer >= self.pool.num_layers:
            raise ValueError(f"layer must be in [0, {self.pool.num_layers}), got {layer}")
        pool, backend = self.pool, self.pool.backend
        table = backend.asarray(self.block_table(seq_id))
        if pool.kv_dtype:  # dequantized, float32
            return backend.quant.gather_kv_quant(
                pool.k_pools[layer], pool.v_pools[layer], pool.k_scales[layer],
                pool.v_scales[layer], table, self.context_len(seq_id), pool.kv_dtype)
        return backend.paging.gather_kv(pool.k_pools[layer], pool.v_pools[layer],
                                        table, self.context_len(seq_id))

    def snapshot(self) -> ManagerSnapshot:
        """Every table, length and ref count as plain values (for tests: "nothing changed")."""
        return ManagerSnapshot(
            allocator=self.allocator.snapshot(),
            sequences=tuple((sid, tuple(s.blocks), tuple(s.token_ids))
                            for sid, s in self._seqs.items()),
        )

    def check_invariants(self) -> None:
        """The allocator's invariants, plus: each block's ref count equals the number of
        sequences whose table lists it, and every sequence has one block per started block of
        tokens and one key per full block. Raises AssertionError."""
        self.allocator.check_invariants()
        owners = [0] * self.allocator.num_blocks
        for seq_id, seq in self._seqs.items():
            if len(seq.blocks) != blocks_needed(seq.num_tokens, self.block_size):
                raise AssertionError(f"sequence {seq_id!r}: {len(seq.blocks)} blocks for "
                                     f"{seq.num_tokens} tokens")
            if len(seq.keys) != seq.num_tokens // self.block_size:
                raise AssertionError(f"sequence {seq_id!r}: {len(seq.keys)} keys for "
                                     f"{seq.num_tokens // self.block_size} full blocks")
            if len(set(seq.blocks)) != len(seq.blocks):
                raise AssertionError(f"sequence {seq_id!r} lists a block twice: {seq.blocks}")
            for block in seq.blocks:
                owners[block] += 1
        for block, count in enumerate(owners):
            if self.allocator.ref_count(block) != count:
                raise AssertionError(f"block {block}: ref count {self.allocator.ref_count(block)} "
                                     f"but {count} sequence(s) list it")

    def __repr__(self) -> str:
        return f"KvCacheManager({len(self._seqs)} sequences, {self.allocator!r})"

    def _seq(self, seq_id: Hashable) -> SequenceState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"no sequence {seq_id!r}") from None

    def _check_layers(self, k_per_layer: Sequence[Any], v_per_layer: Sequence[Any],
                      num_new: int) -> None:
        pool = self.pool
        for name, arrays in (("k_per_layer", k_per_layer), ("v_per_layer", v_per_layer)):
            if len(arrays) != pool.num_layers:
                raise ValueError(f"{name} must hold one array per layer ({pool.num_layers}), "
                                 f"got {len(arrays)}")
        for layer in range(pool.num_layers):
            _check_token_arrays(k_per_layer[layer], v_per_layer[layer], pool.num_kv_heads,
                                pool.head_dim, input_dtypes(pool.dtype, pool.kv_dtype),
                                pool.k_pools[layer], pool.backend, where=f"[{layer}]")
            if int(k_per_layer[layer].shape[0]) != num_new:
                raise ValueError(f"k_per_layer[{layer}] has {k_per_layer[layer].shape[0]} tokens "
                                 f"but token_ids has {num_new}")
        if pool.kv_dtype:
            # write_kv_quant refuses values its dtype cannot store (NaN, inf, too large), but
            # only for the layer it writes: check every layer before the first one is written.
            # Each backend's quant stage tests them on its own device (one flag read back).
            quant = pool.backend.quant
            for layer in range(pool.num_layers):
                quant.check_values(k_per_layer[layer], pool.kv_dtype, f"k_per_layer[{layer}]")
                quant.check_values(v_per_layer[layer], pool.kv_dtype, f"v_per_layer[{layer}]")


# --- helpers ----------------------------------------------------------------------------------

def as_backend(backend: str | Backend) -> Backend:
    """A :class:`Backend` from a name or a Backend."""
    return backend if isinstance(backend, Backend) else get_backend(backend)


def storage_dtype(dtype: str) -> str:
    """The NumPy dtype name a pool stores for ``dtype``: ``"fp16"`` -> ``"float16"``,
    ``"int8"`` -> ``"int8"``, ``"fp8_e4m3"`` -> ``"uint8"`` (E4M3FN bytes)."""
    if dtype in POOL_DTYPES:
        return dtype
    if dtype in list_dtypes():
        kv = get_dtype(dtype)
        if kv.storage in POOL_DTYPES and kv.scale_bytes == 0:
            return kv.storage
        if dtype in CACHE_QUANT_DTYPES:
            return kv.storage
        raise ValueError(f"KV dtype {dtype!r} is quantize/dequantize only (notebook 02's lab); "
                         f"caches hold fp16, {', '.join(CACHE_QUANT_DTYPES)} or "
                         f"{', '.join(POOL_DTYPES)}")
    raise ValueError(f"unknown pool dtype {dtype!r}; use 'fp16', 'int8', 'fp8_e4m3' or one of "
                     f"{POOL_DTYPES}")


def quant_dtype(dtype: str) -> str | None:
    """``dtype`` when it is a quantized cache dtype (``"int8"``, ``"fp8_e4m3"``), else None."""
    return dtype if dtype in CACHE_QUANT_DTYPES else None


def input_dtypes(storage: str, kv_dtype: str | None) -> tuple[str, ...]:
    """The dtypes a cache accepts K and V in: its own (fp16/fp32 pools), or float16/float32 for a
    quantized cache (it quantizes them on the way in)."""
    return QUANT_INPUT_DTYPES if kv_dtype else (storage,)


def _table_row(blocks: Sequence[int], max_blocks: int) -> np.ndarray:
    """int32 ``[max_blocks]``: ``blocks`` then -1."""
    row = np.full(max_blocks, -1, dtype=INDEX_DTYPE)
    row[:len(blocks)] = blocks
    return row


def _check_token_arrays(k: Any, v: Any, num_kv_heads: int, head_dim: int,
                        dtypes: Sequence[str], like: Any, backend: Backend,
                        where: str = "") -> None:
    """k, v: ``[T, num_kv_heads, head_dim]`` of one of ``dtypes``, the array type of ``like``."""
    for name, x in ((f"k{where}", k), (f"v{where}", v)):
        if hasattr(x, "shape") and not isinstance(x, type(like)):
            raise TypeError(f"{name} must be a {type(like).__name__} for the {backend.name} "
                            f"backend, got {type(x).__name__} (convert with backend.asarray)")
    check_array(f"k{where}", k, TOKEN_DIMS, shape=[None, num_kv_heads, head_dim],
                dtypes=list(dtypes), matching="the cache")
    check_array(f"v{where}", v, TOKEN_DIMS, shape=list(k.shape), dtypes=[dtype_name(k)],
                matching=f"k{where}")


def _check_pool_matches(pool: KvPool, **expected: int) -> None:
    for name, value in expected.items():
        if getattr(pool, name) != value:
            raise ValueError(f"{name}={value} does not match the pool's {getattr(pool, name)}")


def _check_allocator_matches(allocator: BlockAllocator, pool: KvPool) -> None:
    if (allocator.num_blocks, allocator.block_size) != (pool.num_blocks, pool.block_size):
        raise ValueError(f"the allocator manages {allocator.num_blocks} blocks of "
                         f"{allocator.block_size}, the pool has {pool.num_blocks} of "
                         f"{pool.block_size}")


def _token_list(token_ids: Sequence[int]) -> list[int]:
    tokens = list(token_ids)
    if any(isinstance(t, bool) or not isinstance(t, Integral) for t in tokens):
        raise TypeError(f"token ids must be ints, got {tokens[:8]}")
    return [int(t) for t in tokens]


