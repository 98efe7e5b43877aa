"""Which thread touched which element: an access tracer for kernels run in Numba's CUDA simulator.

The simulator runs a kernel's Python source with one Python thread per CUDA thread, and it passes
any argument that is not a NumPy array straight through to the kernel. So wrapping each array in a
:class:`TracedArray` (same indexing, same ``shape``/``dtype``) lets every read and write be
recorded with the block and thread that made it::

    log = AccessLog()
    k_pool = TracedArray(k_pool_np, "k_pool", log)
    kernel[grid, block](k, v, k_pool, v_pool, slots)       # the simulator runs it
    log.accesses("k_pool", "write")                         # [(block, thread, element), ...]

A wrong index then shows up as a wrong *picture* (:func:`kvlab.plot.plot_accesses`), not only as
a wrong number. Only the simulator can do this: a real GPU never runs Python, so there
``launch_traced`` runs the kernel untraced and returns no log.

Element positions are recorded as flat indices into the whole array (row-major), so a view such as
``k_pool[block, slot]`` still reports the elements of the pool it touched.

The tracer also records the barriers each thread reaches (``cuda.syncthreads()`` and its
``_count``/``_and``/``_or`` forms), by the line of the kernel that calls them. The simulator
releases a block's threads once every live thread waits at *a* barrier, so a barrier inside a
branch that only some threads take runs there as if it were right; the CUDA Programming Guide
allows a barrier in conditional code only when the condition is the same for the whole block. A
traced launch in which the threads of one block reached different barriers (other lines, or
other numbers of them) raises :class:`DivergentBarrierError`.

And it records what each thread stores and first reads. The simulator runs a block's threads as
Python threads, in whatever order its scheduler picks, so two threads that meet at one element
come out one way in a run there, and any way on a GPU; a traced launch in which two threads stored
different values in one element, or one stored and another read it, with no barrier between them
(or from different blocks), raises :class:`WriteRaceError`. Stores by ``cuda.atomic.*`` are
exempt: they combine on purpose.

Static shared arrays (``cuda.shared.array`` of a constant size) are watched for races only
(their accesses are not in the records: a kernel is judged by the bytes it moves to and from its
arrays). A thread of a block reading an element of a shared array that another thread of that
block writes (or updates by an atomic), or two of them writing different values there, with no
barrier between them, raises :class:`SharedMemoryRaceError`: the classic missing
``cuda.syncthreads()`` of a reduction, which the simulator, running threads one after another,
often gets right. Atomics on one element combine, and race with nothing but plain accesses. A
traced shared array starts as NaN (bytes of 0xA5 for integers), so a read before any write goes
wrong the same way every run. Dynamic shared memory (size 0, set at launch) is not watched.

Last, a traced launch has limits: a loop that never ends would hang the notebook cell (and grow
the records without end), and the simulator's threads cannot be stopped from outside. Past
:data:`TIME_LIMIT_S`, each thread still running is made to raise where it stands; past
:data:`RECORD_LIMIT` reads and writes, the thread making the next one raises; either way the
launch raises :class:`KernelTimeoutError` naming the lines the threads were at.
"""
from __future__ import annotations

import ctypes
import linecache
import re
import sys
import sysconfig
import threading
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

READ, WRITE, ATOMIC = "read", "write", "atomic"


