"""scripts/profile_kernels.py (run under ncu by scripts/gpu_check.sh on a GPU): its launches build
and run here too, on the simulator at the bench's smoke size, so an API change cannot silently
break the one GPU session that needs it."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from kvlab.backends import cuda_mode, get_backend
from kvlab.bench import PRESETS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_kernels.py"


@pytest.mark.skipif(cuda_mode() != "simulator", reason="the GPU runs the script itself")
def test_profile_script_launches_run_on_the_simulator():
    spec = importlib.util.spec_from_file_location("profile_kernels", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    be = get_backend("cuda")
    rng = np.random.default_rng(0)
    shape = dict(PRESETS["smoke"], context_len=16, prefill=4, head_dim=16)  # the simulator is slow
    attention = script.attention_launches(be, rng, shape, num_splits=2)
    fused = script.fused_write_launches(be, rng, shape)
    assert len(attention) == len(script.ATTENTION_VERSIONS)
    assert len(fused) == len(script.FUSED_SETTINGS)
    outs = [be.to_numpy(run()) for run in attention]
    for out in outs[1:]:  # every version computes the same attention
        np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-6)
    heads = shape["num_kv_heads"] * shape["group"]
    for run in fused:
        assert be.to_numpy(run()).shape == (shape["prefill"], heads, shape["head_dim"])
    rows = script.host_overhead(be, rng, shape, num_splits=2, repeats=1)
    assert len(rows) == 16 and all(us > 0 for _, us in rows), rows
