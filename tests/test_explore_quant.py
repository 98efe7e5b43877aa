"""The 02 explorer's logic, without a browser: a setting gives the state it should."""
import matplotlib

matplotlib.use("Agg")  # no display needed: the figures are only drawn to PNG

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kvlab.explore.quant import (  # noqa: E402
    HEAD_DIM, NUM_KV_HEADS, NUM_TOKENS, draw_quant, quant_explorer, quant_state, scales_per_vector,
)
from kvlab.quant_lab import fake_quant, synthetic_kv  # noqa: E402


def test_the_cache_rule_is_what_kvlab_stores():
    """int8 per token: the errors are quantize/dequantize's, 128 B of codes + one fp16 scale."""
    from kvlab.ref.quant import dequantize, quantize

    state = quant_state(15, "token", "int8")
    k, _ = synthetic_kv(NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM, outlier_gain=15.0, seed=0)
    stored = dequantize(*quantize(k, "int8"), "int8")
    np.testing.assert_array_equal(state.key_errors, np.abs(stored - k))
    assert (state.code_bytes, state.scale_bytes) == (128, 2)


def test_bytes_per_vector_follow_the_granularity_and_dtype():
    assert quant_state(15, "group", "int4").code_bytes == 64
    assert quant_state(15, "group", "int4").scale_bytes == 2 * HEAD_DIM / 32   # one per 32 dims
    assert scales_per_vector("tensor") == 1 / (NUM_TOKENS * NUM_KV_HEADS)
    assert scales_per_vector("channel") == HEAD_DIM / NUM_TOKENS
    with pytest.raises(ValueError, match="granularity"):
        scales_per_vector("row")


def test_larger_outliers_hurt_per_token_keys_but_not_per_channel_ones():
    small, large = quant_state(1, "token", "int8"), quant_state(40, "token", "int8")
    assert large.k_rel_error > 2 * small.k_rel_error
    assert small.passes and not large.passes            # ferrum's INT8 bars
    per_channel = quant_state(40, "channel", "int8")
    assert per_channel.k_rel_error < large.k_rel_error / 2


def test_int4_is_coarser_than_int8_and_fp8_barely_cares_about_the_scale():
    int4, int8 = (quant_state(15, "token", d).k_rel_error for d in ("int4", "int8"))
    assert int4 > 5 * int8
    fp8 = [quant_state(15, g, "fp8_e4m3").k_rel_error for g in ("tensor", "token")]
    int8 = [quant_state(15, g, "int8").k_rel_error for g in ("tensor", "token")]
    assert fp8[0] / fp8[1] < int8[0] / int8[1]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="kv_dtype"):
        quant_state(15, "token", "fp16")
    with pytest.raises(ValueError, match="outlier_gain"):
        quant_state(0.5, "token", "int8")


def test_the_explorer_redraws_when_a_control_moves():
    explorer = quant_explorer()
    before = explorer.figure.value
    explorer.controls["granularity"].value = "channel"
    assert explorer.figure.value != before
    assert explorer.values() == {"outlier_gain": 15, "granularity": "channel", "kv_dtype": "int8"}


def test_the_figure_fits_the_notebook():
    import matplotlib.pyplot as plt

    fig = draw_quant(15, "group", "int4")
    assert fig.get_figwidth() <= 10
    plt.close(fig)


def test_fake_quant_group_matches_the_int4_cache():
    """The 'group' granularity is the registry's int4 layout (what the explorer's bytes count)."""
    from kvlab.ref.quant import dequantize, quantize

    k, _ = synthetic_kv(8, 2, 64, seed=3)
    np.testing.assert_array_equal(fake_quant(k, "int4", "group"),
                                  dequantize(*quantize(k, "int4"), "int4"))
