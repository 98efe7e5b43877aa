"""Stage 6 (capstone): kvlab.model's Qwen3 decoder against Hugging Face transformers'
Qwen3ForCausalLM (same random weights, float32, eager attention), generation through every cache,
continuous batching over one shared paged pool, and the bad inputs.

Tolerances (logits, max abs over prefill + every decode step):

| kvlab cache | bound | why |
|---|---|---|
| float32 pools | ``1e-5 * (1 + max|HF|)`` (measured 2.4e-7 on max 1.1) | same float32 math; kvlab's host matmuls accumulate in float64, RoPE tables are rounded once from float64, attention sums in another order |
| fp16 pools | ``2e-3 * (1 + max|HF|)`` (measured 1.8e-4) | Q, K, V are rounded to fp16 (relative 2^-11) by the fused write; the error passes through both layers |
| int8 pools | ``2e-2 * (1 + max|HF|)`` (measured ~5e-3) | one scale per (token, kv head): each K/V element within scale/2 = amax/254 |
| fp8_e4m3 | ``1e-1 * (1 + max|HF|)`` (measured ~3e-2) | 3 mantissa bits: each element within 2^-4 relative |
"""
import json
from dataclasses import replace

import numpy as np
import pytest

from kvlab.cache import KvCacheManager, KvPool
from kvlab.generate import Request, generate, sample, serve
from kvlab.plot import plot_pool_timeline
from kvlab.model import CharTokenizer, ModelConfig, Qwen3Model, hf_weight_shapes, tiny_corpus

SMALL = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=64, rope_theta=10000.0)
TINY = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   max_position_embeddings=16, rope_theta=10000.0)
BOUND = {"float32": 1e-5, "fp16": 2e-3, "int8": 2e-2, "fp8_e4m3": 1e-1}


def hf_model(config, seed=0, **overrides):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    hf = Qwen3ForCausalLM(config.to_hf(attn_implementation="eager", **overrides)).float().eval()
    with torch.no_grad():  # norm weights away from 1, so a missed norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return hf


def hf_logits(hf, ids):
    import torch

    with torch.no_grad():
        return hf(torch.tensor([list(ids)])).logits[0].numpy()


def kvlab_logits(model, ids, cache, prefill):
    """Prefill ``ids[:prefill]`` in one call, then one decode step per remaining token."""
    out = [model.forward(ids[:prefill], cache)]
    out += [model.forward([t], cache) for t in ids[prefill:]]
    return np.concatenate(out)


@pytest.fixture(scope="module")
def small_hf():
    return hf_model(SMALL)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("dtype", ["float32", "fp16", "int8", "fp8_e4m3"])
def test_logits_match_hugging_face(small_hf, backend, kind, dtype):
    ids = [int(t) for t in np.random.default_rng(0).integers(0, SMALL.vocab_size, 12)]
    ref = hf_logits(small_hf, ids)
    model = Qwen3Model.from_state_dict(SMALL, small_hf.state_dict(), backend=backend)
    cache = model.new_cache(kind, capacity=32, dtype=dtype, block_size=4)  # crosses blocks
    ours = kvlab_logits(model, ids, cache, prefill=5)
    err = np.abs(ours - ref).max()
    print(f"{backend} {kind} {dtype}: max |kvlab - HF| = {err:.2e} (max |HF| {np.abs(ref).max():.2f})")
    assert ours.shape == ref.shape and err <= BOUND[dtype] * (1 + np.abs(ref).max())
    assert cache.len == len(ids)


@pytest.mark.parametrize("kind,dtype", [("contiguous", "float32"), ("paged", "fp16")])
def test_logits_match_hugging_face_cuda_simulator(kind, dtype):
    hf = hf_model(TINY, seed=1)
    ids = [int(t) for t in np.random.default_rng(1).integers(0, TINY.vocab_size, 8)]
    ref = hf_logits(hf, ids)
    model = Qwen3Model.from_state_dict(TINY, hf.state_dict(), backend="cuda")
    ours = kvlab_logits(model, ids, model.new_cache(kind, 16, dtype, block_size=4), prefill=4)
    assert np.abs(ours - ref).max() <= BOUND[dtype] * (1 + np.abs(ref).max())


def test_untied_lm_head_and_a_state_dict_with_tied_copy():
    hf = hf_model(SMALL, seed=2, tie_word_embeddings=False)
    config = replace(SMALL, tie_word_embeddings=False)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    model = Qwen3Model.from_state_dict(config, hf.state_dict())
    assert "lm_head.weight" in model.state_dict
    ours = kvlab_logits(model, ids, model.new_cache("paged", 16, "float32", 4), prefill=3)
    assert np.abs(ours - hf_logits(hf, ids)).max() <= 1e-5 * (1 + np.abs(ours).max())
    # tied: HF's state dict also lists lm_head.weight (the same tensor); accepted when equal
    tied = hf_model(SMALL, seed=3)
    assert "lm_head.weight" in tied.state_dict()
    Qwen3Model.from_state_dict(SMALL, tied.state_dict())


