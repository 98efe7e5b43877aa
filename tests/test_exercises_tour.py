"""Wrong answers the 00 (tour) checker must reject (gathered by tests/test_exercises.py)."""


def _bytes(model, kv_dtype, *, kv=2, heads=None, head_dim=None, scale=2):
    heads = model.num_kv_heads if heads is None else heads
    head_dim = model.head_dim if head_dim is None else head_dim
    per_vector = head_dim * 2 if kv_dtype == "fp16" else head_dim + scale
    return kv * model.num_layers * heads * per_vector


def k_only(model, kv_dtype):
    """One vector a layer and KV head: K counted, V forgotten."""
    return _bytes(model, kv_dtype, kv=1)


def query_heads(model, kv_dtype):
    """num_q_heads where the cache holds num_kv_heads (right only without GQA)."""
    return _bytes(model, kv_dtype, heads=model.num_q_heads)


def head_dim_from_the_width(model, kv_dtype):
    """hidden_size // num_q_heads: true for Llama, not for Qwen3 or Gemma 3."""
    return _bytes(model, kv_dtype, head_dim=model.hidden_size // model.num_q_heads)


def int8_without_scales(model, kv_dtype):
    """head_dim bytes a vector in int8, its fp16 scale left out."""
    return _bytes(model, kv_dtype, scale=0)


WRONG_ANSWERS = {
    "00.kv_bytes_per_token": [k_only, query_heads, head_dim_from_the_width, int8_without_scales],
}


def test_the_checker_lays_out_the_product_and_names_the_slip(monkeypatch, capsys):
    from kvlab.exercises import SOLUTIONS_ENV, check

    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)  # check the wrong answer, not the solution
    check("00.kv_bytes_per_token", head_dim_from_the_width)
    out = capsys.readouterr().out
    assert "fails on case 'qwen3-30b-a3b in fp16" in out, out
    assert ("the product: 2 (K and V) x 48 layers x 4 KV heads x 256 B a vector "
            "(128 dims x 2 B) = 98,304 B") in out
    assert "Your 49,152 is what you get with only one of K and V counted" in out  # also 49,152
    assert "; or with head_dim taken as hidden_size // num_q_heads" in out
    check("00.kv_bytes_per_token", int8_without_scales)
    out = capsys.readouterr().out
    assert "x 130 B a vector (128 dims x 1 B + a 2 B scale)" in out
    assert "what you get with int8 without its fp16 scale" in out
    check("00.kv_bytes_per_token", lambda model, kv_dtype: 12345)
    out = capsys.readouterr().out
    assert "the product: 2 (K and V)" in out and "what you get with" not in out
    check("00.kv_bytes_per_token", lambda model, kv_dtype: 2 * model.num_layers
          * model.num_kv_heads * model.head_dim * 2)  # every cache taken as fp16
    out = capsys.readouterr().out
    assert "what you get with kv_dtype left out: every cache taken as fp16" in out, out
