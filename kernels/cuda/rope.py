"""RoPE as a Numba CUDA kernel: :func:`kvlab.ref.rope.apply_rope`, one thread per pair of dims.

A pair's rotation needs its two inputs, one row of the tables and nothing else: no thread reads
what another writes, so there is no shared memory, no barrier and no warp shuffle (the simulator
runs it as written). The launch wrapper has ``kvlab.ref.rope``'s name and parameters, checks the
arguments (:mod:`kvlab.checks`) and launches; it takes and returns Numba device arrays
(``kvlab.kernels.cuda.asarray``): x float16 or float32, tables float32, positions int32.

``rope_tables`` is computed on the host by :func:`kvlab.ref.rope.rope_tables` (float64, then
rounded) and copied to the device once: the tables are built once per model, and one definition
means every backend rotates by the very same numbers.
"""
from __future__ import annotations

from typing import Any, Mapping

from kvlab.checks import ROPE_X_DTYPES, check_apply_rope
from kvlab.kernels.cuda import MODE, cuda, kernel, mul_rn
from kvlab.ref import rope as _ref

from numba import float32  # noqa: E402,I001  (numba is configured once kvlab.kernels.cuda is)

# Threads per block. The simulator runs each thread as a Python thread, so it gets small blocks.
THREADS_PER_BLOCK = 128 if MODE == "gpu" else 32


def rope_tables(max_positions: int, rotary_dim: int, theta: float,
                scaling: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """``cos``, ``sin`` as float32 device arrays ``[max_positions, rotary_dim // 2]``.

    Parameters as :func:`kvlab.ref.rope.rope_tables`, which computes them (on the host).
    """
    cos, sin = _ref.rope_tables(max_positions, rotary_dim, theta, scaling)
    return cuda.to_device(cos), cuda.to_device(sin)


# --- apply_rope ------------------------------------------------------------------------------
#
#   grid: one thread per (token, head, pair), numbered pair-fastest; a head of head_dim dims has
#   head_dim / 2 pairs, of which the first rotary_dim / 2 rotate and the rest are copied:
#
#   thread g        0      1    ...  D/2-1  |  D/2   ...  |  H*D/2  ...
#   (token, head)  (0,0)  (0,0) ...  (0,0)  | (0,1)  ...  | (1,0)   ...
#   pair p          0      1    ...  D/2-1  |   0    ...  |   0     ...
#
#   thread (t, h, p), p < rotary_dim/2:       a = x[t, h, i], b = x[t, h, j]   (float32)
#       neox: (i, j) = (p, p + rotary_dim/2)     c = cos[positions[t], p], s = sin[...]
#       gptj: (i, j) = (2p, 2p + 1)              out[t, h, i] = a c - b s
#                                                out[t, h, j] = b c + a s
#   thread (t, h, p), p >= rotary_dim/2:      copies dims rotary_dim + 2q and +1 (q = p - R/2)
#
#   Neighbouring threads touch neighbouring dims in both styles (neox: two coalesced streams,
#   one per half; gptj: one stream, two elements each), and all heads of a token read one table row.

@kernel(*(f"void({dt}[:, :, ::1], float32[:, ::1], float32[:, ::1], int32[::1], int64, boolean, "
          f"{dt}[:, :, ::1])" for dt in ROPE_X_DTYPES))
def apply_rope_kernel(x, cos, sin, positions, rotary_dim, interleaved, out):
    g = cuda.grid(1)
    num_heads = x.shape[1]
    pairs = x.shape[2] // 2  # pairs per head, rotated or not
    if g >= x.shape[0] * num_heads * pairs:  # the last block's spare threads
        return
    p = g % pairs
    head = (g // pairs) % num_heads
    token = g // (pairs * num_heads)
    half = rotary_dim // 2
    if p >= half:  # a pass-through pair: copy, bit for bit
        i = rotary_dim + 2 * (p - half)
        out[token, head, i] = x[token, head, i]
        out[token, head, i + 1] = x[token, head, i + 1]
        return
    if interleaved:
        i = 2 * p
        j = i + 1
    else:
        i = p
        j = p + half
    pos = positions[token]
    c = cos[pos, p]
    s = sin[pos, p]
    a = float32(x[token, head, i])  # widen fp16 once; all arithmetic in float32
    b = float32(x[token, head, j])
    # mul_rn: no FMA contraction on a GPU, so the result is bit-equal to the reference's; the
    # store rounds once to out's dtype
    out[token, head, i] = mul_rn(a, c) - mul_rn(b, s)
    out[token, head, j] = mul_rn(b, c) + mul_rn(a, s)


def apply_rope(x: Any, cos: Any, sin: Any, positions: Any, style: str = "neox",
               rotary_dim: int | None = None) -> Any:
    """Rotate every head of every token by its position's angles: a new device array like x.

    Parameters as :func:`kvlab.ref.rope.apply_rope` (device arrays).
    """
    rotary_dim = check_apply_rope(x, cos, sin, positions, style, rotary_dim)
    out = cuda.device_array(x.shape, dtype=x.dtype)
    threads = x.shape[0] * x.shape[1] * (x.shape[2] // 2)
    if threads > 0:  # no tokens: nothing to do, and CUDA rejects an empty grid
        blocks = -(-threads // THREADS_PER_BLOCK)
        apply_rope_kernel[blocks, THREADS_PER_BLOCK](x, cos, sin, positions, rotary_dim,
                                                    style == "gptj", out)
    return out
