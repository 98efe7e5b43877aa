"""Notebook 04's explorers: the bytes each setting moves, and the CUDA kernel's grid and paths
(held against a traced run of the real kernel in the simulator)."""
import matplotlib
import numpy as np
import pytest

from kvlab.explore.fused_write import (block_grid, draw_grid, draw_traffic, grid_explorer,
                                       head_paths, traffic_explorer, traffic_state)

matplotlib.use("Agg")


# --- bytes ---

def test_qk_norm_halves_the_bytes_rope_only_saves_less_and_copy_nothing():
    assert traffic_state(1)["saved"] == pytest.approx(0.50, abs=0.01)
    assert traffic_state(2)["saved"] == pytest.approx(0.16, abs=0.01)
    assert abs(traffic_state(0)["saved"]) < 0.005


def test_interleaved_rope_moves_the_same_bytes_as_rotate_half():
    assert traffic_state(3)["steps"] == traffic_state(2)["steps"]


def test_float32_doubles_and_an_int8_cache_shrinks_the_writes():
    half, full = traffic_state(2, "float16"), traffic_state(2, "float32")
    assert full["steps"]["rope_q"]["write"] == 2 * half["steps"]["rope_q"]["write"]
    int8 = traffic_state(2, "float16", "int8")
    assert int8["steps"]["fused"]["write"] < half["steps"]["fused"]["write"]
    assert int8["steps"]["fused"]["read"] == half["steps"]["fused"]["read"]


def test_the_norm_steps_appear_only_with_qk_norm():
    assert "q_norm" in traffic_state(1)["steps"] and "q_norm" not in traffic_state(2)["steps"]
    assert "copy_q" in traffic_state(0)["steps"]


def test_a_bad_cache_is_refused():
    with pytest.raises(ValueError, match="cache must be one of"):
        traffic_state(1, cache="int4")


# --- the grid, by rule ---

def test_block_grid_numbers_blocks_as_cuda_does():
    grid = block_grid(5, 3, 2)       # grid (3, 3): blocks x = 0, 1, 2 per head
    assert grid[:, 0].tolist() == [0, 0, 1, 1, 2]
    assert grid[:, 2].tolist() == [6, 6, 7, 7, 8]
    assert block_grid(4, 2, 1).max() == 7
    with pytest.raises(ValueError, match="tokens_per_block"):
        block_grid(4, 2, 0)


def test_head_paths_follow_what_must_be_shared():
    assert head_paths(2, 1, 2, "same as qkv") == ["registers"] * 4
    assert head_paths(2, 1, 1, "same as qkv") == ["shared"] * 3 + ["registers"]
    assert head_paths(2, 1, 2, "int8") == ["registers"] * 2 + ["shared"] * 2
    assert head_paths(2, 1, 0, "fp8_e4m3") == ["registers"] * 2 + ["shared"] * 2


# --- the grid, against the real kernel ---

