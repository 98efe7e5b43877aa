"""Notebook 00's explorer (kvlab.explore.tour): the planner's numbers for a setting, and the
drawing and controls built on them."""
import matplotlib
import pytest

from kvlab.explore.tour import CARD_MEMORY_GIB, TP_DEGREES, card_explorer, card_plan, draw_card_plan
from kvlab.memory import GIB, bytes_per_token, tokens_that_fit
from kvlab.shapes import get_model, list_models

matplotlib.use("Agg")


def test_qwen3_8b_fp16_on_80_gib_matches_the_planner_and_the_hand_count():
    state = card_plan("qwen3-8b", "fp16", 80)
    # K and V × 36 layers × 8 KV heads × head_dim 128 × 2 bytes
    assert state.bytes_per_token == 2 * 36 * 8 * 128 * 2 == 147_456
    assert state.tokens_that_fit == tokens_that_fit("qwen3-8b", "fp16", 80 * GIB) == 413_194
    assert state.kv_heads_per_rank == 8 and state.kv_replication == 1
    # the card divides into weights, the KV tokens, and the 10 % left alone (plus < 1 token)
    assert state.weights_gib + state.kv_gib + state.spare_gib == pytest.approx(80)
    assert 8.0 <= state.spare_gib < 8.0 + state.bytes_per_token / GIB
    assert state.overflow_gib == 0


def test_tensor_parallelism_splits_heads_then_replicates_them():
    four = card_plan("llama-3.1-70b", "int8", 80, tp=4)
    assert (four.kv_heads_per_rank, four.kv_replication) == (2, 1)
    per_card = bytes_per_token("llama-3.1-70b", "int8", tp=4)
    assert four.bytes_per_token == per_card == 80 * 2 * 2 * 130  # 80 layers, 2 heads, 128 + 2 B
    sixteen = card_plan("llama-3.1-70b", "fp16", 80, tp=16)  # 8 KV heads over 16 cards
    assert (sixteen.kv_heads_per_rank, sixteen.kv_replication) == (1, 2)
    assert sixteen.weights_gib == pytest.approx(get_model("llama-3.1-70b").weight_bytes / 16 / GIB)


def test_weights_that_do_not_fit_leave_no_tokens_and_say_by_how_much():
    state = card_plan("llama-3.1-70b", "fp16", 80, tp=1)
    weights = get_model("llama-3.1-70b").weight_bytes / GIB
    assert state.tokens_that_fit == 0 and state.kv_gib == 0
    assert state.overflow_gib == pytest.approx(weights - 72)


def test_int4_fits_more_tokens_than_int8_than_fp16():
    counts = [card_plan("qwen3-8b", d, 141).tokens_that_fit for d in ("fp16", "int8", "int4")]
    assert counts[0] < counts[1] < counts[2]


def test_every_control_setting_is_possible():
    """The TP choices split (or replicate) the KV heads of every model, so no setting raises."""
    for model in list_models():
        for tp in TP_DEGREES:
            card_plan(model, "fp16", CARD_MEMORY_GIB[0], tp=tp)


def test_a_bad_tp_is_the_planners_value_error():
    with pytest.raises(ValueError, match="tp=3"):
        card_plan("qwen3-8b", "fp16", 80, tp=3)


def test_the_drawing_names_the_setting_and_moving_a_control_redraws():
    fig = draw_card_plan("qwen3-8b", "int8", 80, 2)
    assert "74,880" not in fig._suptitle.get_text()  # tp 2 halves the per-card bytes
    assert f"{bytes_per_token('qwen3-8b', 'int8', tp=2):,} B per token" in fig._suptitle.get_text()
    assert fig.get_size_inches()[0] <= 10
    explorer = card_explorer()
    before = explorer.figure.value
    explorer.controls["dtype"].value = "int8"
    assert explorer.figure.value != before
    assert set(explorer.values()) == {"model", "dtype", "memory_gib", "tp"}
