"""kvlab.backends: three backends behind one switch; the simulator decision made before numba."""
import os
import subprocess
import sys

import numpy as np
import pytest

from kvlab.backends import BACKENDS, cuda_mode, get_backend


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8, np.int32])
def test_asarray_to_numpy_round_trip(name, dtype):
    backend = get_backend(name)
    host = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    back = backend.to_numpy(backend.asarray(host))
    assert back.dtype == host.dtype and back.shape == host.shape
    np.testing.assert_array_equal(back, host)
    backend.synchronize()


def test_tests_run_cuda_in_the_simulator_unless_the_caller_chose():
    expected = "gpu" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "0" else "simulator"
    assert cuda_mode() == expected
    assert get_backend("cuda").device == expected
    assert "simulator" in get_backend("cuda").describe() or expected == "gpu"


def test_torch_picks_the_best_device_and_accepts_cpu():
    import torch

    best = "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    assert get_backend("torch").device == best
    assert get_backend("torch", device="cpu").device == "cpu"
    assert get_backend("numpy").device == "cpu"


def test_torch_ops_take_tokens_in_cpu_sized_tiles_on_the_cpu_only():
    from kvlab.kernels.mps import CPU_TILE_BYTES, token_tiles

    per_token = CPU_TILE_BYTES // 3 + 1  # two tokens fit in a tile, not three
    tiles = token_tiles(5, per_token, "cpu")
    assert [(t.start, t.stop) for t in tiles] == [(0, 2), (2, 4), (4, 6)]
    assert [len(range(5)[t]) for t in tiles] == [2, 2, 1]  # the last tile is cut at the end
    assert token_tiles(5, 2 * CPU_TILE_BYTES, "cpu") == [slice(i, i + 1) for i in range(5)]
    assert token_tiles(0, per_token, "cpu") == []
    # a GPU or MPS launches a kernel per op: all the tokens in one (no device needed to ask)
    assert token_tiles(5, per_token, "cuda") == token_tiles(5, per_token, "mps") == [slice(0, 5)]


def test_unknown_stage_is_a_clear_attribute_error():
    with pytest.raises(AttributeError, match="no stage 'nope'"):
        get_backend("numpy").nope


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("jax",), ValueError, "backend name must be one of"),
        (("numpy", "cuda"), ValueError, "runs on 'cpu' only"),
        (("torch", "no-such-device"), ValueError, "not usable here"),
        (("numpy", 0), TypeError, "device must be a string"),
    ],
)
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        get_backend(*args)


def test_cuda_device_must_match_the_process_mode():
    other = "gpu" if cuda_mode() == "simulator" else "simulator"
    with pytest.raises(ValueError, match="restart the kernel"):
        get_backend("cuda", device=other)


def _mode_in_fresh_process(env_value):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if env_value is not None:
        env["NUMBA_ENABLE_CUDASIM"] = env_value
    code = ("import sys; from kvlab.backends import cuda_mode, gpu_present; m = cuda_mode(); "
            "assert 'numba' not in sys.modules; from numba import config; "
            "print(m, gpu_present(), bool(config.ENABLE_CUDASIM))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_cuda_mode_decides_before_numba_is_imported():
    mode, has_gpu, numba_sim = _mode_in_fresh_process(None)
    assert mode == ("gpu" if has_gpu == "True" else "simulator")
    assert numba_sim == str(mode == "simulator")  # numba was imported with the mode chosen
    assert _mode_in_fresh_process("1")[::2] == ["simulator", "True"]
