"""Notebook 01's explorers (kvlab.explore.paging): the allocator script's state at each step, and
what each block size costs in the serving simulation."""
import matplotlib
import pytest

from kvlab.explore.paging import (
    ALLOCATOR_SCRIPT, BLOCK_SIZES, allocator_explorer, allocator_steps, block_size_explorer,
    block_size_waste, draw_allocator_step, draw_block_size_waste,
)

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def steps():
    return allocator_steps()


def test_one_state_per_call_and_every_event_kind_happens(steps):
    assert len(steps) == len(ALLOCATOR_SCRIPT)
    assert any(s.copies for s in steps) and any(s.new_blocks for s in steps)
    assert any("fork" in s.event for s in steps) and any("finishes" in s.event for s in steps)


def test_fork_shares_blocks_without_moving_bytes(steps):
    fork = steps[2]
    assert fork.tables == {"a": [0, 1], "b": [0, 1]}
    assert fork.refs[:2] == (2, 2) and not fork.copies and not fork.new_blocks


def test_appending_into_a_shared_half_full_block_copies_it(steps):
    cow = steps[3]  # b writes position 7, inside shared block 1
    assert cow.copies == ((1, 2),)
    assert cow.tables["b"] == [0, 2] and cow.tables["a"] == [0, 1]
    assert cow.refs[:3] == (2, 1, 1)
    assert "copy-on-write" in cow.event


def test_the_owner_of_an_unshared_block_appends_in_place(steps):
    assert steps[1].event.endswith("nothing to allocate") and steps[1].tables["a"] == [0, 1]
    grow = steps[4]  # a's block 1 is its own now; position 8 starts block 3
    assert grow.copies == () and grow.new_blocks == (3,)


def test_free_drops_references_and_returns_unshared_blocks(steps):
    free_a = steps[6]
    assert "a" not in free_a.tables
    assert free_a.refs[0] == 1 and free_a.refs[1] == free_a.refs[3] == 0  # 0 still b's
    assert free_a.num_free == 3
    assert steps[7].refs[:4] == (0, 0, 0, 0)


def test_counts_always_add_up(steps):
    for state in steps:
        listed = [b for table in state.tables.values() for b in table]
        assert all(state.refs[b] == listed.count(b) for b in range(len(state.refs)))
        assert state.num_free == sum(r == 0 for r in state.refs)


def test_a_freed_block_is_handed_out_again(steps):
    assert 3 in steps[-1].new_blocks  # a's old block, after the never-used 7 (FIFO free list)


def test_a_bad_script_is_a_value_error():
    with pytest.raises(ValueError, match="unknown operation"):
        allocator_steps(script=(("allocate", "a", 3), ("explode", "a", None)))
    with pytest.raises(ValueError, match="unknown"):
        allocator_steps(script=(("append", "x", 1),))


def test_the_unfilled_tail_is_about_half_a_block():
    """Reserved-but-empty slots per running request ≈ (block_size - 1) / 2, and utilization
    falls as blocks grow."""
    for block_size in (1, 16, 256):
        tail = block_size_waste(block_size)["mean_tail"]
        assert tail == pytest.approx((block_size - 1) / 2, abs=0.1 * block_size + 0.01)
    utils = [block_size_waste(b)["utilization"] for b in BLOCK_SIZES]
    assert utils[0] == 1.0 and all(a >= b for a, b in zip(utils, utils[1:]))
    assert block_size_waste(256)["peak_batch"] < block_size_waste(16)["peak_batch"]
    with pytest.raises(ValueError, match="block_size"):
        block_size_waste(3)


def test_drawings_and_controls():
    fig = draw_allocator_step(4)  # counted from 1: the fourth call, b's copy-on-write
    assert fig._suptitle.get_text().startswith("step 4 of 9: b appends")
    assert "copy-on-write" in fig._suptitle.get_text() and fig.get_size_inches()[0] <= 10
    for bad in (0, 10):
        with pytest.raises(ValueError, match="step"):
            draw_allocator_step(bad)
    assert "256" in draw_block_size_waste(256)._suptitle.get_text()
    for explorer, name, value in ((allocator_explorer(), "step", 5),
                                  (block_size_explorer(), "block_size", 64)):
        before = explorer.figure.value
        explorer.controls[name].value = value
        assert explorer.figure.value != before
