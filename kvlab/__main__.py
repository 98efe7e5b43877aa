"""kvlab's command line: ``python -m kvlab plan ...`` and ``python -m kvlab bench ...``."""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

from kvlab.dtypes import list_dtypes
from kvlab.memory import GIB, plan
from kvlab.shapes import get_model, list_models

DEFAULT_SEQ_LENS = "300,1200,2500,4000,700,150,3100,900"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):  # "nan" and "inf" parse as floats
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r} (it "
                                             f"must be finite)")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def _human(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_plan(rows, args) -> str:
    """A readable table of the planner's rows."""
    model = get_model(args.model)
    dtype_width = max(6, *(len(r.dtype) for r in rows))  # "fp8_e4m3" is wider than the "dtype" header
    lines = [
        f"{model.name} ({model.hf_id}): {model.num_layers} layers, {model.num_q_heads} q heads, "
        f"{model.num_kv_heads} kv heads, head_dim {model.head_dim}"
        + (f", {model.num_sliding_layers} layers with a {model.sliding_window}-token window"
           if model.sliding_window else ""),
        f"memory {args.memory_gib:g} GiB per rank x utilization {args.utilization:g}, tp {args.tp} "
        f"({rows[0].kv_heads_per_rank} kv heads per rank, each stored {rows[0].kv_replication}x), "
        f"weights {_human(rows[0].weight_bytes_per_rank)} per rank",
        "",
        f"{'dtype':<{dtype_width}} {'B/token/layer':>13} {'B/token':>10} {'per 1k tokens':>14} "
        f"{'tokens that fit':>16} {'max-len seqs':>13}",
    ]
    for r in rows:
        lines.append(
            f"{r.dtype:<{dtype_width}} {r.bytes_per_token_per_layer:>13,} {r.bytes_per_token:>10,} "
            f"{_human(1000 * r.bytes_per_token):>14} {r.tokens_that_fit:>16,} "
            f"{r.max_len_sequences_that_fit:>13,}"
        )
    if rows[0].reservation:
        lines += [
            "",
            f"batch of {len(args.seq_lens)} sequences {args.seq_lens}, "
            f"contiguous reserves max_len={args.max_len or model.max_positions}, "
            f"paged uses {args.block_size}-token blocks",
            f"{'dtype':<{dtype_width}} {'used':>12} {'contiguous':>12} {'(used %)':>9} {'paged':>12} {'(used %)':>9}",
        ]
        for r in rows:
            res = r.reservation
            lines.append(
                f"{r.dtype:<{dtype_width}} {_human(res['used_bytes']):>12} {_human(res['contiguous_bytes']):>12} "
                f"{100 * res['contiguous_utilization']:>8.1f}% {_human(res['paged_bytes']):>12} "
                f"{100 * res['paged_utilization']:>8.1f}%"
            )
    return "\n".join(lines)


def cmd_plan(args) -> int:
    dtypes = list_dtypes() if args.dtype == "all" else [args.dtype]
    rows = plan(
        args.model, dtypes, args.memory_gib * GIB, tp=args.tp, utilization=args.utilization,
        seq_lens=args.seq_lens, max_len=args.max_len, block_size=args.block_size,
    )
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_plan(rows, args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvlab", description="kvlab command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "plan",
        help="KV cache memory planner",
        description="Bytes per token, tokens that fit after the weights, and the memory a batch "
        "reserves contiguously vs paged, for a real model's shape.",
    )
    p.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    p.add_argument("--dtype", default="all", help=f"KV dtype: all, {', '.join(list_dtypes())}")
    p.add_argument("--memory-gib", type=_positive(float), default=80.0, help="memory per rank, GiB (default 80)")
    p.add_argument("--utilization", type=_positive(float), default=0.9,
                   help="fraction of memory the engine may use, as vLLM's gpu_memory_utilization (default 0.9)")
    p.add_argument("--tp", type=_positive(int), default=1, help="tensor-parallel ranks (default 1)")
    p.add_argument("--seq-lens", type=_int_list, default=_int_list(DEFAULT_SEQ_LENS),
                   help=f"comma-separated lengths of a batch (default {DEFAULT_SEQ_LENS})")
    p.add_argument("--max-len", type=_positive(int), default=None,
                   help="tokens a contiguous cache reserves per sequence (default: the model's max_positions)")
    p.add_argument("--block-size", type=_positive(int), default=16, help="paged block size in tokens (default 16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    b = sub.add_parser(
        "bench",
        help="time every stage's ops against baselines",
        description="For each stage and op: shapes, bytes moved, median time after warm-up, GB/s "
        "and speedups against baselines run in the same process on the same data (torch SDPA, "
        "gather-then-SDPA, FP16 vs INT8, unfused vs fused, the other backend). On a GPU: CUDA "
        "events, L2 flushed between runs, fraction of the measured copy bandwidth. On the CPU only "
        "the ratios are meaningful.",
    )
    b.add_argument("--stage", action="append", metavar="STAGE",
                   help="stage(s) to run, repeatable or comma-separated: paging, quant, rope, "
                   "fused_write, attention (default: all)")
    b.add_argument("--backend", choices=("numpy", "cuda", "torch"), default="numpy",
                   help="implementation to time (default numpy); cuda = Numba kernels (GPU, else the "
                   "simulator at smoke size), torch = kvlab's torch ops (mps, cuda or cpu)")
    b.add_argument("--size", choices=("smoke", "medium", "real"), default=None,
                   help="smoke: tiny shapes (CI, simulator); medium: 4 x 4k cached tokens and a "
                   "2k-token prefill, shapes a CPU runs in seconds; real: the GPU target, 8 x 32k "
                   "cached tokens, 8 kv heads, GQA 4, head_dim 128, 4k-token prefill (default: "
                   "real for cuda on a GPU, else smoke)")
    b.add_argument("--json", metavar="FILE", help="also write the rows and metadata to FILE as JSON")
    b.add_argument("--warmup", type=_non_negative_int, default=None,
                   help="untimed calls first (default 1; 2 on a GPU)")
    b.add_argument("--repeats", type=_positive(int), default=None,
                   help="timed runs per measurement (default 10; 20 on a GPU; fewer when one run is slow)")
    b.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    b.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args) -> int:
    from kvlab.bench import cmd_bench as run  # imports numba/torch only when asked to bench

    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad model, dtype or numbers: one clear line, no traceback
        parser.exit(2, f"python -m kvlab {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
