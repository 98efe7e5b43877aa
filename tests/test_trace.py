"""The access tracer (kvlab.trace) records exactly the accesses of a hand-worked tiny kernel."""
import numpy as np
import pytest
from numba import cuda

from kvlab.trace import AccessLog, TracedArray, launch_traced


@cuda.jit
def double_rows(src, dst):
    """Thread i (global) copies row i of src, doubled, into dst; spare threads do nothing."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < src.shape[0]:
        for j in range(src.shape[1]):
            dst[i, j] = src[i, j] * 2


def test_records_every_access_with_its_block_and_thread():
    src = np.arange(6, dtype=np.float32).reshape(3, 2)
    dst = np.zeros_like(src)
    after, log = launch_traced(double_rows, 2, 2, src=src, dst=dst)
    np.testing.assert_array_equal(after["dst"], src * 2)
    assert not dst.any(), "the caller's array is left as it was"
    # By hand: blocks of 2 threads; global threads 0, 1, 2 own rows 0, 1, 2; thread 3 is spare.
    expected = [((0, 0, 0), (0, 0, 0), (0, 0)), ((0, 0, 0), (0, 0, 0), (0, 1)),
                ((0, 0, 0), (1, 0, 0), (1, 0)), ((0, 0, 0), (1, 0, 0), (1, 1)),
                ((1, 0, 0), (0, 0, 0), (2, 0)), ((1, 0, 0), (0, 0, 0), (2, 1))]
    assert log.accesses("dst", "write") == expected
    assert log.accesses("src", "read") == expected
    assert log.accesses("src", "write") == [] and log.accesses("dst", "read") == []
    np.testing.assert_array_equal(log.owner_map("dst", "write"), [[0, 0], [1, 1], [2, 2]])


@cuda.jit
def everyone_writes_element_zero(out):
    out[0] = cuda.threadIdx.x


def test_two_threads_writing_one_element_show_as_a_race():
    from kvlab.trace import WriteRaceError

    with pytest.raises(WriteRaceError, match=r"thread 0 of block \(0, 0, 0\) and thread 1 of "
                       r"block \(0, 0, 0\) both wrote out\[0\], different values") as error:
        launch_traced(everyone_writes_element_zero, 1, 2, out=np.zeros(3, np.int32))
    np.testing.assert_array_equal(error.value.access_log.owner_map("out", "write"), [-2, -1, -1])


@cuda.jit
def everyone_writes_one(out):
    out[0] = 1


@cuda.jit
def thread_0_then_thread_1_after_a_barrier(out):
    if cuda.threadIdx.x == 0:
        out[0] = 5
    cuda.syncthreads()
    if cuda.threadIdx.x == 1:
        out[0] = out[0] + 1


@cuda.jit
def each_block_writes_its_index(out):
    out[0] = cuda.blockIdx.x


def test_what_is_a_write_race_and_what_is_not():
    """One value from every thread does no harm; a barrier orders the threads of one block;
    nothing orders two blocks."""
    from kvlab.trace import WriteRaceError

    after, log = launch_traced(everyone_writes_one, 1, 4, out=np.zeros(1, np.int32))
    assert after["out"][0] == 1 and log.owner_map("out", "write")[0] == -2  # shared, but benign
    after, _ = launch_traced(thread_0_then_thread_1_after_a_barrier, 1, 2,
                             out=np.zeros(1, np.int32))
    assert after["out"][0] == 6
    with pytest.raises(WriteRaceError, match=r"of block \(0, 0, 0\) and thread 0 of block "
                       r"\(1, 0, 0\) both wrote out\[0\]"):
        launch_traced(each_block_writes_its_index, 2, 1, out=np.zeros(1, np.int32))


def test_views_report_elements_of_the_whole_array():
    log = AccessLog()
    pool = TracedArray(np.arange(24).reshape(2, 3, 4), "pool", log)
    row = pool[1, 2]            # a view: nothing read yet
    assert log.records == []
    assert row[3] == 23
    row[0] = -1
    assert log.accesses("pool") == [((0, 0, 0), (0, 0, 0), (1, 2, 0)),
                                    ((0, 0, 0), (0, 0, 0), (1, 2, 3))]
    assert pool.to_numpy()[1, 2, 0] == -1


def test_plot_marks_races_and_differences():
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    from kvlab.plot.trace import plot_access_comparison, plot_accesses

    ax = plot_accesses(np.array([[0, 1], [-1, -2]]))
    assert [t.get_text() for t in ax.texts] == ["0", "1", "race"]
    fig = plot_access_comparison(np.array([[0, 1]]), np.array([[0, 0]]))
    assert len(fig.axes[0].patches) == 1  # the one differing cell is outlined
    with pytest.raises(ValueError, match="integer"):
        plot_accesses(np.zeros((2, 2)))


@cuda.jit
def barrier_in_a_branch(out):
    """Threads 0-1 of each block of 4 pass two barriers, threads 2-3 one: the simulator lets it
    run to the end, a GPU would not promise to."""
    i = cuda.threadIdx.x
    cuda.syncthreads()
    if i < 2:
        cuda.syncthreads()
    out[cuda.blockIdx.x * 4 + i] = i


@cuda.jit
def a_barrier_on_each_side(out):
    """As many barriers in every thread, but at two places: an if and an else."""
    i = cuda.threadIdx.x
    if i < 2:
        cuda.syncthreads()
    else:
        cuda.syncthreads()
    out[cuda.blockIdx.x * 4 + i] = i


@cuda.jit
def barriers_for_all(out):
    i = cuda.threadIdx.x
    if i < 2:
        out[cuda.blockIdx.x * 4 + i] = i
    cuda.syncthreads()
    for _ in range(3):  # the same trip count in every thread
        cuda.syncthreads_or(i)


def _lines(function, text):
    """The file lines of ``function``'s source that contain ``text``."""
    import inspect

    lines, first = inspect.getsourcelines(function.fn)
    return [first + n for n, line in enumerate(lines) if text in line]


