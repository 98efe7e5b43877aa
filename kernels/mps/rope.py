"""RoPE as PyTorch ops: :func:`kvlab.ref.rope.apply_rope` on MPS, CUDA or the CPU.

The rotation is elementwise once each token's table row is gathered: take the two coordinates of
every pair as views (:func:`pair_halves`: rotate-half or interleaved), rotate in float32, write
them into a copy of x, a tile of tokens at a time on the CPU. Only ops MPS supports are used (no
float64: the tables are built in float64 on the host by :func:`kvlab.ref.rope.rope_tables`, the
same numbers every backend uses). Arguments are checked by :mod:`kvlab.checks`; results are tensors
on x's device. Unverified on MPS: no machine this project is tested on has one.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from kvlab.checks import check_apply_rope
from kvlab.kernels.mps import pick_device, require_tensors, token_tiles
from kvlab.ref import rope as _ref


def rope_tables(max_positions: int, rotary_dim: int, theta: float,
                scaling: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` as float32 tensors ``[max_positions, rotary_dim // 2]`` on the default
    device (``mps``, then ``cuda``, then ``cpu``, as ``get_backend("torch")`` picks).

    Parameters as :func:`kvlab.ref.rope.rope_tables`, which computes them (on the host). For
    another device, build them with ``kvlab.ref.rope`` and move them with ``backend.asarray``.
    """
    cos, sin = _ref.rope_tables(max_positions, rotary_dim, theta, scaling)
    device = pick_device()
    return torch.from_numpy(cos).to(device), torch.from_numpy(sin).to(device)


def pair_halves(x: torch.Tensor, style: str, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair's first and second coordinate as two views of x, ``[..., rotary_dim // 2]``
    each: the two halves of the rotated dims (neox, rotate-half) or its even and odd dims (gptj,
    interleaved); the pairs of :func:`kvlab.ref.rope.pair_dims`. Views, not copies by index: a
    gather by an index tensor costs a pass over x (measured 2x the whole rotation on a CPU)."""
    half = rotary_dim // 2
    if style == "neox":
        return x[..., :half], x[..., half:rotary_dim]
    return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]


def rotate_into(out: torch.Tensor, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, style: str,
                rotary_dim: int) -> None:
    """Write x's rotated pairs into out's: ``x[first] * c - x[second] * s`` and ``x[second] * c +
    x[first] * s`` in float32, rounded once to out's dtype (the reference's arithmetic).

    x: float32 ``[T, heads, head_dim]``; out: ``[T, heads, head_dim]`` (its other dims untouched);
    c, s: float32 ``[T, 1, rotary_dim // 2]``, each token's table row for every head.
    """
    a, b = pair_halves(x, style, rotary_dim)
    first, second = pair_halves(out, style, rotary_dim)
    first.copy_(a * c - b * s)
    second.copy_(b * c + a * s)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               style: str = "neox", rotary_dim: int | None = None) -> torch.Tensor:
    """Rotate every head of every token by its position's angles: a new tensor like x.

    Parameters as :func:`kvlab.ref.rope.apply_rope` (tensors on one device). On the CPU a tile of
    tokens at a time (:func:`kvlab.kernels.mps.token_tiles`).
    """
    require_tensors(x=x, cos=cos, sin=sin, positions=positions)
    rotary_dim = check_apply_rope(x, cos, sin, positions, style, rotary_dim)
    rows = positions.long()
    out = x.clone()  # the pass-through dims stay as they are
    for tile in token_tiles(x.shape[0], 4 * math.prod(x.shape[1:]), x.device):
        c = cos[rows[tile]].unsqueeze(1)  # [t, 1, rotary_dim // 2]: one row per token, every head
        s = sin[rows[tile]].unsqueeze(1)
        rotate_into(out[tile], x[tile].float(), c, s, style, rotary_dim)
    return out