def test_save_load_roundtrip_and_hugging_face_reads_it(tmp_path, small_hf):
    from transformers import Qwen3ForCausalLM

    model = Qwen3Model.from_state_dict(SMALL, small_hf.state_dict())
    model.save(tmp_path)
    again = Qwen3Model.load(tmp_path)
    ids = [5, 6, 7, 8]
    a = model.forward(ids, model.new_cache("contiguous", 8, "float32"))
    b = again.forward(ids, again.new_cache("contiguous", 8, "float32"))
    assert a.tobytes() == b.tobytes()
    hf = Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert np.abs(hf_logits(hf, ids) - hf_logits(small_hf, ids)).max() == 0


def test_recompute_contiguous_paged_give_the_same_greedy_tokens_random_model():
    model = Qwen3Model.random(SMALL, seed=4)
    prompt = [1, 2, 3, 4, 5]
    runs = {kind: generate(model, prompt, 10, cache=kind, dtype="fp16", block_size=4)
            for kind in ("none", "contiguous", "paged")}
    assert runs["none"].tokens == runs["contiguous"].tokens == runs["paged"].tokens
    # contiguous and paged run the same ops on the same fp16 K/V: bit-identical logits
    assert runs["contiguous"].logits.tobytes() == runs["paged"].logits.tobytes()
    assert runs["paged"].bytes_reserved < runs["contiguous"].bytes_reserved  # 4 blocks vs 64 rows


def test_sampling_is_seeded_and_respects_top_k():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    assert sample(logits) == 1
    draws = {sample(logits, 1.0, 2, np.random.default_rng(s)) for s in range(40)}
    assert draws == {1, 2}
    model = Qwen3Model.random(SMALL, seed=5)
    a = generate(model, [1, 2], 6, temperature=1.0, seed=7)
    b = generate(model, [1, 2], 6, cache="contiguous", temperature=1.0, seed=7)
    assert a.tokens == b.tokens


# --- continuous batching ---------------------------------------------------------------------

def batching_requests(vocab, rng):
    shared = [int(t) for t in rng.integers(0, vocab, 8)]  # two full blocks of 4
    return [Request("a", shared + [1, 2, 3], 6),
            Request("b", [int(t) for t in rng.integers(0, vocab, 5)], 9, arrival=1),
            Request("c", shared + [5], 4, arrival=2),
            Request("d", [int(t) for t in rng.integers(0, vocab, 3)], 5, arrival=2,
                    temperature=1.0, seed=3),
            Request("e", shared + [7, 7], 3, arrival=7)]  # after a and c left: cached blocks


@pytest.mark.parametrize("backend,dtype", [("numpy", "fp16"), ("numpy", "int8"),
                                           ("torch", "fp8_e4m3")])
def test_continuous_batching_equals_running_alone(backend, dtype):
    model = Qwen3Model.random(SMALL, seed=6, backend=backend)
    requests = batching_requests(SMALL.vocab_size, np.random.default_rng(1))
    result = serve(model, requests, num_blocks=12, block_size=4, dtype=dtype)
    for r in requests:
        alone = generate(model, r.prompt, r.max_new_tokens, cache="paged", dtype=dtype,
                         block_size=4, temperature=r.temperature, seed=r.seed)
        assert result.outputs[r.rid] == alone.tokens, r.rid
        ours, theirs = result.logits[r.rid], alone.logits
        assert np.abs(ours - theirs).max() <= 1e-5 * (1 + np.abs(theirs).max()), r.rid
        if backend == "numpy" and not result.prefix_hits[r.rid]:
            assert ours.tobytes() == theirs.tobytes(), r.rid  # batch-invariant host math
    assert result.prefix_hits == {"a": 0, "b": 0, "c": 8, "d": 0, "e": 8}
    assert result.leaked_blocks == 0
    last = result.timeline[-1]
    assert last.used == 0 and last.free + last.cached == 12 and not last.blocks
    assert max(len(t.running) for t in result.timeline) == 4
    assert sum(t.tokens for t in result.timeline) == sum(
        len(r.prompt) - result.prefix_hits[r.rid] + r.max_new_tokens - 1 for r in requests)


