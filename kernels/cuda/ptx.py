"""Compile every registered CUDA kernel to PTX with NVRTC — a real compile, no GPU needed.

The simulator runs any Python (even lists inside a kernel), so passing it proves little about the
real compiler. Run as ``NUMBA_ENABLE_CUDASIM=0 python -m kvlab.kernels.cuda.ptx [--cc 9.0]``; it
prints one JSON line ``{"kernel name": {"bytes": ..., "fma_f32": ...}, ...}`` and exits non-zero on the first failure.
(``numba.cuda.compile_ptx`` does not exist in the simulator, hence a process of its own.)
"""
from __future__ import annotations

import argparse
import json
import re
import sys


def _min_blocks_per_sm(ptx: str) -> int:
    """The ``.minnctapersm`` directive launch bounds put in the PTX (0 when there is none)."""
    found = re.search(r"\.minnctapersm\s+(\d+)", ptx)
    return int(found.group(1)) if found else 0


def compile_all(cc: tuple[int, int] = (9, 0)) -> dict[str, dict[str, int]]:
    """Compile each (kernel, signature) pair; return ``{"module.kernel[i]": {"bytes": len(ptx),
    "fma_f32": count, "local_accesses": count, "global_loads": count}}``: the float32 fused
    multiply-adds the compiler chose to emit (kernels that promise the reference's roundings must
    have none), the loads and stores of local memory (a per-thread array the compiler could not
    keep in registers), the load instructions from global memory in the code (static: a loop's
    body counts once) and the blocks per SM its launch bounds promise (0: none)."""
    from kvlab.kernels import cuda as kcuda

    if kcuda.MODE != "gpu":
        raise RuntimeError("PTX compilation needs NUMBA_ENABLE_CUDASIM=0 (no GPU is needed)")
    from numba.cuda import compile_ptx

    kcuda.load_all_stages()
    sizes = {}
    for entry in kcuda.REGISTRY:
        for i, signature in enumerate(entry.signatures):
            ptx, _ = compile_ptx(entry.py_func, signature, cc=cc,
                                 launch_bounds=entry.launch_bounds)
            sizes[f"{entry.name}[{i}]"] = {"bytes": len(ptx), "fma_f32": ptx.count("fma.rn.f32"),
                                           "local_accesses": ptx.count("ld.local")
                                           + ptx.count("st.local"),
                                           "global_loads": ptx.count("ld.global"),
                                           "min_blocks_per_sm": _min_blocks_per_sm(ptx)}
    return sizes


def resource_usage(name_filter: str = "") -> dict[str, dict[str, int]]:
    """On a GPU: each registered kernel's (first signature's) registers per thread, static shared
    memory per block and local memory (spills, stack) per thread, as the driver reports them —
    what decides how many warps an SM can keep in flight. ``name_filter``: comma-separated
    substrings of the kernels' names ("" for all)."""
    from kvlab.kernels import cuda as kcuda

    kcuda.check_available()
    kcuda.load_all_stages()
    usage = {}
    for entry in kcuda.REGISTRY:
        if not any(part in entry.name for part in name_filter.split(",")):
            continue
        signature = entry.signatures[0]
        compiled = entry.dispatcher.compile(signature)
        usage[f"{entry.name} {signature}"] = {
            "registers": compiled.regs_per_thread,
            "shared_bytes": compiled.shared_mem_per_block,
            "local_bytes": compiled.local_mem_per_thread,
            "max_threads_per_block": compiled.max_threads_per_block,
        }
    return usage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 8.0 or 9.0")
    parser.add_argument("--resources", metavar="NAMES", nargs="?", const="",
                        help="on a GPU: registers / shared / local memory of the kernels whose "
                             "name contains one of the comma-separated NAMES (all without)")
    args = parser.parse_args(argv)
    if args.resources is not None:
        print(json.dumps(resource_usage(args.resources), indent=1))
        return 0
    major, minor = (int(p) for p in args.cc.split("."))
    print(json.dumps(compile_all((major, minor))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