def _traced_write(tokens_per_block, qk_mode, cache, tokens=6, hq=2, hkv=1, d=8):
    """The CUDA kernel traced in the simulator; returns (owner maps of q_out, k_pool, v_pool
    writes as [tokens, head, d] thread ids, threads per block)."""
    from kvlab.backends import cuda_mode

    if cuda_mode() != "simulator":
        pytest.skip("the access tracer needs the simulator")
    from kvlab.kernels.cuda import fused_write as cfw
    from kvlab.ref.rope import rope_tables
    from kvlab.trace import launch_traced

    rng = np.random.default_rng(0)
    kv_dtype = None if cache == "same as qkv" else cache
    storage = {None: np.float32, "int8": np.int8, "fp8_e4m3": np.uint8}[kv_dtype]
    cos, sin = rope_tables(16, d, 10_000.0)
    heads = hq + 2 * hkv
    arrays = dict(
        qkv=rng.standard_normal((tokens, heads * d)).astype(np.float32),
        q_norm_w=np.ones(d, np.float32), k_norm_w=np.ones(d, np.float32), cos=cos, sin=sin,
        k_pool=np.zeros((tokens, 1, hkv, d), storage), v_pool=np.zeros((tokens, 1, hkv, d), storage),
        k_scales=np.zeros((tokens, 1, hkv), np.float16), v_scales=np.zeros((tokens, 1, hkv), np.float16),
        block_tables=np.arange(tokens, dtype=np.int32)[None],       # block size 1: slot = token
        query_start=np.array([0, tokens], np.int32), pos_offsets=np.array([0], np.int32),
        num_q_heads=hq, num_kv_heads=hkv, eps=np.float32(1e-6), qk_mode=qk_mode,
        cache_kind=cfw.CACHE_KIND[kv_dtype], paged=True, is_half=False,
        qmax=cfw.QMAX.get(kv_dtype, np.float32(1)), q_out=np.zeros((tokens, hq, d), np.float32),
        max_input=np.float32(0), check_only=False, flag=np.zeros(1, np.int32),
        tokens_per_block=tokens_per_block, pairs_in_registers=True)
    grid = (-(-tokens // tokens_per_block), heads)
    _, log = launch_traced(cfw.fused_write_kernel, grid, cfw.THREADS_PER_BLOCK, **arrays)
    owners = np.concatenate([log.owner_map("q_out", "write"),
                             log.owner_map("k_pool", "write")[:, 0],
                             log.owner_map("v_pool", "write")[:, 0]], axis=1)
    return owners, cfw.THREADS_PER_BLOCK


@pytest.mark.parametrize("tokens_per_block, qk_mode, cache", [(4, 2, "same as qkv"),
                                                              (2, 1, "int8")])
def test_the_kernel_writes_each_token_and_head_from_the_block_the_rule_names(tokens_per_block,
                                                                              qk_mode, cache):
    owners, threads = _traced_write(tokens_per_block, qk_mode, cache)
    assert (owners >= 0).all()                                   # every element written once
    blocks = owners // threads                                   # [tokens, heads, d]
    assert (blocks == blocks[..., :1]).all()                     # one block per (token, head)
    assert (blocks[..., 0] == block_grid(6, 4, tokens_per_block)).all()


@pytest.mark.parametrize("qk_mode, cache", [(2, "same as qkv"), (1, "same as qkv"), (0, "int8")])
def test_each_head_takes_the_path_the_rule_names(qk_mode, cache):
    """Through shared memory, thread i handles dims i, i + threads, ... of every token; in
    registers the block's threads stride over all its tokens' items at once, so a later token's
    dims go to other threads."""
    owners, threads = _traced_write(4, qk_mode, cache)
    dims = np.arange(owners.shape[2])
    for h, path in enumerate(head_paths(2, 1, qk_mode, cache)):
        second_token = owners[1, h] % threads
        assert (second_token == dims % threads).all() == (path == "shared"), (h, path)


# --- drawing ---

@pytest.mark.parametrize("qk_mode", [0, 1, 2, 3])
@pytest.mark.parametrize("cache", ["same as qkv", "int8"])
def test_the_drawn_grid_hatches_exactly_the_shared_memory_heads(qk_mode, cache):
    from matplotlib.patches import Rectangle

    fig = draw_grid(16, qk_mode, cache, num_tokens=16)             # one row of blocks
    cells = sorted((p for p in fig.axes[0].patches if isinstance(p, Rectangle)),
                   key=lambda p: p.get_x())
    assert [("shared" if c.get_hatch() else "registers") for c in cells] == head_paths(
        4, 2, qk_mode, cache)


def test_the_explorers_redraw_when_a_control_moves():
    for explorer, name, value in ((traffic_explorer(), "qk_mode", 0),
                                  (grid_explorer(), "tokens_per_block", 4)):
        before = explorer.figure.value
        explorer.controls[name].value = value
        assert explorer.figure.value != before
        assert "image/png" in explorer._repr_mimebundle_()


def test_figures_fit_the_notebook_width():
    for fig in (draw_traffic(1, "float16", "int8"), draw_grid(4, 1, "int8")):
        assert fig.get_figwidth() * 100 <= 1000
