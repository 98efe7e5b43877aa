"""Notebook 05's explorers: the online softmax's state tile by tile, and split-K's partitions."""
import matplotlib
import numpy as np
import pytest

from kvlab.explore.attention import (draw_online, draw_split_k, online_softmax_explorer,
                                     online_softmax_steps, split_k_explorer, split_k_state)
from kvlab.ref.attention import attend_max_subtracted

matplotlib.use("Agg")

SCORES = np.array([0.0, 1.0, 5.0, 2.0, 9.0, 3.0, -1.0], np.float32)
VALUES = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)


def _softmax_out(scores, values):
    return attend_max_subtracted(np.ones(1, np.float32), scores[:, None], values, 1.0)


def test_each_step_is_the_softmax_over_the_keys_seen_so_far():
    steps = online_softmax_steps(SCORES, VALUES, tile=2)
    assert [(s["start"], s["stop"]) for s in steps] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert [s["m"] for s in steps] == [1.0, 5.0, 9.0, 9.0]       # the running max only rises
    for s in steps:
        np.testing.assert_allclose(s["out"], _softmax_out(SCORES[:s["stop"]], VALUES[:s["stop"]]),
                                   rtol=1e-5, atol=1e-6)
        assert s["weights"].sum() == pytest.approx(1.0, abs=1e-6)
        assert s["l"] == pytest.approx(np.exp(SCORES[:s["stop"]] - s["m"]).sum(), rel=1e-6)


def test_a_new_max_shrinks_the_weights_already_given_out():
    steps = online_softmax_steps(SCORES, VALUES, tile=2)
    assert steps[2]["weights"][1] < steps[1]["weights"][1]        # key 1 after key 4's 9.0


def test_the_tile_size_changes_the_steps_not_the_answer():
    ends = [online_softmax_steps(SCORES, VALUES, tile)[-1]["out"] for tile in (1, 3, 8)]
    for out in ends[1:]:
        np.testing.assert_allclose(out, ends[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 4, 7, 12])
def test_the_merge_of_the_partitions_is_one_pass(num_splits):
    state = split_k_state(SCORES, VALUES, num_splits)
    np.testing.assert_allclose(state["merged"], state["one_pass"], rtol=1e-5, atol=1e-6)
    assert state["merge_weights"].sum() == pytest.approx(1.0)
    assert sum(b - a for a, b in state["bounds"]) == len(SCORES)


def test_an_empty_partition_has_lse_minus_infinity_and_weight_zero():
    state = split_k_state(SCORES, VALUES, 12)          # ceil(7/12) = 1 key each: 5 empty
    empty = [j for j, (a, b) in enumerate(state["bounds"]) if a == b]
    assert len(empty) == 5
    assert np.isneginf(state["lse"][empty]).all() and (state["merge_weights"][empty] == 0).all()


def test_the_partition_holding_the_max_weighs_most():
    state = split_k_state(SCORES, VALUES, 4)            # key 4 (9.0) is in partition 2
    assert int(np.argmax(state["merge_weights"])) == 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="tile must be"):
        online_softmax_steps(SCORES, VALUES, 0)
    with pytest.raises(ValueError, match="values must be"):
        split_k_state(SCORES, VALUES[:3], 2)
    with pytest.raises(ValueError, match="num_splits must be"):
        split_k_state(SCORES, VALUES, 0)


def test_the_explorers_redraw_when_a_control_moves():
    for explorer, name, value in ((online_softmax_explorer(SCORES, VALUES), "step", 1),
                                  (split_k_explorer(SCORES, VALUES), "num_splits", 2)):
        before = explorer.figure.value
        explorer.controls[name].value = value
        assert explorer.figure.value != before
        assert "image/png" in explorer._repr_mimebundle_()


def test_a_smaller_tile_allows_more_steps():
    explorer = online_softmax_explorer(SCORES, VALUES)
    explorer.controls["tile"].value = 2
    assert explorer.controls["step"].max == 4


def test_figures_fit_the_notebook_width():
    for fig in (draw_online(2, 2, SCORES, VALUES), draw_split_k(3, SCORES, VALUES)):
        assert fig.get_figwidth() * 100 <= 1000
