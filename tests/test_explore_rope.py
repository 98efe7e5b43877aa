"""The 03 explorers' logic, without a browser: a setting gives the state it should."""
import matplotlib

matplotlib.use("Agg")  # no display needed: the figures are only drawn to PNG

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kvlab.explore.rope import (  # noqa: E402
    LLAMA_DIM, draw_rotation, draw_scaling, rotation_explorer, rotation_state, scaling_dict,
    scaling_explorer, scaling_state,
)


def test_position_zero_points_every_hand_at_the_start():
    state = rotation_state(0)
    np.testing.assert_array_equal(state.xy, np.tile([1.0, 0.0], (8, 1)))
    assert (state.turns == 0).all()


def test_pair_zero_turns_one_radian_per_position():
    state = rotation_state(3)
    np.testing.assert_allclose(state.xy[0], [np.cos(3.0), np.sin(3.0)], atol=1e-6)
    np.testing.assert_allclose(state.wavelength[0], 2 * np.pi)
    np.testing.assert_allclose(state.turns, 3 / state.wavelength)
    assert np.all(np.diff(state.wavelength) > 0)     # later pairs are slower


def test_hands_keep_their_length_and_the_style_only_renames_dims():
    neox, gptj = rotation_state(1000, "neox"), rotation_state(1000, "gptj")
    np.testing.assert_allclose(np.hypot(*neox.xy.T), 1.0, atol=1e-6)
    np.testing.assert_array_equal(neox.xy, gptj.xy)
    assert (neox.first[1], neox.second[1]) == (1, 9) and (gptj.first[1], gptj.second[1]) == (2, 3)


def test_a_negative_position_is_named():
    with pytest.raises(ValueError, match="position"):
        rotation_state(-1)


@pytest.mark.parametrize("kind, kept, divided", [("linear", 0, 64), ("llama3", 29, 29),
                                                 ("yarn", 19, 29), ("dynamic", 1, 0)])
def test_scaling_by_8_keeps_and_divides_the_pairs_it_should(kind, kept, divided):
    state = scaling_state(kind, 8)
    assert (state.kept, state.divided) == (kept, divided)
    assert state.scaled.shape == (LLAMA_DIM // 2,)


def test_factor_one_changes_nothing_and_yarn_scales_attention():
    for kind in ("linear", "dynamic", "yarn", "llama3"):
        state = scaling_state(kind, 1)
        np.testing.assert_allclose(state.scaled, state.plain, rtol=1e-12)
    assert scaling_state("yarn", 8).attention_factor == pytest.approx(0.1 * np.log(8) + 1)
    assert scaling_state("llama3", 8).attention_factor == 1.0


def test_the_dicts_are_hugging_faces():
    assert scaling_dict("llama3", 8) == {"rope_type": "llama3", "factor": 8.0,
                                         "original_max_position_embeddings": 8192,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert scaling_dict("linear", 2) == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="kind"):
        scaling_dict("longrope", 2)


def test_the_explorers_redraw_when_a_control_moves():
    for explorer, name, value in ((rotation_explorer(), "position", 100),
                                  (scaling_explorer(), "kind", "linear")):
        before = explorer.figure.value
        explorer.controls[name].value = value
        assert explorer.figure.value != before


def test_the_figures_fit_the_notebook():
    import matplotlib.pyplot as plt

    for fig in (draw_rotation(5, "gptj"), draw_scaling("yarn", 4)):
        assert fig.get_figwidth() <= 10
        plt.close(fig)
