"""The two repairs kvlab makes to Numba's CUDA simulator (kvlab.kernels.cuda): a shared array made
once per block even when threads arrive together, and a GIL hand-over short enough that barriers
do not stall."""
import sys
import threading

import numpy as np
import pytest

from kvlab.backends import cuda_mode

pytestmark = pytest.mark.skipif(cuda_mode() != "simulator", reason="the simulator's own repairs")


def _allocate_together(array_method, threads=32, rounds=40):
    """Threads that reach one ``cuda.shared.array`` line at the same moment, ``rounds`` times (a
    fresh block each round): how many rounds handed out more than one array."""
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    split_rounds = 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as Python allows
    try:
        for _ in range(rounds):
            block = FakeCUDAShared(0)
            start = threading.Barrier(threads)
            got = []

            def thread():
                start.wait()
                got.append(array_method(block, (64,), np.float32))  # one line, all threads

            _run_all(thread, threads)
            split_rounds += any(array is not got[0] for array in got)
    finally:
        sys.setswitchinterval(interval)
    return split_rounds


def _run_all(target, threads):
    workers = [threading.Thread(target=target) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


class _MeetAfterLookUp(dict):
    """A block's table of shared arrays whose look-up waits (up to ``timeout`` s) until a second
    thread has looked up too: the interleaving that splits an unlocked allocator, every time."""

    def __init__(self, timeout):
        super().__init__()
        self.meet = threading.Barrier(2, timeout=timeout)

    def get(self, key, default=None):
        value = super().get(key, default)
        try:
            self.meet.wait()
        except threading.BrokenBarrierError:  # the other thread is held elsewhere (by a lock)
            pass
        return value


def _two_threads_look_up_together(array_method):
    """The arrays two threads get when both look the line up before either stores its array."""
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    block = FakeCUDAShared(0)
    block._allocations = _MeetAfterLookUp(timeout=0.3)
    got = []
    _run_all(lambda: got.append(array_method(block, (64,), np.float32)), 2)
    return got


def test_a_shared_array_is_made_once_per_block():
    import kvlab.kernels.cuda as kc
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    assert FakeCUDAShared.array is kc._simulated_shared_array
    first, second = _two_threads_look_up_together(FakeCUDAShared.array)
    assert first is second
    assert _allocate_together(FakeCUDAShared.array) == 0


def test_numbas_own_shared_array_can_hand_out_two():
    """What the repair is for: the unlocked original splits a block's array between threads."""
    import kvlab.kernels.cuda as kc

    first, second = _two_threads_look_up_together(kc._NUMBA_SHARED_ARRAY)
    assert first is not second


def test_shared_arrays_of_different_lines_and_blocks_are_separate():
    import kvlab.kernels.cuda as kc
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    first, second = FakeCUDAShared(0), FakeCUDAShared(0)
    a = kc._simulated_shared_array(first, (4,), np.float32)
    b = kc._simulated_shared_array(first, (4,), np.int32)
    c = kc._simulated_shared_array(second, (4,), np.float32)
    assert a is not b and a is not c and b.dtype == np.int32
    again = [kc._simulated_shared_array(first, (4,), np.float32) for _ in range(2)]
    assert again[0] is again[1]  # one line, one array


def test_the_switch_interval_is_short_in_the_simulator():
    import kvlab.kernels.cuda as kc

    assert sys.getswitchinterval() <= kc.SIMULATOR_SWITCH_INTERVAL_S
