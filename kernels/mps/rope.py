"""RoPE as PyTorch ops: :func:`kvlab.ref.rope.apply_rope` on MPS, CUDA or the CPU.

The rotation is elementwise once each token's table row is gathered: index the two coordinates of
every pair (``pair_dims``: rotate-half or interleaved), rotate in float32, write them into a copy of
x. Only ops MPS supports are used (no float64: the tables are built in float64 on the host by
:func:`kvlab.ref.rope.rope_tables`, the same numbers every backend uses). Arguments are checked by
:mod:`kvlab.checks`; results are tensors on x's device. Unverified on MPS: no machine this project
is tested on has one.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from kvlab.checks import check_apply_rope
from kvlab.kernels.mps import pick_device, require_tensors
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               style: str = "neox", rotary_dim: int | None = None) -> torch.Tensor:
    """Rotate every head of every token by its position's angles: a new tensor like x.

    Parameters as :func:`kvlab.ref.rope.apply_rope` (tensors on one device).
    """
    require_tensors(x=x, cos=cos, sin=sin, positions=positions)
    rotary_dim = check_apply_rope(x, cos, sin, positions, style, rotary_dim)
    first, second = (torch.from_numpy(d).to(x.device) for d in _ref.pair_dims(rotary_dim, style))
    rows = positions.long()
    c = cos[rows].unsqueeze(1)  # [T, 1, rotary_dim // 2]: one row per token, every head
    s = sin[rows].unsqueeze(1)
    a = x[..., first].float()  # [T, heads, rotary_dim // 2]
    b = x[..., second].float()
    out = x.clone()  # the pass-through dims stay as they are
    out[..., first] = (a * c - b * s).to(x.dtype)
    out[..., second] = (b * c + a * s).to(x.dtype)
    return out
