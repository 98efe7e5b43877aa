"""Every registered Numba CUDA kernel compiles to real PTX (NVRTC; no GPU needed).

The simulator runs any Python, so this is the test that the kernels are valid CUDA. It runs in a
subprocess because compile_ptx does not exist in a process that imported numba with the simulator.
"""
import json
import os
import subprocess
import sys

from kvlab.kernels import cuda as kcuda


def test_every_registered_kernel_compiles_to_ptx():
    stages = kcuda.load_all_stages()
    expected = {f"{k.name}[{i}]" for k in kcuda.REGISTRY for i in range(len(k.signatures))}
    for stage in stages:  # every stage module registers its kernels
        assert any(k.name.startswith(f"kvlab.kernels.cuda.{stage}.") for k in kcuda.REGISTRY), stage
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    out = subprocess.run([sys.executable, "-m", "kvlab.kernels.cuda.ptx", "--cc", "9.0"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(compiled) == expected
    assert all(info["bytes"] > 0 for info in compiled.values())
    # Kernels tested bit-equal to the reference must not let the compiler fuse a multiply and an
    # add (one rounding fewer): RoPE's products go through mul_rn.
    exact = {n: i for n, i in compiled.items()
             if n.split("[")[0].endswith(("apply_rope_kernel", "fused_write_kernel"))}
    assert len(exact) >= 4, sorted(compiled)  # fp16 and fp32 signatures of both kernels
    assert {name: info["fma_f32"] for name, info in exact.items()} == dict.fromkeys(exact, 0)
    # The attention kernels v2-v7 keep q, the output and the softmax state of each lane in
    # registers (constant-size local arrays, fully unrolled loops): no local memory in the PTX.
    # (PTX level only: ptxas may still spill when it allocates registers — v6, bounded to 128,
    # spills 40-72 bytes per thread for int8/fp8/fp16 pools, 208 for float32; v7, bounded to 168,
    # spills 112 for float32 and none for the others — which only the resources report on a GPU,
    # or ptxas -v, shows.)
    warp = {n: i["local_accesses"] for n, i in compiled.items() if ".warp_attention_v" in n}
    assert len(warp) == 21 and set(warp.values()) == {0}, warp
    # v5 reads a fp16 pool in 8-byte words: fewer load instructions than v3 (signature 0: fp16)
    loads = {n.split(".")[-1]: i["global_loads"] for n, i in compiled.items()}
    assert loads["warp_attention_v5_2byte_kernel[0]"] < loads["warp_attention_v3_kernel[0]"], loads
    # v6 is v5 with launch bounds (4 blocks per SM), v7 promises 3; nothing else has bounds
    bounded = {n: i["min_blocks_per_sm"] for n, i in compiled.items() if i["min_blocks_per_sm"]}
    assert bounded == {n: 4 if ".warp_attention_v6_" in n else 3 for n in compiled
                       if ".warp_attention_v6_" in n or ".warp_attention_v7_" in n}, bounded
