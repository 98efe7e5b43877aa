"""Re-execute the course notebooks in one step and save them with their outputs.

    python scripts/run_notebooks.py                 # every notebook in notebooks/
    python scripts/run_notebooks.py 01_paging 05    # some (name or number prefix)

Each notebook runs top to bottom in a fresh kernel, as a learner opening it sees it: Numba's CUDA
simulator, and exercise stubs left unfilled (``KVLAB_SOLUTIONS`` unset, so each checker prints its
"not implemented yet" verdict). Before saving, the script checks what a reader would see:

- no error output (a cell that raised);
- no path of this machine (the repository's folder, the home folder, site-packages) and no
  warning in any output;

and it writes one kernelspec, the one ipykernel installs, so JupyterLab opens every notebook
unmodified. It prints each notebook's run time (the course promises well under a minute each on
2 CPU cores). Exit status 1 when any notebook fails a check (that notebook is not saved).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
TIMEOUT_S = 600  # per cell


def _forbidden_patterns() -> list[re.Pattern]:
    """Text that must not appear in a saved output: this machine's paths, warnings."""
    paths = {str(ROOT), str(Path.home()), "site-packages"}
    return [re.compile(re.escape(p)) for p in paths] + [re.compile(r"\w*Warning\b")]


def _output_text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return "\n".join(str(data.get(kind, "")) for kind in ("text/plain", "text/html", "text/markdown"))


def problems(nb) -> list[str]:
    """What a reader should not see in the executed notebook ``nb``: one line per problem."""
    found = []
    patterns = _forbidden_patterns()
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {index}: {output.get('ename')}: {output.get('evalue')}")
                continue
            text = _output_text(output)
            for pattern in patterns:
                match = pattern.search(text)
                if match:
                    line = next(ln for ln in text.splitlines() if match.group(0) in ln)
                    found.append(f"cell {index}: output shows {match.group(0)!r}: {line.strip()[:160]}")
    return found


def run(path: Path) -> tuple[float, list[str]]:
    """Execute ``path`` in place (saved only when it has no problems); return (seconds, problems)."""
    nb = nbformat.read(path, as_version=4)
    env_before = dict(os.environ)
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    os.environ.pop("KVLAB_SOLUTIONS", None)  # the learner's view: stubs stay stubs
    try:
        start = time.perf_counter()
        # No widget state in the file: each explorer's output carries a PNG of its default
        # figure for readers without a kernel, and the state would store every picture twice.
        NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", store_widget_state=False,
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        seconds = time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    found = problems(nb)
    if not found:
        nb.metadata["kernelspec"] = dict(KERNELSPEC)
        nbformat.write(nb, path)
    return seconds, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names or prefixes (default: all)")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.names:
        paths = [p for p in paths if any(p.stem.startswith(n) for n in args.names)]
        if not paths:
            parser.error(f"no notebook matches {args.names}")
    failed = False
    for path in paths:
        seconds, found = run(path)
        status = "saved" if not found else "NOT saved"
        print(f"{path.name:32s} {seconds:6.1f} s  {status}", flush=True)
        for line in found:
            print(f"    {line}")
        failed |= bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
