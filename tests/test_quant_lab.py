"""The granularity lab (kvlab.quant_lab) and the quant figures: the minimal attention reference
against torch's scaled_dot_product_attention, fake_quant against the cache's own ops, and the
INT8 accuracy bars of ferrum's tests (cosine > 0.999, max|diff|/max|ref| < 0.02) where they hold."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kvlab import plot as kplot  # noqa: E402
from kvlab.quant_lab import (  # noqa: E402
    attention, attention_error, fake_quant, granularity_table, rope_rotate_half, synthetic_kv,
)
from kvlab.ref.quant import dequantize, quantize  # noqa: E402


@pytest.mark.parametrize("num_q, num_q_heads, num_kv_heads", [(1, 4, 4), (5, 8, 2), (3, 4, 1)])
def test_attention_matches_torch_sdpa(num_q, num_q_heads, num_kv_heads):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((num_q, num_q_heads, 64)).astype(np.float32)
    k, v = (rng.standard_normal((37, num_kv_heads, 64)).astype(np.float32) for _ in range(2))
    group = num_q_heads // num_kv_heads
    tq, tk, tv = (torch.from_numpy(a).transpose(0, 1) for a in
                  (q, np.repeat(k, group, 1), np.repeat(v, group, 1)))
    # docs/design.md#conventions, causality: query i sees positions < L - Tq + 1 + i (bottom-right aligned mask)
    mask = torch.arange(37)[None, :] < (37 - num_q + 1 + torch.arange(num_q))[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
    np.testing.assert_allclose(attention(q, k, v), want.transpose(0, 1).numpy(), atol=2e-6)


def test_token_granularity_is_what_the_cache_stores():
    k, _ = synthetic_kv(16, 2, 64)
    for kv_dtype in ("int8", "fp8_e4m3"):
        assert np.array_equal(fake_quant(k, kv_dtype), dequantize(*quantize(k, kv_dtype), kv_dtype))
    assert np.array_equal(fake_quant(k, "int4", "group"), dequantize(*quantize(k, "int4"), "int4"))
    with pytest.raises(ValueError, match="granularity must be one of"):
        fake_quant(k, "int8", "row")


def test_ferrum_bars_int8_on_gaussian_kv():
    """What ferrum's INT8 bars were set on: Gaussian K/V. Measured: cosine 0.99996, rel max 0.012."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((4, 8, 128)).astype(np.float32)
    k, v = (rng.standard_normal((512, 2, 128)).astype(np.float32) for _ in range(2))
    m = attention_error(attention(q, k, v),
                        attention(q, fake_quant(k, "int8"), fake_quant(v, "int8")))
    assert m["cosine"] > 0.999 and m["rel_max_diff"] < 0.02, m


def test_outlier_keys_need_per_channel_scales():
    """With 4 outlier channels (gain 15) per-token INT8 misses the max-diff bar (0.031) and
    per-channel keys meet both bars (0.99972, 0.018): KIVI's argument, measured."""
    k, v = synthetic_kv(512, 2, 128, seed=0)
    q = np.random.default_rng(2).standard_normal((4, 8, 128)).astype(np.float32)
    rows = {r["granularity"]: r for r in granularity_table(q, k, v, "int8")}
    assert rows["token"]["rel_max_diff"] > 0.02
    assert rows["channel"]["cosine"] > 0.999 and rows["channel"]["rel_max_diff"] < 0.02
    assert rows["channel"]["k_error"] < rows["token"]["k_error"] < rows["tensor"]["k_error"]
    assert rows["token"]["v_error"] < rows["channel"]["v_error"]  # values want per-token


def test_rope_rotate_half_preserves_pair_norms_and_position_zero():
    x = np.random.default_rng(3).standard_normal((5, 2, 8)).astype(np.float32)
    y = rope_rotate_half(x, np.arange(5))
    assert np.allclose(y[0], x[0])
    norms = lambda a: a[..., :4] ** 2 + a[..., 4:] ** 2  # noqa: E731
    assert np.allclose(norms(x), norms(y), rtol=1e-5)


def test_quant_figures():
    k, _ = synthetic_kv(32, 1, 64)
    ax = kplot.plot_channel_magnitudes(k[:, 0])
    assert ax.images and ax.get_xlabel().startswith("channel")
    ax = kplot.plot_error_histograms({"a": k[:, 0] * 0.01, "b": k[:, 0] * 0.02})
    assert len(ax.patches) == 2 and ax.get_yscale() == "log"
    ax = kplot.plot_memory_vs_error(["fp16", "int8"], [4096, 2080], [1e-3, 3e-2], bar=0.02)
    assert len(ax.collections) == 2 and len(ax.lines) == 1
    with pytest.raises(ValueError, match="equally long"):
        kplot.plot_memory_vs_error(["fp16"], [1, 2], [3])
    with pytest.raises(ValueError, match="2-D"):
        kplot.plot_channel_magnitudes(np.zeros(3))
    with pytest.raises(ValueError, match="errors is empty"):
        kplot.plot_error_histograms({})
    plt.close("all")
