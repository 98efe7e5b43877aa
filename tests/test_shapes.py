"""kvlab.shapes and data/models.json: real configs, checked by hand against their sources."""
import json

import pytest

from kvlab.data import data_path
from kvlab.shapes import ModelShape, get_model, list_models

REQUIRED = ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "qwen3-0.6b", "qwen3-8b", "qwen3-32b",
            "qwen3-30b-a3b", "mistral-7b-v0.3", "gemma-3-27b"]


def test_at_least_ten_real_models_including_the_required_ones():
    names = list_models()
    assert len(names) >= 10 and set(REQUIRED) <= set(names)


@pytest.mark.parametrize(
    "name, layers, q, kv, head_dim, theta",
    [   # from each model's config.json (see data/README.md)
        ("llama-3.1-8b", 32, 32, 8, 128, 500000.0),
        ("llama-3.1-70b", 80, 64, 8, 128, 500000.0),
        ("llama-3.1-405b", 126, 128, 8, 128, 500000.0),
        ("qwen3-8b", 36, 32, 8, 128, 1000000.0),
        ("qwen3-0.6b", 28, 16, 8, 128, 1000000.0),
        ("qwen3-30b-a3b", 48, 32, 4, 128, 1000000.0),
        ("mistral-7b-v0.3", 32, 32, 8, 128, 1000000.0),
    ],
)
def test_known_configs(name, layers, q, kv, head_dim, theta):
    m = get_model(name)
    assert (m.num_layers, m.num_q_heads, m.num_kv_heads, m.head_dim, m.rope_theta) == \
        (layers, q, kv, head_dim, theta)


def test_every_model_documented_in_data_readme():
    readme = data_path("README.md").read_text(encoding="utf-8")
    for name in list_models():
        assert get_model(name).hf_id in readme, name


def test_qk_norm_and_windows():
    assert get_model("qwen3-8b").qk_norm and not get_model("llama-3.1-8b").qk_norm
    gemma = get_model("gemma-3-27b")
    assert (gemma.sliding_window, gemma.num_sliding_layers) == (1024, 52)  # 5 local : 1 global, 62 layers
    assert get_model("qwen3-8b").gqa_group == 4


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models: .*qwen3-8b"):
        get_model("gpt-5")


def _entry(**change):
    entry = next(e for e in json.loads(data_path("models.json").read_text())["models"]
                 if e["name"] == "qwen3-8b")
    return {**entry, **change}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_kv_heads": 5}, "must be a multiple of num_kv_heads"),
        ({"head_dim": 0}, "head_dim must be a positive int"),
        ({"rotary_dim": 129}, "rotary_dim"),
        ({"sliding_window": 512}, "go together"),
        ({"weight_dtype": "int3"}, "weight_dtype"),
        ({"vocab": 1}, "unknown keys \\['vocab'\\]"),
    ],
)
def test_bad_entries_are_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        ModelShape.from_dict(_entry(**change))
