"""Arrays of the wrong kind given to the torch backend: a NumPy array where a tensor belongs, or a
tensor on another device. Every public op, every array argument: a TypeError (ValueError for the
device) that names the argument, raised before anything is written.

Before, ``kvlab.checks`` (duck-typed: any array with ``.shape`` and ``.dtype`` passes) let a NumPy
array through, and the op failed deep inside with ``AttributeError: ... has no attribute 'long'``
(or, for ``write_kv`` given a NumPy ``v``, after K had been written).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvlab.backends import get_backend
from kvlab.ref.rope import rope_tables

TORCH = get_backend("torch", "cpu")
H, D, BS, NB = 2, 16, 4, 6


def _calls() -> dict[str, tuple]:
    """op -> (function, {array argument: valid NumPy value}, {other arguments})."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((5, H, D)).astype(np.float16)
    pool = lambda dtype=np.float16: np.zeros((NB, BS, H, D), dtype)  # noqa: E731
    scales = lambda: np.zeros((NB, BS, H), np.float16)  # noqa: E731
    cos, sin = rope_tables(32, D, 1e4)
    qkv = rng.standard_normal((3, (4 + 2 * H) * D)).astype(np.float16)
    norm = dict(q_norm_w=np.ones(D, np.float32), k_norm_w=np.ones(D, np.float32), cos=cos,
                sin=sin)
    fused = dict(num_q_heads=4, num_kv_heads=H, eps=1e-6, qk_mode=1)
    blocks = np.array([0, 1], np.int32)
    slots = np.arange(5, dtype=np.int32)
    src_dst = dict(src=np.array([0], np.int32), dst=np.array([1], np.int32))
    quant_pools = dict(k_pool=pool(np.int8), v_pool=pool(np.int8), k_scales=scales(),
                       v_scales=scales())
    q = rng.standard_normal((1, 4, D)).astype(np.float32)
    return {
        "slot_mapping": (TORCH.paging.slot_mapping, dict(block_table=blocks, positions=slots),
                         dict(block_size=BS)),
        "write_kv": (TORCH.paging.write_kv, dict(k=k, v=k, k_pool=pool(), v_pool=pool(),
                                                 slots=slots), {}),
        "gather_kv": (TORCH.paging.gather_kv, dict(k_pool=pool(), v_pool=pool(),
                                                   block_table=blocks), dict(context_len=5)),
        "copy_blocks": (TORCH.paging.copy_blocks, dict(k_pool=pool(), v_pool=pool(), **src_dst),
                        {}),
        "quantize": (TORCH.quant.quantize, dict(x=k), dict(kv_dtype="int8")),
        "dequantize": (TORCH.quant.dequantize, dict(codes=np.zeros((5, H, D), np.int8),
                                                    scales=np.ones((5, H), np.float16)),
                       dict(kv_dtype="int8")),
        "write_kv_quant": (TORCH.quant.write_kv_quant, dict(k=k, v=k, **quant_pools, slots=slots),
                           dict(kv_dtype="int8")),
        "gather_kv_quant": (TORCH.quant.gather_kv_quant, dict(**quant_pools, block_table=blocks),
                            dict(context_len=5, kv_dtype="int8")),
        "copy_blocks_quant": (TORCH.quant.copy_blocks_quant, dict(**quant_pools, **src_dst),
                              dict(kv_dtype="int8")),
        "apply_rope": (TORCH.rope.apply_rope, dict(x=k, cos=cos, sin=sin, positions=slots), {}),
        "decode_attention": (TORCH.attention.decode_attention, dict(q=q, k=k, v=k), {}),
        "paged_decode_attention": (TORCH.attention.paged_decode_attention, dict(
            q=q, k_pool=pool(), v_pool=pool(), block_tables=blocks[None],
            context_lens=np.array([5], np.int32), query_start=np.array([0, 1], np.int32)), {}),
        "paged_write": (TORCH.fused_write.paged_write, dict(
            qkv=qkv, **norm, k_pool=pool(), v_pool=pool(), block_table=blocks),
            dict(pos_offset=0, **fused)),
        "paged_write_batched": (TORCH.fused_write.paged_write_batched, dict(
            qkv=qkv, **norm, k_pool=pool(), v_pool=pool(), block_tables=blocks[None],
            query_start=np.array([0, 3], np.int32), pos_offsets=np.array([0], np.int32)),
            fused),
        "contig_write": (TORCH.fused_write.contig_write, dict(
            qkv=qkv, **norm, k_cache=np.zeros((8, H, D), np.float16),
            v_cache=np.zeros((8, H, D), np.float16)), dict(pos_offset=0, **fused)),
    }


CASES = [(op, name) for op, (_, arrays, _) in _calls().items() for name in arrays]


def _tensors(arrays: dict) -> dict:
    return {name: TORCH.asarray(a) for name, a in arrays.items()}


@pytest.mark.parametrize("op", _calls())
def test_the_valid_call_runs(op):
    fn, arrays, rest = _calls()[op]
    fn(**_tensors(arrays), **rest)


@pytest.mark.parametrize("op, name", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_a_numpy_array_is_refused_by_name(op, name):
    fn, arrays, rest = _calls()[op]
    args = _tensors(arrays)
    before = {n: t.clone() for n, t in args.items()}
    args[name] = arrays[name]
    with pytest.raises(TypeError, match=rf"^{name} must be a torch.Tensor for the torch backend, "
                                        r"got numpy.ndarray \(convert it with backend.asarray\)"):
        fn(**args, **rest)
    for n, was in before.items():
        if n != name:
            assert torch.equal(args[n], was), n


@pytest.mark.parametrize("op", [op for op, (_, arrays, _) in _calls().items() if len(arrays) > 1])
def test_a_tensor_on_another_device_is_refused_by_name(op):
    fn, arrays, rest = _calls()[op]
    args = _tensors(arrays)
    last = list(args)[-1]
    args[last] = args[last].to("meta")
    with pytest.raises(ValueError, match=rf"^{last} is on meta but {list(args)[0]} is on cpu"):
        fn(**args, **rest)
