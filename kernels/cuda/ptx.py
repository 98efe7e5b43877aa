"""What the real compiler makes of every registered kernel — PTX (NVRTC/NVVM) and ptxas's register
allocation (nvJitLink) — with no GPU.

The simulator runs any Python (even lists inside a kernel), so passing it proves little about the
real compiler. Three reports, each a process of its own run with ``NUMBA_ENABLE_CUDASIM=0``
(``numba.cuda.compile_ptx`` does not exist in a process that imported the simulator):

- ``python -m kvlab.kernels.cuda.ptx [--cc 9.0]``: one JSON line ``{"module.kernel[i]": {...}}``
  per (kernel, signature): PTX size, FMAs, local-memory accesses, global loads, launch bounds,
  and ptxas's registers, spills, stack and static shared memory. Exits non-zero on a failure.
- ``--resources [NAMES]``: registers, shared and local memory of each kernel's first signature
  (NAMES: comma-separated substrings of kernel names; all without). From ptxas on any machine;
  on a GPU also as the driver reports them (``driver_*``). This decides how many warps an SM
  keeps in flight.
- ``--budget``: the instruction budget of every decode-attention kernel's main loop — the bound
  that limits these kernels (they are instruction-bound, not load-bound) — and the bytes in flight
  its resident warps can keep out: the issue and latency ceilings of :mod:`kvlab.gpu_limits`.

ptxas runs through nvJitLink (``cuda-bindings``, part of ``numba-cuda[cu13]``) with
``-Xptxas=-v``; the driver of a real GPU compiles the same PTX with its own ptxas, which may
allocate a few registers differently.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from kvlab.gpu_limits import SM90, WARP_SIZE, bandwidth_bounds, blocks_per_sm, h200, issue_bound

# --- ptxas through nvJitLink ---------------------------------------------------------------------


def ptxas_resources(ptx: str, cc: tuple[int, int]) -> dict[str, int]:
    """ptxas's verdict on one kernel's PTX for ``sm_<cc>``: ``registers`` per thread,
    ``spill_bytes`` (stores + loads of spilled registers per thread), ``stack_bytes`` (the
    stack frame: local arrays and spills) and ``shared_bytes`` (static shared memory, summed
    from the PTX's ``.shared`` declarations: ptxas does not report module-scope ones)."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-Xptxas=-v"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as error:
            raise RuntimeError(f"ptxas failed: {_log(handle, error=True)}") from error
        log = _log(handle)
    finally:
        nvjitlink.destroy(handle)
    found = {key: re.search(pattern, log) for key, pattern in (
        ("registers", r"Used (\d+) registers"), ("stack_bytes", r"(\d+) bytes stack frame"),
        ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads"))}
    missing = [key for key, match in found.items() if match is None]
    if missing:
        raise RuntimeError(f"ptxas -v printed no {missing}: {log}")
    values = {key: int(match.group(1)) for key, match in found.items()}
    return {"registers": values["registers"],
            "spill_bytes": values["spill_stores"] + values["spill_loads"],
            "stack_bytes": values["stack_bytes"], "shared_bytes": static_shared_bytes(ptx)}


def _log(handle: Any, error: bool = False) -> str:
    from cuda.bindings import nvjitlink

    size = (nvjitlink.get_error_log_size if error else nvjitlink.get_info_log_size)(handle)
    buffer = bytearray(size)
    (nvjitlink.get_error_log if error else nvjitlink.get_info_log)(handle, buffer)
    return buffer.decode(errors="replace").rstrip("\x00")


def static_shared_bytes(ptx: str) -> int:
    """The bytes of every ``.shared`` array the PTX declares (Numba's ``cuda.shared.array``)."""
    return sum(int(n) for n in re.findall(r"^\s*\.(?:visible\s+)?\.shared\s+.*\[(\d+)\];", ptx,
                                          re.MULTILINE))


# --- the main loop of a kernel -------------------------------------------------------------------

_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")


def instructions(lines: list[str]) -> list[str]:
    """The PTX instructions in ``lines`` (an inline-asm line may hold several; declarations,
    labels, braces and comments are not instructions)."""
    out = []
    for line in lines:
        for piece in line.split("//")[0].split(";"):
            piece = piece.strip().strip("{}").strip()
            if piece and not piece.startswith(".") and not piece.endswith(":"):
                out.append(piece)
    return out


def _blocks(lines: list[str]) -> list[tuple[int, int]]:
    """The basic blocks of a kernel's PTX as ``[start, end)`` line ranges: a label starts one, a
    branch or ``ret`` ends one."""
    blocks, start = [], 0
    for i, line in enumerate(lines):
        text = line.split("//")[0].strip()
        if _LABEL.match(text) and i > start:
            blocks.append((start, i))
            start = i
        if _BRANCH.search(text) or re.match(r"^(@%\w+\s+)?ret;", text):
            blocks.append((start, i + 1))
            start = i + 1
    if start < len(lines):
        blocks.append((start, len(lines)))
    return blocks


def _successors(lines: list[str], blocks: list[tuple[int, int]]) -> list[list[int]]:
    """Each block's successors (indices into ``blocks``): its branch target, and the next block
    unless it ends in an unconditional branch or ``ret``."""
    first = {}
    for b, (start, end) in enumerate(blocks):
        label = _LABEL.match(lines[start].strip())
        if label:
            first[label.group(1)] = b
    out = []
    for b, (start, end) in enumerate(blocks):
        last = lines[end - 1].split("//")[0].strip()
        branch = _BRANCH.search(last)
        succ = [first[branch.group(1)]] if branch and branch.group(1) in first else []
        unconditional = (branch and not last.startswith("@")) or re.match(r"^ret;", last)
        if not unconditional and b + 1 < len(blocks):
            succ.append(b + 1)
        out.append(succ)
    return out


def main_loop(ptx: str) -> list[str] | None:
    """The lines of the kernel's main loop: of its natural loops (a back edge from a block to an
    earlier block, the header, and every block that reaches that edge without passing the
    header), the one holding the most global loads, the shortest on a tie; None when no loop
    loads from global memory. Nested loops are part of it (their bodies counted once). A loop's
    blocks need not be contiguous: the compiler may lay part of a loop out after the kernel's
    ``ret``, so the lines between a label and a branch back to it are not the loop."""
    lines = ptx.splitlines()
    blocks = _blocks(lines)
    succ = _successors(lines, blocks)
    pred: list[list[int]] = [[] for _ in blocks]
    for b, targets in enumerate(succ):
        for t in targets:
            pred[t].append(b)
    best = None
    for latch, targets in enumerate(succ):
        for header in targets:
            if header > latch:
                continue
            body, stack = {header, latch}, [latch]
            while stack:  # every block that reaches the latch without passing the header
                for p in pred[stack.pop()]:
                    if p not in body:
                        body.add(p)
                        stack.append(p)
            if 0 in body and header != 0:  # the entry reaches the latch around the header:
                continue                    # the header does not dominate it, no natural loop
            loop = [line for b in sorted(body) for line in lines[slice(*blocks[b])]]
            loads = sum("ld.global" in line for line in loop)
            key = (loads, -len(loop))
            if loads and (best is None or key > best[0]):
                best = (key, loop)
    return None if best is None else best[1]


def loop_budget(ptx: str, kv_bytes_per_trip: int, warp_lanes: int = 32) -> dict[str, Any]:
    """The main loop's static instruction count and what it costs per byte of K and V.

    ``kv_bytes_per_trip``: bytes of K and V **one thread** reads per trip of the loop (the
    kernel's own constants). ``warp_instructions_per_kv_byte`` = instructions / (bytes x lanes):
    a warp issues each instruction once for its 32 lanes. Static: both sides of a branch and a
    nested loop's body count once, as the PTX holds them (a guide to the bound, not a trace)."""
    body = main_loop(ptx)
    if body is None:
        raise ValueError("no loop with global loads in this PTX")
    ops = instructions(body)
    count = {name: sum(op.split()[0].startswith(prefix) for op in ops) for name, prefix in (
        ("fma", "fma."), ("shfl", "shfl."), ("global_loads", "ld.global"), ("cvt", "cvt."))}
    seen, back_edges = set(), 0
    for line in body:  # a branch to a label already passed is a loop's back edge
        label, branch = _LABEL.match(line.strip()), _BRANCH.search(line)
        if label:
            seen.add(label.group(1))
        if branch and branch.group(1) in seen:
            back_edges += 1
    nested = back_edges - 1  # the main loop's own
    return {"instructions": len(ops), **count, "nested_loops": max(0, nested),
            "kv_bytes_per_thread": kv_bytes_per_trip,
            "warp_instructions_per_kv_byte": round(len(ops) / (kv_bytes_per_trip * warp_lanes), 4)}


# --- the reports ---------------------------------------------------------------------------------

def _compile(entry: Any, signature: str, cc: tuple[int, int]) -> str:
    from numba.cuda import compile_ptx

    ptx, _ = compile_ptx(entry.py_func, signature, cc=cc, launch_bounds=entry.launch_bounds)
    return ptx


def _registry(cc: tuple[int, int]) -> list[Any]:
    """The registered kernels that compile for ``sm_<cc>`` (a kernel with a newer ``min_cc``
    uses instructions that GPU lacks: v8 with fp8 by the hardware's cvt)."""
    from kvlab.kernels import cuda as kcuda

    if kcuda.MODE != "gpu":
        raise RuntimeError("PTX compilation needs NUMBA_ENABLE_CUDASIM=0 (no GPU is needed)")
    kcuda.load_all_stages()
    return [entry for entry in kcuda.REGISTRY if entry.min_cc is None or tuple(cc) >= entry.min_cc]


def kernel_params(ptx: str) -> int:
    """The parameters of the kernel entry in ``ptx`` (``.param`` declarations)."""
    return len(re.findall(r"^\s*\.param\s", ptx, re.MULTILINE))


def _min_blocks_per_sm(ptx: str) -> int:
    """The ``.minnctapersm`` directive launch bounds put in the PTX (0 when there is none)."""
    found = re.search(r"\.minnctapersm\s+(\d+)", ptx)
    return int(found.group(1)) if found else 0


def compile_all(cc: tuple[int, int] = (9, 0)) -> dict[str, dict[str, Any]]:
    """Compile each (kernel, signature) pair and run ptxas on it; return ``{"module.kernel[i]":
    {...}}``: ``bytes`` of PTX, ``fma_f32`` (the float32 fused multiply-adds the compiler chose:
    kernels that promise the reference's roundings must have none), ``local_accesses`` (loads and
    stores of local memory in the PTX: a per-thread array the compiler could not keep in
    registers), ``global_loads`` (static: a loop's body counts once), ``min_blocks_per_sm``
    (launch bounds; 0: none), ``params`` (the kernel's parameters: Numba passes an array as
    5 + 2 x ndim of them, which its launch packs one by one on the host), ptxas's ``registers``, ``spill_bytes``, ``stack_bytes``,
    ``shared_bytes`` (:func:`ptxas_resources`), and for the decode kernels v2-v8 the ``budget``
    of their main loop (:func:`decode_budgets`)."""
    per_trip = {(entry.name, signature): (label, trip, threads)
                for label, _, entry, signature, trip, threads in _decode_kernels(cc)}
    report = {}
    for entry in _registry(cc):
        for i, signature in enumerate(entry.signatures):
            ptx = _compile(entry, signature, cc)
            info = {"bytes": len(ptx), "fma_f32": ptx.count("fma.rn.f32"),
                    "local_accesses": ptx.count("ld.local") + ptx.count("st.local"),
                    "global_loads": ptx.count("ld.global"),
                    "min_blocks_per_sm": _min_blocks_per_sm(ptx), "params": kernel_params(ptx),
                    **ptxas_resources(ptx, cc)}
            if (entry.name, signature) in per_trip:
                label, trip, threads = per_trip[entry.name, signature]
                info["budget"] = {"pool": label, **_budget(ptx, trip, threads, info)}
            report[f"{entry.name}[{i}]"] = info
    return report


def resource_usage(name_filter: str = "", cc: tuple[int, int] = (9, 0)) -> dict[str, dict[str, int]]:
    """Each matching kernel's (first signature's) registers per thread, static shared memory per
    block and local memory per thread, from ptxas for ``sm_<cc>`` (no GPU needed); on a GPU also
    as its driver reports them for the GPU's own architecture. ``name_filter``: comma-separated
    substrings of the kernels' names ("" for all)."""
    from kvlab.kernels import cuda as kcuda

    # The driver's figures are for the GPU's own architecture, which may lack a kernel's
    # instructions (``min_cc``): such a kernel gets ptxas's figures only.
    device_cc = kcuda.cuda.get_current_device().compute_capability if kcuda.cuda.is_available() else None
    usage = {}
    for entry in _registry(cc):
        if not any(part in entry.name for part in name_filter.split(",")):
            continue
        signature = entry.signatures[0]
        ptxas = ptxas_resources(_compile(entry, signature, cc), cc)
        info = {"registers": ptxas["registers"], "shared_bytes": ptxas["shared_bytes"],
                "local_bytes": ptxas["stack_bytes"], "spill_bytes": ptxas["spill_bytes"],
                "source": f"ptxas sm_{cc[0]}{cc[1]} (nvJitLink)"}
        if device_cc is not None and (entry.min_cc is None or device_cc >= entry.min_cc):
            compiled = entry.dispatcher.compile(signature)
            info.update(driver_registers=compiled.regs_per_thread,
                        driver_shared_bytes=compiled.shared_mem_per_block,
                        driver_local_bytes=compiled.local_mem_per_thread,
                        max_threads_per_block=compiled.max_threads_per_block)
        usage[f"{entry.name} {signature}"] = info
    return usage


# What turns a budget into a bound on an H200: its SMs and clock as Nsight Compute reported them
# (kvlab.gpu_limits.h200), and the ~2.4 warp instructions per cycle per SM it measured v6 issuing.
ISSUE_PER_CYCLE = 2.4


def _decode_kernels(cc: tuple[int, int]) -> list[tuple[str, int, Any, str, int, int]]:
    """``(label, version, entry, signature, kv_bytes_per_trip, threads_per_block)`` of the decode
    kernels v2-v8
    with fp16 and 8-bit pools (v8: int8 and fp8 apart); per trip: one key's K and V slices per lane (v7: a chunk of
    keys), v8: one step of the bench's shape (its loop over a block's steps, a nested loop
    when there are several, is counted once)."""
    from kvlab.kernels.cuda import attention, attention_v8

    out = []
    for entry in _registry(cc):
        name = entry.name.rsplit(".", 1)[1]
        found = re.fullmatch(r"(?:warp_)?attention_v(\d)_(?:(\d)byte_|(fp16|int8|fp8)_.*_)?kernel",
                             name)
        if not found:
            continue
        version = int(found.group(1))
        if version == 8:
            if found.group(3) is None:
                continue
            elem = 2 if found.group(3) == "fp16" else 1  # int8 and fp8: one byte
            head_dim, block_size, _ = attention_v8.REGISTERED_SHAPE
            shape = attention_v8.layout(elem, head_dim, block_size, warp_lanes=32)
            per_trip = shape.loads * 2 * attention_v8.LOAD_BYTES
            out.append((found.group(3), version, entry, entry.signatures[0], per_trip,
                        attention_v8.THREADS))
            continue
        keys = attention.KEYS_PER_STEP if version == 7 else 1
        if found.group(2):  # v5-v7: one kernel per element size, one signature
            elem = int(found.group(2))
            if elem in (1, 2):
                out.append(("fp16" if elem == 2 else "int8", version, entry, entry.signatures[0],
                            2 * attention.DIM_SLOTS * elem * keys, attention.WARP_THREADS))
        else:               # v2-v4: signatures float16, float32, int8, uint8
            for label, i, elem in (("fp16", 0, 2), ("int8", 2, 1)):
                out.append((label, version, entry, entry.signatures[i],
                            2 * attention.DIM_SLOTS * elem, attention.WARP_THREADS))
    return out


def _budget(ptx: str, kv_bytes_per_trip: int, threads_per_block: int,
            resources: dict[str, int]) -> dict[str, Any]:
    """:func:`loop_budget` and the two ceilings of :mod:`kvlab.gpu_limits` that can be read
    without a GPU, for an H200 (its SMs and clock from :func:`kvlab.gpu_limits.h200`; it copies
    at ~4.2 TB/s):

    - ``issue_bound_tb_s``: 132 SMs x 1.98 GHz x 2.4 / warp instructions per byte;
    - ``warps_per_sm``: resident warps, from ptxas's ``resources`` (registers, static shared
      memory) by the occupancy rules (:func:`kvlab.gpu_limits.blocks_per_sm`, the largest
      shared-memory carve-out); ``bytes_in_flight_per_warp``: a trip's K/V loads for 32 lanes
      (the most a warp can have out if it issues them all before using any — v3 and later do);
      ``latency_bound_tb_s``: SMs x warps x bytes in flight / the assumed DRAM latency (600 ns).
    """
    budget = loop_budget(ptx, kv_bytes_per_trip)
    machine = h200()
    budget["issue_bound_tb_s"] = round(issue_bound(
        budget["warp_instructions_per_kv_byte"], ISSUE_PER_CYCLE, machine.num_sms,
        machine.clock_hz) / 1e12, 2)
    blocks = blocks_per_sm(resources["registers"], threads_per_block, resources["shared_bytes"],
                           SM90.max_shared_per_sm)
    warps = blocks * threads_per_block // WARP_SIZE
    in_flight = kv_bytes_per_trip * WARP_SIZE
    budget.update(registers=resources["registers"], warps_per_sm=warps,
                  bytes_in_flight_per_warp=in_flight,
                  latency_bound_tb_s=round(bandwidth_bounds(
                      budget["warp_instructions_per_kv_byte"], ISSUE_PER_CYCLE, warps * in_flight,
                      machine)["latency"] / 1e12, 2))
    return budget


def decode_budgets(cc: tuple[int, int] = (9, 0)) -> dict[str, dict[str, Any]]:
    """:func:`_budget` of each decode kernel v2-v8 with fp16 and int8 pools (head_dim 128: the
    lanes of v2-v7 hold 8 dims each, v8 is specialised to it). v1 is left out: its loops run
    over head_dim at run time, so a static count of its body says little."""
    out = {}
    for label, version, entry, signature, trip, threads in _decode_kernels(cc):
        ptx = _compile(entry, signature, cc)
        out[f"v{version} {label} {entry.name.rsplit('.', 1)[1]}"] = _budget(
            ptx, trip, threads, ptxas_resources(ptx, cc))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 8.0 or 9.0")
    parser.add_argument("--resources", metavar="NAMES", nargs="?", const="",
                        help="registers / shared / local memory (ptxas; and the driver's on a GPU) "
                             "of the kernels whose name contains one of the comma-separated NAMES "
                             "(all without)")
    parser.add_argument("--budget", action="store_true",
                        help="instructions per KV byte in each decode kernel's main loop")
    args = parser.parse_args(argv)
    cc = tuple(int(p) for p in args.cc.split("."))
    if args.resources is not None:
        print(json.dumps(resource_usage(args.resources, cc), indent=1))
    elif args.budget:
        print(json.dumps(decode_budgets(cc), indent=1))
    else:
        print(json.dumps(compile_all(cc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
