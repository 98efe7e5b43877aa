"""The sizes ``--size`` picks between: the shapes of each preset, the kernel sweeps the cuda backend
runs at each, and the model constants (RMSNorm's epsilon, RoPE's theta) every stage shares."""

SIZES = ("smoke", "medium", "real")

# Shapes. "real" is the GPU target: a decode batch of 8 x 32k cached tokens (256k), 8 kv heads,
# GQA 4 (32 q heads), head_dim 128, 16-token blocks; writes/RoPE/quantization at a 4k-token prefill.
# "medium" is the same model shape at a size a CPU runs in seconds (4 x 4k cached tokens, a 2k-token
# prefill), large enough that a CPU's ratios mean something (the torch backend's CPU targets).
# "smoke" is small enough for Numba's CUDA simulator (~2 heads x ~64 tokens) and for CI.
PRESETS: dict[str, dict[str, int]] = {
    "smoke": dict(num_seqs=2, context_len=64, num_kv_heads=2, group=2, head_dim=64, block_size=16,
                  prefill=32, copy_blocks=4, num_splits=2),
    "medium": dict(num_seqs=4, context_len=4096, num_kv_heads=8, group=4, head_dim=128,
                   block_size=16, prefill=2048, copy_blocks=256, num_splits=4),
    "real": dict(num_seqs=8, context_len=32768, num_kv_heads=8, group=4, head_dim=128,
                 block_size=16, prefill=4096, copy_blocks=1024, num_splits=16),
}
# cuda backend only: notebook 05's numbered attention kernels timed alone (arguments checked once,
# outside the timing), {version: split counts} per size.
SPLIT_SWEEP = {"smoke": {1: (1, 2), 2: (2,), 3: (2,), 4: (1, 2), 5: (1, 2), 6: (2,), 7: (1, 2),
                         8: (1, 2)},
               "medium": {1: (1, 4), 2: (4,), 3: (4,), 4: (4,), 5: (4,), 6: (1, 4, 16),
                          7: (1, 4, 16), 8: (1, 4, 16)},
               "real": {1: (1, 16), 2: (16,), 3: (16,), 4: (16,), 5: (16,),
                        6: (1, 8, 16, 32, 64, 128), 7: (1, 8, 16, 32, 64, 128),
                        8: (1, 8, 16, 32, 64, 128)}}
# cuda backend only: the fused-write kernel alone, tokens carried per thread block (1: the first
# version, a block per token and head)
TOKENS_SWEEP = {"smoke": (1, 8), "medium": (1, 8, 32), "real": (1, 4, 8, 16, 32)}
EPS = 1e-6
THETA = 1e6