def test_continuous_batching_waits_for_room_and_plots():
    model = Qwen3Model.random(SMALL, seed=7)
    requests = [Request(i, [i + 1] * 6, 6) for i in range(4)]  # 3 blocks of 4 each
    result = serve(model, requests, num_blocks=7, block_size=4, enable_prefix_caching=False)
    assert max(t.used for t in result.timeline) <= 7
    assert max(len(t.running) for t in result.timeline) == 2  # the pool holds two at a time
    for r in requests:
        assert result.outputs[r.rid] == generate(model, r.prompt, 6).tokens
    fig = plot_pool_timeline(result)
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_manager_reserve_is_all_or_nothing():
    pool = KvPool(2, 4, 4, 2, 16)
    mgr = KvCacheManager(pool, max_blocks_per_seq=3)
    mgr.add_sequence("s", [1, 2, 3])
    mgr.reserve("s", [1, 2, 3, 4, 5])
    assert mgr.context_len("s") == 5 and (mgr.block_table("s") >= 0).sum() == 2
    before = mgr.snapshot()
    with pytest.raises(ValueError, match="cannot hold 13 tokens"):
        mgr.reserve("s", list(range(8)))
    assert mgr.snapshot() == before
    mgr.release("s")
    assert mgr.allocator.num_used == 0


# --- the trained model in data/ --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return Qwen3Model.pretrained_tiny()


PROMPT = "The little girl"


def test_tiny_model_greedy_tokens_identical_across_exact_caches(tiny):
    tok = CharTokenizer()
    ids = tok.encode(PROMPT)
    runs = {(kind, dtype): generate(tiny, ids, 40, cache=kind, dtype=dtype, block_size=8)
            for kind, dtype in [("none", "fp16"), ("contiguous", "fp16"), ("paged", "fp16"),
                                ("paged", "float32"), ("paged", "int8"), ("paged", "fp8_e4m3")]}
    exact = runs["paged", "fp16"].tokens
    for key in [("none", "fp16"), ("contiguous", "fp16"), ("paged", "float32")]:
        assert runs[key].tokens == exact, key
    text = tok.decode(exact)
    words = set(tiny_corpus(500).replace(".", " ").replace("\n", " ").lower().split())
    assert all(w in words for w in text.replace(".", " ").lower().split()[:-1]), text
    # quantized caches, teacher-forced on the fp16 tokens: logits within the stated bound
    ref = runs["paged", "float32"].logits
    for dtype in ("int8", "fp8_e4m3"):
        cache = tiny.new_cache("paged", 64, dtype, 8)
        forced = kvlab_logits(tiny, ids + exact[:-1], cache, len(ids))[len(ids) - 1:]
        err = np.abs(forced - ref).max()
        print(f"trained model, {dtype}: max |logit - float32 logit| = {err:.3f}")
        assert err <= BOUND[dtype] * (1 + np.abs(ref).max())


# --- bad inputs ------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(small_hf):
    model = Qwen3Model.random(SMALL)
    with pytest.raises(ValueError, match="needs 70 cached positions, but the cache allows 64"):
        generate(model, [1] * 60, 11)
    with pytest.raises(ValueError, match="the cache allows 16"):
        generate(model, [1] * 10, 8, capacity=16)
    cache = model.new_cache("contiguous", 8)
    with pytest.raises(ValueError, match="cannot run 9 tokens after 0: the cache holds 8"):
        model.forward([1] * 9, cache)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        model.forward([64], cache)
    with pytest.raises(ValueError, match="unknown config key"):
        ModelConfig.from_dict({**SMALL.to_dict(), "num_experts": 8})
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_dict({**SMALL.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="missing"):
        ModelConfig.from_dict({"vocab_size": 8})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        replace(SMALL, num_key_value_heads=3)
    sd = {k: v.clone() for k, v in small_hf.state_dict().items()}
    sd["model.layers.1.self_attn.k_proj.weight"] = sd["model.layers.1.self_attn.k_proj.weight"][:8]
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(8, 64\), the config needs "
                                         r"\(32, 64\)"):
        Qwen3Model.from_state_dict(SMALL, sd)
    del sd["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        Qwen3Model.from_state_dict(SMALL, sd)
    with pytest.raises(ValueError, match="cache kind"):
        model.new_cache("ring")
    with pytest.raises(ValueError, match="the cache allows 16"):
        serve(model, [Request("x", [1] * 20, 5)], num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="needs more blocks than the pool's 4"):
        serve(model, [Request("x", [1] * 20, 5)], num_blocks=4, block_size=4,
              max_blocks_per_seq=8)
    with pytest.raises(ValueError, match="unique"):
        serve(model, [Request("x", [1], 1), Request("x", [2], 1)], num_blocks=4)
    with pytest.raises(ValueError, match="not in the 96-character vocabulary"):
        CharTokenizer().encode("café")


def test_hf_weight_names_match_transformers(small_hf):
    assert set(hf_weight_shapes(SMALL)) | {"lm_head.weight"} == set(small_hf.state_dict())
    assert json.loads(json.dumps(SMALL.to_dict()))["model_type"] == "qwen3"
