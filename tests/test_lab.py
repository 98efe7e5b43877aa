"""`make lab` works: JupyterLab from the venv starts headless, serves /lab and the 00 notebook."""
import json
import os
from pathlib import Path

import pytest

from kvlab.headless_lab import running_lab

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_jupyterlab_serves_lab_and_the_tour_notebook(tmp_path):
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_CONFIG_DIR": str(tmp_path)}
    with running_lab(ROOT / "notebooks", env, tmp_path / "server.log", start_s=90) as lab:
        page = lab.api("GET", "/lab")
        assert b"JupyterLab" in page
        notebook = json.loads(lab.api("GET", "/api/contents/00_tour.ipynb"))
        assert notebook["type"] == "notebook"
        assert notebook["content"]["cells"], "the tour notebook is empty"


def test_running_lab_says_why_it_did_not_start(tmp_path):
    """A server that exits at once (here: told to serve a folder that does not exist) is a
    RuntimeError with the end of its log, not a hang."""
    with pytest.raises(RuntimeError, match="(?s)JupyterLab did not start.*missing"):
        with running_lab(tmp_path, dict(os.environ), tmp_path / "server.log", start_s=60,
                         extra_args=[f"--notebook-dir={tmp_path / 'missing'}"]):
            pass
