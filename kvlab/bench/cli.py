"""``python -m kvlab bench``'s subcommand: run, print the report, save the JSON, and on a SIGTERM
keep what was measured."""
from __future__ import annotations

import json
import signal
from typing import Any

from kvlab.bench.report import format_report
from kvlab.bench.runner import Interrupted, run_bench


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def cmd_bench(args: Any) -> int:
    """The ``bench`` subcommand (``kvlab.__main__`` parses the arguments). A SIGTERM or Ctrl-C
    ends the run early but still prints and saves the rows measured so far (exit status 1)."""
    stages = None
    if args.stage:
        stages = [s.strip() for part in args.stage for s in part.split(",") if s.strip()]
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        result = run_bench(args.backend, stages, args.size, args.warmup, args.repeats, args.quiet)
    finally:  # printing and saving what was measured are not to be cut short by a late SIGTERM
        signal.signal(signal.SIGTERM, previous)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
    return 1 if any(n.startswith("interrupted (") for n in result["notes"]) else 0