def test_a_barrier_some_threads_skip_is_refused_naming_them():
    from kvlab.trace import DivergentBarrierError

    first, second = _lines(barrier_in_a_branch, "cuda.syncthreads()")
    message = (rf"block \(0, 0, 0\) reached different barriers of barrier_in_a_branch "
               rf"\(threads 0-1: line {first}, line {second}; threads 2-3: line {first}\)")
    with pytest.raises(DivergentBarrierError, match=message) as err:
        launch_traced(barrier_in_a_branch, 2, 4, out=np.zeros(8, np.int32))
    assert len(err.value.access_log.accesses("out", "write")) == 8  # it ran to the end
    with pytest.raises(DivergentBarrierError, match="threads 0-1: line .*; threads 2-3: line "):
        launch_traced(a_barrier_on_each_side, 2, 4, out=np.zeros(8, np.int32))


def test_uniform_barriers_pass_and_a_compound_one_counts_once():
    _, log = launch_traced(barriers_for_all, 2, 4, out=np.zeros(8, np.int32))
    assert log.divergent_barriers() is None
    path = log.barriers[(1, 0, 0), (3, 0, 0)]
    assert len(path) == 4 and len(set(path[1:])) == 1  # syncthreads_or: once each, not twice


@cuda.jit
def max_by_numpy_method(x, out):
    out[0] = x[0:4].max()


def test_a_numpy_method_on_a_kernel_array_is_named_for_what_it_is():
    with pytest.raises(AttributeError, match=r"x.max: an array in a GPU kernel has indexing, "
                       r"\.shape, \.size, \.ndim and \.dtype, not NumPy's methods"):
        launch_traced(max_by_numpy_method, 1, 1, x=np.arange(4.0), out=np.zeros(1))


@cuda.jit
def largest_by_atomics(x, out):
    cuda.atomic.max(out, 0, x[cuda.threadIdx.x])