@dataclass
class AccessLog:
    """Every recorded access: ``(array name, kind, block index, thread index, flat element)``."""

    records: list[tuple[str, str, tuple[int, ...], tuple[int, ...], int]] = field(
        default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    grid_dim: tuple[int, ...] = (1, 1, 1)    # set by launch_traced, for numbering threads
    block_dim: tuple[int, ...] = (1, 1, 1)
    # the barriers each thread reached, in order, by (block index, thread index): the function
    # and line that called each, ("scale_kernel", 12); a thread that reached none is absent
    barriers: dict = field(default_factory=lambda: defaultdict(list))
    # what each thread last stored in each element, after how many of its barriers, and where:
    # {(array name, flat element): {(block, thread): (barriers passed, value, site)}}
    stored: dict = field(default_factory=lambda: defaultdict(dict))
    # each thread's first read of each element, after how many of its barriers, and where:
    # {(array name, flat element): {(block, thread): (barriers passed, site)}}
    first_reads: dict = field(default_factory=lambda: defaultdict(dict))
    # shared memory, watched for races only: {(array, element, block, barriers passed):
    # {(kind, thread): (value stored or None for a read, where in the kernel)}}
    shared: dict = field(default_factory=lambda: defaultdict(dict))
    # where the kernel was when the records reached RECORD_LIMIT (None: they did not)
    stopped_at: tuple[str, int, str] | None = None
    # reentrant: a store is recorded, made and read back under it (see TracedArray.__setitem__)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def add(self, name: str, kind: str, elements: np.ndarray) -> None:
        block, thread = _current_thread_ids()
        with self._lock:
            if len(self.records) >= RECORD_LIMIT:  # an endless loop: stop it while memory lasts
                self.stopped_at = self.stopped_at or _kernel_site(sys._getframe(1))
                raise KernelTimeoutError(f"over {RECORD_LIMIT:,} reads and writes")
            self.records.extend((name, kind, block, thread, int(e)) for e in elements.ravel())
            if kind == READ:  # for the races between a store and another thread's read
                passed, site = len(self.barriers.get((block, thread), ())), None
                for element in elements.ravel():
                    by = self.first_reads[name, int(element)]
                    if (block, thread) not in by:
                        site = site or _kernel_site(sys._getframe(1))
                        by[block, thread] = (passed, site)

    def add_stored(self, name: str, elements: np.ndarray, values: np.ndarray) -> None:
        who = _current_thread_ids()
        site = _kernel_site(sys._getframe(1))
        with self._lock:
            passed = len(self.barriers.get(who, ()))
            for element, value in zip(elements.ravel(), values.ravel()):
                self.stored[name, int(element)][who] = (passed, value, site)

    def write_race(self) -> str | None:
        """None when no element of an array argument was stored by one thread and stored
        (another value) or read by another that a GPU may run in either order; else a sentence
        naming the first such element. Two threads of one block are ordered when a barrier
        stands between their accesses (one had passed more barriers than the other); threads
        of different blocks never are. Threads that store the same value do no harm and are
        let pass."""
        for (name, element), by_thread in sorted(self.stored.items()):  # not the run's order
            stores = sorted(by_thread.items())
            for i, ((block_a, thread_a), (passed_a, value_a, _)) in enumerate(stores):
                a = f"thread {_linear(thread_a, self.block_dim)} of block {block_a}"
                for (block_b, thread_b), (passed_b, value_b, _) in stores[i + 1:]:
                    ordered = block_a == block_b and passed_a != passed_b
                    if ordered or value_a.tobytes() == value_b.tobytes():
                        continue
                    b = f"thread {_linear(thread_b, self.block_dim)} of block {block_b}"
                    return (f"{a} and {b} both wrote {self._element(name, element)}, different "
                            f"values ({value_a.item()!r} and {value_b.item()!r}), with no barrier "
                            f"between: on a GPU they run at the same time and which write lands "
                            f"is not defined (in the simulator it came out one way this run). "
                            f"Give each element one writer, or use cuda.atomic if they must "
                            f"combine")
            for (block_a, thread_a), (passed_a, _, write_site) in stores:
                reads = sorted(self.first_reads.get((name, element), {}).items())
                for (block_b, thread_b), (passed_b, read_site) in reads:
                    if (block_a, thread_a) == (block_b, thread_b) or (
                            block_a == block_b and passed_a != passed_b):
                        continue  # its own store, or one a barrier stands between
                    return (f"thread {_linear(thread_b, self.block_dim)} of block {block_b} "
                            f"read {self._element(name, element)} at {_site_words(read_site)}, "
                            f"and thread {_linear(thread_a, self.block_dim)} of block {block_a} "
                            f"wrote it at "
                            f"{_site_words(write_site)}, with no barrier between them"
                            + (" (threads of different blocks are never ordered)"
                               if block_a != block_b else "")
                            + ": on a GPU whether the read comes before or after the write is "
                            "not defined (the simulator ran them in one order this run). Read "
                            "what another thread wrote only after a barrier, in the block that "
                            "wrote it; use shared memory for a block's own scratch")
        return None

    def _element(self, name: str, element: int) -> str:
        """A flat element of array ``name`` as a reader writes it: ``"x[0, 1, 3]"``."""
        return f"{name}{[int(i) for i in np.unravel_index(element, self.shapes[name])]}"

    def add_shared(self, name: str, kind: str, elements: np.ndarray,
                   values: np.ndarray | None = None) -> None:
        """A read, a write (with the ``values`` stored) or an atomic update (``kind``) of
        elements of a shared array, by the thread running now, after the barriers it has
        passed. Per barrier interval, a thread's first read and first atomic of an element are
        kept, and its last write; where in the kernel, as a site put in words only for a
        report."""
        block, thread = _current_thread_ids()
        site = _kernel_site(sys._getframe(1))
        with self._lock:
            passed = len(self.barriers.get((block, thread), ()))
            flat = elements.ravel()
            stored = [None] * len(flat) if values is None else list(values.ravel())
            for element, value in zip(flat, stored):
                by = self.shared[name, int(element), block, passed]
                if kind == WRITE:
                    by[WRITE, thread] = (value, site)
                else:
                    by.setdefault((kind, thread), (None, site))

    def shared_race(self) -> str | None:
        """None when no two threads of a block met at an element of a shared array between
        the same two barriers (a read and a write, an atomic and a plain access, two writes of
        different values); else a sentence naming the first such pair (in a fixed order, not
        the run's)."""
        for (name, element, block, passed), by in sorted(self.shared.items()):
            accesses = sorted((thread, kind, value, site) for (kind, thread), (value, site)
                              in by.items())
            own_write = {thread: value for thread, kind, value, _ in accesses if kind == WRITE}
            for i, first in enumerate(accesses):
                for second in accesses[i + 1:]:
                    if first[0] != second[0] and _conflict(first, second, own_write):
                        return self._shared_race_words(name, element, block, passed, first,
                                                       second)
        return None

    def _shared_race_words(self, name: str, element: int, block: tuple[int, ...], passed: int,
                           first: tuple, second: tuple) -> str:
        """The sentence :meth:`shared_race` returns for two conflicting accesses, each
        ``(thread, kind, value stored, site)``."""
        where = self._element(name, element)
        barriers = f"{passed} barrier{'s' if passed != 1 else ''}"
        interval = (f"with no barrier between them (both had passed {barriers}): on a GPU the "
                    f"threads of a block run at the same time")

        def who(access):
            return f"thread {_linear(access[0], self.block_dim)}"

        kinds = {first[1], second[1]}
        if kinds == {WRITE}:
            return (f"in block {block}, {who(first)} (at {_site_words(first[3])}) and "
                    f"{who(second)} (at {_site_words(second[3])}) both wrote shared {where}, "
                    f"different values ({first[2].item()!r} and {second[2].item()!r}), "
                    f"{interval}, so which write lands is not defined. Give each element one "
                    f"writer between two barriers")
        # the other pairs: one plain access against a write or an atomic update
        order = {READ: 0, WRITE: 1, ATOMIC: 2}
        plain, other = sorted((first, second), key=lambda access: order[access[1]])
        did = {WRITE: "wrote it", ATOMIC: "updated it by an atomic"}[other[1]]
        verb = {READ: "read", WRITE: "wrote"}[plain[1]]
        return (f"in block {block}, {who(plain)} {verb} shared {where} at "
                f"{_site_words(plain[3])}, and {who(other)} {did} at {_site_words(other[3])}, "
                f"{interval}, so whether the {plain[1]} comes before or after is not defined "
                f"(the simulator ran them in one order this run). Put a cuda.syncthreads() "
                f"between them, where every thread of the block reaches it")

    def add_barrier(self, block: tuple[int, ...], thread: tuple[int, ...],
                    site: tuple[str, int]) -> None:
        with self._lock:
            self.barriers[block, thread].append(site)

    def divergent_barriers(self) -> str | None:
        """None when, in every block, every thread reached the same barriers in the same order;
        else a sentence naming the first block whose threads did not, and what each reached."""
        for block in np.ndindex(*self.grid_dim):
            by_path: dict[tuple[tuple[str, int], ...], list[int]] = {}
            for thread in np.ndindex(*self.block_dim):
                path = tuple(self.barriers.get((block, thread), ()))
                by_path.setdefault(path, []).append(_linear(thread, self.block_dim))
            if len(by_path) > 1:
                functions = {function for path in by_path for function, _ in path}
                parts = "; ".join(f"thread{'s' if len(ids) > 1 else ''} {index_runs(ids)}: "
                                  f"{_barrier_path(path, len(functions) > 1)}"
                                  for path, ids in sorted(by_path.items(), key=lambda p: p[1]))
                where = f" of {functions.pop()}" if len(functions) == 1 else ""
                return (f"the threads of block {block} reached different barriers{where} "
                        f"({parts}). "
                        f"Every thread of a block must reach the same barriers: one inside a "
                        f"branch or loop that only some threads take, or after some threads "
                        f"returned, breaks the CUDA Programming Guide's rule (a barrier's "
                        f"condition must be the same for the whole block), though the simulator "
                        f"lets it pass")
        return None

    def accesses(self, name: str, kind: str | None = None
                 ) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``(block, thread, element index)`` of each access to ``name`` (of ``kind`` if given),
        sorted, with element indices unravelled to the array's shape."""
        shape = self.shapes[name]
        out = [(b, t, tuple(int(i) for i in np.unravel_index(e, shape)))
               for n, k, b, t, e in self.records if n == name and (kind is None or k == kind)]
        return sorted(out)

    def owner_map(self, name: str, kind: str) -> np.ndarray:
        """int64 ``array shape``: the global id of the thread that made a ``kind`` access to each
        element, -1 where none did, -2 where two different threads did (for writes: a race).

        Global thread id = block's linear index × threads per block + thread's linear index,
        x fastest, as CUDA numbers them.
        """
        per_block = int(np.prod(self.block_dim))
        owners = np.full(int(np.prod(self.shapes[name])), -1, dtype=np.int64)
        for n, k, block, thread, element in self.records:
            if n == name and k == kind:
                tid = _linear(block, self.grid_dim) * per_block + _linear(thread, self.block_dim)
                owners[element] = tid if owners[element] in (-1, tid) else -2
        return owners.reshape(self.shapes[name])


def index_runs(ids: Any) -> str:
    """Indices as sorted runs: ``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for i in sorted(int(i) for i in ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


class DivergentBarrierError(RuntimeError):
    """The threads of one block reached different barriers (lines, or numbers of them)."""


class KernelTimeoutError(RuntimeError):
    """A traced launch ran past :data:`TIME_LIMIT_S` (a loop that never ends, most likely)."""


def _conflict(first: tuple, second: tuple, own_write: dict) -> bool:
    """Whether two accesses ``(thread, kind, value stored, site)`` of one element of a shared
    array by two threads, between the same two barriers, race: a read and a write, an atomic
    and a plain access, or two writes of different values (reads and atomics combine freely).
    A read by a thread that itself wrote the same value there (``own_write``: each thread's
    write in this interval) sees that value whichever comes first: no race."""
    kinds = {first[1], second[1]}
    if kinds == {WRITE}:
        return first[2].tobytes() != second[2].tobytes()
    if kinds == {READ, WRITE}:
        read, write = sorted((first, second), key=lambda access: access[1] == WRITE)
        mine = own_write.get(read[0])
        return mine is None or mine.tobytes() != write[2].tobytes()
    return kinds in ({READ, ATOMIC}, {WRITE, ATOMIC})


class SharedMemoryRaceError(RuntimeError):
    """Two threads of a block met at one element of a shared array (a read and a write, or two
    different writes) with no barrier between them."""


class WriteRaceError(RuntimeError):
    """Two threads met at one element of an array argument with nothing to order them: two
    stores of different values, or a store and another thread's read."""


def _barrier_path(sites: tuple[tuple[str, int], ...], name_functions: bool) -> str:
    """A thread's barriers, repeats folded: ``"line 9, line 14 x3"`` (``"none"``)."""
    if not sites:
        return "none"
    folded: list[list] = []
    for site in sites:
        if folded and folded[-1][0] == site:
            folded[-1][1] += 1
        else:
            folded.append([site, 1])
    return ", ".join((f"{function} " if name_functions else "") + f"line {line}" +
                     (f" x{n}" if n > 1 else "") for (function, line), n in folded)


# frames that are not the kernel's own: the simulator, this module, and what they call (NumPy,
# Python's standard library); a thread stopped mid-store may be deep inside any of them
_SIMULATOR = ("numba", "numpy", sysconfig.get_paths()["stdlib"], __file__)


def _calling_line() -> tuple[str, int]:
    """Where the kernel (or its device function) called the barrier: the first frame outside
    the simulator, as ``(function, line)`` (a notebook cell's line, or the file's)."""
    frame = sys._getframe(2)
    while frame is not None and any(part in frame.f_code.co_filename for part in _SIMULATOR):
        frame = frame.f_back
    return ("?", 0) if frame is None else (frame.f_code.co_name, frame.f_lineno)


@contextmanager
def _recording_barriers(log: AccessLog):
    """While open, every barrier a simulated thread reaches is recorded in ``log``, once: the
    ``_count``/``_and``/``_or`` forms call ``syncthreads`` twice inside."""
    from numba.cuda.simulator.kernel import BlockThread

    names = ("syncthreads", "syncthreads_count", "syncthreads_and", "syncthreads_or")
    originals = {name: getattr(BlockThread, name) for name in names}
    inside = threading.local()  # each simulated thread is a Python thread

    def recorded(original):
        def barrier(thread, *args):
            if getattr(inside, "barrier", False):
                return original(thread, *args)
            log.add_barrier(tuple(thread.blockIdx), tuple(thread.threadIdx), _calling_line())
            inside.barrier = True
            try:
                return original(thread, *args)
            finally:
                inside.barrier = False
        return barrier

    for name in names:
        setattr(BlockThread, name, recorded(originals[name]))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(BlockThread, name, original)


@contextmanager
def _tracing_shared(log: AccessLog):
    """While open, every static ``cuda.shared.array`` a simulated kernel makes comes back as a
    :class:`TracedArray` watched for races (one per array, named by the variable it is assigned
    to, and by its line where that name is taken). Dynamic shared memory (size 0) passes
    untraced."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    original = FakeCUDAShared.array
    traced: dict[tuple[str, int], TracedArray] = {}

    def array(shared, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic memory; the simulator refuses alignment
            return original(shared, shape, dtype, alignment)
        # One array per call in the kernel's source (its line and its place in the line, so two
        # on one line are two), as a GPU allocates them, kept for the whole launch. (The
        # simulator keys its own by its caller's line; called from here, all would be one.)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno, caller.f_lasti)
        with log._lock:
            if key not in traced:  # the first thread to ask; the others get the same array
                if isinstance(dtype, types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                line = linecache.getline(caller.f_code.co_filename, caller.f_lineno)
                named = re.search(r"(\w+)\s*=\s*cuda\.shared\.array", line)
                name = named.group(1) if named else "array"
                if name in log.shapes:  # an argument's name, or another shared array's
                    name = f"{name} (line {caller.f_lineno} of {caller.f_code.co_name})"
                traced[key] = TracedArray(_uninitialized(shape, dtype), name, log, shared=True)
            return traced[key]

    FakeCUDAShared.array = array
    try:
        yield
    finally:
        FakeCUDAShared.array = original


def _uninitialized(shape: Any, dtype: Any) -> np.ndarray:
    """A new shared array's contents: NaN for floats, bytes of 0xA5 otherwise. A GPU's shared
    memory starts as whatever was there; a fixed, conspicuous start makes a read before any
    write wrong the same way every run."""
    data = np.empty(shape, dtype)
    if np.issubdtype(data.dtype, np.floating):
        data.fill(np.nan)
    else:
        data.view(np.uint8).fill(0xA5)
    return data


# A traced launch is stopped once it has recorded this many reads and writes of its arrays (the
# exercises' cases record at most a few thousand; an endless loop gains ~100,000 a second, each
# a few hundred bytes).
RECORD_LIMIT = 500_000
# A traced launch still running after this many seconds is stopped. The exercises' cases run in
# well under a second each; the limit leaves room for a slow machine, and an endless loop records
# an access at each turn, so it must not run long.
TIME_LIMIT_S = 20.0


def _kernel_site(frame: Any) -> tuple[str, int, str] | None:
    """Where a simulated thread is in the kernel: ``(file, line, function)`` of its innermost
    frame outside the simulator and this module (None when there is none)."""
    while frame is not None and any(part in frame.f_code.co_filename for part in _SIMULATOR):
        frame = frame.f_back
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno,
                                       frame.f_code.co_name)


def _site_words(site: tuple[str, int, str] | None) -> str:
    """A site of :func:`_kernel_site` in words: ``"line 7 of my_kernel (while i < n:)"``."""
    if site is None:
        return "a line the tracer cannot see"
    filename, line, function = site
    text = linecache.getline(filename, line).strip()
    text = text if len(text) <= 80 else text[:77] + "..."  # a long line: its start says which
    return f"line {line} of {function}" + (f" ({text})" if text else "")


@contextmanager
def _time_limit(seconds: float, stopped: list[str]):
    """While open, a timer that after ``seconds`` raises :class:`KernelTimeoutError` inside
    every simulated thread still alive (a Python thread takes such an exception at its next
    bytecode), appending where each one was to ``stopped``."""
    from numba.cuda.simulator.kernel import BlockThread

    def stop() -> None:
        frames = sys._current_frames()
        for thread in threading.enumerate():
            if isinstance(thread, BlockThread) and thread.is_alive():
                stopped.append(_site_words(_kernel_site(frames.get(thread.ident))))
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                           ctypes.py_object(KernelTimeoutError))

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # its thread ends at once once cancelled: none is left behind


LOOP_NOTE = "A loop that never ends? Check that every loop's condition changes inside the loop"


def _timeout_message(seconds: float, stopped: list[str]) -> str:
    """What to say of a launch stopped by :func:`_time_limit`: how many threads were still
    running, and where (the three most common lines)."""
    where = Counter(stopped).most_common()
    lines = "; ".join(f"{count} at {line}" for line, count in where[:3])
    more = f"; and {len(where) - 3} other lines" if len(where) > 3 else ""
    return (f"still running after {seconds:g} s, when these cases take well under a second: "
            f"{len(stopped)} thread{'s' if len(stopped) > 1 else ''} stopped, {lines}{more}. "
            f"{LOOP_NOTE}")


def _linear(index: tuple[int, ...], dims: tuple[int, ...]) -> int:
    """CUDA's linear index of ``index`` (x, y, z) in ``dims``, x fastest."""
    dims = tuple(dims) + (1,) * (3 - len(dims))
    x, y, z = tuple(index) + (0,) * (3 - len(index))
    return x + dims[0] * (y + dims[1] * z)


def _dim3(dims: Any) -> tuple[int, int, int]:
    """A launch dimension (int or tuple) as CUDA's (x, y, z)."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return tuple(int(d) for d in dims + (1,) * (3 - len(dims)))


def _current_thread_ids() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The simulated CUDA block and thread running now ((0,0,0) twice outside a kernel)."""
    thread = threading.current_thread()
    block_idx = getattr(thread, "blockIdx", None)
    thread_idx = getattr(thread, "threadIdx", None)
    if block_idx is None or thread_idx is None:
        return (0, 0, 0), (0, 0, 0)
    return ((block_idx.x, block_idx.y, block_idx.z), (thread_idx.x, thread_idx.y, thread_idx.z))


def _atomic(caller: Any) -> bool:
    """Whether an access comes from the simulator's ``cuda.atomic.*``, which read and store
    through the array one thread at a time by their own lock: atomics combine on purpose, so
    they race only with plain accesses."""
    return caller.f_code.co_filename.endswith("kernelapi.py")


class TracedArray:
    """A NumPy array that records each element read or written, with the thread that did it.

    Indexing returns a plain scalar for one element (recorded as a read) or a ``TracedArray`` view
    for several (recorded when its elements are read or written). Assignment records writes.
    """

    def __init__(self, data: np.ndarray, name: str, log: AccessLog,
                 _flat_ids: np.ndarray | None = None, shared: bool = False):
        self._data = data
        self._ids = np.arange(data.size).reshape(data.shape) if _flat_ids is None else _flat_ids
        self.name, self._log = name, log
        self._shared = shared  # a shared array: watched for races, not recorded
        if _flat_ids is None:
            log.shapes[name] = data.shape

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        """Only for names the class lacks: a kernel reaching for a NumPy method (``x.max()``,
        ``x.astype``) is told that a GPU array has none, instead of a bare AttributeError."""
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"{self.name}.{name}: an array in a GPU kernel has indexing, .shape, "
                             f".size, .ndim and .dtype, not NumPy's methods (the simulator would "
                             f"run them; a GPU cannot): work element by element")

    def __getitem__(self, index: Any) -> Any:
        value, ids = self._data[index], self._ids[index]
        if isinstance(value, np.ndarray) and value.ndim > 0:
            return TracedArray(value, self.name, self._log, ids, self._shared)
        if not self._shared:
            self._log.add(self.name, READ, np.asarray(ids))
        else:
            kind = ATOMIC if _atomic(sys._getframe(1)) else READ
            self._log.add_shared(self.name, kind, np.asarray(ids))
        return value

    def __setitem__(self, index: Any, value: Any) -> None:
        ids = np.asarray(self._ids[index])
        atomic = _atomic(sys._getframe(1))
        with self._log._lock:  # no other thread's store between this one and its read-back
            if not self._shared:
                self._log.add(self.name, WRITE, ids)
            with np.errstate(over="ignore", invalid="ignore"):  # a GPU's store rounds to inf
                self._data[index] = value.to_numpy() if isinstance(value, TracedArray) else value
            stored = np.asarray(self._data[index])  # rounded to the array's dtype
            if self._shared:  # an atomic's read half was recorded as the update
                if not atomic:
                    self._log.add_shared(self.name, WRITE, ids, stored)
            elif not atomic:
                self._log.add_stored(self.name, ids, stored)

    def to_numpy(self) -> np.ndarray:
        """The array's values (recording nothing)."""
        return self._data


