"""Notebook 06's explorer: the pool at each step of continuous batching, by block id."""
import matplotlib
import pytest

from kvlab.explore.capstone import draw_step, pool_at_step, serving_explorer
from kvlab.generate import Request, serve
from kvlab.model import ModelConfig, Qwen3Model

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def result():
    config = ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=64, rope_theta=10000.0)
    model = Qwen3Model.random(config, seed=0)
    shared = [1, 2, 3, 4, 5, 6, 7, 8]                     # two full blocks of 4
    requests = [Request("A", shared + [9], 3, arrival=0),
                Request("B", shared + [10, 11], 2, arrival=1),
                Request("C", shared + [12], 2, arrival=6)]
    return serve(model, requests, num_blocks=12, block_size=4, dtype="float32")


def test_a_shared_prefix_shows_both_owners(result):
    state = pool_at_step(result, 1)                       # A running, B just joined
    assert state["joined"] == ("B",)
    shared = [b for b, owner in enumerate(state["owners"]) if owner == ("A", "B")]
    assert len(shared) == 2, state["owners"]              # B reused A's two full blocks
    held = {b for b, owner in enumerate(state["owners"]) if isinstance(owner, tuple) and owner}
    assert len(held) == state["used"]                     # shared blocks counted once


def test_counts_add_up_at_every_step(result):
    for step in range(len(result.timeline)):
        state = pool_at_step(result, step)
        owners = state["owners"]
        assert sum(o == "cached" for o in owners) == state["cached"]
        assert sum(o == () for o in owners) == state["free"]
        assert state["used"] + state["cached"] + state["free"] == result.num_blocks


def test_after_everyone_left_nothing_is_used_and_the_prefix_stays_cached(result):
    last = pool_at_step(result, len(result.timeline) - 1)
    assert last["used"] == 0 and last["cached"] >= 2
    assert result.prefix_hits["C"] == 8                   # C found A's blocks in the cache


def test_bad_steps_are_refused(result):
    with pytest.raises(ValueError, match="step must be in"):
        pool_at_step(result, len(result.timeline))


def test_the_explorer_redraws_when_the_step_moves(result):
    explorer = serving_explorer(result)
    before = explorer.figure.value
    explorer.controls["step"].value = 2
    assert explorer.figure.value != before
    assert "image/png" in explorer._repr_mimebundle_()
    fig = draw_step(result, 0)
    assert fig.get_figwidth() * 100 <= 1000