def test_atomics_combine_on_purpose_and_are_no_race():
    after, log = launch_traced(largest_by_atomics, 1, 4, x=np.array([3.0, 9.0, 1.0, 4.0]),
                               out=np.zeros(1))
    assert after["out"][0] == 9.0 and log.owner_map("out", "write")[0] == -2


@cuda.jit
def spins_on_one_element(out):
    """Threads 0-2 loop for ever: `i` never changes inside the loop."""
    i = cuda.threadIdx.x
    while i < 3:
        out[i] = 1.0


def test_a_kernel_that_never_ends_is_stopped_naming_the_line(monkeypatch):
    """Past the time limit every simulated thread still running raises where it stands; the
    launch raises KernelTimeoutError naming how many and the line they were at, with the
    accesses made until then, and no simulated thread is left running."""
    import threading
    import time

    from numba.cuda.simulator.kernel import BlockThread

    from kvlab import trace

    monkeypatch.setattr(trace, "TIME_LIMIT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(trace.KernelTimeoutError) as raised:
        launch_traced(spins_on_one_element, 1, 4, out=np.zeros(4, np.float32))
    assert time.perf_counter() - start < 10
    message = str(raised.value)
    assert message.startswith("still running after 0.5 s")
    assert "3 threads stopped, 3 at line " in message
    assert "of spins_on_one_element (out[i] = 1.0)" in message
    assert raised.value.access_log.accesses("out", "write")  # what it did before it was stopped
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if isinstance(t, BlockThread) and t.is_alive()]
    after, _ = launch_traced(double_rows, 2, 2, src=np.ones((3, 2), np.float32),
                             dst=np.zeros((3, 2), np.float32))  # the simulator still works
    np.testing.assert_array_equal(after["dst"], 2)


def test_a_launch_within_the_limit_leaves_no_timer_behind():
    import threading

    launch_traced(double_rows, 2, 2, src=np.ones((3, 2), np.float32),
                  dst=np.zeros((3, 2), np.float32))
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)
                and t.is_alive()]


@cuda.jit
def block_max(x, out):
    """A tree reduction in shared memory, one block per row of x (8 threads, 8 columns) into
    out[row, 0]; when out has one column, the tree's steps run with no barrier between them."""
    tid, row = cuda.threadIdx.x, cuda.blockIdx.x
    partial = cuda.shared.array(8, np.float32)
    partial[tid] = x[row, tid]
    cuda.syncthreads()
    width = 4
    while width > 0:
        if tid < width:
            partial[tid] = max(partial[tid], partial[tid + width])
        if out.shape[1] == 2:  # a second column asks for the barriers: the right kernel
            cuda.syncthreads()
        width //= 2
    cuda.syncthreads()
    if tid == 0:
        out[row, 0] = partial[0]


def test_a_shared_memory_race_is_refused_and_a_right_reduction_passes():
    """The missing barrier between a tree's steps: thread 0 reads partial[1] while thread 1
    writes it. With the barriers, two blocks reusing the simulator's one buffer for their shared
    array are no race, and shared accesses are not in the records (only the arguments')."""
    from kvlab.trace import SharedMemoryRaceError

    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    after, log = launch_traced(block_max, 2, 8, x=x, out=np.zeros((2, 2), np.float32))
    np.testing.assert_array_equal(after["out"][:, 0], [7, 15])
    assert {name for name, *_ in log.records} == {"x", "out"}
    with pytest.raises(SharedMemoryRaceError, match=r"in block \(0, 0, 0\), thread 0 read shared "
                       r"partial\[1\] at line \d+ of block_max \(partial\[tid\] = max"):
        launch_traced(block_max, 2, 8, x=x, out=np.zeros((2, 1), np.float32))


@cuda.jit
def shared_writes(out, same):
    """Every thread writes slot[0] of a shared array (the same value or its own), then a
    barrier, then thread 0 reads it; thread 1 bumps it by an atomic add (no race)."""
    slot = cuda.shared.array(1, np.int32)
    slot[0] = 7 if same else cuda.threadIdx.x
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        out[0] = slot[0]
    cuda.syncthreads()
    if cuda.threadIdx.x == 1:
        cuda.atomic.add(slot, 0, 1)