def launch_traced(kernel: Callable, grid: Any, block: Any, **arrays: Any
                  ) -> tuple[dict[str, Any], AccessLog | None]:
    """Run ``kernel[grid, block](*arrays.values())`` with every NumPy array argument traced;
    return ``(arrays after the run, by name, as NumPy; the AccessLog)``.

    Arguments are passed in the order given; scalars pass through untraced. The caller's arrays
    are copied first, so they are left as they were. When the kernel raises (an index out of
    range, say), the exception carries the accesses made until then as ``error.access_log``; so
    does the :class:`DivergentBarrierError` raised when the threads of a block reached different
    barriers, the :class:`WriteRaceError` raised when two threads stored different values in
    one element with nothing to order them, the :class:`SharedMemoryRaceError` raised when two
    threads met at an element of a shared array between two barriers, and the
    :class:`KernelTimeoutError` raised when the launch ran past :data:`TIME_LIMIT_S` or
    :data:`RECORD_LIMIT`. On a real GPU nothing can be traced (the kernel runs
    compiled code, not Python): the kernel runs on copies and the log is None.
    """
    from kvlab.backends import cuda_mode

    copies = {name: np.array(value) if isinstance(value, np.ndarray) else value
              for name, value in arrays.items()}
    if cuda_mode() == "gpu":
        kernel[grid, block](*copies.values())  # numba copies host arrays in and back out
        return copies, None
    log = AccessLog(grid_dim=_dim3(grid), block_dim=_dim3(block))
    args = {name: TracedArray(value, name, log) if isinstance(value, np.ndarray) else value
            for name, value in copies.items()}
    stopped: list[str] = []
    try:
        try:
            with _recording_barriers(log), _tracing_shared(log), \
                    _time_limit(TIME_LIMIT_S, stopped):
                kernel[grid, block](*args.values())
        except Exception:
            if stopped:  # the threads raised because the timer stopped them
                raise KernelTimeoutError(_timeout_message(TIME_LIMIT_S, stopped)) from None
            if log.stopped_at is not None:  # a thread raised at the record limit
                raise KernelTimeoutError(
                    f"stopped after {RECORD_LIMIT:,} reads and writes of its arrays, when these "
                    f"cases make a few thousand; the last at {_site_words(log.stopped_at)}. "
                    f"{LOOP_NOTE}") from None
            raise
        divergent = log.divergent_barriers()
        if divergent:
            raise DivergentBarrierError(divergent)
        race = log.write_race()
        if race:
            raise WriteRaceError(race)
        race = log.shared_race()
        if race:
            raise SharedMemoryRaceError(race)
    except Exception as error:  # keep what was recorded up to the fault: it shows where it went
        error.access_log = log
        raise
    return {name: a.to_numpy() if isinstance(a, TracedArray) else a
            for name, a in args.items()}, log
