"""Time attention v7's two knobs on a GPU: keys per stream per step x launch bounds (blocks per SM),
at the bench's real shape (fp16 pools), over a few split counts, next to v6 — the evidence for
``KEYS_PER_STEP`` and ``CHUNK_BLOCKS_PER_SM`` in kvlab.kernels.cuda.attention.

    python scripts/sweep_v7.py            (a GPU; scripts/gpu_check.sh runs it)

Each variant is built from v7's source (``_make_warp_kernel(7, 2, keys, blocks)``), launched
through ``attention.launch`` in place of the registered v7, checked against v6's output once, then
timed like ``python -m kvlab bench`` times kernels (CUDA events, L2 flushed, median of 20).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from profile_kernels import attention_arrays  # noqa: E402

from kvlab.backends import get_backend  # noqa: E402
from kvlab.bench import PRESETS, NumbaCudaTimer, measure  # noqa: E402
from kvlab.checks import check_paged_decode_attention  # noqa: E402

VARIANTS = ((2, 3), (2, 4), (2, 0), (4, 3), (4, 0), (8, 0))  # (keys per step, blocks per SM; 0: none)
SPLITS = (8, 16, 32)


def main() -> None:
    from numba import cuda

    from kvlab.kernels.cuda import attention

    be = get_backend("cuda", device="gpu")
    q, k_pool, v_pool, tables, lens, starts = attention_arrays(be, np.random.default_rng(0),
                                                               PRESETS["real"])
    timer = NumbaCudaTimer(cuda)
    registered = attention.WIDE_KERNELS[7, 2]

    def launcher(version: int, splits: int):
        _, _, _, scale, window, num_splits = check_paged_decode_attention(
            q, k_pool, v_pool, tables, lens, starts, None, 0, None, None, splits)
        return lambda: attention.launch(q, k_pool, v_pool, None, None, None, tables, lens, starts,
                                        scale, window, True, num_splits, version=version)

    print(f"{cuda.get_current_device().name}: median / min of 20 (ms), fp16 pools, shape "
          f"{PRESETS['real']}")
    want = be.to_numpy(launcher(6, 16)())
    for splits in SPLITS:
        t = measure(timer, launcher(6, splits), 2, 20)
        print(f"v6                       splits={splits:3d}  {1e3 * np.median(t):7.3f}  "
              f"{1e3 * min(t):7.3f}")
    for keys, blocks in VARIANTS:
        attention.WIDE_KERNELS[7, 2] = attention._make_warp_kernel(7, 2, keys, blocks)
        try:
            err = float(np.abs(be.to_numpy(launcher(7, 16)()) - want).max())
            for splits in SPLITS:
                t = measure(timer, launcher(7, splits), 2, 20)
                print(f"v7 keys={keys} blocks/SM={blocks or '-'}  splits={splits:3d}  "
                      f"{1e3 * np.median(t):7.3f}  {1e3 * min(t):7.3f}  max|v7 - v6| {err:.1e}")
        except Exception as exc:  # noqa: BLE001  (one variant failing must not end the sweep)
            print(f"v7 keys={keys} blocks/SM={blocks}: {type(exc).__name__}: {exc}")
        finally:
            attention.WIDE_KERNELS[7, 2] = registered
        sys.stdout.flush()


if __name__ == "__main__":
    main()