def test_shared_writes_of_one_value_pass_and_of_different_values_are_refused():
    from kvlab.trace import SharedMemoryRaceError

    after, _ = launch_traced(shared_writes, 1, 4, out=np.zeros(1, np.int32), same=True)
    assert after["out"][0] == 7
    with pytest.raises(SharedMemoryRaceError, match=r"thread 0 \(at line \d+ of shared_writes "
                       r"\(slot\[0\] = 7 if same else cuda.threadIdx.x\)\) and thread 1 .* both "
                       r"wrote shared slot\[0\], different values \(0 and 1\)"):
        launch_traced(shared_writes, 1, 4, out=np.zeros(1, np.int32), same=False)


@cuda.jit
def atomic_sum(x, out, barrier_after_reset):
    """Thread 0 zeroes a shared total, the block adds its x by atomics, thread 0 stores it; with
    barrier_after_reset 0 the atomics may land before the reset."""
    t = cuda.threadIdx.x
    total = cuda.shared.array(1, np.float32)
    if t == 0:
        total[0] = 0
    if barrier_after_reset:
        cuda.syncthreads()
    cuda.atomic.add(total, 0, x[t])
    cuda.syncthreads()
    if t == 0:
        out[0] = total[0]


def test_an_atomic_races_a_plain_store_but_not_other_atomics():
    from kvlab.trace import SharedMemoryRaceError

    x = np.arange(4, dtype=np.float32)
    after, _ = launch_traced(atomic_sum, 1, 4, x=x, out=np.zeros(1, np.float32),
                             barrier_after_reset=1)
    assert after["out"][0] == 6
    with pytest.raises(SharedMemoryRaceError, match=r"thread 0 wrote shared total\[0\] at line "
                       r"\d+ of atomic_sum \(total\[0\] = 0\), and thread 1 updated it by an "
                       r"atomic at line \d+"):
        launch_traced(atomic_sum, 1, 4, x=x, out=np.zeros(1, np.float32), barrier_after_reset=0)


@cuda.jit
def two_helpers_one_name(x, out):
    """Two device functions, each with its own shared array called buf: no race between them."""
    t = cuda.threadIdx.x
    out[t] = _fill_and_read_back(x, t) + _fill_and_read_back_again(x, t)


@cuda.jit(device=True)
def _fill_and_read_back(x, t):
    buf = cuda.shared.array(4, np.float32)
    buf[t] = x[t]
    cuda.syncthreads()
    return buf[3 - t]


@cuda.jit(device=True)
def _fill_and_read_back_again(x, t):
    buf = cuda.shared.array(4, np.float32)
    buf[t] = 2 * x[t]
    cuda.syncthreads()
    return buf[3 - t]


def test_shared_arrays_of_one_name_are_two_arrays():
    """Each shared array is watched apart (the second buf is named by its line), so two helpers
    that both call theirs buf do not race, and an argument keeps its own picture."""
    x = np.arange(4, dtype=np.float32)
    after, log = launch_traced(two_helpers_one_name, 1, 4, x=x, out=np.zeros(4, np.float32))
    np.testing.assert_array_equal(after["out"], 3 * x[::-1])
    assert "buf" in log.shapes and any(name.startswith("buf (line ") for name in log.shapes)


@cuda.jit
def loops_over_its_array(out):
    i = 0
    while i < 1:
        out[0] = out[0]  # i never changes


def test_an_endless_loop_is_stopped_at_the_record_limit(monkeypatch):
    from kvlab import trace

    monkeypatch.setattr(trace, "RECORD_LIMIT", 2_000)
    with pytest.raises(trace.KernelTimeoutError, match=r"stopped after 2,000 reads and writes of "
                       r"its arrays, when these cases make a few thousand; the last at line \d+ "
                       r"of loops_over_its_array \(out\[0\] = out\[0\]"):
        launch_traced(loops_over_its_array, 1, 2, out=np.zeros(1, np.float32))


