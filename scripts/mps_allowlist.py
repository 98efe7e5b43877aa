"""Write ``kernels/mps/mps_allowlist.json``: the aten ops MPS can run, as the installed torch's own
files declare them (``kvlab.kernels.mps.allowlist`` says how they are read).

    python scripts/mps_allowlist.py          # (re)write the allowlist for the installed torch
    python scripts/mps_allowlist.py --check  # exit 1 if the stored one is for another torch

``tests/test_mps_safety.py`` fails while the stored allowlist was made for another torch version
(or build): after a torch upgrade, run this script and review the diff of the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

from kvlab.kernels.mps import allowlist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only say whether the stored allowlist matches the installed torch")
    args = parser.parse_args(argv)
    if args.check:
        why = allowlist.stale(allowlist.load())
        print(why or f"{allowlist.ALLOWLIST_FILE} matches torch {allowlist.torch_provenance()}")
        return 1 if why else 0
    made = allowlist.build()
    with open(allowlist.ALLOWLIST_FILE, "w", encoding="utf-8") as f:
        json.dump(made, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"wrote {allowlist.ALLOWLIST_FILE}: {len(made['ops'])} ops, "
          f"{len(made['excluded'])} exclusions, torch {made['provenance']['torch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
