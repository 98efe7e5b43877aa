"""The notebooks on disk are what a reader sees: each was run top to bottom in one fresh kernel
by ``scripts/run_notebooks.py`` (so no saved output is older than the code beside it), shows no
error, no path of the machine it ran on and no warning, and opens in JupyterLab unmodified."""
import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts/run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_saved_in_one_run_from_the_top(path):
    nb = nbformat.read(path, as_version=4)
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: cells were not run once each, in order, in one kernel "
        f"(run: python scripts/run_notebooks.py {path.stem})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_error_path_or_warning_in_the_outputs(path):
    assert run_notebooks.problems(nbformat.read(path, as_version=4)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_kernelspec_is_the_one_ipykernel_installs(path):
    assert nbformat.read(path, as_version=4).metadata.kernelspec == run_notebooks.KERNELSPEC


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_nbval_markers_are_cell_tags_not_comments(path):
    """A learner reads the code; nbval reads the tags (nbval-check-output, nbval-ignore-output)."""
    nb = nbformat.read(path, as_version=4)
    marked = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "# NBVAL_" in c.source]
    assert marked == [], f"{path.name}: cells {marked} carry comment markers"
    assert any("nbval-check-output" in c.metadata.get("tags", []) for c in nb.cells)


def test_problems_are_found():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr",
                                                  text=f"{ROOT}/kvlab/x.py:3: UserWarning: hm")]
    found = run_notebooks.problems(nb)
    assert any(str(ROOT) in line for line in found) and any("Warning" in line for line in found)
    nb.cells[0].outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="bad",
                                                  traceback=[])]
    assert run_notebooks.problems(nb) == ["cell 0: ValueError: bad"]