@cuda.jit
def two_shared_arrays(x, out):
    t = cuda.threadIdx.x
    a = cuda.shared.array(4, np.float32)
    b = cuda.shared.array(4, np.int32)
    a[t] = x[t]
    b[t] = 10 * t
    cuda.syncthreads()
    out[t] = a[3 - t] + b[3 - t]


def test_two_shared_arrays_stay_two_arrays_of_their_own_dtype():
    x = np.arange(4, dtype=np.float32) + 0.5
    after, log = launch_traced(two_shared_arrays, 2, 4, x=x, out=np.zeros(4, np.float32))
    np.testing.assert_array_equal(after["out"], x[::-1] + 10 * np.arange(4)[::-1])
    assert log.shapes["a"] == (4,) and log.shapes["b"] == (4,)


@cuda.jit
def max_through_global_scratch(x, out, barrier):
    """Each thread leaves its value in x (global memory) and the last thread reads them all:
    a race unless a barrier stands between (the block's own threads only)."""
    t = cuda.threadIdx.x
    x[t] = x[t] * 2
    if barrier:
        cuda.syncthreads()
    if t == cuda.blockDim.x - 1:
        best = x[0]
        for i in range(1, cuda.blockDim.x):
            best = max(best, x[i])
        out[0] = best


def test_a_read_of_another_threads_global_store_needs_a_barrier():
    from kvlab.trace import WriteRaceError

    x = np.array([3, 1, 4, 1], np.float32)
    after, _ = launch_traced(max_through_global_scratch, 1, 4, x=x, out=np.zeros(1, np.float32),
                             barrier=1)
    assert after["out"][0] == 8
    with pytest.raises(WriteRaceError, match=r"thread 3 of block \(0, 0, 0\) read x\[0\] at line "
                       r"\d+ of max_through_global_scratch \(best = x\[0\]\), and thread 0 of "
                       r"block \(0, 0, 0\) wrote it at line \d+ .*with no barrier between them: "):
        launch_traced(max_through_global_scratch, 1, 4, x=x, out=np.zeros(1, np.float32),
                      barrier=0)


@cuda.jit
def reads_the_next_blocks_output(out):
    """Block b writes out[b] and reads out[b + 1]: blocks are never ordered."""
    b = cuda.blockIdx.x
    out[b] = b + 1
    if b + 1 < out.shape[0]:
        out[b] += out[b + 1]


def test_a_read_of_another_blocks_store_is_a_race_whatever_the_barriers():
    from kvlab.trace import WriteRaceError

    with pytest.raises(WriteRaceError, match=r"thread 0 of block \(0, 0, 0\) read out\[1\] .* "
                       r"\(threads of different blocks are never ordered\)"):
        launch_traced(reads_the_next_blocks_output, 3, 1, out=np.zeros(3, np.float32))


@cuda.jit
def shared_odds_and_ends(x, out):
    """Two shared arrays on one line (two arrays, as on a GPU); a value every thread writes
    alike and reads back at once (no race); a slot nobody wrote (NaN, the same every run)."""
    t = cuda.threadIdx.x
    lo, hi = cuda.shared.array(4, np.float32), cuda.shared.array(4, np.float32)
    n = cuda.shared.array(1, np.int32)
    never = cuda.shared.array(1, np.float32)
    n[0] = 4
    lo[t] = x[t]
    hi[t] = 10 * x[t] * (n[0] // 4)  # read back before the barrier: every thread wrote 4
    cuda.syncthreads()
    out[t] = lo[n[0] - 1 - t] + hi[t]
    if t == 0:
        out[4] = never[0]


def test_shared_arrays_on_one_line_a_value_written_alike_and_an_unwritten_slot():
    x = np.arange(4, dtype=np.float32)
    after, _ = launch_traced(shared_odds_and_ends, 1, 4, x=x, out=np.zeros(5, np.float32))
    np.testing.assert_array_equal(after["out"][:4], x[::-1] + 10 * x)
    assert np.isnan(after["out"][4])
